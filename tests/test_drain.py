"""
The drain as a load balancer sees it, in a real twistd process: after
SIGTERM the port keeps listening for server.drain_grace seconds, answering
/readyz and the token API with 503 and refusing new WebSockets (1008 "513"),
while open sessions keep relaying; then the port closes and the process exits.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.trial.unittest import TestCase

from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import basic, get_json, wait
from tests.helpers.twistd import serve
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
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
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
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
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
