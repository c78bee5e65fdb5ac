"""
The live sessions of the whole cluster, and ending one from anywhere.

Each process registers its sessions: C{<prefix>session:<id>} holds a JSON
record (who, which VM and console type, zone, client address, which worker,
since when) with an expiry of C{ttl} seconds that the process renews every
C{refresh} seconds (one script per 100 sessions); a dead process's records
vanish after the TTL.  L{SessionRegistry.sessions} lists them with a bounded
C{SCAN} (for the admin API of the sharing/recording issue).

Ending a session held by another process: L{SessionRegistry.publish_kill}
publishes C{{"session": id, "reason": ...}} on C{<prefix>kill}; every
process subscribes (L{SessionRegistry.subscribe}) and the handler of the
process that holds the session closes it (the others ignore ids they do not
hold).  Pub/sub does not queue: a process that was disconnected when the
message went out does not get it, so the caller should check with
L{sessions} that the record went away, and publish again if not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from consoleproxy.cluster.holdings import REFRESH, TTL, Holdings
from consoleproxy.cluster.redis_client import RedisClient, Script
from consoleproxy.interfaces import LiveSession

#: KEYS: the records; ARGV: ttl ms, then the records' JSON in the same order.
RENEW = Script(
    """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
end
return #KEYS
"""
)


class SessionRegistry(Holdings):
    """This process's part of the registry of live sessions."""

    what = "session records"

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        *,
        prefix: str = "consoleproxy:",
        ttl: float = TTL,
        refresh: float = REFRESH,
        worker: str | None = None,
    ) -> None:
        super().__init__(client, clock, prefix=prefix, ttl=ttl, refresh=refresh, worker=worker)
        self.channel = f"{prefix}kill"
        self._mine: dict[str, LiveSession] = {}
        #: Brings a record up to date before each renewal (bytes, viewers,
        #: recording): the renewal writes every record anyway, so the listing
        #: is at most C{refresh} seconds stale at no extra Redis command.
        self.refresher: Callable[[LiveSession], LiveSession] | None = None

    def key(self, session_id: str) -> str:
        """The Redis key of a session's record."""
        return f"{self.prefix}session:{session_id}"

    def register(
        self, session_id: str, *, user: str, vm: str, type: str, zone: str, client: str
    ) -> Deferred[LiveSession]:
        """
        Record a session that has just opened, as held by this worker, now.

        The record is kept (and renewed) even if this first write fails:
        the next renewal writes it once Redis is back.
        """
        session = LiveSession(
            session_id, user, vm, type, zone, client, self.clock.seconds(), worker=self.worker
        )
        self._mine[session_id] = session
        d = self.client.execute("SET", self.key(session_id), session.to_json(), "PX", self.ttl_ms)
        return d.addCallback(lambda _: session)

    def unregister(self, session_id: str) -> Deferred[None]:
        """Forget a session that has ended (never fails: the record lapses anyway)."""
        if self._mine.pop(session_id, None) is None:
            return succeed(None)
        d = self.client.execute("DEL", self.key(session_id))
        return d.addCallbacks(lambda _: None, lambda _: None)

    def renew(self) -> Deferred[None]:
        """Write every record of this process again, with a fresh expiry."""
        if self.refresher is not None:
            for session_id, session in list(self._mine.items()):
                try:
                    self._mine[session_id] = self.refresher(session)
                except Exception:
                    self.log.failure("cluster: refreshing a session record failed")
        return self._in_batches(
            RENEW,
            list(self._mine.values()),
            lambda batch: [self.key(s.id) for s in batch],
            lambda batch: [self.ttl_ms] + [s.to_json() for s in batch],
        )

    async def sessions(self, limit: int = 10_000, count: int = 500) -> list[LiveSession]:
        """
        The live sessions of the whole cluster, at most C{limit} of them.

        C{SCAN} in steps of C{count} keys (Redis stays responsive), then
        C{MGET}; records that expired in between are skipped.
        """
        pattern = self.key("*")
        cursor, keys = "0", []
        for _ in range(max(1, limit // count) * 4 + 4):  # bounded even if Redis misbehaves
            cursor, found = await self.client.execute(
                "SCAN", cursor, "MATCH", pattern, "COUNT", count
            )
            keys += found
            if str(cursor) == "0" or len(keys) >= limit:
                break
        keys = sorted(set(keys))[:limit]
        found_sessions = []
        for start in range(0, len(keys), count):
            values = await self.client.execute("MGET", *keys[start : start + count])
            for value in values:
                if value is None:
                    continue
                try:
                    found_sessions.append(LiveSession.from_json(value))
                except (ValueError, TypeError):
                    continue
        return found_sessions

    def record(self, session_id: str) -> Deferred[LiveSession | None]:
        """One session's record, wherever it runs (C{None}: no such open session)."""

        def read(value: Any) -> LiveSession | None:
            if value is None:
                return None
            try:
                return LiveSession.from_json(value)
            except (ValueError, TypeError):
                return None

        return self.client.execute("GET", self.key(session_id)).addCallback(read)

    def subscribe(self, handler: Callable[[str, str], None]) -> None:
        """
        Call C{handler(session_id, reason)} for every kill request in the
        cluster; the handler ends the session if this process holds it.
        """

        def received(message: str) -> None:
            try:
                data: Any = json.loads(message)
                session_id, reason = data["session"], data.get("reason", "")
                if not isinstance(session_id, str) or not isinstance(reason, str):
                    raise TypeError("not strings")
            except (ValueError, TypeError, KeyError):
                self.log.warn("cluster: ignored a malformed kill message")
                return
            handler(session_id, reason)

        self.client.subscribe(self.channel, received)

    def holds(self, session_id: str) -> bool:
        """Whether this process holds C{session_id} (for the kill handler)."""
        return session_id in self._mine

    def publish_kill(self, session_id: str, reason: str) -> Deferred[int]:
        """Ask whichever process holds C{session_id} to end it; the subscribers reached."""
        message = json.dumps({"session": session_id, "reason": reason})
        return self.client.publish(self.channel, message)
