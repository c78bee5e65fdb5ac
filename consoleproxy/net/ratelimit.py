"""
A per-client rate limit: a token bucket for each client address.

Every request that may check a password (the token API, the console page)
takes one token from its client's bucket; the bucket refills at C{rate} per
second up to C{burst}.  An empty bucket answers 429 with ``Retry-After``.
Argon2 makes a password check cost tens of milliseconds of CPU by design;
without a limit, one client could keep the server's password threads busy.

The table of buckets is bounded: the least recently seen clients are
forgotten first (a forgotten client starts again with a full bucket, which
costs an attacker with that many addresses nothing it could not get anyway).
"""

from __future__ import annotations

import math
from collections import OrderedDict

from twisted.internet.interfaces import IReactorTime


class RateLimiter:
    """Token buckets by key, on an injected clock."""

    def __init__(
        self, clock: IReactorTime, rate: float, burst: int, max_clients: int = 100_000
    ) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float | None:
        """
        Take a token from C{key}'s bucket.

        @return: C{None} when allowed, else the seconds until a token is there.
        """
        now = self.clock.seconds()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._remember(key, tokens - 1.0, now)
            return None
        self._remember(key, tokens, now)
        return (1.0 - tokens) / self.rate

    def _remember(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> int:
    """Whole seconds for a ``Retry-After`` header (at least 1)."""
    return max(1, math.ceil(seconds))


class LineThrottle:
    """
    Rate-limits a repeated log line per client, counting what it held back.

    Every refusal (a WebSocket turned away, a connection over its cap) is
    worth a log line, but a client that retries in a loop would write the
    same line thousands of times a second: each client gets a bucket of
    C{burst} lines refilled at C{rate} per second.  The first line let through
    after some were held back says how many (L{allow} returns the count), so
    the log still tells how much happened.

    Memory is bounded like L{RateLimiter}'s: at most C{max_clients} clients
    are remembered, the least recently seen forgotten first (with their
    count of suppressed lines, which is then never reported).
    """

    def __init__(
        self, clock: IReactorTime, rate: float = 0.2, burst: int = 5, max_clients: int = 10_000
    ) -> None:
        self._buckets = RateLimiter(clock, rate, burst, max_clients)
        self._suppressed: OrderedDict[str, int] = OrderedDict()
        self.max_clients = max_clients

    def allow(self, key: str) -> int | None:
        """
        Whether C{key}'s line may be logged now.

        @return: C{None}: hold it back (it is counted); else the number of
            lines held back since the last one let through (usually 0).
        """
        if self._buckets.take(key) is None:
            return self._suppressed.pop(key, 0)
        self._suppressed[key] = self._suppressed.pop(key, 0) + 1
        while len(self._suppressed) > self.max_clients:
            self._suppressed.popitem(last=False)
        return None

    def __len__(self) -> int:
        return max(len(self._buckets), len(self._suppressed))
