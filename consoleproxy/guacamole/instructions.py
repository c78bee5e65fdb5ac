"""
The Guacamole wire format: encoding, and an incremental, limit-enforcing parser.

An instruction is a list of elements, each written ``LENGTH.VALUE``, joined by
``,`` and ended by ``;``.  LENGTH is the number of Unicode code points of VALUE:
not bytes, not UTF-16 units.  Python's ``str`` is indexed by code points, so
the parser works on decoded text and a length is simply a slice width.  Values
may contain ``,``, ``;`` and ``.``: only a length-aware parser finds the
boundaries, which is why nothing here splits on punctuation.

The limits are guacd's (``libguac/guacamole/parser-constants.h``): a proxy
that forwards what guacd would refuse only moves the failure somewhere less
helpful, and an unbounded buffer is a denial of service.
"""

from __future__ import annotations

import codecs

from consoleproxy.guacamole.status import Status

#: guacd refuses elements longer than this many code points.
MAX_ELEMENT_LENGTH = 8192
#: guacd refuses instructions with more elements (opcode included).
MAX_ELEMENTS = 128
#: guacd's parser buffer: an instruction may not exceed this many bytes of UTF-8.
MAX_INSTRUCTION_BYTES = 32768
#: A length prefix has at most this many decimal digits.
MAX_LENGTH_DIGITS = 5

#: The "internal" opcode: instructions meant for the tunnel, never for guacd.
INTERNAL_OPCODE = ""


class InstructionError(ValueError):
    """
    Malformed or oversized Guacamole data.

    @ivar status: the Guacamole status to close the offending side with:
        L{Status.CLIENT_OVERRUN} for limits, L{Status.CLIENT_BAD_REQUEST} for
        syntax.
    """

    def __init__(self, message: str, status: Status = Status.CLIENT_BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def encode(*elements: str) -> str:
    """
    Encode one instruction; the first element is the opcode.

    >>> encode("size", "0", "1024", "768")
    '4.size,1.0,4.1024,3.768;'
    """
    return ",".join(f"{len(e)}.{e}" for e in elements) + ";"


def _scan(text: str, start: int) -> int:
    """
    Find the end of the instruction that begins at C{text[start]}.

    @return: the index just past its ``;``, or -1 if C{text} ends before the
        instruction does (more data is needed).
    @raise InstructionError: the instruction is malformed or over a limit.
    """
    end_of_text = len(text)
    pos = start
    elements = 0
    while True:
        dot = text.find(".", pos, pos + MAX_LENGTH_DIGITS + 1)
        if dot < 0:
            if end_of_text - pos > MAX_LENGTH_DIGITS:
                raise InstructionError("element length prefix is not a number")
            return -1
        digits = text[pos:dot]
        if not digits or not (digits.isascii() and digits.isdigit()):
            raise InstructionError("element length prefix is not a number")
        length = int(digits)
        if length > MAX_ELEMENT_LENGTH:
            raise InstructionError(
                f"element of {length} characters exceeds {MAX_ELEMENT_LENGTH}",
                Status.CLIENT_OVERRUN,
            )
        terminator = dot + 1 + length
        if terminator >= end_of_text:
            return -1
        elements += 1
        if elements > MAX_ELEMENTS:
            raise InstructionError(
                f"instruction has more than {MAX_ELEMENTS} elements", Status.CLIENT_OVERRUN
            )
        mark = text[terminator]
        if mark == ";":
            end = terminator + 1
            _check_size(text, start, end)
            return end
        if mark != ",":
            raise InstructionError("element is not followed by ',' or ';'")
        pos = terminator + 1


def _check_size(text: str, start: int, end: int) -> None:
    """Refuse an instruction longer than guacd's buffer, counted in UTF-8 bytes."""
    chars = end - start
    # A code point is 1 to 4 bytes: only long non-ASCII instructions need encoding.
    if chars * 4 <= MAX_INSTRUCTION_BYTES:
        return
    if chars > MAX_INSTRUCTION_BYTES or len(text[start:end].encode("utf-8")) > (
        MAX_INSTRUCTION_BYTES
    ):
        raise InstructionError(
            f"instruction exceeds {MAX_INSTRUCTION_BYTES} bytes", Status.CLIENT_OVERRUN
        )


def split(text: str) -> list[str]:
    """
    Split text that must hold only whole instructions (a browser's message).

    @raise InstructionError: on malformed data, a limit, or a partial instruction.
    """
    instructions = []
    start = 0
    while start < len(text):
        end = _scan(text, start)
        if end < 0:
            raise InstructionError("message ends inside an instruction")
        instructions.append(text[start:end])
        start = end
    return instructions


def elements(instruction: str) -> list[str]:
    """
    Return the elements of one whole, already validated instruction.

    Cheap enough for the handshake and the browser's small messages; the
    guacd -> browser hot path never calls it.
    """
    result = []
    pos = 0
    while True:
        dot = instruction.index(".", pos)
        length = int(instruction[pos:dot])
        end = dot + 1 + length
        result.append(instruction[dot + 1 : end])
        if instruction[end] == ";":
            return result
        pos = end + 1


def opcode(instruction: str) -> str:
    """Return the opcode of one whole, already validated instruction."""
    dot = instruction.index(".")
    return instruction[dot + 1 : dot + 1 + int(instruction[:dot])]


class InstructionStream:
    """
    Turn a byte stream into whole instructions.

    Bytes are decoded incrementally, so a multi-byte UTF-8 character split
    across reads waits for its last byte; invalid UTF-8 (including encoded
    surrogates) is refused.  What has not yet formed a whole instruction is
    kept, and never more than one instruction's worth: the buffer is bounded
    by L{MAX_INSTRUCTION_BYTES}.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._pending = ""

    @property
    def pending(self) -> int:
        """Code points buffered that do not yet form a whole instruction."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[str]:
        """
        Add bytes; return the instructions they complete, in order.

        @raise InstructionError: malformed data or a limit was hit; the stream
            is then unusable and the connection should be closed.
        """
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError as e:
            raise InstructionError("data is not valid UTF-8") from e
        if self._pending:
            text = self._pending + text
        instructions = []
        start = 0
        while start < len(text):
            end = _scan(text, start)
            if end < 0:
                break
            instructions.append(text[start:end])
            start = end
        rest = text[start:]
        if len(rest) * 4 > MAX_INSTRUCTION_BYTES:
            _check_size(rest, 0, len(rest))
        self._pending = rest
        return instructions
