"""
Which of the browser's RFB bytes are the user's input (for the idle timeout).

noVNC sends messages by itself all the time (update requests after every
update, fences, encodings); only keys, the pointer, the clipboard and the
xvp power buttons mean someone is there.  The raw VNC relay passes bytes on
unchanged; this watcher follows the client-to-server message boundaries of
RFC 6143 and the extensions noVNC uses, to tell input from the rest.  It
holds at most a message header (the rest of a long message is skipped, not
buffered).  A message type it does not know ends the watch: from then on
everything counts as input, so an unknown client is never closed as idle by
mistake.
"""

from __future__ import annotations

import struct

#: Message types that are the user's doing.
_INPUT = {4, 5, 6, 250}
_FIXED = {0: 20, 3: 10, 4: 8, 5: 6, 150: 10, 250: 4}


def _size(head: bytes | bytearray) -> int | None:
    """
    The whole size of the message starting with C{head}; C{None} when more
    of the header is needed; -1 for a type this watcher does not know.
    """
    kind = head[0]
    if kind in _FIXED:
        return _FIXED[kind]
    if kind == 2:  # SetEncodings: u8 type, pad, u16 count, s32 * count
        return None if len(head) < 4 else 4 + 4 * struct.unpack_from("!H", head, 2)[0]
    if kind == 6:  # ClientCutText: u8 type, pad*3, s32 length (negative: extended)
        return None if len(head) < 8 else 8 + abs(struct.unpack_from("!i", head, 4)[0])
    if kind == 248:  # ClientFence: type, pad*3, u32 flags, u8 length, payload
        return None if len(head) < 9 else 9 + head[8]
    if kind == 251:  # SetDesktopSize: type, pad, u16 w, u16 h, u8 screens, pad, 16 * screens
        return None if len(head) < 8 else 8 + 16 * head[6]
    if kind == 255:  # QEMU: u8 submessage
        if len(head) < 2:
            return None
        if head[1] == 0:  # extended key event
            return 12
        if head[1] == 1:  # audio: u16 operation; 2 (set format) carries 6 more bytes
            return (
                None if len(head) < 4 else (10 if struct.unpack_from("!H", head, 2)[0] == 2 else 4)
            )
    return -1


def _is_input(head: bytes | bytearray) -> bool:
    return head[0] in _INPUT or (head[0] == 255 and head[1] == 0)


class RfbInputWatch:
    """Follows the browser's RFB messages; tells whether bytes held input."""

    def __init__(self, after_security: bool = True) -> None:
        """
        @param after_security: the stream starts right after the security
            handshake, with the one-byte ClientInit (the shared flag), which
            is skipped; then come the messages.
        """
        self._head = bytearray()
        self._skip = 1 if after_security else 0
        self.lost = False

    def feed(self, data: bytes) -> bool:
        """Take the next bytes from the browser; whether they hold (part of) user input."""
        if self.lost:
            return True
        seen = False
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            # Grow the header one byte at a time until its size is known.
            self._head.append(data[pos])
            pos += 1
            size = _size(self._head)
            if size is None:
                continue
            if size < 0:
                self.lost = True
                return True
            seen = seen or _is_input(self._head)
            self._skip = size - len(self._head)
            self._head.clear()
        return seen
