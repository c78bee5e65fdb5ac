"""
Bounds on the cost of password checks: a small pool of checks with a short,
deadline-bounded queue, and a budget of failed logins over all clients.

An Argon2 check costs a tenth of a CPU-second and tens of MiB by design.  The
per-address rate limit (``net/ratelimit``) bounds what one address asks, but a
handful of addresses together could still queue checks without bound: every
uncached login then waited behind all of them, seconds and then tens of
seconds.  Here:

- L{CheckPool}: at most C{workers} checks run at once, at most C{queue} wait
  behind them, and none waits longer than C{queue_timeout}.  Beyond the queue,
  or past the deadline, the check is refused with L{Overloaded} (503 with
  ``Retry-After``): at once and cheaply, so that accepted checks finish in a
  bounded time.
- L{FailureBudget}: a token bucket of failed logins over all clients.  Every
  check reserves one failure before it runs and gives it back when the
  password was right (or the check never ran), so that at most C{rate}
  failures a second (C{burst} at once) cost Argon2 work, whatever the number
  of addresses.  With the budget spent, new checks are refused at once
  (503 with ``Retry-After``).  Remembered successful logins
  (L{consoleproxy.clouds.passwords.PasswordVerifier}'s cache) never get here,
  so a user who is logged in keeps working during an attack.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from consoleproxy.errors import Overloaded
from consoleproxy.net.ratelimit import retry_after

T = TypeVar("T")


def default_workers() -> int:
    """
    Checks at once when not configured: half the cores this process may use, 1 to 4.

    argon2-cffi's default hashes (parallelism 4) already compute their lanes
    in threads: one check keeps more than one core busy, so more workers than
    half the cores add little speed and take the cores the reactor needs.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


@dataclass
class _Waiting:
    result: Deferred[Any]
    work: Callable[..., Any]
    args: tuple[Any, ...]
    timer: IDelayedCall | None = field(default=None)


class CheckPool:
    """
    Runs at most C{workers} jobs at once, queues at most C{queue} more for at
    most C{queue_timeout} seconds each, and refuses the rest with L{Overloaded}.

    @param clock: for the queue's deadlines.
    """

    def __init__(self, clock: IReactorTime, workers: int, queue: int, queue_timeout: float) -> None:
        if workers < 1 or queue < 0 or queue_timeout <= 0:
            raise ValueError("workers >= 1, queue >= 0 and queue_timeout > 0")
        self.clock = clock
        self.workers = workers
        self.queue = queue
        self.queue_timeout = queue_timeout
        self.running = 0
        self._waiting: deque[_Waiting] = deque()

    @property
    def waiting(self) -> int:
        """How many jobs wait for a worker now."""
        return len(self._waiting)

    def run(self, work: Callable[..., Deferred[T]], *args: Any) -> Deferred[T]:
        """
        Run C{work(*args)} when a worker is free; fire with its result.

        Fails at once with L{Overloaded} when the queue is full, and later
        when the job waited C{queue_timeout} seconds without a worker.
        """
        if self.running < self.workers:
            return self._start(work, args)
        if len(self._waiting) >= self.queue:
            return fail(
                Overloaded(
                    "the server is busy checking other passwords; "
                    f"retry in {retry_after(self.queue_timeout)} s",
                    retry_after=self.queue_timeout,
                )
            )
        entry = _Waiting(Deferred(), work, args)
        entry.timer = self.clock.callLater(self.queue_timeout, self._expired, entry)
        self._waiting.append(entry)
        return entry.result

    def _start(self, work: Callable[..., Deferred[T]], args: tuple[Any, ...]) -> Deferred[T]:
        self.running += 1
        done = maybeDeferred(work, *args)

        def finished(outcome: Any) -> Any:
            self.running -= 1
            self._next()
            return outcome

        return done.addBoth(finished)

    def _next(self) -> None:
        while self._waiting and self.running < self.workers:
            entry = self._waiting.popleft()
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            self._start(entry.work, entry.args).chainDeferred(entry.result)

    def _expired(self, entry: _Waiting) -> None:
        self._waiting.remove(entry)
        entry.result.errback(
            Overloaded(
                "the server is too busy checking passwords: "
                f"waited {self.queue_timeout:g} s; retry in {retry_after(self.queue_timeout)} s",
                retry_after=self.queue_timeout,
            )
        )


class FailureBudget:
    """
    How many failed logins the whole server pays Argon2 for: a token bucket
    that refills at C{rate} a second up to C{burst}.

    A check L{reserve}s a failure before it runs; L{give_back} returns it when
    the check did not fail (a right password, or no check at all).
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate > 0 and burst >= 1")
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self._level = float(burst)
        self._when = clock.seconds()

    def available(self) -> float:
        """Failures that may be reserved now (fractional)."""
        now = self.clock.seconds()
        self._level = min(float(self.burst), self._level + (now - self._when) * self.rate)
        self._when = now
        return self._level

    def reserve(self) -> float | None:
        """
        Reserve one failure.

        @return: C{None} when reserved, else the seconds until one is there.
        """
        level = self.available()
        if level < 1.0:
            return (1.0 - level) / self.rate
        self._level = level - 1.0
        return None

    def give_back(self) -> None:
        """Return a reserved failure that did not happen."""
        self._level = min(float(self.burst), self.available() + 1.0)

    def refusal(self, wait: float) -> Overloaded:
        """The error of a check refused because the budget is spent."""
        return Overloaded(
            "too many failed logins on this server just now; new logins are refused for a "
            f"while: retry in {retry_after(wait)} s",
            retry_after=wait,
        )
