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
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from consoleproxy.cluster.holdings import REFRESH, TTL, Holdings
from consoleproxy.cluster.redis_client import RedisClient, Script
from consoleproxy.guacamole.status import GuacamoleError, Status

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
RENEW = Script(
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


class ClusterLeases(Holdings):
    """
    This process's side of the cluster-wide session caps.

    @param max_total: C{relay.max_sessions}, for the whole cluster.
    @param max_per_user: C{relay.max_sessions_per_user}, for the whole cluster.
    """

    what = "session leases"

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        *,
        max_total: int,
        max_per_user: int,
        prefix: str = "consoleproxy:",
        ttl: float = TTL,
        refresh: float = REFRESH,
        worker: str | None = None,
    ) -> None:
        super().__init__(client, clock, prefix=prefix, ttl=ttl, refresh=refresh, worker=worker)
        self.max_total = max_total
        self.max_per_user = max_per_user
        self._ids = itertools.count(1)
        # Host and pid alone are not unique: two ClusterLeases in one process,
        # or containers that share a host name and each run as pid 1, would
        # make the same lease ids and overwrite each other's slots.
        self._instance = os.urandom(4).hex()
        self._held: dict[str, Lease] = {}

    @property
    def global_key(self) -> str:
        """The sorted set of every lease in the cluster."""
        return f"{self.prefix}leases"

    def user_key(self, user: str) -> str:
        """The sorted set of C{user}'s leases."""
        return f"{self.prefix}leases:user:{user}"

    def __len__(self) -> int:
        return len(self._held)

    def acquire(self, user: str) -> Deferred[Lease]:
        """
        Take a slot for a session of C{user}.

        @return: a Deferred firing with the L{Lease}; failing with
            L{SessionCapReached} at a cap, L{RedisUnavailable} without Redis.
        """
        lease = Lease(f"{self.worker}:{self._instance}:{next(self._ids)}", user)
        keys = [self.global_key, self.user_key(user)]
        args = [lease.id, self.ttl_ms, self.max_total, self.max_per_user]

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
            self.log.info(
                "cluster: a session's slot comes back by itself within {ttl:g} s ({why})",
                ttl=self.ttl,
                why=failure.getErrorMessage(),
            )

        return d.addCallbacks(lambda _: None, unreleased)

    def renew(self) -> Deferred[None]:
        """
        Push every held lease's deadline C{ttl} seconds forward; a lease that
        had lapsed (Redis was away) is added again: its session is alive.
        """
        return self._in_batches(
            RENEW,
            list(self._held.values()),
            lambda batch: [self.global_key] + [self.user_key(lease.user) for lease in batch],
            lambda batch: [self.ttl_ms] + [lease.id for lease in batch],
        )
