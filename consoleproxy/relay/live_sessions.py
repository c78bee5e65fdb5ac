"""
The open console sessions for the sessions API (L{ILiveSessions}): listing
them and ending one.

Without Redis, this process's L{SessionTable} is the truth (several workers
need Redis: C{server.workers} > 1 without C{cluster.redis} is refused at
start-up, so a process alone always sees every session).  With Redis, the
cluster's registry is: every process registers its open sessions there
(relay/cluster_sessions.py), renewed every 10 s with their byte counts,
viewers and recording; a listing reads it with a bounded C{SCAN}, and the
sessions this process holds are shown with their counts of this instant.
A kill ends a session held here at once; another process's goes through the
kill channel (Redis pub/sub), after a C{GET} of its record says it is open
(an unknown id is a 404, not a message nobody acts on).

A killed session closes with SESSION_CLOSED (523), WebSocket code 1002 and
the close reason ``523 ended by an administrator``; guacd is told
C{disconnect} (L{end_by_administrator}).

Bounds: a listing holds at most C{limit} sessions (C{relay.max_sessions}, the
cap of open sessions of one process, and of the cluster's leases); finding a
session by id scans the process's table (at most the same cap) once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from consoleproxy.cluster.holdings import worker_id
from consoleproxy.cluster.redis_client import RedisUnavailable
from consoleproxy.consoles import Identity
from consoleproxy.errors import CloudUnavailable, NotFound
from consoleproxy.interfaces import ILiveSessions, LiveSession
from consoleproxy.relay.cluster_sessions import ClusterSessions, end_by_administrator
from consoleproxy.relay.sessions import SessionTable


def _summary(session: Any, worker: str) -> LiveSession | None:
    """An open session of this process as the API lists it (C{None}: not open now)."""
    record = getattr(session, "record", None)
    if record is None or record.closed_at is not None or not record.session_id:
        return None
    if getattr(session, "state", None) != getattr(session, "STATE_OPEN", object()):
        return None  # closing already
    return LiveSession(
        id=record.session_id,
        user=record.user,
        vm=str(record.vm_id),
        type=record.console_type,
        zone=str(record.zone or ""),
        client=record.client,
        started=record.opened_at,
        bytes_to_browser=session.bytes_to_browser,
        bytes_from_browser=session.bytes_from_browser,
        viewers=record.viewers,
        recording=record.recording,
        worker=worker,
    )


@implementer(ILiveSessions)
class LiveSessions:
    """
    The relays' sessions, for the sessions API.

    @param table: this process's sessions (both relays).
    @param cluster: the cluster's side (C{None}: no Redis, this process alone).
    @param limit: the most sessions a listing holds.
    """

    def __init__(
        self, table: SessionTable, cluster: ClusterSessions | None = None, *, limit: int = 10000
    ) -> None:
        self.table = table
        self.cluster = cluster
        self.limit = limit
        self.worker = cluster.registry.worker if cluster is not None else worker_id()

    def _local(self, user: str | None) -> dict[str, LiveSession]:
        """This process's open sessions (of C{user} only, unless C{None})."""
        found = {}
        for session in self.table.sessions():
            record = getattr(session, "record", None)
            if record is None or (user is not None and record.user != user):
                continue
            summary = _summary(session, self.worker)
            if summary is not None:
                found[summary.id] = summary
        return found

    def listing(self, identity: Identity) -> Deferred[list[LiveSession]]:
        """See L{ILiveSessions.listing}."""

        def visible(sessions: list[LiveSession]) -> list[LiveSession]:
            mine = [s for s in sessions if identity.admin or s.user == identity.name]
            return sorted(mine, key=lambda s: (s.started, s.id))[: self.limit]

        local = self._local(None if identity.admin else identity.name)
        if self.cluster is None:
            return succeed(visible(list(local.values())))

        async def everywhere() -> list[LiveSession]:
            assert self.cluster is not None
            records = await self.cluster.registry.sessions(limit=self.limit)
            merged = {r.id: r for r in records}
            merged.update(local)  # this process's, with their counts of now
            return visible(list(merged.values()))

        return Deferred.fromCoroutine(everywhere()).addErrback(_unavailable)

    def end(self, identity: Identity, session_id: str, reason: str) -> Deferred[LiveSession]:
        """See L{ILiveSessions.end}: here at once, elsewhere by the kill channel."""
        for session in self.table.sessions():
            record = getattr(session, "record", None)
            if record is None or record.session_id != session_id:
                continue
            summary = _summary(session, self.worker)
            if summary is not None:
                end_by_administrator(session, reason)
                return succeed(summary)
        cluster = self.cluster
        if cluster is None:
            return _missing(session_id)

        def found(record: LiveSession | None) -> Deferred[LiveSession]:
            if record is None:
                return _missing(session_id)
            return cluster.kill_session(session_id, reason).addCallback(lambda _: record)

        return cluster.registry.record(session_id).addCallback(found).addErrback(_unavailable)


def _unavailable(failure: Failure) -> None:
    """Redis away: a 503 that says so (not where Redis is), rather than a 500."""
    failure.trap(RedisUnavailable)
    raise CloudUnavailable(
        "the cluster's shared state (Redis) is unavailable; retry shortly", retry_after=5.0
    )


def _missing(session_id: str) -> Deferred[Any]:
    return fail(NotFound(f"no open session {session_id}"))
