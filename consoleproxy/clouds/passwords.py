"""
Password hashes for the embedded inventory's users (Argon2id, argon2-cffi).

Verification is slow on purpose, so it runs in the reactor's thread pool,
at most a few at a time (each Argon2 check takes tens of MiB of memory),
with a short queue behind them and a budget of failed logins over all
clients (L{consoleproxy.clouds.logins}: beyond them, 503 with
``Retry-After``, at once).  Unknown users are checked against a dummy hash
so that a wrong user name costs as much time as a wrong password.

A successful check is remembered for a short while (C{cache_seconds} after
its last use), so that a user opening console after console pays for Argon2
once, not per token.  What is remembered is an HMAC, under a key made at start-up and
never stored, of the hash and the password: no password is kept, a changed
hash in the inventory no longer matches, and failures are never remembered
(the rate limits and the failed-login budget are their answer).  A
remembered login costs no check, so it is never queued nor refused for want
of budget: a user who is logged in keeps working while others hammer.

``consoleproxy passwd`` prints a hash for the inventory file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from consoleproxy.clouds.logins import CheckPool, FailureBudget

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("consoleproxy: no such user")


def hash_password(password: str) -> str:
    """Hash a password for the inventory (Argon2id, argon2-cffi's defaults)."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """
    Check a password in constant time for its hash; C{None} means no such user.

    A malformed hash counts as a mismatch (and costs a dummy check).
    """
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and (
            password_hash is not None
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class PasswordVerifier:
    """
    Runs L{verify_password} off the reactor thread, a bounded number at once.

    @param run_in_thread: C{f(callable, *args) -> Deferred}; by default the
        reactor's thread pool.
    @param cache_seconds: how long a successful check is remembered after its
        last use; 0: never.
    @param concurrency: checks running at once (when no C{pool} is given).
    @param pool: runs the checks: C{concurrency} workers and a queue of
        L{DEFAULT_QUEUE} waiting at most L{DEFAULT_QUEUE_TIMEOUT} s by default.
    @param budget: failed logins over all clients; C{None}: no such budget.
    """

    #: Most successful checks remembered at once (the oldest are forgotten).
    MAX_REMEMBERED = 10000
    #: Checks that may wait for a worker, and for how long (seconds), by default.
    DEFAULT_QUEUE = 16
    DEFAULT_QUEUE_TIMEOUT = 2.0

    def __init__(
        self,
        reactor: Any,
        concurrency: int = 2,
        run_in_thread: Callable[..., Deferred[bool]] | None = None,
        cache_seconds: float = 0.0,
        *,
        pool: CheckPool | None = None,
        budget: FailureBudget | None = None,
    ) -> None:
        self._clock = reactor
        self._cache_seconds = cache_seconds
        self._key = os.urandom(32)
        self._remembered: OrderedDict[bytes, float] = OrderedDict()
        self._checking: dict[bytes, list[Deferred[bool]]] = {}
        if run_in_thread is None:

            def run_in_thread(f: Callable[..., bool], *args: Any) -> Deferred[bool]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self._run = run_in_thread
        self.pool = pool or CheckPool(
            reactor, concurrency, self.DEFAULT_QUEUE, self.DEFAULT_QUEUE_TIMEOUT
        )
        self.budget = budget

    def verify(self, password_hash: str | None, password: str) -> Deferred[bool]:
        """
        Fire with whether C{password} matches C{password_hash}.

        Fails with L{consoleproxy.errors.Overloaded} when the check cannot be
        made now (the queue is full, or the failed-login budget is spent).
        """
        if password_hash is None or self._cache_seconds <= 0:
            return self._check(password_hash, password)
        mac = hmac.new(
            self._key, password_hash.encode() + b"\0" + password.encode(), hashlib.sha256
        ).digest()
        now = self._clock.seconds()
        expires = self._remembered.get(mac)
        if expires is not None and expires > now:
            # Remembered since its last use: a user who keeps working is not checked again
            # (nor refused when the failed-login budget is spent), however long the session.
            self._remembered[mac] = now + self._cache_seconds
            self._remembered.move_to_end(mac)
            return succeed(True)
        waiting = self._checking.get(mac)
        if waiting is not None:
            # The same check is under way (a burst of requests): share its answer.
            answer: Deferred[bool] = Deferred()
            waiting.append(answer)
            return answer
        self._checking[mac] = []

        def remember(ok: bool) -> bool:
            if ok:
                self._remembered.pop(mac, None)
                self._remembered[mac] = self._clock.seconds() + self._cache_seconds
                while len(self._remembered) > self.MAX_REMEMBERED:
                    self._remembered.popitem(last=False)
            return ok

        def share(outcome: Any) -> Any:
            for answer in self._checking.pop(mac, []):
                if isinstance(outcome, Failure):
                    answer.errback(outcome)
                else:
                    answer.callback(outcome)
            return outcome

        return self._check(password_hash, password).addCallback(remember).addBoth(share)

    def _check(self, password_hash: str | None, password: str) -> Deferred[bool]:
        """One Argon2 check, within the failed-login budget and the pool's bounds."""
        budget = self.budget
        if budget is None:
            return self.pool.run(self._run, verify_password, password_hash, password)
        wait = budget.reserve()
        if wait is not None:
            return fail(budget.refusal(wait))

        def settle(outcome: Any) -> Any:
            if outcome is not False:  # right, or never checked: no failure to pay for
                budget.give_back()
            return outcome

        return self.pool.run(self._run, verify_password, password_hash, password).addBoth(settle)
