"""
What this process holds in Redis with an expiry, and renews while it lives.

Leases (L{leases}) and session records (L{registry}) work the same way: each
entry expires C{ttl} seconds after its last renewal, this process renews all
of its entries every C{refresh} seconds, a batch of L{BATCH} per script call
(a call's arguments and Redis's time in it stay bounded), and a process that
dies stops renewing, so its entries lapse by themselves.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoleproxy.cluster.redis_client import RedisClient, Script

#: Seconds an entry lives without a renewal (how long a dead process's entries stay).
TTL = 30.0
#: Seconds between renewals (a third of the TTL: two may fail before an entry lapses).
REFRESH = 10.0
#: Entries renewed by one script call: bounded arguments, bounded time in Redis
#: (a 500-entry lease renewal held Redis about 5 ms; 100 about 1 ms).
BATCH = 100


def worker_id() -> str:
    """This process's name in the cluster: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Holdings:
    """
    The renewal loop shared by this process's leases and session records.

    @param what: for the log line when a renewal fails.
    """

    log = Logger()
    what = "entries"

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        *,
        prefix: str,
        ttl: float,
        refresh: float,
        worker: str | None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.prefix = prefix
        self.ttl = ttl
        self.refresh_interval = refresh
        self.worker = worker or worker_id()
        self._loop = LoopingCall(self.renew)
        self._loop.clock = clock

    @property
    def ttl_ms(self) -> int:
        """The TTL in milliseconds, as Redis takes it."""
        return int(self.ttl * 1000)

    def start(self) -> None:
        """Start renewing this process's entries."""
        if not self._loop.running:
            self._loop.start(self.refresh_interval, now=False)

    def stop(self) -> None:
        """Stop renewing (this process's entries lapse after the TTL)."""
        if self._loop.running:
            self._loop.stop()

    def renew(self) -> Deferred[None]:
        """Renew every entry (subclasses say how, with L{_in_batches})."""
        raise NotImplementedError

    def _in_batches(
        self,
        script: Script,
        items: Sequence[Any],
        keys: Callable[[Sequence[Any]], list[str]],
        args: Callable[[Sequence[Any]], list[Any]],
    ) -> Deferred[None]:
        """
        Run C{script} over C{items}, L{BATCH} at a time; never fails (a failed
        renewal is logged, the next one tries again).  Without Redis it does
        nothing: the first renewal after the outage restores everything.
        """
        if not items or not self.client.available:
            return succeed(None)
        calls = []
        for start in range(0, len(items), BATCH):
            batch = items[start : start + BATCH]
            call = self.client.run(script, keys(batch), args(batch))
            calls.append(call.addErrback(self._renew_failed))
        return gatherResults(calls).addCallback(lambda _: None)

    def _renew_failed(self, failure: Failure) -> None:
        self.log.warn(
            "cluster: renewing {what} failed ({why})",
            what=self.what,
            why=failure.getErrorMessage(),
        )
