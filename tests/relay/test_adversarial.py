"""
Adversarial tests over real loopback sockets: hostile WebSocket frames,
malformed Guacamole instructions, opcodes that must not reach guacd, and
connection parameters smuggled in the query string.  Each attack gets a clean
refusal (close code and numeric Guacamole status), guacd's side of the
attacker's session is closed, and an honest session beside it keeps relaying.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

from consoleproxy.guacamole.instructions import encode
from tests.helpers.adversary import AdversaryTestCase, until
from tests.helpers.fakeguacd import DEFAULT_ARGS, Behaviour
from tests.helpers.rawws import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    frame,
    text_frame,
    upgrade_request,
)
from tests.helpers.support import wait
from tests.relay.test_guacamole_relay import ALICE, GOODBYE, SSH, VNC

BAD_REQUEST = (1002, "768")
OVERRUN = (1009, "781")
BAD_UTF8 = (1007, "768")
BAD_TYPE = (1003, "783")
EMOJI = "\U0001f600"  # one code point, two UTF-16 units, four UTF-8 bytes


class FrameAttackTests(AdversaryTestCase):
    """WebSocket frames no browser sends: each refused, nothing buffered for them."""

    @inlineCallbacks
    def attack(self, data: bytes, expected: tuple[int, str]):  # type: ignore[no-untyped-def]
        client, conn = yield self.attack_session()
        client.send(data)
        yield self.closed_with(client, expected)
        yield conn.closed
        self.assertEqual(conn.received, GOODBYE)
        return conn

    @inlineCallbacks
    def test_frame_announcing_2_40_bytes(self):  # type: ignore[no-untyped-def]
        """Refused on the header alone: the server does not wait for (or buffer) the payload."""
        yield self.attack(frame(b"", length=1 << 40), OVERRUN)  # the header alone
        yield self.attack(frame(b"4.nop;" * 100, length=1 << 40), OVERRUN)
        yield until(lambda: len(self.server.relay.sessions) == 1, "only the honest session")
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_frame_just_over_the_limit(self):  # type: ignore[no-untyped-def]
        yield self.attack(frame(b"", length=65537), OVERRUN)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_fragment_flood(self):  # type: ignore[no-untyped-def]
        """Thousands of tiny continuation frames add up past the message limit."""
        piece = b"4.nop;3.ab"  # 10 bytes a fragment
        fragments = [frame(piece, OP_TEXT, fin=False)]
        fragments += [frame(piece, OP_CONTINUATION, fin=False) for _ in range(7000)]
        yield self.attack(b"".join(fragments), OVERRUN)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_empty_fragment_flood(self):  # type: ignore[no-untyped-def]
        """Empty continuation frames have no bytes to count: their number is capped."""
        fragments = [frame(b"", OP_TEXT, fin=False)]
        fragments += [frame(b"", OP_CONTINUATION, fin=False) for _ in range(5000)]
        yield self.attack(b"".join(fragments), OVERRUN)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_reserved_bits(self):  # type: ignore[no-untyped-def]
        for rsv in (1, 2, 4, 7):
            yield self.attack(frame(b"3.nop;", rsv=rsv), BAD_REQUEST)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_unmasked_frame(self):  # type: ignore[no-untyped-def]
        yield self.attack(frame(b"3.nop;", mask=False), BAD_REQUEST)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_reserved_opcodes_and_bad_fragmentation(self):  # type: ignore[no-untyped-def]
        for data in (
            frame(b"3.nop;", 0x3),  # reserved data opcode
            frame(b"", 0xB),  # reserved control opcode
            frame(b"3.nop;", OP_CONTINUATION),  # continuation of nothing
            frame(b"3.no", OP_TEXT, fin=False) + frame(b"p;", OP_TEXT),  # new message inside one
            frame(b"", 0x9, fin=False),  # fragmented ping
            frame(b"x" * 126, 0x9),  # control frame over 125 bytes
        ):
            yield self.attack(data, BAD_REQUEST)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_fragmented_close_frame(self):  # type: ignore[no-untyped-def]
        """
        Autobahn fails the connection (1002), then reads the same frame as the
        client's close and aborts the socket before its close frame is out: the
        attacker sees the connection dropped; its session and guacd's side go.
        """
        client, conn = yield self.attack_session()
        client.send(frame(b"\x03\xe8", 0x8, fin=False))
        yield client.lost
        yield conn.closed
        self.assertEqual(conn.received, GOODBYE)
        yield until(lambda: len(self.server.relay.sessions) == 1, "only the honest session")
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_binary_frames(self):  # type: ignore[no-untyped-def]
        yield self.attack(frame(b"3.key,2.65,1.1;", OP_BINARY), BAD_TYPE)
        yield self.attack(
            frame(b"3.key,", OP_BINARY, fin=False) + frame(b"2.65,1.1;", OP_CONTINUATION),
            BAD_TYPE,
        )
        yield self.assert_undisturbed()


class SilentReaderTests(AdversaryTestCase):
    """A browser that never reads while guacd floods its session."""

    def behaviour(self, number: int) -> Behaviour:
        return Behaviour(flood=number == 2)

    @inlineCallbacks
    def test_never_reading_client_holds_bounded_memory(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        request = upgrade_request(f"/guacamole?token={token}")
        client = yield self.raw_request(request)
        client.transport.pauseProducing()  # from now on, it reads nothing
        conn = yield self.guacd.wait_for_connection(2)
        yield until(lambda: conn.flood is not None and conn.flood.paused, "guacd paused", 10)
        yield wait(1.0)  # the socket buffers on the way fill up
        produced = conn.flood.bytes
        yield wait(1.0)
        # Once the socket buffers are full, guacd is no longer read: nothing piles up.
        self.assertTrue(conn.flood.paused)
        self.assertLess(conn.flood.bytes - produced, 1 << 20)
        self.assertLess(conn.flood.bytes, 16 << 20)
        ids = {s: s._guacd.connection_id for s in self.server.relay.sessions}
        attacker = [s for s, i in ids.items() if i == conn.connection_id]
        self.assertEqual(len(attacker), 1)
        self.assertLess(attacker[0].bytes_to_browser, 16 << 20)
        yield self.assert_undisturbed()
        # The attacker leaves without a word: its guacd connection goes too.
        client.transport.abortConnection()
        yield conn.closed
        yield until(lambda: len(self.server.relay.sessions) == 1, "attacker's session gone")
        yield self.assert_undisturbed()


class InstructionAttackTests(AdversaryTestCase):
    """Malformed Guacamole data from the browser after the handshake."""

    @inlineCallbacks
    def refused(self, cases: list[tuple[bytes, tuple[int, str]]]):  # type: ignore[no-untyped-def]
        """Send each payload as one text frame in a session of its own."""
        for payload, expected in cases:
            client, conn = yield self.attack_session()
            client.send(frame(payload))
            yield self.closed_with(client, expected)
            yield conn.closed
            self.assertEqual(conn.received, GOODBYE, payload[:40])
        yield self.assert_undisturbed()

    def test_bad_length_prefixes(self):  # type: ignore[no-untyped-def]
        return self.refused(
            [
                (b"x.sync;", BAD_REQUEST),
                (b".sync;", BAD_REQUEST),  # guacd would read an empty length as 0
                (b"-4.sync;", BAD_REQUEST),
                (b"+4.sync;", BAD_REQUEST),
                (b" 4.sync;", BAD_REQUEST),
                (b"4 .sync;", BAD_REQUEST),
                ("\u0664.sync;".encode(), BAD_REQUEST),  # an Arabic-Indic four
                ("\uff14.sync;".encode(), BAD_REQUEST),  # a full-width four
                (b"000004.sync;", BAD_REQUEST),  # six digits
                (b"4.sync,1e1.0123456789;", BAD_REQUEST),
                (b"4.sync;;", BAD_REQUEST),
                (b"4.sync:", BAD_REQUEST),
                (b";", BAD_REQUEST),
            ]
        )

    def test_lengths_past_the_end(self):  # type: ignore[no-untyped-def]
        return self.refused(
            [
                (b"10.sync;", BAD_REQUEST),
                (b"4.sync,99.1;", BAD_REQUEST),
                (b"4.sync,8192.1;", BAD_REQUEST),
                (b"3.key,2.65,1.1;5.mouse,99.1;", BAD_REQUEST),  # valid, then not: none forwarded
            ]
        )

    def test_limits(self):  # type: ignore[no-untyped-def]
        return self.refused(
            [
                (b"8193." + b"a" * 8193 + b";", OVERRUN),
                (b"4.blob,1.0,8193." + b"a" * 8193 + b";", OVERRUN),
                (b"99999.", OVERRUN),  # refused on the prefix alone
                (b"1.a," * 128 + b"1.a;", OVERRUN),
                # Four elements of 8192 characters: within each limit, over guacd's 32768 bytes.
                (b"4.blob" + (b",8192." + b"b" * 8192) * 4 + b";", OVERRUN),
                # 2000 characters of 4 bytes each: 8000 bytes an element, 40 KB in all.
                (("4.blob" + f",2000.{EMOJI * 2000}" * 5 + ";").encode(), OVERRUN),
            ]
        )

    def test_invalid_utf8(self):  # type: ignore[no-untyped-def]
        return self.refused(
            [
                (b"4.sync,1.\xed\xa0\x80;", BAD_UTF8),  # a lone high surrogate
                (b"4.sync,1.\xed\xbf\xbf;", BAD_UTF8),  # a lone low surrogate
                (b"4.sync,2.\xed\xa0\xbd\xed\xb8\x80;", BAD_UTF8),  # CESU-8 pair for U+1F600
                (b"4.sync,1.\xc0\xbb;", BAD_UTF8),  # overlong ';'
                (b"4.sync,1.\xf4\x90\x80\x80;", BAD_UTF8),  # beyond U+10FFFF
                (b"4.sync,1.\xff;", BAD_UTF8),
                (b"4.sync,1.\xf0\x9f\x98", BAD_UTF8),  # cut inside a character
            ]
        )

    def test_utf16_and_byte_lengths_refused(self):  # type: ignore[no-untyped-def]
        """Lengths counted in UTF-16 units or bytes (CVE-2023-30575's bug) are never misparsed."""
        return self.refused(
            [
                (f"4.sync,2.{EMOJI};".encode(), BAD_REQUEST),
                (f"9.clipboard,2.{EMOJI},1.1;".encode(), BAD_REQUEST),
                (f"4.blob,1.0,4.{EMOJI};".encode(), BAD_REQUEST),
                # UTF-16 lengths would swallow the next instruction into the value.
                (f"4.blob,1.0,3.{EMOJI};4.sync;".encode(), BAD_REQUEST),
                (f"5.mouse,4.{EMOJI}{EMOJI},1.1;".encode(), BAD_REQUEST),
            ]
        )

    def test_partial_instructions(self):  # type: ignore[no-untyped-def]
        return self.refused(
            [
                (b"4", BAD_REQUEST),
                (b"4.", BAD_REQUEST),
                (b"4.syn", BAD_REQUEST),
                (b"4.sync", BAD_REQUEST),
                (b"4.sync,", BAD_REQUEST),
                (b"3.key,2.65,1.1", BAD_REQUEST),
                (b"3.key,2.65,", BAD_REQUEST),  # the first half of an instruction
            ]
        )

    @inlineCallbacks
    def test_astral_characters_counted_as_one(self):  # type: ignore[no-untyped-def]
        """The same values with code-point lengths pass, unchanged."""
        client, conn = yield self.attack_session()
        sent = encode("clipboard", "0", f"{EMOJI};1.x,{EMOJI}")
        client.send(text_frame(sent))
        yield until(lambda: conn.received, "the clipboard instruction")
        self.assertEqual(conn.received, [["clipboard", "0", f"{EMOJI};1.x,{EMOJI}"]])
        yield self.assert_undisturbed()


class OpcodeTests(AdversaryTestCase):
    """Opcodes meant for the tunnel or for the handshake, sent after the handshake."""

    @inlineCallbacks
    def test_internal_instructions_never_reach_guacd(self):  # type: ignore[no-untyped-def]
        client, conn = yield self.attack_session()
        internal = [
            "0.;",
            "0.,3.foo;",
            "0.,4.PING,1.1;",
            "0.,5.pings,1.1;",
            "0.,6.select,3.vnc;",
            "0.,7.connect,1.x;",
            "0.,0.,4.ping;",
            "00.,3.foo;",  # the parser accepts leading zeros (as guacd does)
            "000.,6.select,3.vnc;",
        ]
        for message in internal:
            client.send(text_frame(message))
        ping = "0.,4.ping,13.1700000000000;"
        # Mixed with real input in one message: the input goes, the rest stays.
        client.send(text_frame(f"0.,3.foo;3.key,2.65,1.1;{ping}0.,3.bar;"))
        yield until(lambda: conn.received, "the key")
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], ping)  # only the ping is echoed, as it came
        yield wait(0.1)
        self.assertEqual(conn.received, [["key", "65", "1"]])
        self.assertEqual(len(client.messages()), 2)
        padded = "00.,4.ping,1.7;"  # still the internal opcode: echoed, never forwarded
        client.send(text_frame(padded))
        messages = yield client.wait_messages(3)
        self.assertEqual(messages[2], padded)
        self.assertEqual(conn.received, [["key", "65", "1"]])
        self.assertFalse(client.closed.called)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_handshake_opcodes_after_the_handshake(self):  # type: ignore[no-untyped-def]
        """
        Forwarded unchanged, as Apache's tunnel does: after ``ready`` guacd's
        user handlers know only run-time opcodes (``size`` resizes; ``select``,
        ``connect``, ``name``, ``timezone``, ``video``, ``image`` are ignored),
        so nothing reopens the handshake: the connection keeps its target.
        """
        client, conn = yield self.attack_session()
        values = ["VERSION_1_5_0", "evil.example", "22"] + [""] * (len(DEFAULT_ARGS["vnc"]) - 2)
        sent = [
            ("select", "ssh"),
            ("connect", *values),
            ("size", "640", "480", "96"),
            ("audio", "audio/L16"),
            ("video",),
            ("image", "image/png"),
            ("timezone", "Etc/UTC"),
            ("name", "mallory"),
            ("args", "VERSION_1_5_0", "hostname"),
            ("ready", "$x"),
        ]
        for instruction in sent:
            client.send(text_frame(encode(*instruction)))
        yield until(lambda: len(conn.received) == len(sent), "every instruction")
        self.assertEqual(conn.received, [list(i) for i in sent])
        self.assertEqual((conn.select, conn.name, conn.state), ("vnc", "alice", "running"))
        self.assertEqual(conn.connect["hostname"], "10.0.0.5")
        self.assertEqual(len(self.guacd.connections), 2)
        self.assertFalse(client.closed.called)
        yield self.assert_undisturbed()


class QueryInjectionTests(AdversaryTestCase):
    """Connection parameters in the WebSocket's query string never reach guacd."""

    @inlineCallbacks
    def connect_values(self, console, query: str):  # type: ignore[no-untyped-def]
        """Open a session with C{query} appended; return what guacd got in ``connect``."""
        token = self.server.tokens.seal(ALICE, console)
        before = len(self.guacd.connections)
        client = yield self.raw(f"/guacamole?token={token}&{query}")
        self.assertEqual(client.status, 101)
        yield client.wait_messages(1)
        conn = self.guacd.connections[before]
        self.assertEqual(conn.select, console.console_type)
        return conn

    @staticmethod
    def expected(console, **display: str) -> dict[str, str]:
        values = {name: "" for name in DEFAULT_ARGS[console.console_type]}
        values.update(console.parameters)
        values.update(display)
        return values

    @inlineCallbacks
    def test_every_guacd_argument_ignored(self):  # type: ignore[no-untyped-def]
        """Each of guacd's argument names, given by the browser, is ignored (SSH too)."""
        for console, allowed in ((VNC, ()), (SSH, ("color-scheme", "font-name", "font-size"))):
            names = [n for n in DEFAULT_ARGS[console.console_type] if n not in allowed]
            query = "&".join(f"{name}=1" for name in names)
            conn = yield self.connect_values(console, query + "&width=800&height=600&dpi=120")
            self.assertEqual(conn.connect, self.expected(console))
            self.assertEqual(conn.size, ["800", "600", "120"])
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_disguised_names_ignored(self):  # type: ignore[no-untyped-def]
        query = "&".join(
            [
                "host%6Eame=evil.example",  # percent-encoded 'hostname'
                "HOSTNAME=evil.example",
                "hostname%00=evil.example",
                "%20hostname=evil.example",
                "hostname[]=evil.example",
                "port%3D1=2",
                "recording-path=/tmp/x&create-recording-path=true",
                "dest-host=evil.example&dest-port=1&reverse-connect=true",
                "sftp-hostname=evil.example&enable-sftp=true&sftp-root-directory=/",
                "wol-send-packet=true&wol-mac-addr=00:11:22:33:44:55",
                "typescript-path=/tmp&command=id&private-key=x",
                "parameters=hostname&p=hostname&connect=evil",
            ]
        )
        for console in (VNC, SSH):
            conn = yield self.connect_values(console, query)
            self.assertEqual(conn.connect, self.expected(console))
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_instruction_injection_through_display_values(self):  # type: ignore[no-untyped-def]
        """An SSH font name with Guacamole syntax in it is one value, encoded as such."""
        font = "Mono,8.hostname,12.evil.example;7.connect"
        query = "font-name=Mono%2C8.hostname%2C12.evil.example%3B7.connect&color-scheme=x%3By"
        conn = yield self.connect_values(SSH, query)
        self.assertEqual(
            conn.connect, self.expected(SSH, **{"font-name": font, "color-scheme": "x;y"})
        )
        yield self.assert_undisturbed()


class FrameReadingTests(AdversaryTestCase):
    """
    The relay reads whole simple frames itself and leaves the rest to Autobahn:
    whichever reads a frame, the browser's instructions reach guacd in order.
    """

    @inlineCallbacks
    def test_every_kind_of_frame_in_order(self):  # type: ignore[no-untyped-def]
        client, conn = yield self.attack_session()
        keys = [encode("key", str(n), "1") for n in range(12)]
        fragmented = encode("key", "100", "1")
        stream = b"".join(
            [
                text_frame(keys[0] + keys[1]) + text_frame(keys[2]),  # whole frames, one read
                text_frame(encode("clipboard", "0", "x" * 492)),  # 513 = 0x0201 bytes
                frame(b"p", OP_PING),  # a control frame between them: Autobahn's
                text_frame(keys[3]),
                frame(fragmented[:5].encode(), OP_TEXT, fin=False),  # a fragmented message
                frame(fragmented[5:].encode(), OP_CONTINUATION),
                text_frame(keys[4]),
                text_frame(encode("clipboard", "0", EMOJI * 300 + "é" * 7000)),  # 16-bit length
            ]
        )
        split = text_frame(keys[5])
        client.send(stream + split[:3])  # ...and a frame cut across two reads
        yield wait(0.05)
        client.send(split[3:] + text_frame(keys[6]))
        expected = [["key", str(n), "1"] for n in range(3)]
        expected += [["clipboard", "0", "x" * 492], ["key", "3", "1"]]
        expected += [["key", "100", "1"], ["key", "4", "1"]]
        expected += [["clipboard", "0", EMOJI * 300 + "é" * 7000]]
        expected += [["key", "5", "1"], ["key", "6", "1"]]
        yield until(lambda: len(conn.received) >= len(expected), "every instruction")
        self.assertEqual(conn.received, expected)
        self.assertFalse(client.closed.called)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_bad_utf8_in_a_whole_frame_is_still_refused(self):  # type: ignore[no-untyped-def]
        client, conn = yield self.attack_session()
        client.send(text_frame(encode("key", "1", "1")) + frame(b"3.key,1.\xff,1.1;"))
        yield self.closed_with(client, BAD_UTF8)
        self.assertEqual(conn.received, [["key", "1", "1"], *GOODBYE])
        yield self.assert_undisturbed()
