"""
End to end over real loopback sockets:
a real WebSocket client -> consoleproxy -> the fake guacd.
"""

from __future__ import annotations

import re

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from consoleproxy.consoles import Console, Identity
from consoleproxy.guacamole.instructions import InstructionStream, elements, encode
from tests.helpers.fakeguacd import DEFAULT_ARGS, Behaviour, FakeGuacd
from tests.helpers.support import get_json, start_server, wait
from tests.helpers.wsclient import connect

ALICE = Identity("alice")
VNC = Console(7, "vnc", {"hostname": "10.0.0.5", "port": "5907", "password": "vnc-secret"})
SSH = Console(7, "ssh", {"hostname": "10.0.0.5", "port": "22", "username": "root"})
#: All guacd hears of a session whose input was refused: the relay's goodbye.
GOODBYE = [["disconnect"]]
UUID = re.compile(r"^0\.,36\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12};$")


class RelayTestCase(TestCase):
    """Starts a fake guacd and a consoleproxy in front of it."""

    guacd_version: str | None = "VERSION_1_5_0"
    handshake_timeout = 15.0

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.guacd = FakeGuacd(reactor, version=self.guacd_version, behaviour=self.behaviour())
        yield self.guacd.start()
        self.addCleanup(self.guacd.stop)
        self.server = yield start_server(
            self, guacd_port=self.guacd.port, handshake_timeout=self.handshake_timeout
        )

    def behaviour(self) -> Behaviour | None:
        return None

    @inlineCallbacks
    def open(self, console=VNC, query="", protocols=None):  # type: ignore[no-untyped-def]
        """Mint a token, open the WebSocket; return the client once it is open or closed."""
        token = self.server.tokens.seal(ALICE, console)
        client = yield connect(
            self.server.ws_url(f"/guacamole?token={token}{query}"), protocols=protocols
        )
        self.addCleanup(self._close, client)
        yield client.opened
        return client

    @inlineCallbacks
    def _close(self, client):  # type: ignore[no-untyped-def]
        if not client.closed.called:
            client.sendClose(1000)
        yield client.closed
        # Let the relay finish closing guacd's side before the reactor is checked.
        for connection in self.guacd.connections:
            yield connection.closed

    @inlineCallbacks
    def refused_open(self, url, protocols=None):  # type: ignore[no-untyped-def]
        """Open a WebSocket that the relay accepts and closes at once; return (code, reason)."""
        client = yield connect(url, protocols=protocols)
        yield client.opened
        code, reason = yield client.closed
        return client, code, reason


class SessionTests(RelayTestCase):
    @inlineCallbacks
    def test_handshake_values(self):  # type: ignore[no-untyped-def]
        yield self.open(
            query="&width=1280.5&height=800&dpi=120&hostname=evil&port=1&recording-path=/tmp"
        )
        conn = yield self.guacd.wait_for_connection()
        self.assertEqual(conn.select, "vnc")
        self.assertEqual(conn.size, ["1280", "800", "120"])
        self.assertEqual(conn.timezone, "Europe/Madrid")
        self.assertEqual(conn.name, "alice")
        self.assertEqual(conn.connect_version, "VERSION_1_5_0")
        self.assertEqual(conn.audio, ["audio/L8", "audio/L16"])
        self.assertEqual(conn.image, ["image/jpeg", "image/png", "image/webp"])
        expected = {name: "" for name in conn.connect}
        expected.update(hostname="10.0.0.5", port="5907", password="vnc-secret")
        self.assertEqual(conn.connect, expected)
        self.assertEqual(list(conn.connect), list(DEFAULT_ARGS["vnc"]))

    @inlineCallbacks
    def test_ssh_display_parameters(self):  # type: ignore[no-untyped-def]
        yield self.open(
            SSH, query="&color-scheme=green-black&font-name=Mono&font-size=14&password=x"
        )
        conn = yield self.guacd.wait_for_connection()
        self.assertEqual(conn.select, "ssh")
        self.assertEqual(conn.connect["color-scheme"], "green-black")
        self.assertEqual(conn.connect["font-name"], "Mono")
        self.assertEqual(conn.connect["font-size"], "14")
        self.assertEqual(conn.connect["password"], "")
        self.assertEqual(conn.connect["username"], "root")

    @inlineCallbacks
    def test_uuid_first_then_exact_bytes_both_ways(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        sent = [
            ("size", "0", "1024", "768"),
            ("clipboard", "0", "text/plain"),
            ("blob", "0", "a;b,c.😀é"),
            ("sync", "1234"),
        ]
        for instruction in sent:
            conn.send(*instruction)
        expected = "".join(encode(*i) for i in sent)
        yield client.wait_messages(1)
        while len(client.text()) < len(client.messages[0]) + len(expected):
            yield wait(0.01)
        self.assertRegex(client.messages[0], UUID)
        self.assertEqual(client.text()[len(client.messages[0]) :], expected)
        for message in client.messages:
            InstructionStream().feed(message.encode())  # each message holds whole instructions

        client.send("4.sync,4.1234;")
        client.send("3.key,5.65307,1.1;")
        client.send("5.mouse,2.10,2.20,1.1;5.mouse,2.11,2.21,1.0;")
        while len(conn.received) < 4:
            yield wait(0.01)
        self.assertEqual(
            conn.received,
            [
                ["sync", "1234"],
                ["key", "65307", "1"],
                ["mouse", "10", "20", "1"],
                ["mouse", "11", "21", "0"],
            ],
        )

    @inlineCallbacks
    def test_ping_echoed_internal_never_forwarded(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        ping = "0.,4.ping,13.1700000000000;"
        client.send(ping)
        client.send("0.,3.foo;")
        client.send("3.key,2.65,1.1;")
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], ping)
        while not conn.received:
            yield wait(0.01)
        yield wait(0.05)
        self.assertEqual(conn.received, [["key", "65", "1"]])

    @inlineCallbacks
    def test_split_utf8_from_guacd_arrives_whole(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        yield client.wait_messages(1)
        raw = encode("clipboard", "1", "😀" * 3 + "é").encode()
        cut = raw.index("😀".encode()) + 2  # inside the first emoji
        conn.send_raw(raw[:cut])
        yield wait(0.1)
        self.assertEqual(len(client.messages), 1)
        conn.send_raw(raw[cut:])
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], raw.decode())

    @inlineCallbacks
    def test_browser_close_closes_guacd(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        client.sendClose(1000)
        yield conn.closed
        code, _ = yield client.closed
        self.assertEqual(code, 1000)
        self.assertEqual(self.server.relay.sessions, set())

    @inlineCallbacks
    def test_browser_vanishing_closes_guacd(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        client.transport.abortConnection()
        yield conn.closed
        # guacd was told before its socket closed (see test_guacamole_relay_goodbye).
        self.assertEqual((conn.ended_by, conn.received), ("disconnect", GOODBYE))

    @inlineCallbacks
    def test_guacd_error_passes_through_and_maps(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        conn.send_error("Aborted. See logs.", 519)
        code, reason = yield client.closed
        self.assertEqual((code, reason), (1011, "519"))
        self.assertIn(encode("error", "Aborted. See logs.", "519"), client.text())

    @inlineCallbacks
    def test_guacd_clean_close(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        conn.close()
        code, reason = yield client.closed
        self.assertEqual((code, reason), (1000, "0"))

    @inlineCallbacks
    def test_bad_instructions_from_browser(self):  # type: ignore[no-untyped-def]
        for message, expected in (
            ("4.sync,1.1", (1002, "768")),  # ends inside an instruction
            ("x.sync;", (1002, "768")),
            ("8193." + "a" * 8193 + ";", (1009, "781")),
            ("1.a," * 128 + "1.a;", (1009, "781")),
        ):
            client = yield self.open()
            conn = yield self.guacd.wait_for_connection(len(self.guacd.connections))
            client.send(message)
            code, reason = yield client.closed
            self.assertEqual((code, reason), expected, message[:20])
            yield conn.closed
            self.assertEqual(conn.received, GOODBYE)

    @inlineCallbacks
    def test_binary_message_refused(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        client.sendMessage(b"4.sync,1.1;", isBinary=True)
        code, reason = yield client.closed
        self.assertEqual((code, reason), (1003, "783"))
        yield conn.closed

    @inlineCallbacks
    def test_oversized_message_refused(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        client.send("4.sync,1.1;" * 7000)  # 77 000 bytes > 65 536
        code, reason = yield client.closed
        self.assertEqual((code, reason), (1009, "781"))
        yield conn.closed
        self.assertEqual(conn.received, GOODBYE)

    @inlineCallbacks
    def test_session_logs_without_secrets(self):  # type: ignore[no-untyped-def]
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        token = self.server.tokens.seal(ALICE, VNC)
        client = yield connect(self.server.ws_url(f"/guacamole?token={token}"))
        yield client.opened
        conn = yield self.guacd.wait_for_connection()
        conn.send("sync", "1")
        yield client.wait_messages(2)
        client.send("4.sync,1.1;")
        conn.close()
        yield client.closed
        yield wait(0.05)
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertIn("Console opened: user=alice vm=7 type=vnc guacd=$", text)
        closed = [formatEvent(e) for e in events if "Console closed" in formatEvent(e)]
        self.assertEqual(len(closed), 1)
        self.assertRegex(
            closed[0],
            r"user=alice vm=7 type=vnc guacd=\$[-0-9a-f]+ peer=127\.0\.0\.1 "
            r"to_browser=\d+ from_browser=11 duration=\d+\.\ds status=0 \(guacd closed",
        )
        for secret in ("vnc-secret", token, token[:40]):
            self.assertNotIn(secret, text)


class RefusalTests(RelayTestCase):
    @inlineCallbacks
    def assertRefusedBeforeGuacd(self, url, expected=(1008, "769")):  # type: ignore[no-untyped-def]
        _, code, reason = yield self.refused_open(url)
        self.assertEqual((code, reason), expected)
        self.assertEqual(self.guacd.connections, [])

    @inlineCallbacks
    def test_bad_tokens_never_reach_guacd(self):  # type: ignore[no-untyped-def]
        good = self.server.tokens.seal(ALICE, VNC)
        for query in (
            "",
            "?token=",
            "?token=garbage",
            f"?token={good[:-2]}",
            f"?token={good[:10]}{'B' if good[10] == 'A' else 'A'}{good[11:]}",  # one changed
            f"?token={good}&token={good}",
        ):
            yield self.assertRefusedBeforeGuacd(self.server.ws_url(f"/guacamole{query}"))

    @inlineCallbacks
    def test_expired_token(self):  # type: ignore[no-untyped-def]
        server = yield self._short_lived_server()
        token = server.tokens.seal(ALICE, VNC)
        yield wait(0.25)
        yield self.assertRefusedBeforeGuacd(server.ws_url(f"/guacamole?token={token}"))

    @inlineCallbacks
    def _short_lived_server(self):  # type: ignore[no-untyped-def]
        return (yield start_server(self, guacd_port=self.guacd.port, lifetime=0.2))

    @inlineCallbacks
    def test_replayed_token(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        url = self.server.ws_url(f"/fireedge/guacamole?token={token}")
        first = yield connect(url)
        self.addCleanup(self._close, first)
        yield first.opened
        yield self.guacd.wait_for_connection()
        _, code, reason = yield self.refused_open(url)
        self.assertEqual((code, reason), (1008, "769"))
        self.assertEqual(len(self.guacd.connections), 1)

    @inlineCallbacks
    def test_bad_display_values(self):  # type: ignore[no-untyped-def]
        for query in ("&width=abc", "&width=0", "&height=99999999", "&dpi=1&dpi=2"):
            token = self.server.tokens.seal(ALICE, VNC)
            yield self.assertRefusedBeforeGuacd(
                self.server.ws_url(f"/guacamole?token={token}{query}"), (1002, "768")
            )

    @inlineCallbacks
    def test_subprotocol_required(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        client = yield connect(self.server.ws_url(f"/guacamole?token={token}"), protocols=[])
        yield self.assertFailure(client.opened, ConnectionError)
        self.assertEqual(self.guacd.connections, [])

    @inlineCallbacks
    def test_malformed_token_beside_running_session(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        for _ in range(5):
            yield self.refused_open(self.server.ws_url("/guacamole?token=%FF%FE" + "x" * 5000))
        conn.send("sync", "42")
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], "4.sync,2.42;")
        client.send("4.sync,2.42;")
        while not conn.received:
            yield wait(0.01)
        self.assertEqual(conn.received, [["sync", "42"]])
        self.assertEqual(len(self.guacd.connections), 1)


class GuacdRefusalTests(RelayTestCase):
    def behaviour(self) -> Behaviour:
        # guacd 1.6 says 'ready' first and reports upstream failures after it.
        return Behaviour(refuse_connect=("Access denied.", 769))

    @inlineCallbacks
    def test_refusal_status_reaches_browser(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        client, code, reason = yield self.refused_open(
            self.server.ws_url(f"/guacamole?token={token}")
        )
        self.assertEqual((code, reason), (1008, "769"))
        self.assertRegex(client.messages[0], UUID)
        self.assertEqual(
            client.text()[len(client.messages[0]) :], encode("error", "Access denied.", "769")
        )
        # guacd keeps its socket open after an error: the relay must close it.
        yield self.guacd.connections[0].closed


class GuacdHandshakeErrorTests(RelayTestCase):
    def behaviour(self) -> Behaviour:
        return Behaviour(refuse_select=("No such connection.", 516))

    @inlineCallbacks
    def test_error_during_handshake(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        client, code, reason = yield self.refused_open(
            self.server.ws_url(f"/guacamole?token={token}")
        )
        self.assertEqual((code, reason), (1002, "516"))
        self.assertEqual(client.messages, [])


class DelayedReadyTests(RelayTestCase):
    def behaviour(self) -> Behaviour:
        return Behaviour(ready_delay=0.3)

    @inlineCallbacks
    def test_accepted_only_after_ready(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        started = reactor.seconds()
        client = yield connect(self.server.ws_url(f"/guacamole?token={token}"))
        self.addCleanup(self._close, client)
        yield client.opened
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        self.assertIsNotNone(self.guacd.connections[0].connection_id)
        messages = yield client.wait_messages(1)
        self.assertRegex(messages[0], UUID)


class IdleSessionTests(RelayTestCase):
    @inlineCallbacks
    def test_http_timeout_does_not_cut_an_open_session(self):  # type: ignore[no-untyped-def]
        server = yield start_server(self, guacd_port=self.guacd.port, http_timeout=0.3)
        token = server.tokens.seal(ALICE, VNC)
        client = yield connect(server.ws_url(f"/guacamole?token={token}"))
        self.addCleanup(self._close, client)
        yield client.opened
        conn = yield self.guacd.wait_for_connection()
        yield wait(1.0)
        self.assertFalse(client.closed.called)
        conn.send("sync", "7")
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], "4.sync,1.7;")
        self.assertEqual(self.flushLoggedErrors(), [])


class PlainHttpTests(RelayTestCase):
    @inlineCallbacks
    def test_plain_get_gets_json_426(self):  # type: ignore[no-untyped-def]
        code, _, body = yield get_json(self.server.url("/guacamole?token=x"))
        self.assertEqual((code, body["id"]), (426, 426))
        self.assertEqual(self.guacd.connections, [])


class GuacdSilentTests(RelayTestCase):
    handshake_timeout = 0.5

    def behaviour(self) -> Behaviour:
        return Behaviour(silent=True)

    @inlineCallbacks
    def test_handshake_timeout(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        _, code, reason = yield self.refused_open(self.server.ws_url(f"/guacamole?token={token}"))
        self.assertEqual((code, reason), (1011, "514"))
        yield self.guacd.connections[0].closed


class GuacdUnreachableTests(TestCase):
    @inlineCallbacks
    def test_guacd_down(self):  # type: ignore[no-untyped-def]
        server = yield start_server(self, guacd_port=1)
        token = server.tokens.seal(ALICE, VNC)
        client = yield connect(server.ws_url(f"/guacamole?token={token}"))
        yield client.opened
        code, reason = yield client.closed
        # Upstream not found, as Apache's guacamole-common reports it (not 512).
        self.assertEqual((code, reason), (1011, "519"))


class OldGuacdTests(RelayTestCase):
    guacd_version = "VERSION_1_1_0"

    @inlineCallbacks
    def test_no_name_before_1_5(self):  # type: ignore[no-untyped-def]
        yield self.open()
        conn = yield self.guacd.wait_for_connection()
        self.assertEqual(conn.connect_version, "VERSION_1_1_0")
        self.assertEqual(conn.timezone, "Europe/Madrid")
        self.assertIsNone(conn.name)


class AncientGuacdTests(RelayTestCase):
    guacd_version = None

    @inlineCallbacks
    def test_no_version_no_timezone(self):  # type: ignore[no-untyped-def]
        yield self.open()
        conn = yield self.guacd.wait_for_connection()
        self.assertIsNone(conn.connect_version)
        self.assertIsNone(conn.timezone)
        self.assertEqual(conn.connect["hostname"], "10.0.0.5")


class NewerGuacdTests(RelayTestCase):
    guacd_version = "VERSION_1_9_0"

    @inlineCallbacks
    def test_capped_at_1_5_0(self):  # type: ignore[no-untyped-def]
        yield self.open()
        conn = yield self.guacd.wait_for_connection()
        self.assertEqual(conn.connect_version, "VERSION_1_5_0")
        self.assertEqual(conn.name, "alice")


class BackpressureTests(RelayTestCase):
    def behaviour(self) -> Behaviour:
        return Behaviour(flood=True)

    @inlineCallbacks
    def test_browser_that_stops_reading_pauses_guacd(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        yield client.wait_messages(2)
        client.transport.pauseProducing()
        yield wait(1.0)
        produced = conn.flood.bytes
        yield wait(1.0)
        # Once the socket buffers are full, guacd is not read any more.
        self.assertTrue(conn.flood.paused)
        self.assertLess(conn.flood.bytes - produced, 1 << 20)
        self.assertLess(conn.flood.bytes, 32 << 20)
        session = next(iter(self.server.relay.sessions))
        self.assertLess(session.bytes_to_browser, 32 << 20)
        client.transport.resumeProducing()
        before = len(client.text())
        yield wait(0.5)
        self.assertGreater(len(client.text()), before)  # flowing again
        stream = InstructionStream()
        for message in client.messages:
            for instruction in stream.feed(message.encode()):
                self.assertIn(elements(instruction)[0], ("", "blob", "sync"))
        self.assertEqual(stream.pending, 0)


class GuacdThatStopsReadingTests(RelayTestCase):
    @inlineCallbacks
    def test_guacd_that_stops_reading_pauses_browser(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        conn.transport.pauseProducing()
        chunk = "4.blob,1.0," + f"8064.{'A' * 8064};"
        for _ in range(8000):  # ~64 MB offered by the browser
            client.send(chunk)
        yield wait(1.5)
        session = next(iter(self.server.relay.sessions))
        self.assertLess(session.bytes_from_browser, 24 << 20)
        conn.transport.resumeProducing()
