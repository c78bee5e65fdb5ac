"""RfbInputWatch: which of the browser's RFB bytes are the user's input."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.relay.rfb_input import RfbInputWatch

# (message, is it input), one builder per client-to-server message type.
_MESSAGES = st.one_of(
    st.just((b"\x00" + bytes(19), False)),  # SetPixelFormat
    st.lists(st.integers(-300, 300), max_size=40).map(
        lambda codes: (struct.pack(f"!BxH{len(codes)}i", 2, len(codes), *codes), False)
    ),  # SetEncodings
    st.tuples(st.booleans(), st.integers(0, 0xFFFF)).map(
        lambda t: (struct.pack("!BBHHHH", 3, t[0], 0, 0, t[1], t[1]), False)
    ),  # FramebufferUpdateRequest
    st.integers(0, 0xFFFFFFFF).map(lambda k: (struct.pack("!BBxxI", 4, 1, k), True)),  # KeyEvent
    st.integers(0, 0xFFFF).map(lambda x: (struct.pack("!BBHH", 5, 0, x, x), True)),  # Pointer
    st.binary(max_size=300).map(
        lambda text: (struct.pack("!Bxxxi", 6, len(text)) + text, True)
    ),  # ClientCutText
    st.binary(max_size=300).map(
        lambda data: (struct.pack("!Bxxxi", 6, -len(data)) + data, True)
    ),  # ClientCutText, extended (negative length)
    st.just((struct.pack("!BBHHHH", 150, 1, 0, 0, 64, 64), False)),  # EnableContinuousUpdates
    st.binary(max_size=64).map(
        lambda payload: (struct.pack("!BxxxIB", 248, 0, len(payload)) + payload, False)
    ),  # ClientFence
    st.just((bytes([250, 0, 1, 2]), True)),  # xvp (power buttons)
    st.integers(0, 3).map(
        lambda n: (struct.pack("!BxHHBx", 251, 800, 600, n) + bytes(16 * n), False)
    ),  # SetDesktopSize
    st.just((struct.pack("!BBHII", 255, 0, 1, 0xFF0D, 28), True)),  # QEMU extended key
    st.just((struct.pack("!BBH", 255, 1, 0), False)),  # QEMU audio enable
    st.just((struct.pack("!BBHBBI", 255, 1, 2, 3, 2, 44100), False)),  # QEMU audio format
)


#: Header bytes of the input messages (types 4, 5, 250: the type byte alone).
_HEADER = {6: 8, 255: 2}


class WatchTests(SynchronousTestCase):
    @given(st.lists(_MESSAGES, max_size=30), st.data())
    def test_input_found_in_any_chunking(self, messages, data) -> None:  # type: ignore[no-untyped-def]
        stream = b"".join(m for m, _ in messages)
        # Where the header of each input message ends: input is reported with the
        # chunk that completes it (its size is known from then on).
        header_ends, position = [], 0
        for message, is_input in messages:
            if is_input:
                header_ends.append(position + _HEADER.get(message[0], 1) - 1)
            position += len(message)
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=10)))
        watch = RfbInputWatch(after_security=False)
        start = 0
        for end in [*[c for c in cuts if c < len(stream)], len(stream)]:
            if end <= start:
                continue
            expected = any(start <= last < end for last in header_ends)
            self.assertEqual(watch.feed(stream[start:end]), expected, (start, end))
            start = end
        self.assertFalse(watch.lost)
        self.assertEqual(len(watch._head), 0)

    def test_long_messages_are_skipped_not_buffered(self) -> None:
        watch = RfbInputWatch(after_security=False)
        encodings = struct.pack("!BxH", 2, 60000) + bytes(4 * 60000)
        cut = struct.pack("!Bxxxi", 6, 1 << 20) + bytes(1 << 20)
        self.assertFalse(watch.feed(encodings[:9]))
        self.assertLessEqual(len(watch._head), 9)
        self.assertFalse(watch.feed(encodings[9:]))
        self.assertTrue(watch.feed(cut[:8]))
        self.assertFalse(watch.feed(cut[8:]))  # the rest of the same message
        self.assertTrue(watch.feed(struct.pack("!BBHH", 5, 0, 1, 1)))
        self.assertEqual(len(watch._head), 0)

    def test_client_init_comes_first(self) -> None:
        watch = RfbInputWatch()
        self.assertFalse(watch.feed(b"\x01" + struct.pack("!BBHHHH", 3, 1, 0, 0, 8, 8)))
        self.assertFalse(watch.lost)
        self.assertTrue(watch.feed(struct.pack("!BBHH", 5, 0, 1, 1)))

    def test_unknown_type_counts_everything_as_input(self) -> None:
        watch = RfbInputWatch(after_security=False)
        self.assertFalse(watch.feed(struct.pack("!BBHHHH", 3, 1, 0, 0, 8, 8)))
        self.assertTrue(watch.feed(b"\x07whatever"))
        self.assertTrue(watch.lost)
        self.assertTrue(watch.feed(struct.pack("!BBHHHH", 3, 1, 0, 0, 8, 8)))
