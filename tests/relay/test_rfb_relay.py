"""The raw VNC relay: RFB handshakes both ways, opaque relaying, refusals, limits, backpressure.

A small fake VNC server (RFB 3.3/3.7/3.8, security None or VNC authentication checked with
the DES answer) and a real x11vnc on Xvfb (when installed) sit behind a consoleproxy on
loopback; a real WebSocket client (Autobahn) plays the browser.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from consoleproxy.consoles import Console, Identity
from consoleproxy.relay import rfb_relay as rfb
from consoleproxy.relay.rfb_relay import vnc_auth_response
from consoleproxy.relay.websocket import CancelTimersOnLoss, ClockTimer
from tests.helpers.consoleserver import start_console_server
from tests.helpers.support import wait

ALICE = Identity("alice")
CHALLENGE = bytes(range(16))


class VncAuthTests(SynchronousTestCase):
    def test_des_known_answer(self) -> None:
        # FIPS 46 / the classic DES example: key 133457799BBCDFF1, plaintext
        # 0123456789ABCDEF, ciphertext 85E813540F0AB405.  VNC mirrors the key's bits.
        key = bytes.fromhex("133457799BBCDFF1")
        password = bytes(int(f"{b:08b}"[::-1], 2) for b in key)
        answer = vnc_auth_response(password, bytes.fromhex("0123456789ABCDEF") * 2)
        self.assertEqual(answer, bytes.fromhex("85E813540F0AB405") * 2)

    def test_password_rules(self) -> None:
        # Only the first 8 bytes count; shorter passwords are padded with zeros.
        self.assertEqual(
            vnc_auth_response("12345678", CHALLENGE), vnc_auth_response("123456789", CHALLENGE)
        )
        self.assertEqual(
            vnc_auth_response("abc", CHALLENGE), vnc_auth_response(b"abc\0\0\0\0\0", CHALLENGE)
        )
        self.assertNotEqual(
            vnc_auth_response("abc", CHALLENGE), vnc_auth_response("abd", CHALLENGE)
        )
        self.assertRaises(ValueError, vnc_auth_response, "x", b"short")


class FakeVnc(Protocol):
    """A VNC server's handshake, then it echoes (or floods, or stops reading)."""

    factory: FakeVncFactory

    def __init__(self) -> None:
        self.state = "version"
        self.buffer = b""
        self.client_version = b""
        self.chosen: int | None = None
        self.client_init: bytes | None = None
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self.flooded = 0
        self.paused = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.transport.write(self.factory.version)

    def take(self, count: int) -> bytes | None:
        if len(self.buffer) < count:
            return None
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relay":
            self.received += data
            if self.factory.echo:
                self.transport.write(data)
            return
        self.buffer += data
        while self.step():
            pass

    def step(self) -> bool:
        f = self.factory
        if self.state == "version":
            line = self.take(12)
            if line is None:
                return False
            self.client_version = line
            if f.version == b"RFB 003.003\n":
                self.transport.write(struct.pack("!I", f.types[0] if f.types else 0))
                if not f.types:
                    self.transport.write(struct.pack("!I", 6) + b"nope33")
                    self.transport.loseConnection()
                    return False
                return self.chose(f.types[0])
            self.transport.write(bytes([len(f.types), *f.types]))
            if not f.types:
                self.transport.write(struct.pack("!I", 13) + b"go away today")
                self.transport.loseConnection()
                return False
            self.state = "choice"
        elif self.state == "choice":
            raw = self.take(1)
            if raw is None:
                return False
            return self.chose(raw[0])
        elif self.state == "challenge":
            answer = self.take(16)
            if answer is None:
                return False
            if answer == vnc_auth_response(f.password, CHALLENGE):
                self.transport.write(struct.pack("!I", 0))
                self.state = "init"
            else:
                self.transport.write(struct.pack("!I", 1))
                if self.client_version == b"RFB 003.008\n":
                    self.transport.write(struct.pack("!I", 19) + b"Authentication fail")
                self.transport.loseConnection()
                return False
        elif self.state == "init":
            raw = self.take(1)
            if raw is None:
                return False
            self.client_init = raw
            self.state = "relay"
            self.transport.write(b"SERVERINIT")
            if f.flood:
                self.transport.registerProducer(self, True)
                self.resumeProducing()
            if self.buffer:
                rest, self.buffer = self.buffer, b""
                self.dataReceived(rest)
            return False
        return True

    def chose(self, chosen: int) -> bool:
        self.chosen = chosen
        if chosen == 2:
            self.transport.write(CHALLENGE)
            self.state = "challenge"
        else:
            if self.client_version == b"RFB 003.008\n":
                self.transport.write(struct.pack("!I", 0))
            self.state = "init"
        return True

    # A push producer flooding the relay, for backpressure.
    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.flooded < 64 << 20 and self.transport is not None:
            self.transport.write(b"F" * 65536)
            self.flooded += 65536

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class FakeVncFactory(Factory):
    protocol = FakeVnc
    noisy = False

    def __init__(
        self,
        version: bytes = b"RFB 003.008\n",
        types: tuple[int, ...] = (2,),
        password: str = "vncpw",
        echo: bool = True,
        flood: bool = False,
    ) -> None:
        self.version, self.types, self.password = version, list(types), password
        self.echo, self.flood = echo, flood
        self.connections: list[FakeVnc] = []


class BinaryClient(CancelTimersOnLoss, WebSocketClientProtocol):
    """A browser stand-in: records binary messages and how the connection closed."""

    def __init__(self) -> None:
        super().__init__()
        self.got = b""
        self.messages: list[bytes] = []
        self.texts = 0
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self.subprotocol: str | None = None

    def onConnect(self, response: Any) -> None:
        self.subprotocol = response.protocol

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.texts += 1
        self.messages.append(payload)
        self.got += payload

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"refused: {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    @inlineCallbacks
    def expect(self, count: int, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        """Wait until C{count} bytes arrived; return and forget them."""
        deadline = reactor.seconds() + timeout
        while len(self.got) < count:
            if reactor.seconds() > deadline or self.closed.called:
                raise AssertionError(f"got {self.got!r}, wanted {count} bytes")
            yield wait(0.01)
        taken, self.got = self.got[:count], self.got[count:]
        return taken

    def send(self, data: bytes) -> None:
        """Send one binary message."""
        self.sendMessage(data, isBinary=True)


class _ClientFactory(WebSocketClientFactory):
    protocol = BinaryClient

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batched_timer = ClockTimer(reactor)


class RfbTestCase(TestCase):
    """A fake VNC server behind a consoleproxy."""

    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory()

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.clients: list[BinaryClient] = []
        self.fake = self.vnc()
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.fake)
        self.addCleanup(port.stopListening)
        self.server = yield start_console_server(
            self, vnc_port=port.getHost().port, vnc_password=self.fake.password
        )
        self.vnc_port = port.getHost().port

    def console(self, **parameters: str) -> Console:
        values = {"hostname": "127.0.0.1", "port": str(self.vnc_port), "password": "vncpw"}
        values.update(parameters)
        return Console(vm_id=7, console_type="vnc", parameters=values)

    @inlineCallbacks
    def connect(self, token: str | None = None, protocols: list[str] | None = None):  # type: ignore[no-untyped-def]
        """Open /rfb with a token (a fresh one by default); return the client once open."""
        if token is None:
            token = self.server.rfb_tokens.seal(ALICE, self.console())
        url = self.server.ws_url(f"/rfb?token={token}")
        factory = _ClientFactory(url, protocols=["binary"] if protocols is None else protocols)
        factory.setProtocolOptions(openHandshakeTimeout=30, closeHandshakeTimeout=2)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port).connect(factory)
        if not self.clients:
            self.addCleanup(self._close_all)
        self.clients.append(client)
        yield client.opened
        return client

    @inlineCallbacks
    def _close_all(self):  # type: ignore[no-untyped-def]
        for client in self.clients:
            if not client.closed.called:
                client.sendClose(1000)
            yield client.closed
        # Let the relay finish closing the VNC side before the reactor is checked.
        for connection in self.fake.connections:
            yield connection.lost

    @inlineCallbacks
    def handshake(self, client: BinaryClient, version: bytes = b"RFB 003.008\n"):  # type: ignore[no-untyped-def]
        """The browser's side of the handshake, up to ServerInit."""
        self.assertEqual((yield client.expect(12)), b"RFB 003.008\n")
        client.send(version)
        if version == b"RFB 003.003\n":
            self.assertEqual((yield client.expect(4)), struct.pack("!I", 1))
        else:
            self.assertEqual((yield client.expect(2)), b"\x01\x01")
            client.send(b"\x01")
            if version == b"RFB 003.008\n":
                self.assertEqual((yield client.expect(4)), b"\0\0\0\0")
        client.send(b"\x01")  # ClientInit, shared
        self.assertEqual((yield client.expect(10)), b"SERVERINIT")


class SessionTests(RfbTestCase):
    @inlineCallbacks
    def test_vnc_auth_then_opaque_bytes_both_ways(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        self.assertEqual(client.subprotocol, "binary")
        fake = self.fake.connections[0]
        # Authenticated before the browser was accepted: the password never left the server.
        self.assertEqual((fake.client_version, fake.chosen), (b"RFB 003.008\n", 2))
        yield self.handshake(client)
        self.assertEqual(fake.client_init, b"\x01")
        payload = bytes(range(256)) * 40
        client.send(payload)
        self.assertEqual((yield client.expect(len(payload))), payload)
        self.assertEqual(fake.received, payload)
        self.assertEqual(client.texts, 0)
        session = next(iter(self.server.rfb.sessions))
        self.assertEqual(session.bytes_from_browser, 12 + 1 + 1 + len(payload))

    @inlineCallbacks
    def test_browser_versions_3_3_and_3_7(self):  # type: ignore[no-untyped-def]
        for version in (b"RFB 003.003\n", b"RFB 003.007\n"):
            client = yield self.connect()
            yield self.handshake(client, version)
            client.send(b"ping")
            self.assertEqual((yield client.expect(4)), b"ping")

    @inlineCallbacks
    def test_large_reads_are_cut_at_the_message_limit(self):  # type: ignore[no-untyped-def]
        # The real limit (1 MiB) is above any read; a smaller one shows the cut.
        self.patch(rfb, "MAX_OUTGOING_MESSAGE", 65536)
        client = yield self.connect()
        yield self.handshake(client)
        payload = os.urandom(60000) * 5
        for start in range(0, len(payload), 30000):
            client.send(payload[start : start + 30000])
        self.assertEqual((yield client.expect(len(payload))), payload)
        self.assertLessEqual(max(len(m) for m in client.messages), 65536)

    @inlineCallbacks
    def test_vnc_server_closes(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client)
        self.fake.connections[0].transport.loseConnection()
        self.assertEqual((yield client.closed), (1000, "0"))

    @inlineCallbacks
    def test_browser_closes(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client)
        client.sendClose(1000)
        yield self.fake.connections[0].lost
        yield client.closed

    @inlineCallbacks
    def test_browser_leaves_during_its_handshake(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield client.expect(12)
        client.transport.abortConnection()
        yield self.fake.connections[0].lost

    @inlineCallbacks
    def test_bad_browser_handshakes(self):  # type: ignore[no-untyped-def]
        for data, code, status in (
            (b"HTTP/1.1 200\n", 1002, "768"),  # not RFB
            (b"RFB 002.000\n", 1002, "768"),  # too old
        ):
            client = yield self.connect()
            yield client.expect(12)
            client.send(data)
            self.assertEqual((yield client.closed), (code, status))
        client = yield self.connect()
        yield client.expect(12)
        client.send(b"RFB 003.008\n")
        yield client.expect(2)
        client.send(b"\x02")  # VNC authentication is not offered to the browser
        self.assertEqual((yield client.closed), (1002, "768"))
        client = yield self.connect()
        client.sendMessage(b"RFB 003.008\n", isBinary=False)
        self.assertEqual((yield client.closed), (1003, "783"))

    @inlineCallbacks
    def test_oversized_message(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client)
        client.send(b"x" * 65537)
        self.assertEqual((yield client.closed), (1009, "781"))


class RefusalTests(RfbTestCase):
    @inlineCallbacks
    def refused(self, token: str | None = None):  # type: ignore[no-untyped-def]
        client = yield self.connect(token)
        closed = yield client.closed
        return closed

    @inlineCallbacks
    def test_tokens(self):  # type: ignore[no-untyped-def]
        guacamole_token = self.server.tokens.seal(ALICE, self.console())
        self.assertEqual((yield self.refused(guacamole_token)), (1008, "769"))
        self.assertEqual((yield self.refused("garbage")), (1008, "769"))
        token = self.server.rfb_tokens.seal(ALICE, self.console())
        client = yield self.connect(token)
        yield self.handshake(client)
        self.assertEqual((yield self.refused(token)), (1008, "769"))  # single use
        ssh = Console(vm_id=7, console_type="ssh", parameters={"hostname": "h", "port": "22"})
        self.assertEqual(
            (yield self.refused(self.server.rfb_tokens.seal(ALICE, ssh))), (1008, "771")
        )
        # A token for another zone is sealed under that zone's key: it does not open here.
        zoned = Console(7, "vnc", dict(self.console().parameters), zone="1")
        self.assertEqual(
            (yield self.refused(self.server.rfb_tokens.seal(ALICE, zoned))), (1008, "769")
        )
        # A Guacamole token does not open under the rfb purpose's key: "tampered" too.
        self.assertEqual(
            self.server.rfb.token_refusals, {"tampered": 2, "malformed": 1, "replayed": 1}
        )
        # Refused tokens never reached the VNC server: only the good one did.
        self.assertEqual(len(self.fake.connections), 1)

    @inlineCallbacks
    def test_subprotocol_required(self):  # type: ignore[no-untyped-def]
        with self.assertRaises(ConnectionError):
            yield self.connect(protocols=["guacamole"])

    @inlineCallbacks
    def test_unreachable(self):  # type: ignore[no-untyped-def]
        token = self.server.rfb_tokens.seal(ALICE, self.console(port="1"))
        self.assertEqual((yield self.refused(token)), (1011, "519"))

    @inlineCallbacks
    def test_wrong_password(self):  # type: ignore[no-untyped-def]
        token = self.server.rfb_tokens.seal(ALICE, self.console(password="wrong"))
        self.assertEqual((yield self.refused(token)), (1011, "515"))

    @inlineCallbacks
    def test_no_password_for_vnc_auth(self):  # type: ignore[no-untyped-def]
        token = self.server.rfb_tokens.seal(ALICE, self.console(password=""))
        self.assertEqual((yield self.refused(token)), (1011, "515"))

    @inlineCallbacks
    def test_plain_get_426(self):  # type: ignore[no-untyped-def]
        from tests.helpers.support import get_json  # noqa: PLC0415

        code, _, body = yield get_json(self.server.url("/rfb").encode())
        self.assertEqual(code, 426)
        self.assertIn("binary", body["data"])


class Rfb33Tests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(version=b"RFB 003.003\n", types=(2,))

    @inlineCallbacks
    def test_server_3_3_vnc_auth(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client)
        self.assertEqual(self.fake.connections[0].client_version, b"RFB 003.003\n")


class Rfb37NoneTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(version=b"RFB 003.007\n", types=(16, 1, 2))

    @inlineCallbacks
    def test_server_3_7_prefers_none(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client, b"RFB 003.003\n")
        self.assertEqual(self.fake.connections[0].chosen, 1)


class AppleVersionTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(version=b"RFB 003.889\n", types=(1,))

    @inlineCallbacks
    def test_newer_version_is_answered_with_3_8(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client)
        self.assertEqual(self.fake.connections[0].client_version, b"RFB 003.008\n")


class UnsupportedSecurityTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(types=(19, 18))

    @inlineCallbacks
    def test_no_supported_type(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        self.assertEqual((yield client.closed), (1011, "515"))


class ServerRefusesTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(types=())

    @inlineCallbacks
    def test_refusal_with_reason(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        self.assertEqual((yield client.closed), (1011, "515"))


class NotRfbTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(version=b"SSH-2.0-x\r\n\0")

    @inlineCallbacks
    def test_not_a_vnc_server(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        self.assertEqual((yield client.closed), (1011, "515"))


class SilentServerTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(version=b"")

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.clients = []
        self.fake = self.vnc()
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.fake)
        self.addCleanup(port.stopListening)
        self.vnc_port = port.getHost().port
        self.server = yield start_console_server(self, vnc_port=self.vnc_port, handshake_timeout=1)

    @inlineCallbacks
    def test_handshake_timeout(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        self.assertEqual((yield client.closed), (1011, "514"))


class BackpressureTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(flood=True, echo=False)

    @inlineCallbacks
    def test_browser_that_stops_reading_pauses_the_vnc_server(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client)
        client.transport.pauseProducing()
        yield wait(1.0)
        fake = self.fake.connections[0]
        flooded = fake.flooded
        yield wait(1.0)
        self.assertTrue(fake.paused)
        self.assertLess(fake.flooded - flooded, 1 << 20)
        self.assertLess(fake.flooded, 32 << 20)
        client.transport.resumeProducing()
        before = len(client.got)
        yield wait(0.5)
        self.assertGreater(len(client.got), before)
        fake.transport.unregisterProducer()
        fake.stopProducing()


class VncServerThatStopsReadingTests(RfbTestCase):
    def vnc(self) -> FakeVncFactory:
        return FakeVncFactory(echo=False)

    @inlineCallbacks
    def test_vnc_server_that_stops_reading_pauses_the_browser(self):  # type: ignore[no-untyped-def]
        client = yield self.connect()
        yield self.handshake(client)
        self.fake.connections[0].transport.pauseProducing()
        chunk = b"B" * 65000
        for _ in range(1000):  # ~64 MB offered by the browser
            client.send(chunk)
        yield wait(1.5)
        session = next(iter(self.server.rfb.sessions))
        self.assertLess(session.bytes_from_browser, 24 << 20)
        self.fake.connections[0].transport.resumeProducing()


class RealX11vncTests(TestCase):
    """The relay's VNC authentication against a real x11vnc."""

    @inlineCallbacks
    def test_x11vnc(self):  # type: ignore[no-untyped-def]
        try:
            from tests.helpers.realservers import start_vnc_desktop  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover
            raise SkipTest(f"tests.helpers.realservers is not available: {e}") from e
        desktop = yield start_vnc_desktop(self, reactor, width=200, height=100, password="s3cret!")
        self.addCleanup(desktop.stop)
        server = yield start_console_server(self, vnc_port=desktop.port)
        console = Console(
            7, "vnc", {"hostname": "127.0.0.1", "port": str(desktop.port), "password": "s3cret!"}
        )
        url = server.ws_url(f"/rfb?token={server.rfb_tokens.seal(ALICE, console)}")
        factory = _ClientFactory(url, protocols=["binary"])
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", server.port).connect(factory)
        yield client.opened
        self.assertEqual((yield client.expect(12)), b"RFB 003.008\n")
        client.send(b"RFB 003.008\n")
        self.assertEqual((yield client.expect(2)), b"\x01\x01")
        client.send(b"\x01")
        self.assertEqual((yield client.expect(4)), b"\0\0\0\0")
        client.send(b"\x01")
        server_init = yield client.expect(24)
        self.assertEqual(struct.unpack("!HH", server_init[:4]), (200, 100))
        client.sendClose(1000)
        yield client.closed
        wrong = Console(7, "vnc", {**console.parameters, "password": "wrong"})
        url = server.ws_url(f"/rfb?token={server.rfb_tokens.seal(ALICE, wrong)}")
        factory = _ClientFactory(url, protocols=["binary"])
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", server.port).connect(factory)
        self.assertEqual((yield client.closed), (1011, "515"))


class TimeoutTests(RfbTestCase):
    """Idle and absolute timeouts on the raw VNC relay: only the user's input counts."""

    @inlineCallbacks
    def test_idle_closes_but_pointer_and_keys_keep_it(self):  # type: ignore[no-untyped-def]
        self.server.rfb.policy.idle_timeout = 0.6
        idle = yield self.connect()
        yield self.handshake(idle)
        busy = yield self.connect()
        yield self.handshake(busy)
        update_request = struct.pack("!BBHHHH", 3, 1, 0, 0, 64, 64)
        encodings = struct.pack("!BxHii", 2, 2, 0, -223)
        for step in range(8):  # 1.2 s
            if not idle.closed.called:
                idle.send(update_request + encodings)
            pointer = struct.pack("!BBHH", 5, 0, step, step)
            key = struct.pack("!BBxxI", 4, step % 2, 0x61)
            busy.send(pointer if step % 2 else key)
            yield wait(0.15)
        self.assertEqual(idle.closed.result if idle.closed.called else None, (1002, "522"))
        self.assertFalse(busy.closed.called)

    @inlineCallbacks
    def test_absolute_limit(self):  # type: ignore[no-untyped-def]
        self.server.rfb.policy.session_timeout = 0.4
        client = yield self.connect()
        yield self.handshake(client)
        client.send(struct.pack("!BBHH", 5, 0, 1, 1))
        self.assertEqual((yield client.closed), (1002, "523"))
