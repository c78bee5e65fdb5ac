"""
Bench-only fake upstreams, fast enough never to be the bottleneck: a guacd and
a VNC (RFB) server in one asyncio process.

The fake guacd speaks guacd 1.6's handshake (``select``; ``args`` with
``VERSION_1_5_0`` and the VNC argument names of tests/helpers/fakeguacd.py; then any
of ``size``/``audio``/``video``/``image``/``timezone``/``name`` until
``connect``; ``ready,$<uuid>``) as both consoleproxy (1.5.0, with ``name``)
and guacamole-lite 1.2.0 (1.1.0: size, audio, video, image, timezone,
connect) perform it.  The workload is chosen by the ``hostname`` connect
value (each relay passes the console's own ``hostname`` through):

  - ``blob``: an image stream, ``img`` then 32 ``blob``s of 8064 base64
    characters, ``end`` and a ``sync``, over and over;
  - ``small``: many small drawing instructions (``rect``, ``cfill``,
    ``copy``, ``cursor``, ``move``, ``mouse``), a ``sync`` every 48;
  - ``echo``: every ``echo`` instruction received is sent back at once;
  - ``idle``: nothing but guacd's keep-alive.

Streams are pre-built bytes written with flow control (the transport's
pause/resume) in bounded batches.  Unlike real guacd there is no 15 s receive
timeout; the keep-alive ``nop`` goes to every connection every 5 s, as real
guacd sends it to quiet users (guacamole-lite closes a guacd connection that
is silent for 10 s).

The fake RFB server offers RFB 3.8 with security type None only, waits for
ClientInit, sends a ServerInit (1024x768, 32 bpp) and then streams
FramebufferUpdates of 16 raw 64x64 rectangles, unrequested, with flow control.

Run: ``python bench/streamservers.py``; prints ``{"guacd": PORT, "rfb": PORT}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import struct
import uuid

from tests.helpers.fakeguacd import PROTOCOL_VERSION, VNC_ARGS

KEEP_ALIVE = 5.0
#: Chunks written per event-loop turn at most (the transport pauses us sooner when full).
BATCH = 8
HIGH_WATER = 1 << 20


def instruction(*elements: str) -> str:
    """One Guacamole instruction."""
    return ",".join(f"{len(e)}.{e}" for e in elements) + ";"


def blob_stream(frames: int = 8, blobs_per_frame: int = 32) -> bytes:
    """The blob-heavy image stream: 8064-character base64 blobs, a sync per frame."""
    rng = random.Random(1)
    out = []
    for frame in range(frames):
        out.append(instruction("img", "1", "14", "0", "image/jpeg", str(frame * 64), "0"))
        for _ in range(blobs_per_frame):
            raw = rng.randbytes(6048)
            out.append(instruction("blob", "1", base64.b64encode(raw).decode()))
        out.append(instruction("end", "1"))
        out.append(instruction("sync", str(1700000000000 + frame), "1"))
    return "".join(out).encode()


def small_stream(count: int = 6144, sync_every: int = 48) -> bytes:
    """Many small drawing instructions, a sync every C{sync_every}."""
    rng = random.Random(2)
    out = []
    for n in range(count):
        x, y = str(rng.randrange(1024)), str(rng.randrange(768))
        kind = n % 6
        if kind == 0:
            out.append(instruction("rect", "0", x, y, "8", "16"))
        elif kind == 1:
            out.append(instruction("cfill", "14", "0", "255", "255", "255", "255"))
        elif kind == 2:
            out.append(instruction("copy", "-1", "0", "0", "8", "16", "14", "0", x, y))
        elif kind == 3:
            out.append(instruction("cursor", "0", "0", "-1", "0", "0", "11", "16"))
        elif kind == 4:
            out.append(instruction("move", "1", "0", x, y, "0"))
        else:
            out.append(instruction("mouse", x, y, "0", str(1700000000000 + n)))
        if n % sync_every == sync_every - 1:
            out.append(instruction("sync", str(1700000000000 + n), "1"))
    return "".join(out).encode()


def framebuffer_updates(rects: int = 16, size: int = 64) -> bytes:
    """One FramebufferUpdate of C{rects} raw C{size}x{size} 32-bpp rectangles."""
    rng = random.Random(3)
    out = [struct.pack("!BxH", 0, rects)]
    for n in range(rects):
        out.append(struct.pack("!HHHHi", (n % 16) * size, (n // 16) * size, size, size, 0))
        out.append(rng.randbytes(size * size * 4))
    return b"".join(out)


SERVER_INIT = (
    struct.pack("!HH", 1024, 768)
    + struct.pack("!BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    + struct.pack("!I", 5)
    + b"bench"
)


def parse(buffer: str) -> tuple[list[list[str]], str]:
    """Whole instructions at the start of C{buffer}, and what is left."""
    done: list[list[str]] = []
    start = 0
    while True:
        elements: list[str] = []
        i = start
        while True:
            dot = buffer.find(".", i)
            if dot < 0:
                return done, buffer[start:]
            length = int(buffer[i:dot])
            end = dot + 1 + length
            if end >= len(buffer):
                return done, buffer[start:]
            elements.append(buffer[dot + 1 : end])
            i = end + 1
            if buffer[end] == ";":
                break
        done.append(elements)
        start = i


class _Streamer(asyncio.Protocol):
    """Writes one pre-built chunk over and over, as fast as the peer reads."""

    chunk = b""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._streaming = False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._streaming:
            self._pump()

    def stream(self, chunk: bytes) -> None:
        """Start writing C{chunk} repeatedly."""
        self.chunk = chunk
        self._streaming = True
        self._pump()

    def _pump(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for _ in range(BATCH):
            if self._paused or not self._streaming or transport.is_closing():
                return
            transport.write(self.chunk)
        if not self._paused:
            asyncio.get_running_loop().call_soon(self._pump)


class FakeGuacd(_Streamer):
    """One guacd connection: the handshake, then the workload its hostname names."""

    live: set[FakeGuacd] = set()  # noqa: RUF012 - the keep-alive's registry, on purpose

    def __init__(self, workloads: dict[str, bytes]) -> None:
        super().__init__()
        self._workloads = workloads
        self._buffer = ""
        self._phase = "select"
        self.workload = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        FakeGuacd.live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        FakeGuacd.live.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._phase == "stream":
            return  # nop and the like: read and dropped
        self._buffer += data.decode("utf-8", "surrogateescape")
        instructions, self._buffer = parse(self._buffer)
        for parts in instructions:
            self._handle(parts)

    def _handle(self, parts: list[str]) -> None:
        assert self.transport is not None
        op = parts[0]
        if self._phase == "select":
            if op != "select":
                self.transport.close()
                return
            self.transport.write(instruction("args", PROTOCOL_VERSION, *VNC_ARGS).encode())
            self._phase = "handshake"
        elif self._phase == "handshake":
            if op != "connect":
                return  # size, audio, video, image, timezone, name: accepted
            values = parts[1:]
            self.workload = values[1] if len(values) > 1 else ""
            ready = instruction("ready", f"${uuid.uuid4()}").encode()
            self.transport.write(ready)
            chunk = self._workloads.get(self.workload)
            if chunk is not None:
                self._phase = "stream"
                self.stream(chunk)
            else:
                self._phase = "echo"
        elif op == "echo":
            self.transport.write(instruction(*parts).encode())
        elif op == "disconnect":
            self.transport.close()


class FakeRfb(_Streamer):
    """One VNC connection: RFB 3.8, security None, then FramebufferUpdates."""

    def __init__(self, update: bytes) -> None:
        super().__init__()
        self._update = update
        self._buffer = b""
        self._phase = "version"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.write(b"RFB 003.008\n")

    def data_received(self, data: bytes) -> None:
        if self._phase == "stream":
            return  # FramebufferUpdateRequest and friends: dropped
        assert self.transport is not None
        self._buffer += data
        if self._phase == "version" and len(self._buffer) >= 12:
            self._buffer = self._buffer[12:]
            self.transport.write(bytes([1, 1]))
            self._phase = "security"
        if self._phase == "security" and len(self._buffer) >= 1:
            self._buffer = self._buffer[1:]
            self.transport.write(struct.pack("!I", 0))
            self._phase = "init"
        if self._phase == "init" and len(self._buffer) >= 1:
            self._phase = "stream"
            self.transport.write(SERVER_INIT)
            self.stream(self._update)


async def _keep_alive() -> None:
    nop = instruction("nop").encode()
    while True:
        await asyncio.sleep(KEEP_ALIVE)
        for conn in list(FakeGuacd.live):
            if conn._phase == "echo" and conn.transport is not None:
                conn.transport.write(nop)


async def main() -> None:
    """Listen on two free loopback ports, say which, serve forever."""
    workloads = {"blob": blob_stream(), "small": small_stream()}
    update = framebuffer_updates()
    loop = asyncio.get_running_loop()
    guacd = await loop.create_server(lambda: FakeGuacd(workloads), "127.0.0.1", 0, backlog=4096)
    rfb = await loop.create_server(lambda: FakeRfb(update), "127.0.0.1", 0, backlog=4096)
    ports = {
        "guacd": guacd.sockets[0].getsockname()[1],
        "rfb": rfb.sockets[0].getsockname()[1],
        "pid": os.getpid(),
    }
    print(json.dumps(ports), flush=True)
    await _keep_alive()


if __name__ == "__main__":
    asyncio.run(main())
