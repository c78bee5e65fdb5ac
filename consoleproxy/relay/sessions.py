"""
The server's table of console sessions, across both relays: caps and drain.

A session takes its place in the table as soon as its token is open and the
user is known, before its upstream is connected: a flood of handshakes
counts against the caps too.  It gives the place back when its WebSocket is
gone, whatever happened.

  - Caps: at most C{max_total} sessions in all (a new one is refused with
    SERVER_BUSY, 513) and C{max_per_user} per user (CLIENT_TOO_MANY, 797).
  - Drain (SIGTERM): new sessions are refused with SERVER_BUSY, the open
    ones run on for a grace period, then each is closed with WebSocket code
    1001 ("going away") and SESSION_CLOSED (523) as the reason; L{drain}'s
    Deferred fires once the table is empty.  L{close_all} (a second signal)
    closes them at once.  The grace may be kept by the caller instead
    (C{drain(None)}), who then calls L{close_all}: the server does, so that
    its ports close before the sessions do.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from consoleproxy.guacamole.status import GuacamoleError, Status


class Closable(Protocol):
    """What the table needs of a session."""

    def shut_down(self) -> None:
        """Close the session now because the server is stopping (code 1001)."""


class SessionTable:
    """Open and opening sessions, by user; caps them and drains them."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, *, max_total: int, max_per_user: int) -> None:
        self.clock = clock
        self.max_total = max_total
        self.max_per_user = max_per_user
        self._users: dict[Closable, str] = {}
        self._per_user: Counter[str] = Counter()
        self.draining = False
        self._drained: list[Deferred[None]] = []
        self._grace: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._users)

    def count_of(self, user: str) -> int:
        """Sessions C{user} has now."""
        return self._per_user[user]

    def reserve(self, session: Closable, user: str) -> None:
        """
        Give C{session} of C{user} its place.

        @raise GuacamoleError: SERVER_BUSY when stopping or full,
            CLIENT_TOO_MANY when the user has too many.
        """
        if session in self._users:
            return
        if self.draining:
            raise GuacamoleError(Status.SERVER_BUSY, "the server is shutting down")
        if len(self._users) >= self.max_total:
            raise GuacamoleError(
                Status.SERVER_BUSY, f"the server holds its maximum of {self.max_total} sessions"
            )
        if self._per_user[user] >= self.max_per_user:
            raise GuacamoleError(
                Status.CLIENT_TOO_MANY,
                f"user already has the maximum of {self.max_per_user} sessions",
            )
        self._users[session] = user
        self._per_user[user] += 1

    def release(self, session: Closable) -> None:
        """C{session} is gone (safe to call more than once, or without a place)."""
        user = self._users.pop(session, None)
        if user is None:
            return
        self._per_user[user] -= 1
        if self._per_user[user] <= 0:
            del self._per_user[user]
        if not self._users and self.draining:
            # Later, not now: the session is still closing (its observers,
            # e.g. the audit log, have yet to hear of it).
            self.clock.callLater(0, self._fire_drained)

    def drain(self, grace: float | None) -> Deferred[None]:
        """
        Refuse new sessions; close the open ones after C{grace} seconds
        (C{None}: when the caller calls L{close_all}).

        @return: fires when no session is left.
        """
        self.draining = True
        if not self._users:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        if self._grace is None and grace is not None:
            self._log.info(
                "Draining: {count} sessions may run for {grace:g} s more",
                count=len(self._users),
                grace=grace,
            )
            self._grace = self.clock.callLater(grace, self.close_all)
        elif grace is None:
            self._log.info("Draining: {count} sessions open", count=len(self._users))
        return done

    def close_all(self) -> None:
        """Close every session now (the grace is over, or a second signal came)."""
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        if self._users:
            self._log.info("Closing {count} sessions: shutting down", count=len(self._users))
        for session in list(self._users):
            try:
                session.shut_down()
            except Exception:
                self._log.failure("Closing a session at shutdown failed")
                self.release(session)

    def _fire_drained(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        waiting, self._drained = self._drained, []
        for done in waiting:
            done.callback(None)

    def sessions(self) -> list[Any]:
        """The sessions now in the table."""
        return list(self._users)
