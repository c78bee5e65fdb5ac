"""
The audit log: one JSON object a line for every console session.

L{AuditLog} is an L{ISessionObserver}.  It writes ``session_opened``,
``session_closed`` and ``session_refused`` events (the other observer calls,
handshake latencies and byte counts, are metrics, not audit events), each a
single line of UTF-8 JSON ending in ``\\n``, for example::

    {"event":"session_closed","time":"2025-01-02T03:04:05.678Z","relay":"guacamole",
     "user":"alice","vm":"7","type":"vnc","zone":null,"client":"192.0.2.1",
     "connection_id":"$abc","duration":12.5,"bytes_to_browser":1024,
     "bytes_from_browser":64,"status":0,"reason":"closed by the browser"}

(on one line).  ``time`` is when the event was written, ISO 8601 in UTC with
milliseconds, from the injected clock.  Session records carry no token,
password or query string, and nothing else is logged.

The log is a file (created with mode 0640 when missing, appended to, flushed
after each line; L{AuditLog.reopen} after log rotation) or a text stream such
as C{sys.stdout}.  A write that fails (a full disk) is logged once through
twisted.logger until a write succeeds again, and never raised into a session.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from consoleproxy.relay.session_events import ISessionObserver, SessionRecord

#: Longest reason text written; longer ones are cut (they are words, not data).
MAX_REASON = 256

#: Mode of a log file created by L{AuditLog} (the umask may narrow it further).
FILE_MODE = 0o640


def iso_time(seconds: float) -> str:
    """POSIX C{seconds} as ISO 8601 in UTC with milliseconds: ``2025-01-02T03:04:05.678Z``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_line(event: dict[str, Any]) -> str:
    """C{event} as one line of UTF-8-safe JSON (no line break inside, even U+2028/U+2029)."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    # A lone surrogate (never valid UTF-8) becomes its JSON escape.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


@implementer(ISessionObserver)
class AuditLog:
    """
    Writes session events as JSON lines.

    @param target: a file path, or an open text stream (not closed by L{close}).
    @param clock: gives the events' times (the reactor, or a C{Clock} in tests).
    """

    log = Logger()

    def __init__(self, target: str | os.PathLike[str] | TextIO, clock: IReactorTime) -> None:
        self.clock = clock
        self.path: str | None = None
        self._stream: TextIO | None = None
        self._owned = False
        self._failing = False
        if isinstance(target, str | os.PathLike):
            self.path = os.fspath(target)
            self._open()
        else:
            self._stream = target

    # -- the file --------------------------------------------------------------------

    def _open(self) -> None:
        """Open (creating) the file for appending; on failure, log and stay closed."""
        assert self.path is not None
        try:
            fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
            )
            self._stream = os.fdopen(fd, "a", encoding="utf-8")
            self._owned = True
        except OSError as e:
            self._stream = None
            self._failed(e)

    def reopen(self) -> None:
        """Close and open the file again (after rotation); a stream is just flushed."""
        if self.path is None:
            self._flush()
            return
        self._close_file()
        self._open()

    def close(self) -> None:
        """Close the file (a stream is flushed, not closed); later events are dropped."""
        if self.path is None:
            self._flush()
            self._stream = None
            return
        self._close_file()
        self.path = None

    def _close_file(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None and self._owned:
            try:
                stream.close()
            except OSError as e:
                self._failed(e)

    def _flush(self) -> None:
        if self._stream is not None:
            try:
                self._stream.flush()
            except (OSError, ValueError) as e:
                self._failed(e)

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            self._failing = True
            self.log.error(
                "Audit log {target} failed, events are lost until it works again: {error}",
                target=self.path or "stream",
                error=error,
            )

    def write(self, event: dict[str, Any]) -> None:
        """Write C{event} as a line, with its ``time``; errors are logged, never raised."""
        if self._stream is None and self.path is not None:
            self._open()
        stream = self._stream
        if stream is None:
            return
        line = json_line(
            {"event": event.get("event"), "time": iso_time(self.clock.seconds()), **event}
        )
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError) as e:
            self._failed(e)
            return
        if self._failing:
            self._failing = False
            self.log.info("Audit log {target} works again", target=self.path or "stream")

    # -- ISessionObserver -----------------------------------------------------------

    @staticmethod
    def _session(event: str, record: SessionRecord) -> dict[str, Any]:
        return {
            "event": event,
            "relay": record.relay,
            "user": record.user,
            "vm": record.vm_id,
            "type": record.console_type,
            "zone": record.zone,
            "client": record.client,
            "connection_id": record.connection_id,
            "session": record.session_id,
        }

    def session_opened(self, record: SessionRecord) -> None:
        """Write a ``session_opened`` event."""
        self.write(self._session("session_opened", record))

    def session_closed(self, record: SessionRecord) -> None:
        """Write a ``session_closed`` event: duration, bytes both ways, status, reason."""
        duration = record.duration
        if duration is None:
            duration = self.clock.seconds() - record.opened_at
        event = self._session("session_closed", record)
        event.update(
            duration=round(duration, 3),
            bytes_to_browser=record.bytes_to_browser,
            bytes_from_browser=record.bytes_from_browser,
            status=record.status,
            reason=record.reason[:MAX_REASON],
        )
        self.write(event)

    def session_killed(self, by: str, session: Any, client: str) -> None:
        """
        Write a ``session_killed`` event: administrator C{by} (from address
        C{client}) ended C{session} (an L{consoleproxy.interfaces.LiveSession})
        through the sessions API; its own ``session_closed`` event follows
        from the process that held it, with the same ``session``.
        """
        self.write(
            {
                "event": "session_killed",
                "by": by,
                "client": client,
                "session": session.id,
                "user": session.user,
                "vm": session.vm,
                "type": session.type,
                "zone": session.zone or None,
                "session_client": session.client,
            }
        )

    def session_refused(self, relay: str, status: int, reason: str, client: str) -> None:
        """Write a ``session_refused`` event: who was refused, and why."""
        self.write(
            {
                "event": "session_refused",
                "relay": relay,
                "client": client,
                "status": status,
                "reason": reason[:MAX_REASON],
            }
        )

    def token_refused(self, relay: str, reason: str) -> None:
        """Not audited: without the client's address the event says too little."""

    def handshake_done(self, relay: str, seconds: float) -> None:
        """Not audited (a metric)."""

    def bytes_relayed(self, relay: str, to_browser: int, from_browser: int) -> None:
        """Not audited (a metric; the closing event has the totals)."""
