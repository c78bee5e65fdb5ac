"""
Session caps across the cluster: leases that a dead process cannot keep.

Every open session holds a lease: its id is a member of two sorted sets, the
global one (C{<prefix>leases}) and its user's (C{<prefix>leases:user:<name>}),
scored by the lease's deadline in milliseconds of Redis's clock (C{TIME}, so
the hosts' clocks do not matter).  One Lua script takes a lease atomically:
drop the members past their deadline (C{ZREMRANGEBYSCORE}), count
(C{ZCARD}), refuse at the cap, add.  The process that holds leases pushes
their deadlines forward every C{refresh} seconds (one script per 100 of
them); a process that dies stops doing so and its slots come back C{ttl}
seconds later at most.  A session whose lease had lapsed anyway (Redis was
away longer than C{ttl}) is counted again by the next refresh: it is alive,
so it takes a slot, even if that puts the count over a cap for a while.

The caps are C{relay.max_sessions} and C{relay.max_sessions_per_user}, the
same keys and statuses as the one-process table (relay/sessions.py):
SERVER_BUSY (513) when the cluster is full, CLIENT_TOO_MANY (797) when the
user is.  Redis unavailable: L{RedisUnavailable} (512); leases already held
stay held in this process, and are refreshed again once Redis is back.

The keys of several users are touched by one script, so the sets must live
on one Redis (a Redis Cluster would need one hash tag for all of them).
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoleproxy.cluster.redis_client import RedisClient, RedisUnavailable, Script
from consoleproxy.guacamole.status import GuacamoleError, Status

#: Seconds a lease lives without a refresh (how long a dead process's slots stay taken).
LEASE_TTL = 30.0
#: Seconds between refreshes (a third of the TTL: two may fail before a lease lapses).
LEASE_REFRESH = 10.0
#: Leases refreshed by one script call: bounded arguments, bounded time in Redis.
REFRESH_BATCH = 100

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

ACQUIRE = Script(
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 'global' end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 'user' end
local deadline = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 'ok'
"""
)

#: KEYS: global set, then one user set per lease; ARGV: ttl ms, then the lease ids.
REFRESH = Script(
    _NOW_MS
    + """
local deadline = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], deadline, ARGV[i])
  redis.call('ZADD', KEYS[i], deadline, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""
)

RELEASE = Script(
    """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
"""
)


class SessionCapReached(GuacamoleError):
    """
    A lease refused: C{cap} is C{"global"} (SERVER_BUSY, 513) or C{"user"}
    (CLIENT_TOO_MANY, 797), as the one-process session table says it.
    """

    def __init__(self, cap: str, limit: int) -> None:
        if cap == "user":
            super().__init__(
                Status.CLIENT_TOO_MANY, f"user already has the maximum of {limit} sessions"
            )
        else:
            super().__init__(
                Status.SERVER_BUSY, f"the cluster holds its maximum of {limit} sessions"
            )
        self.cap = cap


@dataclass(frozen=True)
class Lease:
    """One session's slot: give it back with L{ClusterLeases.release}."""

    id: str
    user: str


def worker_id() -> str:
    """This process's name in the cluster: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ClusterLeases:
    """
    This process's side of the cluster-wide session caps.

    @param max_total: C{relay.max_sessions}, for the whole cluster.
    @param max_per_user: C{relay.max_sessions_per_user}, for the whole cluster.
    """

    log = Logger()

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        *,
        max_total: int,
        max_per_user: int,
        prefix: str = "consoleproxy:",
        ttl: float = LEASE_TTL,
        refresh: float = LEASE_REFRESH,
        worker: str | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.max_total = max_total
        self.max_per_user = max_per_user
        self.prefix = prefix
        self.ttl = ttl
        self.refresh_interval = refresh
        self.worker = worker or worker_id()
        self._ids = itertools.count(1)
        self._held: dict[str, Lease] = {}
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = clock

    @property
    def global_key(self) -> str:
        """The sorted set of every lease in the cluster."""
        return f"{self.prefix}leases"

    def user_key(self, user: str) -> str:
        """The sorted set of C{user}'s leases."""
        return f"{self.prefix}leases:user:{user}"

    def start(self) -> None:
        """Start refreshing this process's leases."""
        if not self._loop.running:
            self._loop.start(self.refresh_interval, now=False)

    def stop(self) -> None:
        """Stop refreshing (a stopped process's leases lapse after the TTL)."""
        if self._loop.running:
            self._loop.stop()

    def __len__(self) -> int:
        return len(self._held)

    def acquire(self, user: str) -> Deferred[Lease]:
        """
        Take a slot for a session of C{user}.

        @return: a Deferred firing with the L{Lease}; failing with
            L{SessionCapReached} at a cap, L{RedisUnavailable} without Redis.
        """
        lease = Lease(f"{self.worker}:{next(self._ids)}", user)
        ttl_ms = int(self.ttl * 1000)
        keys = [self.global_key, self.user_key(user)]
        args = [lease.id, ttl_ms, self.max_total, self.max_per_user]

        def taken(reply: Any) -> Lease:
            if reply == "global":
                raise SessionCapReached("global", self.max_total)
            if reply == "user":
                raise SessionCapReached("user", self.max_per_user)
            self._held[lease.id] = lease
            return lease

        return self.client.run(ACQUIRE, keys, args).addCallback(taken)

    def release(self, lease: Lease) -> Deferred[None]:
        """
        Give C{lease}'s slot back.  Never fails: without Redis, the slot comes
        back by itself after the TTL (this process stops refreshing it now).
        """
        if self._held.pop(lease.id, None) is None:
            return succeed(None)
        d = self.client.run(RELEASE, [self.global_key, self.user_key(lease.user)], [lease.id])

        def unreleased(failure: Any) -> None:
            failure.trap(RedisUnavailable)
            self.log.info(
                "cluster: a session's slot comes back by itself within {ttl:g} s ({why})",
                ttl=self.ttl,
                why=failure.getErrorMessage(),
            )

        return d.addCallbacks(lambda _: None, unreleased)

    def refresh(self) -> Deferred[None]:
        """Push every held lease's deadline C{ttl} seconds forward (batched)."""
        if not self._held:
            return succeed(None)
        if not self.client.available:
            return succeed(None)  # once back, the next tick re-adds them all
        leases = list(self._held.values())
        ttl_ms = int(self.ttl * 1000)
        calls = []
        for start in range(0, len(leases), REFRESH_BATCH):
            batch = leases[start : start + REFRESH_BATCH]
            keys = [self.global_key] + [self.user_key(lease.user) for lease in batch]
            calls.append(self.client.run(REFRESH, keys, [ttl_ms] + [lease.id for lease in batch]))
        for call in calls:
            call.addErrback(self._refresh_failed)
        return gatherResults(calls).addCallback(lambda _: None)

    def _refresh_failed(self, failure: Failure) -> None:
        self.log.warn(
            "cluster: refreshing session leases failed ({why})", why=failure.getErrorMessage()
        )
