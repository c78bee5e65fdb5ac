"""Tests of tests/helpers/fakeguacd.py itself, so the product tests can trust it.

A small raw client written here (not the product code) talks to the fake over loopback
sockets; timer behaviour runs on a ``task.Clock`` with ``StringTransport``.
"""

from __future__ import annotations

import codecs
import uuid

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, endpoints, protocol, reactor, ssl, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from tests.helpers.fakeguacd import (
    BLOB_MAX_BYTES,
    MAX_INSTRUCTION_BYTES,
    Behaviour,
    FakeGuacd,
    HandshakeFailed,
    Parser,
)
from tests.helpers.testca import make_tls_files

# -- an independent client-side codec ----------------------------------------------------


def enc(*elements: str) -> bytes:
    """Encode one instruction (independently of the fake's encoder)."""
    parts = [str(len(e)) + "." + e for e in elements]
    return (",".join(parts) + ";").encode()


def split_instructions(text: str) -> tuple[list[list[str]], str]:
    """Complete instructions at the start of ``text``, and the unparsed rest."""
    found: list[list[str]] = []
    start = 0
    while True:
        elements: list[str] = []
        pos = start
        while True:
            dot = text.find(".", pos)
            if dot < 0:
                return found, text[start:]
            end = dot + 1 + int(text[pos:dot])
            if end >= len(text):
                return found, text[start:]
            elements.append(text[dot + 1 : end])
            pos = end + 1
            if text[end] == ";":
                break
            assert text[end] == ","
        found.append(elements)
        start = pos


def decode_all(data: bytes) -> list[list[str]]:
    found, rest = split_instructions(data.decode())
    assert rest == "", rest
    return found


class RawClient(protocol.Protocol):
    """Records what the fake sends; ``wait(n)`` fires once n instructions arrived."""

    def __init__(self) -> None:
        self.instructions: list[list[str]] = []
        self.raw_bytes = 0
        self.parse = True
        self.lost: defer.Deferred = defer.Deferred()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._text = ""
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.raw_bytes += len(data)
        if self.parse:
            found, self._text = split_instructions(self._text + self._decoder.decode(data))
            self.instructions.extend(found)
            ready = [(n, d) for n, d in self._waiting if len(self.instructions) >= n]
            for item in ready:
                self._waiting.remove(item)
                item[1].callback(self.instructions[: item[0]])

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        for _, d in self._waiting:
            d.errback(AssertionError(f"closed after {self.instructions!r}"))
        self._waiting = []
        self.lost.callback(reason.getErrorMessage())

    def wait(self, count: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if len(self.instructions) >= count:
            d.callback(self.instructions[:count])
        else:
            self._waiting.append((count, d))
        return d

    def send(self, *elements: str) -> None:
        self.transport.write(enc(*elements))


@defer.inlineCallbacks
def until(predicate, timeout: float = 5.0):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not met in time")
        yield task.deferLater(reactor, 0.01, lambda: None)


HANDSHAKE = (
    ("size", "1024", "768", "96"),
    ("audio", "audio/L8", "audio/L16"),
    ("video",),
    ("image", "image/png", "image/jpeg"),
    ("timezone", "Europe/Paris"),
    ("name", "zoë😀"),
)


def connect_values(names: list[str], **values: str) -> list[str]:
    return [values.get(name.replace("-", "_"), "") for name in names]


# -- the parser --------------------------------------------------------------------------


class ParserTests(unittest.SynchronousTestCase):
    def feed_bytes(self, data: bytes) -> tuple[list[list[str]], str | None]:
        parser = Parser()
        found = []
        for i in range(len(data)):
            found.extend(parser.feed(data[i : i + 1]))
        return found, parser.error

    def test_code_points_byte_by_byte(self) -> None:
        data = "4.size,1.0,4.1024,3.768;4.name,2.é😀;0.,4.ping,1.5;".encode()
        found, error = self.feed_bytes(data)
        self.assertIsNone(error)
        self.assertEqual(found, [["size", "0", "1024", "768"], ["name", "é😀"], ["", "ping", "5"]])

    def test_empty_length_and_leading_zeros(self) -> None:
        parser = Parser()
        self.assertEqual(parser.feed(b".,000003.abc;"), [["", "abc"]])
        self.assertIsNone(parser.error)

    def test_element_length_limit(self) -> None:
        parser = Parser()
        self.assertEqual(parser.feed(enc("x", "a" * 8192)), [["x", "a" * 8192]])
        parser.feed(b"8193.")
        self.assertEqual(parser.error, "element too long")
        self.assertEqual(parser.feed(b"3.nop;"), [])

    def test_element_count_limit(self) -> None:
        parser = Parser()
        self.assertEqual(len(parser.feed(enc(*["a"] * 128))[0]), 128)
        self.assertEqual(parser.feed(enc(*["a"] * 129)), [])
        self.assertEqual(parser.error, "too many elements")

    def test_instruction_byte_limit(self) -> None:
        prefix = enc("x", "a" * 8192, "a" * 8192, "a" * 8192)[:-1] + b","
        fill = MAX_INSTRUCTION_BYTES - len(prefix) - len(b"8164.;")
        exact = prefix + b"%d." % fill + b"a" * fill + b";"
        self.assertEqual(len(exact), MAX_INSTRUCTION_BYTES)
        self.assertEqual(len(Parser().feed(exact)), 1)
        longer = prefix + b"%d." % (fill + 1) + b"a" * (fill + 1) + b";"
        parser = Parser()
        self.assertEqual(parser.feed(longer), [])
        self.assertEqual(parser.error, "instruction too long")
        parser = Parser()
        parser.feed(longer[:MAX_INSTRUCTION_BYTES])  # fails once the buffer is full
        self.assertEqual(parser.error, "instruction too long")

    def test_bad_input(self) -> None:
        for data in (b"3x.abc;", b"3.abc:", b"3.abcd;"):
            parser = Parser()
            parser.feed(data)
            self.assertIsNotNone(parser.error, data)

    @given(
        st.lists(st.lists(st.text(max_size=20), min_size=1, max_size=6), max_size=5),
        st.integers(min_value=1, max_value=7),
    )
    def test_roundtrip_any_chunking(self, instructions, chunk) -> None:
        data = b"".join(enc(*i) for i in instructions)
        parser = Parser()
        found = []
        for i in range(0, len(data), chunk):
            found.extend(parser.feed(data[i : i + chunk]))
        self.assertIsNone(parser.error)
        self.assertEqual(found, instructions)


# -- clock-driven behaviour --------------------------------------------------------------


class ClockTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()

    def connection(self, behaviour: Behaviour | None = None, **kwargs):
        self.fake = FakeGuacd(reactor, clock=self.clock, behaviour=behaviour, **kwargs)
        conn = self.fake.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport

    def drain(self, transport: StringTransport, nops: bool = False) -> list[list[str]]:
        found = decode_all(transport.value())
        transport.clear()
        return found if nops else [i for i in found if i != ["nop"]]

    def handshake(self, conn, transport, protocol_name: str = "vnc") -> list[str]:
        conn.dataReceived(enc("select", protocol_name))
        args = self.drain(transport)[0]
        conn.dataReceived(b"".join(enc(*i) for i in HANDSHAKE))
        conn.dataReceived(enc("connect", *args[1:2], *[""] * (len(args) - 2)))
        return args

    def finish(self, conn) -> None:
        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_select_timeout_closes_at_once(self) -> None:
        conn, transport = self.connection()
        self.clock.advance(14.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.finish(conn)

    def test_handshake_timeout_is_silent_and_lingers(self) -> None:
        conn, transport = self.connection()
        conn.dataReceived(enc("select", "vnc"))
        self.drain(transport)
        self.clock.advance(14)
        conn.dataReceived(b"4.si")  # any byte restarts guacd's 15 s wait
        self.clock.advance(14.9)
        self.assertEqual(conn.state, "handshake")
        self.clock.advance(0.2)
        self.assertTrue(conn.lingering)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.failureResultOf(conn.handshake_done, HandshakeFailed)
        self.assertEqual(self.fake.live_connection_ids(), [])
        conn.dataReceived(b"3.nop;")
        self.assertTrue(transport.disconnecting)
        self.finish(conn)

    def test_keep_alive_nop(self) -> None:
        conn, transport = self.connection()
        self.handshake(conn, transport)
        self.assertEqual(self.drain(transport)[0][0], "ready")
        self.clock.advance(5)
        self.assertEqual(self.drain(transport, nops=True), [["nop"]])
        self.clock.advance(2)
        conn.send("log", "hello")
        conn.dataReceived(enc("nop"))
        self.clock.advance(3)  # t=10: output 3 s ago, no nop
        self.assertEqual(self.drain(transport, nops=True), [["log", "hello"]])
        self.clock.advance(5)  # t=15
        self.assertEqual(self.drain(transport, nops=True), [["nop"]])
        self.finish(conn)

    def test_client_timeout_776_then_disconnect(self) -> None:
        conn, transport = self.connection()
        self.handshake(conn, transport)
        self.drain(transport)
        self.clock.advance(10)
        conn.dataReceived(enc("sync", "0"))
        self.clock.advance(14.9)
        self.assertEqual(self.drain(transport), [])
        self.clock.advance(0.2)
        self.assertEqual(
            self.drain(transport), [["error", "Aborted. See logs.", "776"], ["disconnect"]]
        )
        self.assertTrue(conn.lingering)
        self.assertFalse(transport.disconnecting)
        conn.dataReceived(enc("nop"))
        self.assertTrue(transport.disconnecting)
        self.finish(conn)

    def test_sync_newer_than_server_sync_ends_user(self) -> None:
        conn, transport = self.connection()
        self.handshake(conn, transport)
        self.clock.advance(2)
        conn.send_sync()
        conn.dataReceived(enc("sync", "2000"))
        self.assertEqual(conn.state, "running")
        conn.dataReceived(enc("sync", "2001"))
        self.assertEqual(self.drain(transport)[-1], ["disconnect"])
        self.assertTrue(conn.lingering)
        self.assertEqual(conn.received, [["sync", "2000"], ["sync", "2001"]])
        self.finish(conn)

    def test_parse_error_after_ready(self) -> None:
        conn, transport = self.connection()
        self.handshake(conn, transport)
        self.drain(transport)
        conn.dataReceived(b"3.nop;3.abc:")
        self.assertEqual(self.drain(transport), [["disconnect"]])
        self.assertEqual(conn.received, [["nop"]])
        self.assertTrue(conn.lingering)
        self.finish(conn)

    def test_handshake_any_order_unknown_opcodes_and_bad_size(self) -> None:
        conn, transport = self.connection()
        conn.dataReceived(
            enc("select", "ssh")
            + enc("name", "a")
            + enc("bogus", "1")
            + enc("name", "")
            + enc("size", "800", "600")
        )
        self.assertIsNone(conn.name)
        self.assertEqual(conn.size, ["800", "600"])
        self.assertEqual(conn.state, "handshake")
        conn.dataReceived(enc("size", "800"))
        self.assertTrue(conn.lingering)
        self.assertEqual(self.drain(transport)[0][0], "args")
        self.finish(conn)

    def test_ready_delay_and_pipelined_input(self) -> None:
        conn, transport = self.connection(Behaviour(ready_delay=3))
        self.handshake(conn, transport)
        conn.dataReceived(enc("key", "65", "1"))
        self.assertEqual(self.drain(transport), [])
        self.clock.advance(3)
        self.assertEqual(self.drain(transport)[0][0], "ready")
        self.assertEqual(conn.received, [["key", "65", "1"]])
        self.finish(conn)

    def test_silent(self) -> None:
        conn, transport = self.connection(Behaviour(silent=True))
        conn.dataReceived(enc("select", "vnc") + enc("size", "1", "2"))
        self.clock.advance(100)
        self.assertEqual(self.drain(transport), [])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(conn.handshake_received, [["size", "1", "2"]])
        self.finish(conn)

    def test_refuse_connect_sends_error_after_ready(self) -> None:
        refusal = Behaviour(refuse_connect=("Aborted. See logs.", 519))
        conn, transport = self.connection(refusal)
        self.handshake(conn, transport)
        found = self.drain(transport)
        self.assertEqual([i[0] for i in found], ["ready", "error"])
        self.assertEqual(found[-1][1:], ["Aborted. See logs.", "519"])
        self.assertEqual(conn.state, "running")
        conn.dataReceived(enc("nop"))
        self.assertEqual(self.drain(transport), [["disconnect"]])
        self.assertTrue(conn.lingering)
        self.finish(conn)

    def test_flood_pause_resume_limit(self) -> None:
        conn, transport = self.connection(Behaviour(flood=True, flood_sync_every=8))
        self.handshake(conn, transport)
        flood = conn.flood
        self.assertIs(transport.producer, flood)
        self.assertTrue(transport.streaming)
        found = self.drain(transport)
        blobs = [i for i in found if i[0] == "blob"]
        self.assertEqual(len(blobs), flood.batch)
        self.assertEqual(len(blobs[0][2]), BLOB_MAX_BYTES // 3 * 4)
        self.assertEqual([i[0] for i in found[1:10]], ["blob"] * 8 + ["sync"])
        flood.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(transport.value(), b"")
        flood.resumeProducing()
        self.assertEqual(flood.sent, 2 * flood.batch)
        self.clock.advance(flood.tick)
        self.assertEqual(flood.sent, 3 * flood.batch)
        self.finish(conn)

        conn, transport = self.connection(Behaviour(flood=True, flood_limit=10))
        self.handshake(conn, transport)
        self.assertEqual(conn.flood.sent, 10)
        self.assertIsNone(transport.producer)
        self.finish(conn)

    def test_legacy_guacd_without_version(self) -> None:
        conn, transport = self.connection(version=None, args={"vnc": ["hostname", "port"]})
        conn.dataReceived(enc("select", "vnc"))
        self.assertEqual(self.drain(transport), [["args", "hostname", "port"]])
        for instruction in HANDSHAKE[:4]:
            conn.dataReceived(enc(*instruction))
        conn.dataReceived(enc("connect", "h", "5900"))
        self.assertEqual(conn.connect, {"hostname": "h", "port": "5900"})
        self.assertEqual(self.drain(transport)[0][0], "ready")
        self.finish(conn)

        conn, transport = self.connection(version=None)
        conn.dataReceived(enc("select", "vnc") + enc("timezone", "UTC"))
        self.assertTrue(conn.lingering)
        self.finish(conn)

    def test_owner_leaving_ends_session(self) -> None:
        conn, transport = self.connection()
        self.handshake(conn, transport)
        self.assertEqual(self.fake.live_connection_ids(), [conn.connection_id])
        conn.dataReceived(enc("disconnect"))
        self.assertEqual(self.drain(transport)[-1], ["disconnect"])
        self.assertEqual(self.fake.live_connection_ids(), [])
        self.finish(conn)


# -- real sockets ------------------------------------------------------------------------


class SocketTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def start(self, behaviour=None, endpoint: str = "tcp:0:interface=127.0.0.1", **kwargs):
        fake = FakeGuacd(reactor, endpoint=endpoint, behaviour=behaviour, **kwargs)
        port = yield fake.start()
        self.assertEqual(port, fake.port)
        self.addCleanup(fake.stop)
        return fake

    @defer.inlineCallbacks
    def client(self, fake, trust: bytes | None = None):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", fake.port)
        if trust is not None:
            options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(trust))
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        client = yield endpoints.connectProtocol(endpoint, RawClient())

        def cleanup():
            if not client.lost.called:
                client.transport.abortConnection()
            return client.lost

        self.addCleanup(cleanup)
        return client

    @defer.inlineCallbacks
    def handshake(self, client, protocol_name: str = "vnc", **values: str):
        client.send("select", protocol_name)
        args = (yield client.wait(1))[0]
        for instruction in HANDSHAKE:
            client.send(*instruction)
        client.send("connect", args[1], *connect_values(args[2:], **values))
        return (yield client.wait(2))[1]

    @defer.inlineCallbacks
    def test_full_handshake_records_everything(self) -> None:
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fake = yield self.start()
        client = yield self.client(fake)
        ready = yield self.handshake(client, hostname="10.0.0.7", port="5901", password="s3cret")
        conn = yield fake.wait_for_connection(1)
        self.assertEqual(ready[0], "ready")
        self.assertEqual(ready[1][0], "$")
        self.assertEqual(str(uuid.UUID(ready[1][1:])), ready[1][1:])
        self.assertEqual(conn.connection_id, ready[1])
        self.assertEqual((yield conn.handshake_done), ready[1])
        self.assertEqual(conn.select, "vnc")
        self.assertEqual(conn.size, ["1024", "768", "96"])
        self.assertEqual(conn.audio, ["audio/L8", "audio/L16"])
        self.assertEqual(conn.video, [])
        self.assertEqual(conn.image, ["image/png", "image/jpeg"])
        self.assertEqual((conn.timezone, conn.name), ("Europe/Paris", "zoë😀"))
        self.assertEqual(conn.connect_version, "VERSION_1_5_0")
        self.assertEqual(list(conn.connect), fake.args["vnc"])
        self.assertEqual(
            (conn.connect["hostname"], conn.connect["port"], conn.connect["password"]),
            ("10.0.0.7", "5901", "s3cret"),
        )
        client.send("nop")
        client.send("key", "65307", "1")
        yield until(lambda: len(conn.received) == 2)
        self.assertEqual(conn.received, [["nop"], ["key", "65307", "1"]])
        self.assertEqual(
            conn.received_bytes,
            len(
                b"".join(
                    [
                        enc("select", "vnc"),
                        *(enc(*i) for i in HANDSHAKE),
                        enc(
                            "connect",
                            "VERSION_1_5_0",
                            *connect_values(
                                fake.args["vnc"],
                                hostname="10.0.0.7",
                                port="5901",
                                password="s3cret",
                            ),
                        ),
                        enc("nop"),
                        enc("key", "65307", "1"),
                    ]
                )
            ),
        )
        self.assertEqual(conn.sent_bytes, client.raw_bytes)
        self.assertFalse([e for e in events if "s3cret" in (formatEvent(e) or "")])

    @defer.inlineCallbacks
    def test_args_lists_match_guacd_1_6_0(self) -> None:
        fake = yield self.start()
        expected = {
            "vnc": ("hostname", "quality-level", 51),
            "ssh": ("hostname", "wol-wait-time", 42),
            "rdp": ("hostname", "normalize-clipboard", 88),
        }
        for name, (first, last, count) in expected.items():
            client = yield self.client(fake)
            client.send("select", name)
            args = (yield client.wait(1))[0]
            self.assertEqual(args[:3], ["args", "VERSION_1_5_0", first])
            self.assertEqual((args[-1], len(args) - 2), (last, count))
        self.assertIn("password", fake.args["ssh"])
        self.assertNotIn("enable-agent", fake.args["ssh"])

    @defer.inlineCallbacks
    def test_wrong_connect_arity_ready_then_linger(self) -> None:
        fake = yield self.start()
        client = yield self.client(fake)
        client.send("select", "ssh")
        args = (yield client.wait(1))[0]
        client.send("connect", "VERSION_1_5_0", *[""] * (len(args) - 3))
        ready = (yield client.wait(2))[1]
        conn = yield fake.wait_for_connection(1)
        self.assertEqual(ready, ["ready", conn.connection_id])
        yield self.assertFailure(conn.handshake_done, HandshakeFailed)
        self.assertIsNone(conn.connect)
        self.assertEqual(len(conn.connect_values), len(args) - 3)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(conn.lingering)
        self.assertFalse(client.lost.called)
        client.send("nop")
        yield client.lost
        self.assertEqual(len(client.instructions), 2)

    @defer.inlineCallbacks
    def test_unknown_protocol_sends_nothing_and_lingers(self) -> None:
        fake = yield self.start()
        client = yield self.client(fake)
        client.send("select", "telnet-x")
        conn = yield fake.wait_for_connection(1)
        yield self.assertFailure(conn.handshake_done, HandshakeFailed)
        self.assertTrue(conn.lingering)
        client.send("size", "1", "2")
        yield client.lost
        self.assertEqual(client.raw_bytes, 0)

    @defer.inlineCallbacks
    def test_join_existing_and_unknown_connection(self) -> None:
        fake = yield self.start()
        owner = yield self.client(fake)
        ready = yield self.handshake(owner, "rdp")
        joiner = yield self.client(fake)
        joined = yield self.handshake(joiner, ready[1])
        self.assertEqual(joined, ready)
        second = yield fake.wait_for_connection(2)
        self.assertEqual((second.select, second.connection_id), (ready[1], ready[1]))
        self.assertEqual(list(second.connect), fake.args["rdp"])
        stranger = yield self.client(fake)
        stranger.send("select", "$" + str(uuid.uuid4()))
        yield stranger.lost
        self.assertEqual(stranger.instructions, [["error", "No such connection.", "516"]])

    @defer.inlineCallbacks
    def test_bad_select_and_refusals_close_at_once(self) -> None:
        fake = yield self.start(
            behaviour=lambda n: [
                Behaviour(),
                Behaviour(refuse_select=True),
                Behaviour(refuse_select=("Server busy.", 513)),
            ][n - 1]
        )
        scripts = [
            (("size", "1", "2"), []),
            (("select", "vnc"), []),
            (("select", "vnc"), [["error", "Server busy.", "513"]]),
        ]
        for instruction, expected in scripts:
            client = yield self.client(fake)
            client.send(*instruction)
            yield client.lost
            self.assertEqual(client.instructions, expected)
        for n in (1, 2, 3):
            conn = yield fake.wait_for_connection(n)
            yield self.assertFailure(conn.handshake_done, HandshakeFailed)

    @defer.inlineCallbacks
    def test_send_error_then_disconnect_then_close(self) -> None:
        fake = yield self.start()
        client = yield self.client(fake)
        yield self.handshake(client)
        conn = yield fake.wait_for_connection(1)
        conn.send_error("Upstream went away.", 519)
        yield client.wait(3)
        self.assertEqual(client.instructions[2], ["error", "Upstream went away.", "519"])
        client.send("sync", "0")
        yield client.wait(4)
        self.assertEqual(client.instructions[3], ["disconnect"])
        self.assertEqual(conn.received, [["sync", "0"]])
        yield until(lambda: conn.lingering)
        client.send("nop")
        reason = yield conn.closed
        self.assertIsInstance(reason, str)
        yield client.lost

    @defer.inlineCallbacks
    def test_client_disconnect(self) -> None:
        fake = yield self.start()
        client = yield self.client(fake)
        yield self.handshake(client)
        client.send("disconnect")
        self.assertEqual((yield client.wait(3))[2], ["disconnect"])
        conn = fake.connections[0]
        yield until(lambda: conn.lingering)
        client.transport.loseConnection()
        yield conn.closed

    @defer.inlineCallbacks
    def test_echo(self) -> None:
        fake = yield self.start(behaviour=Behaviour(echo=True))
        client = yield self.client(fake)
        yield self.handshake(client)
        for instruction in (
            ("key", "65", "1"),
            ("sync", "0"),
            ("nop",),
            ("clipboard", "2", "text/plain"),
        ):
            client.send(*instruction)
        found = yield client.wait(4)
        self.assertEqual(found[2:], [["key", "65", "1"], ["clipboard", "2", "text/plain"]])

    @defer.inlineCallbacks
    def test_flood_stops_when_paused(self) -> None:
        fake = yield self.start(behaviour=Behaviour(flood=True))
        client = yield self.client(fake)
        client.send("select", "vnc")
        args = (yield client.wait(1))[0]
        client.send("connect", args[1], *[""] * (len(args) - 2))
        conn = yield fake.wait_for_connection(1)
        client.transport.pauseProducing()  # stop reading: backpressure reaches the fake
        client.parse = False
        sent = -1
        while sent != conn.flood.sent:  # kernel buffers absorb a while, then it stays paused
            yield until(lambda: conn.flood.paused)
            sent = conn.flood.sent
            yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertTrue(conn.flood.paused)
        handshake_bytes = len(enc(*args) + enc("ready", conn.connection_id))
        self.assertEqual(conn.flood.bytes, conn.sent_bytes - handshake_bytes)
        self.assertGreater(conn.flood.syncs, 0)
        client.transport.resumeProducing()
        yield until(lambda: conn.flood.sent > sent + 100)
        self.assertGreaterEqual(conn.flood.pauses, 1)

    @defer.inlineCallbacks
    def test_tls_listener(self) -> None:
        key, cert, ca = make_tls_files(FilePath(self.mktemp()))
        key, cert = endpoints.quoteStringArgument(key), endpoints.quoteStringArgument(cert)
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        fake = yield self.start(endpoint=endpoint)
        client = yield self.client(fake, trust=ca)
        ready = yield self.handshake(client, "ssh", hostname="vm", password="pw")
        conn = yield fake.wait_for_connection(1)
        self.assertEqual(ready[1], conn.connection_id)
        self.assertEqual(conn.connect["hostname"], "vm")

    @defer.inlineCallbacks
    def test_stop_closes_everything(self) -> None:
        fake = FakeGuacd(reactor)
        yield fake.start()
        running = yield self.client(fake)
        yield self.handshake(running)
        lingering = yield self.client(fake)
        lingering.send("select", "nothing-here")
        yield fake.wait_for_connection(2)
        yield fake.stop()
        yield running.lost
        yield lingering.lost
        self.assertEqual(fake.live_connection_ids(), [])
        self.assertTrue(all(c.state == "closed" for c in fake.connections))
