"""
Tests for L{consoleproxy.guacamole.instructions}: the Guacamole wire format.

Lengths are Unicode code points (REFERENCE.md section 3); the limits are
guacd's: 8192 code points per element, 128 elements (opcode included), 32768
UTF-8 bytes per instruction, at most 5 length digits.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.guacamole.instructions import (
    INTERNAL_OPCODE,
    MAX_ELEMENT_LENGTH,
    MAX_ELEMENTS,
    MAX_INSTRUCTION_BYTES,
    MAX_LENGTH_DIGITS,
    InstructionError,
    InstructionStream,
    elements,
    encode,
    opcode,
    split,
)
from consoleproxy.guacamole.status import Status

EMOJI = "\U0001f600"  # 4 UTF-8 bytes, 2 UTF-16 units, 1 code point
CLEF = "\U0001d11e"  # another astral character
BAD_REQUEST = Status.CLIENT_BAD_REQUEST
OVERRUN = Status.CLIENT_OVERRUN

# --- strategies --------------------------------------------------------------

#: Any code point but surrogates (which UTF-8 cannot carry), biased towards the
#: characters that break naive parsers: the separators, digits, astral ones.
_tricky = st.sampled_from([",", ";", ".", "0", "1", "9", EMOJI, CLEF, "\u00e9", "\u20ac", "\x00"])
_char = st.one_of(_tricky, st.characters(exclude_categories=("Cs",)))
_value = st.text(alphabet=_char, max_size=12)
#: One instruction (opcode first), far within the limits.
_instruction = st.lists(_value, min_size=1, max_size=8)
_instructions = st.lists(_instruction, min_size=1, max_size=6)


def _utf16_units(value: str) -> int:
    return len(value.encode("utf-16-le")) // 2


def _utf8_bytes(value: str) -> int:
    return len(value.encode("utf-8"))


def _size(*elems: str) -> int:
    """UTF-8 size of the encoded instruction."""
    return _utf8_bytes(encode(*elems))


def _sized(nbytes: int, char: str) -> list[str]:
    """
    Elements of an instruction whose encoding is exactly C{nbytes} UTF-8
    bytes, made mostly of C{char}, every element within the element limits.
    """
    width = _utf8_bytes(char)
    elems = ["blob"]
    full = len(str(MAX_ELEMENT_LENGTH)) + 2 + MAX_ELEMENT_LENGTH * width
    while nbytes - _size(*elems) - full >= 200:
        elems.append(char * MAX_ELEMENT_LENGTH)
    remaining = nbytes - _size(*elems)
    # One more element of k chars, then an ASCII element of n to hit the size.
    for k in range(min(MAX_ELEMENT_LENGTH, remaining // width), -1, -1):
        rest = remaining - (len(str(k)) + 2 + k * width)
        for n in range(max(rest - 7, 0), rest + 1):
            if len(str(n)) + 2 + n == rest:
                result = [*elems, char * k, "p" * n]
                assert _size(*result) == nbytes
                assert len(result) <= MAX_ELEMENTS
                assert all(len(e) <= MAX_ELEMENT_LENGTH for e in result)
                return result
    raise AssertionError(f"cannot build {nbytes} bytes of {char!r}")


def _feed_all(stream: InstructionStream, chunks: list[bytes]) -> list[str]:
    out = []
    for chunk in chunks:
        out.extend(stream.feed(chunk))
    return out


class Helpers:
    def assertRefused(self, status: Status, f, *args) -> InstructionError:
        err = self.assertRaises(InstructionError, f, *args)
        self.assertEqual(err.status, status, f"{err!r} for {args!r:.200}")
        return err

    def assertStreamRefuses(self, status: Status, data: bytes) -> InstructionError:
        """The stream refuses C{data} fed at once, and fed one byte at a time."""
        err = self.assertRefused(status, InstructionStream().feed, data)
        stream = InstructionStream()

        def byByte() -> None:
            for i in range(len(data)):
                stream.feed(data[i : i + 1])

        self.assertRefused(status, byByte)
        return err


# --- encoding and round trips ------------------------------------------------


class EncodeTests(SynchronousTestCase):
    def test_example(self) -> None:
        self.assertEqual(encode("size", "0", "1024", "768"), "4.size,1.0,4.1024,3.768;")

    def test_emptyAndInternal(self) -> None:
        self.assertEqual(encode(INTERNAL_OPCODE, "ping", "123"), "0.,4.ping,3.123;")
        self.assertEqual(encode(""), "0.;")
        self.assertEqual(opcode("0.,4.ping,3.123;"), INTERNAL_OPCODE)
        self.assertEqual(elements("0.,4.ping,3.123;"), ["", "ping", "123"])

    def test_countsCodePoints(self) -> None:
        """Not UTF-8 bytes, not UTF-16 units, not grapheme clusters."""
        self.assertEqual(encode(EMOJI), f"1.{EMOJI};")
        self.assertEqual(encode("key", EMOJI * 3), f"3.key,3.{EMOJI * 3};")
        self.assertEqual(encode("\u00e9\u20ac"), "2.\u00e9\u20ac;")
        # e + COMBINING ACUTE ACCENT: one grapheme, two code points.
        self.assertEqual(encode("e\u0301"), "2.e\u0301;")
        # man ZWJ woman ZWJ girl: one grapheme, five code points.
        family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
        self.assertEqual(encode(family), f"5.{family};")

    def test_punctuationInValues(self) -> None:
        instruction = encode("a;b", "1.x,", ";", ",", ".", "0.;")
        self.assertEqual(instruction, "3.a;b,4.1.x,,1.;,1.,,1..,3.0.;;")
        self.assertEqual(split(instruction), [instruction])
        self.assertEqual(elements(instruction), ["a;b", "1.x,", ";", ",", ".", "0.;"])
        self.assertEqual(opcode(instruction), "a;b")

    def test_splitEmpty(self) -> None:
        self.assertEqual(split(""), [])

    def test_statusNumbers(self) -> None:
        """The refusal statuses go on the wire in decimal."""
        self.assertEqual(int(BAD_REQUEST), 768)
        self.assertEqual(int(OVERRUN), 781)


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(_instruction)
    def test_roundTrip(self, elems: list[str]) -> None:
        instruction = encode(*elems)
        self.assertEqual(elements(instruction), elems)
        self.assertEqual(opcode(instruction), elems[0])
        self.assertEqual(split(instruction), [instruction])

    @settings(max_examples=300, deadline=None)
    @given(_instructions)
    def test_splitConcatenation(self, many: list[list[str]]) -> None:
        encoded = [encode(*e) for e in many]
        parts = split("".join(encoded))
        self.assertEqual(parts, encoded)
        self.assertEqual([elements(p) for p in parts], many)
        self.assertEqual([opcode(p) for p in parts], [e[0] for e in many])

    def test_roundTripAtLimits(self) -> None:
        """Largest element, most elements, largest instruction: all intact."""
        cases = [
            ["blob", ("a;,.9" + EMOJI) * (MAX_ELEMENT_LENGTH // 6) + ";,"],
            ["o", *(["", ";", ","] * 43)[: MAX_ELEMENTS - 1]],
            _sized(MAX_INSTRUCTION_BYTES, ";"),
            _sized(MAX_INSTRUCTION_BYTES, EMOJI),
        ]
        self.assertEqual(len(cases[0][1]), MAX_ELEMENT_LENGTH)
        self.assertEqual(len(cases[1]), MAX_ELEMENTS)
        for elems in cases:
            instruction = encode(*elems)
            self.assertEqual(split(instruction + instruction), [instruction] * 2)
            self.assertEqual(elements(instruction), elems)
            self.assertEqual(opcode(instruction), elems[0])
            stream = InstructionStream()
            self.assertEqual(stream.feed(instruction.encode() * 2), [instruction] * 2)
            self.assertEqual(stream.pending, 0)


# --- the incremental stream ----------------------------------------------------


class ChunkingTests(SynchronousTestCase):
    def check(self, encoded: list[str], cuts: list[int]) -> None:
        """
        Feed the UTF-8 of C{encoded} cut at C{cuts}: after every feed, exactly
        the instructions wholly received so far have come out, in order, and
        C{pending} counts the decoded code points of the rest.
        """
        data = "".join(encoded).encode("utf-8")
        ends = []
        offset = 0
        for instruction in encoded:
            offset += _utf8_bytes(instruction)
            ends.append(offset)
        stream = InstructionStream()
        received: list[str] = []
        bounds = [0, *sorted(set(cuts) | {len(data)})]
        for start, stop in itertools.pairwise(bounds):
            received.extend(stream.feed(data[start:stop]))
            whole = sum(1 for end in ends if end <= stop)
            self.assertEqual(received, encoded[:whole], f"after {stop} of {len(data)} bytes")
            done = ends[whole - 1] if whole else 0
            self.assertEqual(stream.pending, len(data[done:stop].decode("utf-8", "ignore")))
        self.assertEqual(received, encoded)
        self.assertEqual(stream.pending, 0)

    @settings(max_examples=300, deadline=None)
    @given(st.data(), _instructions)
    def test_arbitraryChunks(self, data: st.DataObject, many: list[list[str]]) -> None:
        encoded = [encode(*e) for e in many]
        size = sum(_utf8_bytes(i) for i in encoded)
        cuts = data.draw(st.lists(st.integers(0, size)))
        self.check(encoded, cuts)
        self.assertEqual([elements(i) for i in encoded], many)

    @settings(max_examples=100, deadline=None)
    @given(_instructions)
    def test_everyByte(self, many: list[list[str]]) -> None:
        encoded = [encode(*e) for e in many]
        size = sum(_utf8_bytes(i) for i in encoded)
        self.check(encoded, list(range(size)))

    def test_everyTwoWaySplit(self) -> None:
        """Every cut, including inside every multi-byte character."""
        encoded = [
            encode("key", EMOJI, "\u00e9\u20ac", CLEF + ";,."),
            encode("", "ping", "12345"),
            encode("clipboard", "0", "text/plain"),
            encode("blob", "0", "4." + EMOJI * 3 + ",;"),
        ]
        size = sum(_utf8_bytes(i) for i in encoded)
        for cut in range(size + 1):
            self.check(encoded, [cut])
        self.check(encoded, list(range(size)))

    def test_largeInstructionByteByByte(self) -> None:
        encoded = [encode(*_sized(MAX_INSTRUCTION_BYTES, "\u20ac")), encode("nop")]
        data = "".join(encoded).encode()
        stream = InstructionStream()
        received = []
        for i in range(len(data)):
            out = stream.feed(data[i : i + 1])
            if i == len(data) - len("3.nop;") - 1:
                self.assertEqual(out, encoded[:1])
            elif i == len(data) - 1:
                self.assertEqual(out, encoded[1:])
            else:
                self.assertEqual(out, [])
            received.extend(out)
        self.assertEqual(received, encoded)
        self.assertEqual(stream.pending, 0)


# --- lengths are code points -------------------------------------------------


def _miscount(elems: list[str], count) -> str:
    """Encode like a buggy client that counts lengths with C{count}."""
    return ",".join(f"{count(e)}.{e}" for e in elems) + ";"


class CodePointLengthTests(SynchronousTestCase, Helpers):
    @settings(max_examples=300, deadline=None)
    @given(
        _instruction,
        st.data(),
        st.sampled_from([EMOJI, CLEF, "\U00010000", "\U0010ffff"]),
        st.sampled_from([_utf8_bytes, _utf16_units]),
        st.lists(_instruction, max_size=3),
    )
    def test_miscountedNeverYieldsOriginal(self, elems, data, astral, count, following) -> None:
        """
        With lengths in bytes or UTF-16 units, an instruction holding astral
        characters is refused, or parsed as something else: never as itself.
        """
        which = data.draw(st.integers(0, len(elems) - 1))
        where = data.draw(st.integers(0, len(elems[which])))
        elems[which] = elems[which][:where] + astral + elems[which][where:]
        wrong = _miscount(elems, count)
        self.assertNotEqual(wrong, encode(*elems))
        text = wrong + "".join(encode(*f) for f in following)
        try:
            parsed = split(text)
        except InstructionError:
            pass
        else:
            self.assertNotEqual(elements(parsed[0]), elems)
        stream = InstructionStream()
        try:
            out = stream.feed(text.encode())
        except InstructionError:
            pass
        else:
            if out:
                self.assertNotEqual(elements(out[0]), elems)

    def test_utf16LengthAloneIsIncomplete(self) -> None:
        """'2.X;' with X astral: the ';' is part of the value, the rest never comes."""
        text = f"4.test,2.{EMOJI};"
        self.assertRefused(BAD_REQUEST, split, text)
        stream = InstructionStream()
        self.assertEqual(stream.feed(text.encode()), [])
        self.assertEqual(stream.pending, len(text))

    def test_byteLengthAloneIsIncomplete(self) -> None:
        text = f"3.key,8.{EMOJI * 2};"
        self.assertRefused(BAD_REQUEST, split, text)
        stream = InstructionStream()
        self.assertEqual(stream.feed(text.encode()), [])
        self.assertEqual(stream.pending, len(text))

    def test_utf16LengthBadTerminator(self) -> None:
        """The overcount eats ';4' and finds '.' where a terminator must be."""
        text = f"4.test,2.{EMOJI};4.sync,3.123;"
        self.assertRefused(BAD_REQUEST, split, text)
        self.assertRefused(BAD_REQUEST, InstructionStream().feed, text.encode())

    def test_utf16LengthSwallowsNextInstruction(self) -> None:
        """
        CVE-2023-30575's shape: 7 astral characters counted as 14 UTF-16
        units swallow ';4.sync' and two instructions parse as one.
        """
        value = EMOJI * 7
        text = f"4.test,14.{value};4.sync,3.123;"
        parts = split(text)
        self.assertEqual(parts, [text])
        self.assertEqual(elements(parts[0]), ["test", value + ";4.sync", "123"])
        self.assertEqual(InstructionStream().feed(text.encode()), [text])

    def test_byteLengthSwallowsNextInstruction(self) -> None:
        """2 emoji counted as 8 bytes swallow ';3.nop'."""
        text = f"4.test,8.{EMOJI * 2};3.nop;"
        parts = split(text)
        self.assertEqual(parts, [text])
        self.assertEqual(elements(parts[0]), ["test", EMOJI * 2 + ";3.nop"])
        self.assertEqual(opcode(parts[0]), "test")

    def test_codePointLengthOfAstral(self) -> None:
        text = f"4.test,2.{EMOJI * 2};4.sync,3.123;"
        self.assertEqual(split(text), [f"4.test,2.{EMOJI * 2};", "4.sync,3.123;"])
        self.assertEqual(elements(split(text)[0]), ["test", EMOJI * 2])


# --- limits ------------------------------------------------------------------


class ElementLengthLimitTests(SynchronousTestCase, Helpers):
    def test_atLimit(self) -> None:
        for char in ("a", "\u00e9", ";"):
            text = encode("x", char * MAX_ELEMENT_LENGTH)
            self.assertEqual(split(text), [text])
            self.assertEqual(InstructionStream().feed(text.encode()), [text])

    def test_overLimit(self) -> None:
        text = encode("x", "a" * (MAX_ELEMENT_LENGTH + 1))
        self.assertTrue(text.startswith("1.x,8193."))
        self.assertRefused(OVERRUN, split, text)
        self.assertStreamRefuses(OVERRUN, text.encode())

    def test_overLimitOpcode(self) -> None:
        text = encode("a" * (MAX_ELEMENT_LENGTH + 1))
        self.assertRefused(OVERRUN, split, text)
        self.assertStreamRefuses(OVERRUN, text.encode())

    def test_overLimitRefusedOnPrefix(self) -> None:
        """The stream refuses a too-long length as soon as it reads it."""
        for prefix in (b"8193.", b"1.x,8193.", b"99999.", b"09000."):
            self.assertStreamRefuses(OVERRUN, prefix)
            self.assertRefused(OVERRUN, split, prefix.decode())

    def test_overLimitMultiByte(self) -> None:
        """8193 two-byte code points (16386 bytes, within the size limit) are refused."""
        text = encode("x", "\u00e9" * (MAX_ELEMENT_LENGTH + 1))
        self.assertRefused(OVERRUN, split, text)
        self.assertStreamRefuses(OVERRUN, text.encode())


class ElementCountLimitTests(SynchronousTestCase, Helpers):
    def test_atLimit(self) -> None:
        for arg in ("", "a", EMOJI):
            elems = ["op", *[arg] * (MAX_ELEMENTS - 1)]
            text = encode(*elems)
            self.assertEqual(split(text), [text])
            self.assertEqual(elements(text), elems)
            self.assertEqual(InstructionStream().feed(text.encode()), [text])

    def test_overLimit(self) -> None:
        for arg in ("", "a", EMOJI):
            text = encode("op", *[arg] * MAX_ELEMENTS)
            self.assertRefused(OVERRUN, split, text)
            self.assertStreamRefuses(OVERRUN, text.encode())

    def test_overLimitBeforeTerminator(self) -> None:
        """129 complete elements are refused before the instruction ends."""
        data = b"1.a," * (MAX_ELEMENTS + 1)
        self.assertStreamRefuses(OVERRUN, data)


class InstructionSizeLimitTests(SynchronousTestCase, Helpers):
    #: 1 to 4 UTF-8 bytes per character; the multi-byte ones keep the code
    #: point count well under the byte limit.
    chars = ("a", ";", "\u00e9", "\u20ac", EMOJI)

    def test_atLimit(self) -> None:
        for char in self.chars:
            elems = _sized(MAX_INSTRUCTION_BYTES, char)
            text = encode(*elems)
            self.assertEqual(_utf8_bytes(text), MAX_INSTRUCTION_BYTES)
            self.assertEqual(split(text), [text], char)
            self.assertEqual(elements(text), elems)
            stream = InstructionStream()
            self.assertEqual(stream.feed(text.encode()), [text])
            self.assertEqual(stream.pending, 0)

    def test_overLimit(self) -> None:
        for char in self.chars:
            text = encode(*_sized(MAX_INSTRUCTION_BYTES + 1, char))
            self.assertEqual(_utf8_bytes(text), MAX_INSTRUCTION_BYTES + 1)
            if _utf8_bytes(char) > 1:
                self.assertLess(len(text), MAX_INSTRUCTION_BYTES)
            self.assertRefused(OVERRUN, split, text)
            self.assertRefused(OVERRUN, InstructionStream().feed, text.encode())
            stream = InstructionStream()
            data = text.encode()
            self.assertEqual(stream.feed(data[:-1]), [])
            self.assertRefused(OVERRUN, stream.feed, data[-1:])

    def test_overLimitByOneMultiByteCharacter(self) -> None:
        """32767 bytes plus one 2-byte character: 32769 bytes, refused."""
        elems = _sized(MAX_INSTRUCTION_BYTES - 1, "a")
        elems[-1] = elems[-1][:-1] + "\u00e9"
        text = encode(*elems)
        self.assertEqual(_utf8_bytes(text), MAX_INSTRUCTION_BYTES + 1)
        self.assertRefused(OVERRUN, split, text)
        self.assertRefused(OVERRUN, InstructionStream().feed, text.encode())

    def test_limitIsPerInstruction(self) -> None:
        """Two instructions of 32768 bytes in one message are both fine."""
        one = encode(*_sized(MAX_INSTRUCTION_BYTES, "a"))
        two = encode(*_sized(MAX_INSTRUCTION_BYTES, EMOJI))
        self.assertEqual(split(one + two), [one, two])
        stream = InstructionStream()
        self.assertEqual(stream.feed((one + two).encode()), [one, two])
        self.assertEqual(stream.pending, 0)

    def test_streamCompletesAtLimit(self) -> None:
        """32767 bytes pending then ';' make a whole 32768-byte instruction."""
        text = encode(*_sized(MAX_INSTRUCTION_BYTES, "\u20ac"))
        data = text.encode()
        stream = InstructionStream()
        self.assertEqual(stream.feed(data[:-1]), [])
        self.assertEqual(stream.pending, len(text) - 1)
        self.assertEqual(stream.feed(data[-1:]), [text])
        self.assertEqual(stream.pending, 0)

    def assertRefusedWhenPendingExceeds(self, char: str) -> None:
        """
        Feed an endless instruction in 4096-byte chunks: it is refused on the
        chunk that takes it past 32768 bytes, not later.
        """
        data = encode(*_sized(3 * MAX_INSTRUCTION_BYTES, char)).encode()[:-1]
        stream = InstructionStream()
        chunk = 4096
        for start in range(0, len(data), chunk):
            stop = start + chunk
            if stop <= MAX_INSTRUCTION_BYTES:
                self.assertEqual(stream.feed(data[start:stop]), [])
            else:
                self.assertRefused(OVERRUN, stream.feed, data[start:stop])
                return
        self.fail("never refused")

    def test_pendingOverLimitAscii(self) -> None:
        self.assertRefusedWhenPendingExceeds("a")

    def test_pendingOverLimitMultiByte(self) -> None:
        """
        The limit is bytes: 32769+ bytes of an unfinished instruction are
        refused even when they are fewer than 32768 code points.
        """
        self.assertRefusedWhenPendingExceeds("\u20ac")
        self.assertRefusedWhenPendingExceeds(EMOJI)

    def assertRefusedAtOnce(self, char: str) -> None:
        """The shortest unfinished prefix over 32768 bytes, fed at once, is refused."""
        text = encode(*_sized(2 * MAX_INSTRUCTION_BYTES, char))
        size = cut = 0
        while size <= MAX_INSTRUCTION_BYTES:
            size += _utf8_bytes(text[cut])
            cut += 1
        data = text[:cut].encode()
        self.assertEqual(len(data), size)
        self.assertGreater(len(data), MAX_INSTRUCTION_BYTES)
        self.assertRefused(OVERRUN, InstructionStream().feed, data)

    def test_pendingOverLimitAtOnceAscii(self) -> None:
        self.assertRefusedAtOnce("a")

    def test_pendingOverLimitAtOnceMultiByte(self) -> None:
        """32769+ bytes, 8200-odd code points, unfinished: refused."""
        self.assertRefusedAtOnce(EMOJI)


class LengthDigitsTests(SynchronousTestCase, Helpers):
    def test_fiveDigits(self) -> None:
        self.assertEqual(MAX_LENGTH_DIGITS, 5)
        for text in ("00005.hello;", "4.test,00000.;", "08192." + "a" * 8192 + ";"):
            self.assertEqual(split(text), [text])
            self.assertEqual(InstructionStream().feed(text.encode()), [text])
        self.assertEqual(elements("00005.hello,00000.;"), ["hello", ""])
        self.assertEqual(opcode("00005.hello;"), "hello")

    def test_sixDigits(self) -> None:
        for text in ("000005.hello;", "4.test,000000.;", "008192." + "a" * 8192 + ";"):
            err = self.assertRaises(InstructionError, split, text)
            self.assertIn(err.status, (BAD_REQUEST, OVERRUN))
            err = self.assertRaises(InstructionError, InstructionStream().feed, text.encode())
            self.assertIn(err.status, (BAD_REQUEST, OVERRUN))

    def test_sixDigitsRefusedBeforeDot(self) -> None:
        """Six digits and no '.' yet: refused without waiting for more."""
        stream = InstructionStream()
        self.assertEqual(stream.feed(b"00000"), [])
        self.assertRaises(InstructionError, stream.feed, b"5")

    def test_fiveDigitsWaitForDot(self) -> None:
        stream = InstructionStream()
        self.assertEqual(stream.feed(b"4.test,00004"), [])
        self.assertEqual(stream.feed(b".abcd;"), ["4.test,00004.abcd;"])


# --- malformed input -----------------------------------------------------------


class MalformedTests(SynchronousTestCase, Helpers):
    malformed = (
        "a.test;",  # non-digit length
        "\u0663.abc;",  # ARABIC-INDIC DIGIT THREE
        "\u0967.a;",  # DEVANAGARI DIGIT ONE
        "\uff11.a;",  # FULLWIDTH DIGIT ONE
        "\u00b9.a;",  # SUPERSCRIPT ONE: isdigit() but not a decimal
        "-1.a;",
        "+1.a;",
        " 1.a;",
        "1 .a;",
        "1_0.abcdefghij;",  # int() would accept it
        "0x1.a;",
        "1e1.abcdefghij;",
        ".a;",  # empty length
        "4.test:",  # wrong terminator
        "4.test 1.a;",
        "4.test4.next;",  # missing ',' between elements
        "1.ab;",  # length too short
        "4.test,1.ab;",
        "3.abc,,1.a;",  # empty element without length
        "3.abc;;",  # stray terminator
        "\ufeff1.a;",  # BOM
        "3.abc;\n",  # trailing newline after a valid instruction
        "4.test,-0.;",
    )

    def test_split(self) -> None:
        for text in self.malformed:
            self.assertRefused(BAD_REQUEST, split, text)

    def test_stream(self) -> None:
        """
        The stream refuses each one, at the latest once 6 more bytes
        without a '.' prove the length is not a number.
        """
        for text in self.malformed:
            self.assertStreamRefuses(BAD_REQUEST, text.encode() + b"xxxxxx")

    def test_streamRefusesAtSyntaxError(self) -> None:
        """Errors visible in what has arrived are refused at once."""
        for data in (
            b"4.test:",
            b"-1.",
            b"4.test,+1.",
            b"\xd9\xa3.",
            b"1.a,1.bc",
            "\u0663.".encode(),
            b"4.test;x.",
        ):
            self.assertStreamRefuses(BAD_REQUEST, data)

    def test_partialMessage(self) -> None:
        """A message must hold only whole instructions."""
        for text in (
            "4.test",
            "4.test,",
            "4.test,1",
            "4.test,1.",
            "4.test,3.ab",
            "3.nop;4.sync",
            "3.nop;4",
            f"1.{EMOJI}",
        ):
            self.assertRefused(BAD_REQUEST, split, text)

    def test_partialInStreamWaits(self) -> None:
        """An unfinished instruction is not an error for the stream: it waits."""
        stream = InstructionStream()
        self.assertEqual(stream.feed(b"4.test,3.ab"), [])
        self.assertEqual(stream.pending, len("4.test,3.ab"))
        self.assertEqual(stream.feed(b"c;"), ["4.test,3.abc;"])


class InvalidUTF8Tests(SynchronousTestCase, Helpers):
    invalid = (
        b"\xed\xa0\x80",  # encoded high surrogate U+D800
        b"\xed\xbf\xbf",  # encoded low surrogate U+DFFF
        b"\xed\xa0\xbd\xed\xb8\x80",  # CESU-8 pair for U+1F600
        b"\xc0\xaf",  # overlong '/'
        b"\xc1\xbf",  # overlong
        b"\xe0\x80\xaf",  # overlong '/'
        b"\xf0\x80\x80\xaf",  # overlong '/'
        b"\xc0\x80",  # overlong NUL (modified UTF-8)
        b"\x80",  # stray continuation byte
        b"\xbf",
        b"a\x80b",
        b"\xc3a",  # lead byte without continuation
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"\xf8\x88\x80\x80\x80",  # 5-byte form
        b"\xfe",
        b"\xff",
    )

    def test_refusedInValue(self) -> None:
        for bad in self.invalid:
            data = b"4.test,1." + bad + b";"
            self.assertStreamRefuses(BAD_REQUEST, data)

    def test_refusedAnywhere(self) -> None:
        for bad in self.invalid:
            self.assertStreamRefuses(BAD_REQUEST, bad)
            self.assertStreamRefuses(BAD_REQUEST, b"3.nop;" + bad)

    def test_validMultiByteAccepted(self) -> None:
        """Boundary code points that are valid UTF-8 pass."""
        values = ["\x7f", "\x80", "\u07ff", "\u0800", "\ud7ff", "\ue000", "\uffff", "\U0010ffff"]
        text = encode("x", *values)
        stream = InstructionStream()
        self.assertEqual(_feed_all(stream, [bytes([b]) for b in text.encode()]), [text])
        self.assertEqual(elements(text), ["x", *values])


# --- bounded buffering under arbitrary input -----------------------------------

_fragments = st.sampled_from(
    [
        b"a",
        b"0",
        b"9",
        b".",
        b",",
        b";",
        b"1.a",
        b"0.,",
        b"8192.",
        b"4.blob,",
        b"3.nop;",
        "\u00e9".encode(),
        "\u20ac".encode(),
        EMOJI.encode(),
        EMOJI.encode()[:2],
        b"\xed\xa0\x80",
        b"\xff",
    ]
)
#: Elements whose declared length may or may not match their content.
_elementish = st.builds(
    lambda declared, char, count, end: f"{declared}.{char * count}{end}".encode(),
    st.one_of(st.integers(0, 8300), st.sampled_from([0, 1, 8191, 8192, 8193])),
    st.sampled_from(["a", "\u00e9", "\u20ac", EMOJI, ";", ","]),
    st.one_of(st.integers(0, 8300), st.sampled_from([0, 1, 8191, 8192, 8193])),
    st.sampled_from([",", ";", ""]),
)
_pieces = st.lists(
    st.one_of(
        _elementish,
        st.binary(max_size=16),
        st.tuples(_fragments, st.integers(1, 12000)).map(lambda t: t[0] * t[1]),
    ),
    max_size=12,
)


class BoundedBufferTests(SynchronousTestCase):
    def check(self, pieces: list[bytes], stream: InstructionStream | None = None) -> None:
        if stream is None:
            stream = InstructionStream()
        try:
            for piece in pieces:
                out = stream.feed(piece)
                self.assertLessEqual(stream.pending, MAX_INSTRUCTION_BYTES)
                for instruction in out:
                    # Whatever comes out is one valid instruction within limits.
                    self.assertLessEqual(_utf8_bytes(instruction), MAX_INSTRUCTION_BYTES)
                    self.assertEqual(split(instruction), [instruction])
                    self.assertEqual(encode(*elements(instruction)), instruction)
        except InstructionError as e:
            self.assertIn(e.status, (BAD_REQUEST, OVERRUN))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=20))
    def test_randomBytes(self, pieces: list[bytes]) -> None:
        self.check(pieces)

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_pieces)
    def test_randomLargeInput(self, pieces: list[bytes]) -> None:
        self.check(pieces)

    @settings(max_examples=150, deadline=None)
    @given(_instructions, st.binary(max_size=8))
    def test_validThenGarbage(self, many: list[list[str]], garbage: bytes) -> None:
        """Valid instructions come out before anything after them is judged."""
        encoded = [encode(*e) for e in many]
        stream = InstructionStream()
        self.assertEqual(stream.feed("".join(encoded).encode()), encoded)
        self.assertEqual(stream.pending, 0)
        self.check([garbage], stream)
