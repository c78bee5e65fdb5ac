"""
What the relays tell the rest of the server about their sessions.

A relay does not know who watches it: it reports to L{ISessionObserver}s
(the Prometheus metrics, the JSON audit log) through L{SessionEvents}, which
contains their failures so that a broken observer never breaks a console.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger
from zope.interface import Interface, implementer


@dataclass
class SessionRecord:
    """
    One console session, as the observers see it.

    @ivar relay: ``guacamole`` or ``rfb``.
    @ivar user: who opened it (from the token).
    @ivar vm_id: which VM.
    @ivar console_type: ``vnc``, ``ssh`` or ``rdp``.
    @ivar zone: the zone it was relayed to, or C{None} for this one.
    @ivar client: the browser's address (the real one, behind a trusted frontend).
    @ivar opened_at: POSIX time it opened.
    @ivar closed_at: POSIX time it closed (C{None} while open).
    @ivar bytes_to_browser: bytes relayed to the browser.
    @ivar bytes_from_browser: bytes relayed from the browser.
    @ivar status: the Guacamole status it closed with (numeric).
    @ivar reason: why it closed, in words.
    @ivar connection_id: guacd's connection id, when there is one.
    @ivar session_id: the session's id (unique in the cluster): what the
        sessions API, share links and recordings name it by.
    @ivar viewers: how many shared viewers are joined to it now.
    @ivar recording: the id of its recording, when it is recorded.
    """

    relay: str
    user: str
    vm_id: str
    console_type: str
    client: str
    opened_at: float
    zone: str | None = None
    connection_id: str | None = None
    closed_at: float | None = None
    bytes_to_browser: int = 0
    bytes_from_browser: int = 0
    status: int | None = None
    reason: str = ""
    session_id: str = ""
    viewers: int = 0
    recording: str | None = None

    @property
    def duration(self) -> float | None:
        """Seconds the session was open, once closed."""
        if self.closed_at is None:
            return None
        return self.closed_at - self.opened_at


class ISessionObserver(Interface):
    """Something that wants to know about console sessions."""

    def session_opened(record: SessionRecord) -> None:  # noqa: N805
        """A session opened: C{record} has no close fields yet."""

    def session_closed(record: SessionRecord) -> None:  # noqa: N805
        """A session that had opened is closed: C{record} is complete."""

    def session_refused(relay: str, status: int, reason: str, client: str) -> None:  # noqa: N805
        """A WebSocket was refused before a session opened (status is numeric)."""

    def token_refused(relay: str, reason: str) -> None:  # noqa: N805
        """A token was refused: C{reason} is the token error's reason word."""

    def handshake_done(relay: str, seconds: float) -> None:  # noqa: N805
        """A session's upstream was ready C{seconds} after the WebSocket request."""

    def bytes_relayed(relay: str, to_browser: int, from_browser: int) -> None:  # noqa: N805
        """Bytes relayed by a session since its last report."""


@implementer(ISessionObserver)
class SessionEvents:
    """Fans events out to observers; an observer's exception is logged, not raised."""

    _log = Logger()

    def __init__(self, *observers: ISessionObserver) -> None:
        self.observers: list[ISessionObserver] = list(observers)

    def add(self, observer: ISessionObserver) -> None:
        """Report to C{observer} too."""
        self.observers.append(observer)

    def _each(self, method: str, *args: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                self._log.failure(
                    "Session observer {observer!r} failed in {method}",
                    observer=observer,
                    method=method,
                )

    def session_opened(self, record: SessionRecord) -> None:
        """See L{ISessionObserver}."""
        self._each("session_opened", record)

    def session_closed(self, record: SessionRecord) -> None:
        """See L{ISessionObserver}."""
        self._each("session_closed", record)

    def session_refused(self, relay: str, status: int, reason: str, client: str) -> None:
        """See L{ISessionObserver}."""
        self._each("session_refused", relay, status, reason, client)

    def token_refused(self, relay: str, reason: str) -> None:
        """See L{ISessionObserver}."""
        self._each("token_refused", relay, reason)

    def handshake_done(self, relay: str, seconds: float) -> None:
        """See L{ISessionObserver}."""
        self._each("handshake_done", relay, seconds)

    def bytes_relayed(self, relay: str, to_browser: int, from_browser: int) -> None:
        """See L{ISessionObserver}."""
        self._each("bytes_relayed", relay, to_browser, from_browser)
