"""Headless Chromium for tests: a Node process running tests/helpers/browser_driver.mjs.

The driver and the browser are real (Debian's chromium, npm's playwright-core); the test
talks to the driver with one JSON line per command while the reactor keeps serving the
consoleproxy under test.  L{require_browser} raises L{SkipTest} naming what is missing.
Screenshots are PNG files; L{read_png} decodes them (8-bit RGB/RGBA, as Chromium writes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE_MODULES = os.path.join(ROOT, "node_modules")
DRIVER = os.path.join(ROOT, "tests", "helpers", "browser_driver.mjs")
CHROMIUM = "/usr/bin/chromium"
#: Seconds any one driver command may take.
COMMAND_TIMEOUT = 30.0


def require_browser() -> str:
    """The path of node; L{SkipTest} naming the missing package otherwise."""
    node = shutil.which("node")
    if node is None:
        raise SkipTest("node is not installed (Debian package nodejs; scripts/setup installs it)")
    if not os.access(CHROMIUM, os.X_OK):
        raise SkipTest("chromium is not installed (Debian package chromium; scripts/setup)")
    for package in ("playwright-core", "guacamole-common-js", "@novnc/novnc"):
        if not os.path.isfile(os.path.join(NODE_MODULES, package, "package.json")):
            raise SkipTest(f"npm package {package} is not installed (scripts/setup runs npm ci)")
    return node


def trust_key(certificate_pem: bytes) -> str:
    """
    The Chromium option that accepts a server certificate's key (its SPKI's SHA-256),
    for a server whose certificate a test CA signed: Chromium trusts only its system
    store, and the option applies to a throwaway profile only (Playwright's).
    """
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")
    return f"--ignore-certificate-errors-spki-list={digest}"


def open_guacamole_console(
    browser: Browser, guacd: Any, url: str, user: str = "alice", password: str = "wonderland"
) -> Deferred[dict[str, Any]]:
    """
    Open the console page at C{url}; when the relay's guacd connection arrives at the
    fake guacd C{guacd} (its second: the first is /api/console-modes's probe), draw a
    400x300 red screen and a frame.  Fires with what the page shows once it is
    connected or failed (the driver's C{wait_state}), with C{"status"} the page's HTTP status.
    """

    async def steps() -> dict[str, Any]:
        opened = await browser.command("open", url=url, user=user, password=password)
        conn = await guacd.wait_for_connection(2)
        conn.send("size", "0", "400", "300")
        conn.send("rect", "0", "0", "0", "400", "300")
        conn.send("cfill", "14", "0", "220", "30", "40", "255")
        conn.send_sync(1)
        shown = await browser.command("wait_state", states=["connected", "error"], timeout=15000)
        return {**shown, "status": opened["status"]}

    return Deferred.fromCoroutine(steps())


class DriverError(Exception):
    """The driver answered a command with an error."""


class Browser(protocol.ProcessProtocol):
    """One headless Chromium, driven by JSON commands."""

    def __init__(self) -> None:
        self._buffer = b""
        self._next = 1
        self._waiting: dict[int, Deferred[Any]] = {}
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.stderr = b""

    @classmethod
    def start(cls, testcase: Any, extra_args: Sequence[str] = ()) -> Deferred[Browser]:
        """
        Start the driver and its browser; stopped by a cleanup of C{testcase}.
        C{extra_args} go to Chromium's command line (see L{trust_key}).
        """
        node = require_browser()
        browser = cls()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "CHROMIUM": CHROMIUM,
            "CHROMIUM_EXTRA_ARGS": json.dumps(list(extra_args)),
        }
        reactor.spawnProcess(browser, node, [node, DRIVER], env=env, path=ROOT)
        testcase.addCleanup(browser.stop)
        browser.ready.addTimeout(COMMAND_TIMEOUT, reactor)
        return browser.ready.addCallback(lambda _: browser)

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            message = json.loads(line)
            if message.get("id") == 0:
                if not self.ready.called:
                    self.ready.callback(None)
                continue
            waiter = self._waiting.pop(message.get("id"), None)
            if waiter is None:
                continue
            if message.get("ok"):
                waiter.callback(message.get("value"))
            else:
                waiter.errback(DriverError(message.get("error")))

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-20000:]

    def processEnded(self, reason: Failure) -> None:
        error = DriverError(f"browser driver ended: {self.stderr.decode('utf-8', 'replace')}")
        if not self.ready.called:
            self.ready.errback(error)
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.errback(DriverError(str(error)))
        self.ended.callback(None)

    def command(self, op: str, timeout: float = COMMAND_TIMEOUT, **arguments: Any) -> Deferred[Any]:
        """Run one driver command; fires with its value."""
        number = self._next
        self._next += 1
        d: Deferred[Any] = Deferred()
        self._waiting[number] = d
        line = json.dumps({"id": number, "op": op, **arguments}) + "\n"
        assert self.transport is not None
        self.transport.write(line.encode("utf-8"))
        return d.addTimeout(timeout, reactor)

    def stop(self) -> Deferred[None]:
        """Close the browser and wait for the driver to end (killed if it hangs)."""
        if self.ended.called:
            return succeed(None)
        if self.transport is not None:
            self.transport.closeStdin()

        def kill() -> None:
            if not self.ended.called and self.transport is not None:
                self.transport.signalProcess("KILL")

        timer = reactor.callLater(10, kill)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        return self.ended.addCallback(done)


def read_png(path: str) -> tuple[int, int, list[bytes]]:
    """
    Decode an 8-bit, non-interlaced RGB or RGBA PNG.

    @return: width, height and one row of RGB triplets (3 bytes per pixel) per line.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    position, chunks, header = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        content = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = content
        elif kind == b"IDAT":
            chunks.append(content)
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour})")
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind = raw[start]
        line = bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(kind, line, previous, channels)
        rows.append(bytes(line) if channels == 3 else _drop_alpha(line))
        previous = line
    return width, height, rows


def _unfilter(kind: int, line: bytearray, previous: bytearray, bpp: int) -> None:
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = previous[i]
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            corner = previous[i - bpp] if i >= bpp else 0
            estimate = left + up - corner
            distances = (abs(estimate - left), abs(estimate - up), abs(estimate - corner))
            best = (left, up, corner)[distances.index(min(distances))]
            line[i] = (line[i] + best) & 0xFF
        elif kind != 0:
            raise ValueError(f"unknown PNG filter {kind}")


def _drop_alpha(line: bytearray) -> bytes:
    return bytes(b for i, b in enumerate(line) if i % 4 != 3)


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    """The (r, g, b) at (x, y) of decoded rows."""
    row = rows[y]
    return row[3 * x], row[3 * x + 1], row[3 * x + 2]
