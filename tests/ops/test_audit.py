"""The JSON audit log: one line a session event, to a file or a stream, robust to errors."""

from __future__ import annotations

import io
import json
import os
import stat
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from consoleproxy.interfaces import LiveSession
from consoleproxy.ops.audit import AuditLog, iso_time
from consoleproxy.relay.session_events import ISessionObserver, SessionEvents
from tests.helpers.support import session_record as record

#: 2025-01-02T03:04:05.678Z
T0 = 1735787045.678


def lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of an audit log's text, checking that each line is one object."""
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.split("\n")[:-1]]


class _Broken(io.StringIO):
    """A stream whose writes fail (a full disk) while C{full}."""

    full = True

    def write(self, text: str) -> int:
        if self.full:
            raise OSError(28, "No space left on device")
        return super().write(text)


class AuditStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.stream = io.StringIO()
        self.audit = AuditLog(self.stream, self.clock)

    def test_observer(self) -> None:
        self.assertTrue(verifyObject(ISessionObserver, self.audit))

    def test_time(self) -> None:
        self.assertEqual(iso_time(T0), "2025-01-02T03:04:05.678Z")
        self.assertEqual(iso_time(0), "1970-01-01T00:00:00.000Z")

    def test_session(self) -> None:
        """Opened and closed events, with every field; metrics-only calls write nothing."""
        events = SessionEvents(self.audit)
        session = record(opened_at=T0, zone="100", connection_id="$42", session_id="c" * 32)
        events.session_opened(session)
        events.handshake_done("guacamole", 0.2)
        events.bytes_relayed("guacamole", 10, 20)
        events.token_refused("guacamole", "expired")
        self.clock.advance(12.5)
        session.closed_at = self.clock.seconds()
        session.bytes_to_browser, session.bytes_from_browser = 4096, 128
        session.status, session.reason = 0x0203, "the VNC server closed"
        events.session_closed(session)
        opened, closed = lines(self.stream.getvalue())
        common = {
            "relay": "guacamole",
            "user": "alice",
            "vm": "7",
            "type": "vnc",
            "zone": "100",
            "client": "192.0.2.1",
            "connection_id": "$42",
            "session": "c" * 32,
        }
        self.assertEqual(
            opened, {"event": "session_opened", "time": "2025-01-02T03:04:05.678Z", **common}
        )
        self.assertEqual(
            closed,
            {
                "event": "session_closed",
                "time": "2025-01-02T03:04:18.178Z",
                **common,
                "duration": 12.5,
                "bytes_to_browser": 4096,
                "bytes_from_browser": 128,
                "status": 515,
                "reason": "the VNC server closed",
            },
        )

    def test_killed(self) -> None:
        """Who ended which session through the sessions API."""
        session = LiveSession("c" * 32, "alice", "7", "vnc", "", "192.0.2.1", T0)
        self.audit.session_killed("root", session, "192.0.2.9")
        (killed,) = lines(self.stream.getvalue())
        self.assertEqual(
            killed,
            {
                "event": "session_killed",
                "time": "2025-01-02T03:04:05.678Z",
                "by": "root",
                "client": "192.0.2.9",
                "session": "c" * 32,
                "user": "alice",
                "vm": "7",
                "type": "vnc",
                "zone": None,
                "session_client": "192.0.2.1",
            },
        )

    def test_refused(self) -> None:
        self.audit.session_refused("rfb", 0x0301, "the token expired", "tcp6:[2001:db8::1]:5")
        (refused,) = lines(self.stream.getvalue())
        self.assertEqual(
            refused,
            {
                "event": "session_refused",
                "time": "2025-01-02T03:04:05.678Z",
                "relay": "rfb",
                "client": "tcp6:[2001:db8::1]:5",
                "status": 769,
                "reason": "the token expired",
            },
        )

    def test_one_line_each(self) -> None:
        """Line breaks (ASCII or Unicode) in values never split an event; UTF-8 stays readable."""
        self.audit.session_opened(record(user="zoë\nfake\u2028line\u2029", opened_at=T0))
        self.audit.session_refused("rfb", 1, "x" * 10000 + "\r\n", "tcp4:1.2.3.4:5")
        self.audit.session_opened(record(user="bad\udcff"))
        text = self.stream.getvalue()
        self.assertEqual(text.count("\n"), 3)
        self.assertNotIn("\u2028", text)
        self.assertNotIn("\x1e", text)
        self.assertIn("zoë", text)
        first, second, third = lines(text)
        self.assertEqual(first["user"], "zoë\nfake\u2028line\u2029")
        self.assertEqual(len(second["reason"]), 256)
        self.assertEqual(third["user"], "bad\udcff")
        text.encode("utf-8")  # no lone surrogate reached the stream

    def test_duration_while_open(self) -> None:
        """A record without a close time gets the duration so far."""
        self.clock.advance(3)
        self.audit.session_closed(record(opened_at=T0, status=0))
        (closed,) = lines(self.stream.getvalue())
        self.assertEqual(closed["duration"], 3.0)

    def test_write_error_logged_once(self) -> None:
        """A failing write is logged once, never raised, and again after a recovery."""
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        stream = _Broken()
        audit = AuditLog(stream, self.clock)
        events = SessionEvents(audit)
        for _ in range(3):
            events.session_opened(record())
        errors = [e for e in logged if "Audit log" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertIn("No space left", str(errors[0]["error"]))
        self.assertEqual(self.flushLoggedErrors(), [])
        stream.full = False
        events.session_opened(record())
        self.assertEqual(len(lines(stream.getvalue())), 1)
        stream.full = True
        events.session_opened(record())
        errors = [e for e in logged if "failed" in e.get("log_format", "")]
        self.assertEqual(len(errors), 2)

    def test_close_stream(self) -> None:
        """Closing does not close a given stream (sys.stdout); later events are dropped."""
        self.audit.reopen()
        self.audit.session_opened(record())
        self.audit.close()
        self.assertFalse(self.stream.closed)
        self.audit.session_opened(record())
        self.assertEqual(len(lines(self.stream.getvalue())), 1)


class AuditFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "audit.log")

    def read(self, path: str | None = None) -> list[dict[str, Any]]:
        with open(path or self.path, encoding="utf-8") as f:
            return lines(f.read())

    def test_created_0640(self) -> None:
        old = os.umask(0o022)
        try:
            audit = AuditLog(self.path, self.clock)
        finally:
            os.umask(old)
        self.addCleanup(audit.close)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    def test_appends_and_flushes(self) -> None:
        """An existing file is appended to; each line is on disk once written."""
        with open(self.path, "w", encoding="utf-8") as f:
            f.write('{"event":"earlier"}\n')
        audit = AuditLog(self.path, self.clock)
        self.addCleanup(audit.close)
        audit.session_opened(record())
        events = self.read()
        self.assertEqual([e["event"] for e in events], ["earlier", "session_opened"])

    def test_reopen_after_rotation(self) -> None:
        """After the file is moved away, reopen() starts a new one at the path."""
        audit = AuditLog(self.path, self.clock)
        self.addCleanup(audit.close)
        audit.session_opened(record(user="before"))
        rotated = self.path + ".1"
        os.rename(self.path, rotated)
        audit.session_opened(record(user="still old"))
        audit.reopen()
        audit.session_opened(record(user="after"))
        self.assertEqual([e["user"] for e in self.read(rotated)], ["before", "still old"])
        self.assertEqual([e["user"] for e in self.read()], ["after"])

    def test_unopenable(self) -> None:
        """A path that cannot be opened is logged, not raised; it is retried at each event."""
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        missing = os.path.join(self.directory, "not yet", "audit.log")
        audit = AuditLog(missing, self.clock)
        self.addCleanup(audit.close)
        audit.session_opened(record())
        self.assertEqual(len([e for e in logged if "failed" in e.get("log_format", "")]), 1)
        os.makedirs(os.path.dirname(missing))
        audit.session_opened(record(user="later"))
        self.assertEqual([e["user"] for e in self.read(missing)], ["later"])

    def test_close(self) -> None:
        audit = AuditLog(self.path, self.clock)
        audit.session_opened(record())
        audit.close()
        audit.session_opened(record())
        audit.close()
        self.assertEqual(len(self.read()), 1)
