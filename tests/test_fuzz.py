"""
Fuzz targets (hypothesis) for what an attacker feeds the proxy directly: the
Guacamole instruction parser and the token opener.

tests/guacamole/test_instructions.py and tests/test_tokens.py state the properties of
valid input; here the input is hostile: arbitrary text and bytes, valid
streams mutated byte by byte, fed whole and in random chunks, and valid
tokens altered, truncated and spliced.  Invariants:

  - the parser raises L{InstructionError} and nothing else; what it returns
    re-encodes to exactly the input's prefix; its buffer stays within
    guacd's limit; chunking never changes the outcome; and every instruction
    it lets through reads the same in guacd's own parser (the fake guacd's,
    which follows libguac), so nothing it forwards is misparsed upstream;
  - the token opener raises L{TokenError} and nothing else, and never opens
    a token whose bytes were changed.

Examples per target: C{CONSOLEPROXY_FUZZ_EXAMPLES} (default 200, a few
seconds in all); set it higher for a longer campaign.
"""

from __future__ import annotations

import base64
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.consoles import Console, Identity
from consoleproxy.guacamole.instructions import (
    MAX_INSTRUCTION_BYTES,
    InstructionError,
    InstructionStream,
    elements,
    encode,
    split,
)
from consoleproxy.tokens import KeyRing, TokenAuthority, TokenError
from tests.helpers.fakeguacd import Parser as GuacdParser

settings.register_profile(
    "consoleproxy-fuzz",
    max_examples=int(os.environ.get("CONSOLEPROXY_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("consoleproxy-fuzz")

# --- instruction streams -----------------------------------------------------

#: Bytes and characters that matter to the format, and UTF-8's edge cases.
_SPECIAL = [b".", b",", b";", b"0", b"1", b"9", b"00", b"8192", b"99999", b"-", b" "]
_UTF8 = [
    "é".encode(),
    "€".encode(),
    "\U0001f600".encode(),
    b"\xf0\x9f",  # a cut 4-byte character
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xc0\xaf",  # overlong
    b"\xff",
    b"\x00",
]
_piece = st.sampled_from(_SPECIAL + _UTF8)
_value = st.text(
    alphabet=st.one_of(st.sampled_from(".,;0123456789\U0001f600é"), st.characters(codec="utf-8")),
    max_size=10,
)
_instruction = st.lists(_value, min_size=1, max_size=6).map(lambda e: encode(*e))
_stream = st.lists(_instruction, min_size=1, max_size=6).map(lambda i: "".join(i).encode())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid stream with a few byte-level mutations."""
    data = bytearray(draw(_stream))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "digit"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(_piece)
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif kind == "duplicate":
            end = draw(st.integers(at, len(data)))
            data[at:at] = data[at:end]
        elif kind == "digit":  # change a length prefix: the classic miscount
            digits = [i for i, b in enumerate(data) if 0x30 <= b <= 0x39]
            if digits:
                data[draw(st.sampled_from(digits))] = draw(st.integers(0x30, 0x39))
    return bytes(data)


_hostile_bytes = st.one_of(st.binary(max_size=200), mutated(), _stream)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


class InstructionFuzzTests(SynchronousTestCase):
    def feed(self, pieces: list[bytes]) -> tuple[list[str], int, InstructionError | None]:
        """Feed a stream; check the invariants after each piece; return what came out."""
        stream = InstructionStream()
        out: list[str] = []
        try:
            for piece in pieces:
                out += stream.feed(piece)
                self.assertLessEqual(stream.pending, MAX_INSTRUCTION_BYTES)
        except InstructionError as e:
            return out, stream.pending, e
        return out, stream.pending, None

    def assertForwardable(self, instruction: str) -> None:
        """Valid, within guacd's limits, and read by guacd exactly as by us."""
        raw = instruction.encode("utf-8")
        self.assertLessEqual(len(raw), MAX_INSTRUCTION_BYTES)
        self.assertEqual(split(instruction), [instruction])
        # (Lengths may carry leading zeros, as guacd allows: compare elements, not text.)
        self.assertEqual(elements(encode(*elements(instruction))), elements(instruction))
        guacd = GuacdParser()
        self.assertEqual(guacd.feed(raw), [elements(instruction)])
        self.assertIsNone(guacd.error)

    @FUZZ
    @given(_hostile_bytes, st.lists(st.integers(0, 400), max_size=8))
    def test_stream(self, data: bytes, cuts: list[int]) -> None:
        """Whole or in chunks: same outcome, output is the input's prefix, guacd agrees."""
        whole, pending, error = self.feed([data])
        chunked, chunked_pending, chunked_error = self.feed(_chunks(data, cuts))
        self.assertEqual(error is None, chunked_error is None, (data, cuts))
        if error is None:
            self.assertEqual((chunked, chunked_pending), (whole, pending))
        self.assertTrue(data.startswith("".join(chunked).encode("utf-8")))
        for instruction in chunked:
            self.assertForwardable(instruction)

    @FUZZ
    @given(st.one_of(st.text(max_size=200), mutated().map(lambda b: b.decode("utf-8", "replace"))))
    def test_split(self, text: str) -> None:
        """A browser's message: all whole instructions, or refused."""
        try:
            instructions = split(text)
        except InstructionError:
            return
        self.assertEqual("".join(instructions), text)
        for instruction in instructions:
            self.assertForwardable(instruction)
        # The stream agrees, and keeps nothing back.
        self.assertEqual(self.feed([text.encode("utf-8")])[:2], (instructions, 0))


# --- tokens ------------------------------------------------------------------


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


_clock = Clock()
_clock.advance(1_800_000_000)
_KEY = os.urandom(32)
_AUTHORITY = TokenAuthority(KeyRing([_KEY]), _clock)
_CONSOLE = Console(7, "vnc", {"hostname": "10.0.0.5", "port": "5907", "password": "pw"})
#: Valid tokens, never opened: for mutation and splicing only.
_TOKENS = [_AUTHORITY.seal(Identity("alice"), _CONSOLE) for _ in range(4)]
_OTHERS = [
    TokenAuthority(KeyRing([_KEY]), _clock, purpose="rfb").seal(Identity("alice"), _CONSOLE),
    _AUTHORITY.seal(Identity("alice"), Console(7, "vnc", {}, zone="1")),
]


@st.composite
def altered_token(draw: st.DrawFn) -> bytes:
    """A valid token's bytes with at least one change (flips, cuts, splices)."""
    original = _raw(draw(st.sampled_from(_TOKENS)))
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "set"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=20))
        elif kind == "splice":  # a part of another valid token in its place
            donor = _raw(draw(st.sampled_from(_TOKENS + _OTHERS)))
            at = min(at, len(donor))
            end = draw(st.integers(at, len(donor)))
            data[at:end] = donor[at:end]
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


class TokenFuzzTests(SynchronousTestCase):
    def refused(self, token: object) -> None:
        self.assertRaises(TokenError, _AUTHORITY.open, token)

    @FUZZ
    @given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(_text)))
    def test_arbitrary_strings(self, token: str) -> None:
        self.refused(token)

    @FUZZ
    @given(altered_token())
    def test_altered_tokens_never_open(self, data: bytes) -> None:
        if data in {_raw(t) for t in _TOKENS}:
            return  # the changes cancelled out (a splice of the same bytes)
        self.refused(_text(data))

    @FUZZ
    @given(st.sampled_from(_TOKENS + _OTHERS), st.data())
    def test_altered_text_never_opens(self, token: str, data: st.DataObject) -> None:
        """Characters changed in the text: refused, unless the bytes are still the same."""
        chars = list(token)
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(chars) - 1))
            chars[at] = data.draw(st.sampled_from("AZaz09-_+/=.%~ é\x00"))
        text = "".join(chars)
        try:
            strict = base64.b64decode(text + "=" * (-len(text) % 4), b"-_", validate=True)
            same = strict == _raw(token)
        except ValueError:
            same = False
        if not same or token in _OTHERS:
            self.refused(text)
