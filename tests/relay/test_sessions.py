"""
Session caps, drain, idle and absolute timeouts, and the Origin allow-list:
in memory for the table's logic, over real sockets for what a browser sees.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.consoles import Console, Identity
from consoleproxy.guacamole.instructions import encode
from consoleproxy.guacamole.status import GuacamoleError, Status
from consoleproxy.net.clients import ClientAddresses, networks
from consoleproxy.relay.origins import OriginPolicy, normalize_origin
from consoleproxy.relay.session_events import SessionEvents, SessionRecord
from consoleproxy.relay.sessions import SessionTable
from consoleproxy.relay.websocket import RelayPolicy
from tests.helpers.fakeguacd import Behaviour, FakeGuacd
from tests.helpers.support import start_server, wait
from tests.helpers.wsclient import connect

VNC = Console(7, "vnc", {"hostname": "10.0.0.5", "port": "5907"})


class _Session:
    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self.shut = 0

    def shut_down(self) -> None:
        self.shut += 1
        self.table.release(self)


class TableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.table = SessionTable(self.clock, max_total=3, max_per_user=2)

    def refused(self, user: str) -> Status:
        error = self.assertRaises(GuacamoleError, self.table.reserve, _Session(self.table), user)
        return error.status

    def test_caps(self) -> None:
        a1, a2, b1 = (_Session(self.table) for _ in range(3))
        self.table.reserve(a1, "alice")
        self.table.reserve(a1, "alice")  # the same session again: still one place
        self.table.reserve(a2, "alice")
        self.assertEqual(self.refused("alice"), Status.CLIENT_TOO_MANY)
        self.table.reserve(b1, "bob")
        self.assertEqual(self.refused("carol"), Status.SERVER_BUSY)
        self.table.release(a1)
        self.table.release(a1)
        self.assertEqual((len(self.table), self.table.count_of("alice")), (2, 1))
        self.table.reserve(_Session(self.table), "carol")

    def test_drain_waits_for_grace_then_closes(self) -> None:
        sessions = [_Session(self.table) for _ in range(2)]
        for session in sessions:
            self.table.reserve(session, "alice")
        drained = self.table.drain(5)
        self.assertEqual(self.refused("bob"), Status.SERVER_BUSY)
        self.clock.advance(4.9)
        self.assertNoResult(drained)
        self.assertEqual([s.shut for s in sessions], [0, 0])
        self.clock.advance(0.1)
        self.assertEqual([s.shut for s in sessions], [1, 1])
        self.clock.advance(0)
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_ends_early_when_sessions_end(self) -> None:
        session = _Session(self.table)
        self.table.reserve(session, "alice")
        drained = self.table.drain(30)
        self.table.release(session)
        self.clock.advance(0)
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(session.shut, 0)

    def test_close_all_during_grace(self) -> None:
        session = _Session(self.table)
        self.table.reserve(session, "alice")
        drained = self.table.drain(30)
        self.table.close_all()
        self.assertEqual(session.shut, 1)
        self.clock.advance(0)
        self.successResultOf(drained)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_with_nothing_open(self) -> None:
        self.successResultOf(self.table.drain(30))
        self.assertTrue(self.table.draining)


class OriginPolicyTests(SynchronousTestCase):
    def test_normalize(self) -> None:
        self.assertEqual(
            normalize_origin("HTTPS://Console.Example.com"), "https://console.example.com:443"
        )
        self.assertEqual(normalize_origin("http://[::1]:8080/"), "http://[::1]:8080")
        for bad in (
            "null",
            "file://",
            "ftp://x",
            "https://x/path",
            "https://u@x",
            "https://x:99999",
        ):
            self.assertRaises(ValueError, normalize_origin, bad)

    def test_policy(self) -> None:
        policy = OriginPolicy(["https://console.example.com"])
        self.assertTrue(policy.allows("https://console.example.com:443"))
        self.assertFalse(policy.allows("http://console.example.com"))
        self.assertFalse(policy.allows("https://console.example.com.evil.net"))
        self.assertFalse(policy.allows("null"))
        self.assertFalse(policy.allows(None))
        self.assertTrue(OriginPolicy([], allow_missing=True).allows(None))


class _Recorder:
    """Records what the relay tells observers."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.events.append((name, args))


class RelayPolicyTestCase(TestCase):
    """A fake guacd and a consoleproxy with a given policy."""

    @inlineCallbacks
    def start(  # type: ignore[no-untyped-def]
        self, behaviour: Behaviour | None = None, handshake_timeout: float = 15, **policy: Any
    ):
        self.guacd = FakeGuacd(reactor, behaviour=behaviour)
        yield self.guacd.start()
        self.addCleanup(self.guacd.stop)
        self.recorder = _Recorder()
        self.policy = RelayPolicy(events=SessionEvents(self.recorder), **policy)  # type: ignore[arg-type]
        self.clients: list[Any] = []
        self.addCleanup(self._close_all)
        self.server = yield start_server(
            self,
            guacd_port=self.guacd.port,
            policy=self.policy,
            handshake_timeout=handshake_timeout,
        )

    @inlineCallbacks
    def connect(self, user: str = "alice", origin: str | None = None):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(Identity(user), VNC)
        client = yield connect(self.server.ws_url(f"/guacamole?token={token}"), origin=origin)
        self.clients.append(client)
        yield client.opened
        return client

    @inlineCallbacks
    def _close_all(self):  # type: ignore[no-untyped-def]
        """Close every client, then let guacd's side of each finish closing."""
        for client in self.clients:
            if not client.closed.called:
                client.sendClose(1000)
        for client in self.clients:
            yield client.closed
        for connection in self.guacd.connections:
            yield connection.closed

    @inlineCallbacks
    def assert_refused(self, client, code: int, reason: str):  # type: ignore[no-untyped-def]
        closed = yield client.closed
        self.assertEqual(closed, (code, reason))


class CapTests(RelayPolicyTestCase):
    @inlineCallbacks
    def test_per_user_and_global_caps(self):  # type: ignore[no-untyped-def]
        table = SessionTable(reactor, max_total=3, max_per_user=2)
        yield self.start(table=table)
        first = yield self.connect("alice")
        yield self.connect("alice")
        third = yield self.connect("alice")
        yield self.assert_refused(third, 1008, "797")
        yield self.connect("bob")
        fourth = yield self.connect("carol")
        yield self.assert_refused(fourth, 1008, "513")
        self.assertEqual(len(self.guacd.connections), 3)  # the refused never reached guacd
        first.sendClose(1000)
        yield first.closed
        yield self.guacd.connections[0].closed
        again = yield self.connect("alice")
        self.assertFalse(again.closed.called)
        self.assertEqual(len(table), 3)
        refusals = [e for e in self.recorder.events if e[0] == "session_refused"]
        self.assertEqual(
            [(r[1][0], r[1][1]) for r in refusals], [("guacamole", 797), ("guacamole", 513)]
        )

    @inlineCallbacks
    def test_handshakes_in_progress_count(self):  # type: ignore[no-untyped-def]
        table = SessionTable(reactor, max_total=1, max_per_user=5)
        yield self.start(behaviour=Behaviour(silent=True), handshake_timeout=1, table=table)
        token = self.server.tokens.seal(Identity("alice"), VNC)
        pending = yield connect(self.server.ws_url(f"/guacamole?token={token}"))
        self.addCleanup(pending.transport.abortConnection)
        for _ in range(100):  # alice's handshake is in progress (guacd never answers)
            if len(table):
                break
            yield wait(0.01)
        self.assertEqual(len(table), 1)
        second = yield self.connect("bob")
        yield self.assert_refused(second, 1008, "513")
        # The place is given back when the handshake ends (here: guacd's timeout).
        closed = yield pending.closed
        self.assertEqual(closed, (1011, "514"))
        self.assertEqual(len(table), 0)


class DrainTests(RelayPolicyTestCase):
    @inlineCallbacks
    def test_sessions_run_through_the_grace_then_close_1001(self):  # type: ignore[no-untyped-def]
        table = SessionTable(reactor, max_total=10, max_per_user=10)
        yield self.start(table=table)
        client = yield self.connect()
        conn = yield self.guacd.wait_for_connection()
        drained = table.drain(0.5)
        newcomer = yield self.connect("bob")
        yield self.assert_refused(newcomer, 1008, "513")
        conn.send("sync", "1")
        yield client.wait_messages(2)
        self.assertIn(encode("sync", "1"), client.text())
        self.assertFalse(client.closed.called)
        closed = yield client.closed
        self.assertEqual(closed, (1001, "523"))
        yield drained
        yield conn.closed
        self.assertEqual(len(table), 0)

    @inlineCallbacks
    def test_close_all_is_immediate(self):  # type: ignore[no-untyped-def]
        table = SessionTable(reactor, max_total=10, max_per_user=10)
        yield self.start(table=table)
        client = yield self.connect()
        drained = table.drain(60)
        table.close_all()
        closed = yield client.closed
        self.assertEqual(closed, (1001, "523"))
        yield drained


class TimeoutTests(RelayPolicyTestCase):
    @inlineCallbacks
    def test_idle_session_closes_but_input_keeps_it(self):  # type: ignore[no-untyped-def]
        yield self.start(idle_timeout=0.6)
        idle = yield self.connect("alice")
        busy = yield self.connect("bob")
        for _ in range(8):  # 1.2 s: sync and nop from the idle one, keys from the busy one
            if not idle.closed.called:
                idle.sendMessage((encode("sync", "1") + encode("nop")).encode())
            busy.sendMessage(encode("key", "65", "1").encode())
            yield wait(0.15)
        self.assertEqual(idle.closed.result if idle.closed.called else None, (1002, "522"))
        self.assertFalse(busy.closed.called)
        closes = [e[1][0] for e in self.recorder.events if e[0] == "session_closed"]
        self.assertEqual([(r.user, r.status) for r in closes], [("alice", 522)])

    @inlineCallbacks
    def test_absolute_limit(self):  # type: ignore[no-untyped-def]
        yield self.start(session_timeout=0.4)
        client = yield self.connect()
        for _ in range(3):
            client.sendMessage(encode("key", "65", "1").encode())
            yield wait(0.05)
        closed = yield client.closed
        self.assertEqual(closed, (1002, "523"))

    @inlineCallbacks
    def test_no_timeouts_by_default(self):  # type: ignore[no-untyped-def]
        yield self.start()
        client = yield self.connect()
        yield wait(0.3)
        self.assertFalse(client.closed.called)
        session = next(iter(self.server.relay.sessions))
        self.assertEqual((session._deadline, session._idle), (None, None))


class OriginTests(RelayPolicyTestCase):
    @inlineCallbacks
    def test_only_listed_origins(self):  # type: ignore[no-untyped-def]
        yield self.start(origins=OriginPolicy(["https://console.example.com"]))
        good = yield self.connect(origin="https://console.example.com")
        self.assertFalse(good.closed.called)
        self.assertEqual(len(self.guacd.connections), 1)
        for origin in (
            "https://evil.example.com",
            f"http://127.0.0.1:{self.server.port}",  # the request's own Host: not listed
            None,  # no Origin: not allowed unless configured
        ):
            client = yield self.connect("bob", origin=origin)
            yield self.assert_refused(client, 1008, "771")
        # Autobahn itself refuses "null" (HTTP 400) before the relay sees it.
        token = self.server.tokens.seal(Identity("bob"), VNC)
        null = yield connect(self.server.ws_url(f"/guacamole?token={token}"), origin="null")
        yield self.assertFailure(null.opened, ConnectionError)
        self.assertEqual(len(self.guacd.connections), 1)
        # The refusals spent no token and disturbed nobody.
        conn = self.guacd.connections[0]
        conn.send("sync", "7")
        yield good.wait_messages(2)
        self.assertFalse(good.closed.called)

    @inlineCallbacks
    def test_refusal_comes_before_the_token(self):  # type: ignore[no-untyped-def]
        yield self.start(origins=OriginPolicy(["https://console.example.com"]))
        token = self.server.tokens.seal(Identity("alice"), VNC)
        url = self.server.ws_url(f"/guacamole?token={token}")
        evil = yield connect(url, origin="https://evil.example.com")
        yield self.assert_refused(evil, 1008, "771")
        good = yield connect(url, origin="https://console.example.com")
        self.clients.append(good)
        yield good.opened
        self.assertFalse(good.closed.called)  # the token was not spent by the refusal


class ForwardedTests(RelayPolicyTestCase):
    @inlineCallbacks
    def test_audit_record_names_the_real_client(self):  # type: ignore[no-untyped-def]
        yield self.start(clients=ClientAddresses(networks(["127.0.0.1"])))
        token = self.server.tokens.seal(Identity("alice"), VNC)
        client = yield connect(
            self.server.ws_url(f"/guacamole?token={token}"),
            headers={"X-Forwarded-For": "198.51.100.4, 203.0.113.9"},
        )
        self.clients.append(client)
        yield client.opened
        opened = [e[1][0] for e in self.recorder.events if e[0] == "session_opened"]
        self.assertEqual(len(opened), 1)
        record: SessionRecord = opened[0]
        self.assertEqual(record.client, "203.0.113.9")
