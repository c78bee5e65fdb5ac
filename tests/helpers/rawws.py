"""
A raw WebSocket client for adversarial tests: the opening handshake written
by hand, frames built byte by byte (mask, RSV bits, opcode, announced length
all under the test's control), and the server's frames read back, close
frames included.  Autobahn's own client refuses to send most of what an
attacker sends, hence this one.
"""

from __future__ import annotations

import base64
import os
import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def frame(
    payload: bytes,
    opcode: int = OP_TEXT,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """
    One WebSocket frame.

    @param rsv: the three RSV bits, as a number from 0 to 7.
    @param mask: whether to mask it (clients must).
    @param length: the payload length to announce, when it is not the real one.
    """
    announced = len(payload) if length is None else length
    header = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
    mask_bit = 0x80 if mask else 0
    if announced < 126:
        header += bytes([mask_bit | announced])
    elif announced < 1 << 16:
        header += bytes([mask_bit | 126]) + struct.pack("!H", announced)
    else:
        header += bytes([mask_bit | 127]) + struct.pack("!Q", announced)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text_frame(text: str) -> bytes:
    """One masked, final text frame."""
    return frame(text.encode("utf-8"))


def close_frame(code: int = 1000, reason: bytes = b"") -> bytes:
    """One masked close frame."""
    return frame(struct.pack("!H", code) + reason, OP_CLOSE)


class RawWebSocket(Protocol):
    """
    Sends a hand-written upgrade request, then reads what the server says.

    @ivar response: fires with the HTTP status once the response head is in
        (for a status other than 101, once the connection is gone, so that
        L{body} is complete).
    @ivar frames: the server's frames, as (opcode, payload).
    @ivar closed: fires with (code, reason) when a close frame arrives.
    @ivar lost: fires when the connection is gone.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = b""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""
        self.frames: list[tuple[int, bytes]] = []
        self.response: Deferred[int] = Deferred()
        self.closed: Deferred[tuple[int | None, str]] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[list[str]]]] = []

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.status is None:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self.buffer = rest
            if self.status == 101:
                self.response.callback(101)
        if self.status == 101:
            self._read_frames()
        else:
            self.body, self.buffer = self.body + self.buffer, b""

    def _read_frames(self) -> None:
        while len(self.buffer) >= 2:
            first, second = self.buffer[0], self.buffer[1]
            length, at = second & 0x7F, 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                length, at = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                length, at = struct.unpack("!Q", self.buffer[2:10])[0], 10
            if len(self.buffer) < at + length:
                return
            payload = self.buffer[at : at + length]
            self.buffer = self.buffer[at + length :]
            self._frame(first & 0x0F, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        self.frames.append((opcode, payload))
        if opcode == OP_CLOSE and not self.closed.called:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
            self.closed.callback((code, payload[2:].decode("utf-8")))
        still = []
        for count, d in self._waiting:
            if len(self.messages()) >= count:
                d.callback(self.messages()[:count])
            else:
                still.append((count, d))
        self._waiting = still

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.response.called:
            self.body += self.buffer
            self.response.callback(self.status or 0)
        if not self.closed.called:
            self.closed.callback((None, ""))
        self.lost.callback(None)

    def messages(self) -> list[str]:
        """The text frames received (the relay never fragments), decoded."""
        return [p.decode("utf-8") for op, p in self.frames if op == OP_TEXT]

    def wait_messages(self, count: int) -> Deferred[list[str]]:
        """Fire with the first C{count} text messages once they are in."""
        d: Deferred[list[str]] = Deferred()
        if len(self.messages()) >= count:
            d.callback(self.messages()[:count])
        else:
            self._waiting.append((count, d))
        return d

    def send(self, data: bytes) -> None:
        """Write raw bytes (frames, or anything else)."""
        self.transport.write(data)


def upgrade_request(path: str, protocols: tuple[str, ...] = ("guacamole",)) -> bytes:
    """A browser's upgrade request for C{path} (with its query string)."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw_connect(port: int, request: bytes) -> Deferred[RawWebSocket]:
    """Connect to 127.0.0.1:C{port} and send C{request}; fire with the client."""
    factory = Factory.forProtocol(lambda: RawWebSocket(request))
    factory.noisy = False
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)


def raw_open(
    port: int, path: str, protocols: tuple[str, ...] = ("guacamole",)
) -> Deferred[RawWebSocket]:
    """Connect, send the upgrade request for C{path}; fire with the client once it is answered."""

    def answered(client: RawWebSocket) -> Deferred[RawWebSocket]:
        return client.response.addCallback(lambda _: client)

    return raw_connect(port, upgrade_request(path, protocols)).addCallback(answered)
