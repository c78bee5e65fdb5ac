"""
Adversarial tests over real loopback sockets: clients that make the server
write toward them (Guacamole ``ping`` echoes, WebSocket pongs) and never read.

Everything written toward a browser obeys one bound (relay.websocket.FlowControl):
the server's buffered bytes for that browser stay under L{BOUND}, reading from
it stops while they are over L{RELAY_BUFFER}, and a browser that keeps them over
that limit for the policy's ``stall_timeout`` is closed with CLIENT_TIMEOUT (776,
WebSocket code 1002).  guacd hears ``disconnect`` before the socket closes, and
an honest session on the same server keeps relaying throughout.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from consoleproxy.guacamole.instructions import encode
from consoleproxy.relay.session_events import SessionEvents, SessionRecord
from consoleproxy.relay.websocket import RELAY_BUFFER, RelayPolicy
from consoleproxy.tokens import KeyRing
from tests.helpers.adversary import AdversaryTestCase, until
from tests.helpers.fakeguacd import Behaviour
from tests.helpers.rawws import OP_PING, OP_PONG, frame, raw_connect, upgrade_request
from tests.helpers.support import start_server, wait
from tests.relay.test_guacamole_relay import ALICE, VNC
from tests.relay.test_rfb_relay import RfbTestCase

#: Most bytes the server may hold for one browser: the limit, plus what one
#: read of the browser (256 KiB) or of the upstream turns into, plus one
#: unfinished message of the browser's (64 KiB), plus frame headers.
BOUND = 2 * RELAY_BUFFER + 65536 + 4096
#: Seconds over the limit before the session closes, in these tests.
STALL = 2.0
#: Autobahn's close handshake timeout: a browser that does not read the close
#: frame is dropped this long after it.
CLOSE_HANDSHAKE = 2.0

#: One message of Guacamole pings, as a flooding client sends it (54 KiB).
PINGS = encode("", "ping", "1700000000000") * 2000


class Closes:
    """An observer of sessions: records how each closed."""

    def __init__(self) -> None:
        self.records: list[SessionRecord] = []

    def session_closed(self, record: SessionRecord) -> None:
        self.records.append(record)

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def open_descriptors() -> int:
    """Descriptors this process holds (the server runs in it)."""
    return len(os.listdir("/proc/self/fd"))


class FloodTestCase(AdversaryTestCase):
    """A server whose stall timeout is L{STALL}, recording how sessions closed."""

    def start_proxy(self) -> Any:
        self.keyring = KeyRing([os.urandom(32)])
        self.closes = Closes()
        policy = RelayPolicy(stall_timeout=STALL, events=SessionEvents(self.closes))
        return start_server(self, guacd_port=self.guacd.port, keyring=self.keyring, policy=policy)

    def session_of(self, conn: Any) -> Any:
        (session,) = [
            s for s in self.server.relay.sessions if s._guacd.connection_id == conn.connection_id
        ]
        return session


class PingEchoFloodTests(FloodTestCase):
    """Messages full of Guacamole ``ping``, sent by a client that never reads."""

    @inlineCallbacks
    def test_never_reading_ping_flood_is_bounded_then_closed(self):  # type: ignore[no-untyped-def]
        descriptors = open_descriptors()
        client, conn = yield self.attack_session()
        attacker = self.session_of(conn)
        client.transport.pauseProducing()  # from now on, it reads nothing
        flood = frame(PINGS.encode()) * 200  # 11 MB of pings: as many bytes of echoes
        started = reactor.seconds()
        client.send(flood)
        most = over_since = 0.0
        while attacker in self.server.relay.sessions and reactor.seconds() - started < 15:
            held = attacker.buffered_to_browser()
            most = max(most, held)
            if held > RELAY_BUFFER and not over_since:
                over_since = reactor.seconds()
            yield wait(0.01)
        closed_after = reactor.seconds() - over_since
        self.assertLess(most, BOUND, "bytes buffered for the flooding client")
        self.assertGreater(most, RELAY_BUFFER, "the flood did fill the buffer")
        self.assertNotIn(attacker, self.server.relay.sessions, "the flooder's session closed")
        # Closed once STALL seconds over the limit, dropped after the close handshake.
        self.assertGreaterEqual(closed_after, STALL - 0.1)
        self.assertLess(closed_after, STALL + CLOSE_HANDSHAKE + 2)
        (record,) = self.closes.records
        self.assertEqual(record.status, 776)
        self.assertIn("read nothing", record.reason)
        # guacd was told before its socket closed; the honest session relays on.
        yield conn.closed
        self.assertEqual(conn.ended_by, "disconnect")
        self.assertEqual(conn.received, [["disconnect"]])
        yield self.assert_undisturbed()
        client.transport.abortConnection()
        yield client.lost
        yield until(lambda: open_descriptors() <= descriptors, "descriptors given back")

    @inlineCallbacks
    def test_slow_reader_is_not_closed(self):  # type: ignore[no-untyped-def]
        """A client that pauses for less than the stall timeout, then reads, keeps its session."""
        client, conn = yield self.attack_session()
        client.transport.pauseProducing()
        client.send(frame(PINGS.encode()) * 200)
        yield until(self._over, "over the limit", 10)
        yield wait(STALL / 4)
        client.transport.resumeProducing()
        yield until(lambda: len(client.messages()) >= 201, "every echo", 20)
        self.assertEqual(client.messages()[1:], [PINGS] * 200)
        yield wait(STALL)
        self.assertEqual(len(self.server.relay.sessions), 2)
        self.assertFalse(client.closed.called)
        # Its input still reaches guacd.
        client.send(frame(encode("key", "65", "1").encode()))
        yield until(lambda: ["key", "65", "1"] in conn.received, "the key")
        yield self.assert_undisturbed()

    def _over(self) -> bool:
        return any(s.buffered_to_browser() > RELAY_BUFFER for s in self.server.relay.sessions)


class WebSocketPingFloodTests(FloodTestCase):
    """WebSocket ping frames: one pong for the latest ping, never one per ping."""

    @inlineCallbacks
    def test_never_reading_ping_frame_flood_is_bounded(self):  # type: ignore[no-untyped-def]
        client, conn = yield self.attack_session()
        client.transport.pauseProducing()
        pings = b"".join(frame(struct.pack("!I", n) * 31, OP_PING) for n in range(80000))
        client.send(pings)  # 10 MB; a pong each would be 10 MB too
        attacker = self.session_of(conn)
        most = 0
        for _ in range(150):
            most = max(most, attacker.buffered_to_browser())
            yield wait(0.01)
        yield until(
            lambda: not client.transport.dataBuffer and not client.transport._tempDataBuffer,
            "flood sent",
            10,
        )
        self.assertLess(most, BOUND)
        client.transport.resumeProducing()
        yield until(
            lambda: any(
                p == struct.pack("!I", 79999) * 31 for op, p in client.frames if op == OP_PONG
            ),
            "the last ping's pong",
            10,
        )
        pongs = [p for op, p in client.frames if op == OP_PONG]
        # Coalesced: at most one per read of the server's (256 KiB): far fewer than pings.
        self.assertLess(len(pongs), 1000)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_pings_of_one_read_get_one_pong(self):  # type: ignore[no-untyped-def]
        client, _conn = yield self.attack_session()
        client.send(b"".join(frame(bytes([n]) * 4, OP_PING) for n in range(100)))
        yield until(lambda: any(op == OP_PONG for op, _ in client.frames), "a pong")
        yield wait(0.2)
        pongs = [p for op, p in client.frames if op == OP_PONG]
        self.assertLessEqual(len(pongs), 3)  # one per read (a 600-byte write: one read, or few)
        self.assertEqual(pongs[-1], bytes([99]) * 4)
        # A lone ping later gets its own pong.
        client.send(frame(b"solo", OP_PING))
        yield until(lambda: [p for op, p in client.frames if op == OP_PONG][-1] == b"solo", "pong")
        yield self.assert_undisturbed()


class RfbPingFloodTests(RfbTestCase):
    """The same on /rfb: pongs are coalesced and bounded; an honest session relays on."""

    @inlineCallbacks
    def test_never_reading_ping_frame_flood_on_rfb(self):  # type: ignore[no-untyped-def]
        honest = yield self.connect()
        yield self.handshake(honest)
        token = self.server.rfb_tokens.seal(ALICE, self.console())
        client = yield raw_connect(
            self.server.port, upgrade_request(f"/rfb?token={token}", ("binary",))
        )
        self.addCleanup(client.transport.abortConnection)
        yield client.response
        self.assertEqual(client.status, 101)
        yield until(lambda: len(self.server.rfb.sessions) == 2, "both sessions open")
        client.transport.pauseProducing()
        client.send(b"".join(frame(struct.pack("!I", n) * 31, OP_PING) for n in range(80000)))
        most = 0
        for _ in range(150):
            most = max(most, *(s.buffered_to_browser() for s in self.server.rfb.sessions))
            yield wait(0.01)
        self.assertLess(most, BOUND)
        honest.send(b"hello")
        self.assertEqual((yield honest.expect(5)), b"hello")


class StalledRelayTests(FloodTestCase):
    """Relayed data obeys the same stall limit: guacd floods, the browser never reads."""

    def behaviour(self, number: int) -> Behaviour:
        return Behaviour(flood=number == 2)

    @inlineCallbacks
    def test_browser_that_never_reads_relayed_data_is_closed(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        client = yield self.raw_request(upgrade_request(f"/guacamole?token={token}"))
        client.transport.pauseProducing()
        conn = yield self.guacd.wait_for_connection(2)
        yield until(lambda: conn.flood is not None and conn.flood.paused, "guacd paused", 10)
        attacker = self.session_of(conn)
        most, started = 0, reactor.seconds()
        while attacker in self.server.relay.sessions and reactor.seconds() - started < 15:
            most = max(most, attacker.buffered_to_browser())
            yield wait(0.01)
        self.assertLess(most, BOUND)
        self.assertNotIn(attacker, self.server.relay.sessions, "closed")
        (record,) = self.closes.records
        self.assertEqual(record.status, 776)
        self.assertGreaterEqual(record.closed_at - record.opened_at, STALL)
        yield conn.closed
        self.assertEqual(conn.ended_by, "disconnect")
        yield self.assert_undisturbed()
