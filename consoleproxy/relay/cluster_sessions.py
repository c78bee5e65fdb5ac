"""
This process's sessions in the cluster's shared state (Redis): caps, live
sessions and ending a session from another process.

Built by tap.py only when C{cluster.redis} is configured; without it the
relays never see one and keep their in-process table alone.

  - Caps: a session takes a lease (L{ClusterLeases.acquire}) right after
    its place in the process's L{SessionTable} (which stays, for the drain
    and the local count); the lease is given back whenever the place is.
    Refusals keep the table's statuses: SERVER_BUSY (513) for the cluster,
    CLIENT_TOO_MANY (797) for a user; Redis away: SERVER_ERROR (512).
  - Live sessions: an open session is registered (who, VM, type, zone,
    client, worker, since when) and unregistered when it ends.
  - Kills: every process subscribes to the kill channel; the one holding the
    named session closes it with SESSION_CLOSED (523) and WebSocket code
    1002, the close reason ``523 ended by an administrator`` (the console
    page says so), guacd being told C{disconnect}.  L{kill_session} is the
    plumbing of the sessions API (relay/live_sessions.py).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from consoleproxy.cluster.leases import ClusterLeases, Lease
from consoleproxy.cluster.registry import LiveSession, SessionRegistry
from consoleproxy.guacamole.status import Status
from consoleproxy.net.logsafe import log_safe

#: The words after the status in a killed session's close reason.
ENDED_BY_ADMIN = "ended by an administrator"
#: The status a killed session is closed with (WebSocket code 1002).
KILL_STATUS = Status.SESSION_CLOSED


class Killable(Protocol):
    """What a kill needs of a session."""

    def end_by_request(self, status: Status, message: str, words: str = "") -> None:
        """Close the session (browser and upstream) with C{status}."""


def end_by_administrator(session: Killable, reason: str) -> None:
    """
    Close C{session} as a kill does: L{KILL_STATUS}, the close reason
    ``523 ended by an administrator``; C{reason} (who asked, why) goes to the
    close log line and the audit log's C{session_closed} event.
    """
    message = f"{ENDED_BY_ADMIN}: {reason}" if reason else ENDED_BY_ADMIN
    session.end_by_request(KILL_STATUS, message, ENDED_BY_ADMIN)


class ClusterSessions:
    """
    The relays' side of the cluster: leases, the registry, kills.

    @ivar kill_status: the status a killed session is closed with.
    """

    log = Logger()
    kill_status = KILL_STATUS

    def __init__(self, leases: ClusterLeases, registry: SessionRegistry) -> None:
        self.leases = leases
        self.registry = registry
        self._live: dict[str, Killable] = {}
        registry.subscribe(self._kill_requested)
        registry.refresher = self._refreshed

    def _refreshed(self, record: LiveSession) -> LiveSession:
        """C{record} with the held session's bytes, viewers and recording now."""
        session = self._live.get(record.id)
        if session is None:
            return record
        live = getattr(session, "record", None)
        return replace(
            record,
            bytes_to_browser=getattr(session, "bytes_to_browser", 0),
            bytes_from_browser=getattr(session, "bytes_from_browser", 0),
            viewers=getattr(live, "viewers", 0),
            recording=getattr(live, "recording", None),
        )

    def acquire(self, user: str) -> Deferred[Lease]:
        """A cluster-wide slot for a session of C{user} (see L{ClusterLeases.acquire})."""
        return self.leases.acquire(user)

    def release(self, lease: Lease) -> None:
        """Give a slot back (never fails: it lapses by itself otherwise)."""
        self.leases.release(lease)

    def new_id(self) -> str:
        """A session id unique in the cluster."""
        return uuid.uuid4().hex

    def opened(
        self,
        session_id: str,
        session: Killable,
        *,
        user: str,
        vm: str,
        type: str,
        zone: str,
        client: str,
    ) -> None:
        """Register an open session (a failed first write is renewed later)."""
        self._live[session_id] = session
        self.registry.register(
            session_id, user=user, vm=vm, type=type, zone=zone, client=client
        ).addErrback(lambda _: None)

    def closed(self, session_id: str) -> None:
        """The session has ended: unregister it."""
        if self._live.pop(session_id, None) is not None:
            self.registry.unregister(session_id)

    def __len__(self) -> int:
        return len(self._live)

    def kill_session(self, session_id: str, reason: str) -> Deferred[int]:
        """
        End C{session_id} wherever it runs: at once if this process holds it,
        else through the kill channel.

        @return: fires with how many processes it reached (0 or 1 here).
        """
        if self._end_local(session_id, reason):
            return succeed(1)
        return self.registry.publish_kill(session_id, reason)

    def _kill_requested(self, session_id: str, reason: str) -> None:
        self._end_local(session_id, reason)

    def _end_local(self, session_id: str, reason: str) -> bool:
        session = self._live.get(session_id)
        if session is None:
            return False
        self.log.info(
            "Session {id} ended on request: {reason}", id=session_id, reason=log_safe(reason)
        )
        end_by_administrator(session, reason)
        return True
