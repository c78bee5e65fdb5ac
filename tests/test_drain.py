"""
The drain as a load balancer sees it, in a real twistd process: after
SIGTERM the port keeps listening for server.drain_grace seconds, answering
/readyz and the token API with 503 and refusing new WebSockets (1008 "513"),
while open sessions keep relaying; then the port closes and the process exits.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from consoleproxy import tap
from consoleproxy.relay.sessions import SessionTable
from tests.helpers.support import basic, get_json, wait
from tests.helpers.twistd import fake_guacd, free_port, run_twistd, serve, until_serving
from tests.helpers.wsclient import connect

GRACE = 4.0


class DrainTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def mint(self, served):  # type: ignore[no-untyped-def]
        code, _, body = yield get_json(
            served.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
        )
        self.assertEqual(code, 200)
        return body["data"]

    @inlineCallbacks
    def test_listening_through_the_grace(self):  # type: ignore[no-untyped-def]
        guacd = yield fake_guacd(self)
        served = yield serve(self, guacd, grace=GRACE)
        token = yield self.mint(served)
        spare = yield self.mint(served)
        client = yield connect(f"ws://127.0.0.1:{served.port}/guacamole?token={token}")
        yield client.opened
        conn = yield guacd.wait_for_connection()

        served.process.transport.signalProcess("TERM")
        signalled = reactor.seconds()
        yield wait(0.5)
        # New TCP connections are still accepted, and told the server drains.
        code, _, body = yield get_json(served.url("/readyz"))
        self.assertEqual((code, body), (503, {"status": "draining"}))
        code, headers, body = yield get_json(
            served.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
        )
        self.assertEqual((code, body["data"]), (503, "the server is shutting down"))
        self.assertEqual(headers.getRawHeaders(b"Retry-After"), [b"4"])
        late = yield connect(f"ws://127.0.0.1:{served.port}/guacamole?token={spare}")
        refused = yield late.closed
        self.assertEqual(refused, (1008, "513"))
        # The open session still relays.
        conn.send("sync", "42")
        yield client.wait_messages(2)
        self.assertIn("4.sync,2.42;", client.text())
        self.assertFalse(client.closed.called)

        closed = yield client.closed
        self.assertEqual(closed, (1001, "523"))
        self.assertGreater(reactor.seconds() - signalled, GRACE - 0.5)
        yield served.process.ended
        self.assertEqual(served.process.signal, 15)
        with self.assertRaises(ConnectError):
            yield get_json(served.url("/healthz"))
        self.assertNotIn(b"Traceback", served.process.output)

    @inlineCallbacks
    def test_port_closes_after_the_grace_without_sessions(self):  # type: ignore[no-untyped-def]
        guacd = yield fake_guacd(self)
        served = yield serve(self, guacd, grace=2.0)
        served.process.transport.signalProcess("TERM")
        signalled = reactor.seconds()
        yield wait(1.0)
        code, _, body = yield get_json(served.url("/readyz"))
        self.assertEqual((code, body), (503, {"status": "draining"}))
        self.assertFalse(served.process.ended.called)
        yield served.process.ended
        self.assertGreater(reactor.seconds() - signalled, 1.5)
        with self.assertRaises(ConnectError):
            yield get_json(served.url("/healthz"))

    @inlineCallbacks
    def test_drain_grace_option_zero_stops_at_once(self):  # type: ignore[no-untyped-def]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        process = run_twistd(
            self,
            f"--listen=tcp:{port}:interface=127.0.0.1",
            f"--key-file={directory}/k",
            "--guacd=none",
            "--drain-grace=0",
        )
        yield until_serving(self, process, port)
        process.transport.signalProcess("TERM")
        signalled = reactor.seconds()
        yield process.ended
        self.assertLess(reactor.seconds() - signalled, 5)

    @inlineCallbacks
    def test_ctrl_c_stops_at_once_without_sessions(self):  # type: ignore[no-untyped-def]
        guacd = yield fake_guacd(self)
        served = yield serve(self, guacd, grace=30)
        served.process.transport.signalProcess("INT")
        signalled = reactor.seconds()
        yield served.process.ended
        self.assertLess(reactor.seconds() - signalled, 5)
        self.assertNotIn(b"Traceback", served.process.output)


class _Port:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)


@implementer(IStreamServerEndpoint)
class _Endpoint:
    """Listens at once (a port), or fails as a port in use does."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.port = _Port()

    def listen(self, factory: Any) -> Deferred[_Port]:
        return fail(self.error) if self.error is not None else succeed(self.port)


class _Session:
    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self.closed_while_listening: bool | None = None
        self.port: _Port | None = None

    def shut_down(self) -> None:
        assert self.port is not None
        self.closed_while_listening = self.port.listening
        self.table.release(self)


class ShutdownServiceTests(SynchronousTestCase):
    """The order of the stop, on a clock: ports through the grace, then sessions, then the rest."""

    def setUp(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.addCleanup(gc.unfreeze)
        self.clock = Clock()
        self.table = SessionTable(self.clock, max_total=10, max_per_user=10)
        self.closed: list[str] = []
        self.service = tap.ShutdownService(
            self.table, 30, self.clock, lambda: self.closed.append("closers")
        )

    def serving_with_a_session(self) -> tuple[_Endpoint, _Session]:
        """Start the service (as twistd does) on one port, with one open session."""
        endpoint = _Endpoint()
        self.service.listen("tcp:2616", endpoint, object())
        self.service.privilegedStartService()
        self.service.startService()
        session = _Session(self.table)
        session.port = endpoint.port
        self.table.reserve(session, "alice")
        return endpoint, session

    def test_ports_listen_through_the_grace(self) -> None:
        endpoint, session = self.serving_with_a_session()
        stopped = self.service.stopService()
        self.clock.advance(29.9)
        self.assertTrue(endpoint.port.listening)
        self.assertTrue(self.table.draining)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.assertFalse(endpoint.port.listening)
        self.assertIs(session.closed_while_listening, False)  # the port closed first
        self.clock.advance(0)  # the table fires "drained" on the next turn
        self.successResultOf(stopped)
        self.assertEqual(self.closed, ["closers"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_second_signal_ends_the_grace(self) -> None:
        endpoint = _Endpoint()
        self.service.listen("tcp:2616", endpoint, object())
        self.service.startService()
        stopped = self.service.stopService()
        self.assertTrue(endpoint.port.listening)
        self.service.end_grace()
        self.assertFalse(endpoint.port.listening)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ctrl_c_closes_the_ports_at_once(self) -> None:
        """SIGINT is a person at a terminal: the ports go now, the sessions keep the grace."""
        self.service.received.append(signal.SIGINT)
        endpoint, session = self.serving_with_a_session()
        stopped = self.service.stopService()
        self.clock.advance(0)
        self.assertFalse(endpoint.port.listening)
        self.clock.advance(29)
        self.assertIsNone(session.closed_while_listening)  # still running
        self.clock.advance(1)
        self.clock.advance(0)
        self.assertIs(session.closed_while_listening, False)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_two_signals_before_the_stop_end_it_at_once(self) -> None:
        """Ctrl-C to a process group and a script's kill: both came before the stop began."""
        self.service.received += [signal.SIGINT, signal.SIGTERM]
        endpoint, session = self.serving_with_a_session()
        stopped = self.service.stopService()
        self.assertFalse(endpoint.port.listening)
        self.assertIs(session.closed_while_listening, False)
        self.clock.advance(0)
        self.successResultOf(stopped)

    def test_listen_failure_is_one_line(self) -> None:
        self.patch(sys, "excepthook", sys.excepthook)
        in_use = CannotListenError(
            "127.0.0.1", 2616, OSError(errno.EADDRINUSE, "Address already in use")
        )
        self.service.listen("tcp:2616:interface=127.0.0.1", _Endpoint(in_use), object())
        error = self.assertRaises(tap.ListenFailed, self.service.privilegedStartService)
        self.assertEqual(
            str(error),
            "consoleproxy: cannot listen on tcp:2616:interface=127.0.0.1: Address already in use",
        )
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        sys.excepthook(tap.ListenFailed, error, None)
        self.assertEqual(stderr.getvalue(), f"{error}\n")
