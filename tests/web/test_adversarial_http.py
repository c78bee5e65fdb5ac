"""
Attacks on the HTTP side, against the real server over real sockets, with
descriptor and memory figures asserted as bounds (issue 13, round 2):

  - one address opening connections without end (the per-client cap, refused
    at accept time), WebSockets counted until they close;
  - the process at its descriptor limit (a real twistd started with a low
    C{RLIMIT_NOFILE}): ``/healthz`` and an existing connection still answer;
  - clients that never read a static file (bytes buffered per client);
  - control characters in paths, headers and forwarded addresses (the logs);
  - a client retrying refused WebSockets in a loop (log lines, upgrade rate).
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.net.clients import ClientAddresses, networks
from consoleproxy.net.connlimit import ConnectionGate
from consoleproxy.net.ratelimit import LineThrottle, RateLimiter
from consoleproxy.ops.health import HealthResource
from consoleproxy.relay.websocket import RelayPolicy, RelayResource
from consoleproxy.web.api import TokenApi
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.http_channel import HttpLimits
from consoleproxy.web.site import ConsoleProxySite, ConsoleProxyWeb, Operations, build_site
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import start_server, wait
from tests.helpers.testca import make_tls_files
from tests.helpers.wsclient import ClientFactory
from tests.relay.test_guacamole_relay import ALICE, VNC

ROOT = Path(__file__).resolve().parents[2]
#: A static file larger than any buffer on the way (the page's libraries are ~230 KiB).
BIG_FILE_BYTES = 6 * 1024 * 1024


# -- measuring the server ---------------------------------------------------------------


def _socket_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets whose local port is C{port}, not listening (accepted ones)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A":
                inodes.add(fields[9])
    return inodes


def server_descriptors(port: int, pid: str = "self") -> int:
    """Descriptors process C{pid} holds for connections accepted on C{port}."""
    inodes = _socket_inodes(port)
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            count += 1
    return count


def open_descriptors(pid: int) -> int:
    """All the descriptors process C{pid} holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def server_transports(port: int) -> list[Any]:
    """This process's live server-side TCP transports of connections to C{port}."""
    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, tcp.Server) and o.connected and o.getHost().port == port
    ]


def buffered(transport: Any) -> int:
    """Bytes a transport holds, not yet taken by the kernel."""
    return (
        len(transport.dataBuffer)
        - transport.offset
        + sum(len(part) for part in transport._tempDataBuffer)
    )


def control_characters(text: str) -> list[str]:
    """The control characters in C{text} (a log line must have none)."""
    return [c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029"]


def client_socket(source: str = "127.0.0.1", receive_buffer: int | None = None) -> socket.socket:
    """A TCP socket bound to C{source} (another loopback address is another client)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.bind((source, 0))
    return sock


def blocking_get(
    port: int,
    path: str,
    source: str = "127.0.0.1",
    *,
    headers: str = "",
    sock: socket.socket | None = None,
    timeout: float = 5.0,
) -> bytes:
    """One HTTP/1.1 request on a (new or given) blocking socket; the raw response head+body."""
    own = sock is None
    if sock is None:
        sock = client_socket(source)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    finally:
        if own:
            sock.close()


def refused_at_accept(sock: socket.socket) -> bool:
    """Whether the server closed or reset C{sock} (without a byte)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def status_of(response: bytes) -> int | None:
    """The status code of a raw response, or C{None} when there was none."""
    match = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    return int(match.group(1)) if match else None


class LogCapture:
    """The formatted text of every log event while installed (removed at cleanup)."""

    def __init__(self, testcase: TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event))

    def matching(self, pattern: str) -> list[str]:
        """The lines matching C{pattern} (a regular expression)."""
        return [line for line in self.lines if re.search(pattern, line)]


class AccessLog:
    """Stands in for the site's access log file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class SilentGuacd(Protocol):
    """A guacd that accepts and never answers: sessions stay in their opening."""

    def connectionMade(self) -> None:
        self.factory.connected.append(self)  # type: ignore[attr-defined]


# -- the server under attack ----------------------------------------------------------


class HttpAttackCase(TestCase):
    """A consoleproxy (token API, relay, static files, /healthz) with the given caps."""

    @inlineCallbacks
    def serve(  # type: ignore[no-untyped-def]
        self,
        *,
        per_client: int = 256,
        per_frontend: int = 4096,
        trusted: tuple[str, ...] = (),
        stall_timeout: float = 10.0,
        upgrade_limiter: RateLimiter | None = None,
        refusal_lines: LineThrottle | None = None,
        guacd_port: int = 1,
        handshake_timeout: float = 15,
    ):
        static = Path(self.mktemp())
        static.mkdir()
        self.big = os.urandom(BIG_FILE_BYTES)
        (static / "big.js").write_bytes(self.big)
        clients = ClientAddresses(networks(trusted))
        policy = RelayPolicy(
            clients=clients, upgrade_limiter=upgrade_limiter, refusal_lines=refusal_lines
        )
        self.server = yield start_server(
            self, guacd_port=guacd_port, policy=policy, handshake_timeout=handshake_timeout
        )
        web = ConsoleProxyWeb(
            TokenApi(self.server.cloud, self.server.cloud, self.server.tokens),
            RelayResource(self.server.relay),
            assets=StaticFiles(own=static, stall_timeout=stall_timeout),
            operations=Operations(health=HealthResource()),
        )
        self.gate = ConnectionGate(
            per_client, per_frontend=per_frontend, frontends=networks(trusted)
        )
        self.site: ConsoleProxySite = build_site(
            web, reactor, 60, limits=HttpLimits(), clients=clients, gate=self.gate
        )
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.site)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        self.access_log = AccessLog()
        self.site._logFile = self.access_log
        return self.port

    def open_sockets(self, count: int, source: str = "127.0.0.1", **kw: Any) -> list[socket.socket]:
        """C{count} connected client sockets (closed at cleanup)."""
        socks = []
        for _ in range(count):
            sock = client_socket(source, **kw)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
            socks.append(sock)
            self.addCleanup(sock.close)
        return socks


class ConnectionCapTests(HttpAttackCase):
    @inlineCallbacks
    def test_one_address_holds_at_most_its_cap(self) -> None:
        """
        60 connections from one address: the server keeps 10 (its cap), closes
        the rest at once without reading them, logs a few lines, and another
        address is served as usual.
        """
        log = LogCapture(self)
        yield self.serve(per_client=10)
        socks = self.open_sockets(60)
        closed: set[int] = set()
        for _ in range(30):
            yield wait(0.1)
            for index, sock in enumerate(socks):
                try:
                    if sock.recv(1) == b"":
                        closed.add(index)
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(index)
            if len(closed) >= 50:
                break
        self.assertEqual(len(closed), 50)
        self.assertEqual(server_descriptors(self.port), 10)
        self.assertEqual(self.gate.open_by("127.0.0.1"), 10)
        response = yield deferToThread(blocking_get, self.port, "/healthz", "127.0.0.2")
        self.assertEqual(status_of(response), 200)
        refusals = log.matching(r"^Connection from 127\.0\.0\.1 refused: over the cap of 10")
        self.assertLessEqual(len(refusals), 5)

    @inlineCallbacks
    def test_places_come_back_when_connections_close(self) -> None:
        yield self.serve(per_client=5)
        socks = self.open_sockets(5)
        yield wait(0.3)
        self.assertEqual(self.gate.open_by("127.0.0.1"), 5)
        for sock in socks:
            sock.close()
        yield wait(0.3)
        self.assertEqual((self.gate.total, len(self.gate)), (0, 0))
        response = yield deferToThread(blocking_get, self.port, "/healthz")
        self.assertEqual(status_of(response), 200)

    @inlineCallbacks
    def test_websockets_count_until_they_close(self) -> None:
        """
        A WebSocket keeps its place after twisted.web handed the connection
        over, and gives it back when it closes.
        """
        factory = Factory.forProtocol(SilentGuacd)
        factory.connected = []  # type: ignore[attr-defined]
        guacd = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(guacd.stopListening)
        self.addCleanup(
            lambda: [p.transport.abortConnection() for p in factory.connected]  # type: ignore[attr-defined]
        )
        yield self.serve(per_client=2, guacd_port=guacd.getHost().port, handshake_timeout=1)
        token = self.server.tokens.seal(ALICE, VNC)
        upgrade = (
            f"GET /guacamole?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: guacamole\r\n\r\n"
        ).encode()
        socks = self.open_sockets(2)
        yield wait(0.2)
        for sock in socks:
            sock.send(upgrade)
        yield wait(0.5)  # both wait for guacd (which never answers)
        self.assertEqual(self.gate.open_by("127.0.0.1"), 2)
        third = self.open_sockets(1)[0]
        yield wait(0.3)
        self.assertTrue(refused_at_accept(third))
        # Each session is refused when guacd's handshake times out (1 s), and
        # closed; the browser is gone, so Autobahn drops the connection.
        for sock in socks:
            sock.close()
        yield wait(2.5)
        self.assertEqual(self.gate.total, 0)
        response = yield deferToThread(blocking_get, self.port, "/healthz")
        self.assertEqual(status_of(response), 200)


class StaticFileTests(HttpAttackCase):
    @inlineCallbacks
    def test_never_reading_clients_hold_little(self) -> None:
        """
        Ten clients ask for a 6 MiB file and never read: each holds at most
        the transport's buffer and one chunk in the server, not the file.
        """
        yield self.serve()
        socks = self.open_sockets(10, receive_buffer=4096)
        yield wait(0.2)
        for sock in socks:
            sock.send(b"GET /static/big.js HTTP/1.1\r\nHost: x\r\n\r\n")
        yield wait(1.0)
        transports = server_transports(self.port)
        self.assertEqual(len(transports), 10)
        held = [buffered(t) for t in transports]
        self.assertLess(max(held), 96 * 1024, held)
        self.assertLess(sum(held), 10 * 96 * 1024)

    @inlineCallbacks
    def test_stalled_responses_are_aborted_after_the_stall_timeout(self) -> None:
        yield self.serve(stall_timeout=1.0)
        socks = self.open_sockets(5, receive_buffer=4096)
        yield wait(0.2)
        for sock in socks:
            sock.send(b"GET /static/big.js HTTP/1.1\r\nHost: x\r\n\r\n")
        yield wait(0.5)
        self.assertEqual(server_descriptors(self.port), 5)
        yield wait(2.0)
        self.assertEqual(server_descriptors(self.port), 0)
        self.assertEqual(self.gate.total, 0)

    @inlineCallbacks
    def test_a_reader_gets_the_whole_file(self) -> None:
        yield self.serve()
        response = yield deferToThread(blocking_get, self.port, "/static/big.js")
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertEqual(status_of(head), 200)
        self.assertIn(b"Content-Length: %d" % BIG_FILE_BYTES, head)
        self.assertEqual(body, self.big)

    @inlineCallbacks
    def test_behind_a_frontend_the_real_client_is_counted(self) -> None:
        """
        Through a trusted frontend (127.0.0.1), a client's static responses in
        flight count against the per-client cap (3): the fourth gets 429; the
        frontend's other clients do not.
        """
        yield self.serve(per_client=3, trusted=("127.0.0.1",))
        socks = self.open_sockets(3, receive_buffer=4096)
        yield wait(0.2)
        for sock in socks:
            sock.send(
                b"GET /static/big.js HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.9\r\n\r\n"
            )
        yield wait(0.5)
        self.assertEqual(self.gate.open_by("192.0.2.9"), 3)
        fourth = yield deferToThread(
            blocking_get, self.port, "/static/big.js", headers="X-Forwarded-For: 192.0.2.9\r\n"
        )
        self.assertEqual(status_of(fourth), 429)
        other = yield deferToThread(
            blocking_get, self.port, "/healthz", headers="X-Forwarded-For: 192.0.2.10\r\n"
        )
        self.assertEqual(status_of(other), 200)
        for sock in socks:
            sock.close()
        yield wait(0.3)
        self.assertEqual(self.gate.open_by("192.0.2.9"), 0)


class LogInjectionTests(HttpAttackCase):
    @inlineCallbacks
    def test_access_log_escapes_control_characters(self) -> None:
        yield self.serve()
        raw = (
            b"GET /static/a%0a%1b[2Jb\x7f HTTP/1.1\r\nHost: x\r\n"
            b"User-Agent: evil\x1b]0;owned\x07 \xe2\x80\xa8next\r\n"
            b"Referer: http://x/\x1b[31m\r\n\r\n"
        )

        def send() -> bytes:
            sock = client_socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", self.port))
            sock.sendall(raw)
            data = sock.recv(65536)
            sock.close()
            return data

        response = yield deferToThread(send)
        self.assertEqual(status_of(response), 404)
        yield wait(0.1)
        [line] = self.access_log.lines
        self.assertEqual(control_characters(line.rstrip("\n")), [])
        self.assertIn("a%0a%1b[2Jb\\x7f", line)
        self.assertIn("evil\\x1b]0;owned\\x07 \\u2028next", line)

    @inlineCallbacks
    def test_api_log_escapes_decoded_path_segments(self) -> None:
        log = LogCapture(self)
        yield self.serve()
        response = yield deferToThread(
            blocking_get, self.port, "/api/vm/1%0a%1b[2J%0d/guacamole/v%0anc"
        )
        self.assertEqual(status_of(response), 400)
        [line] = log.matching("^Token refused")
        self.assertEqual(control_characters(line), [])
        self.assertIn("1\\x0a\\x1b[2J\\x0d", line)

    @inlineCallbacks
    def test_a_forwarded_address_is_escaped(self) -> None:
        """
        An IPv6 scope in X-Forwarded-For (believed from a trusted frontend)
        may carry control characters: it is dropped, and nothing of it reaches
        the API's or the access log's lines.  (Autobahn refuses such headers
        on a WebSocket upgrade.)
        """
        log = LogCapture(self)
        yield self.serve(trusted=("127.0.0.1",))
        response = yield deferToThread(
            blocking_get,
            self.port,
            "/api/vm/x/guacamole/vnc",
            headers="X-Forwarded-For: fe80::1%\x1b[31m\x7fforged\r\n",
        )
        self.assertEqual(status_of(response), 400)
        yield wait(0.1)
        [line] = log.matching("^Token refused")
        self.assertIn("peer=fe80::1 (via 127.0.0.1)", line)  # the scope is dropped
        [access] = self.access_log.lines
        for text in (line, access.rstrip("\n")):
            self.assertEqual(control_characters(text), [])


class RefusalFloodTests(HttpAttackCase):
    def upgrade(self, source: str = "127.0.0.1", headers: bytes = b"") -> bytes:
        sock = client_socket(source)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(
            b"GET /guacamole?token=bad HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: guacamole\r\n"
            + headers
            + b"\r\n"
        )
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                if status_of(head) == 101 and b"\x88" in rest:
                    break  # the close frame: a browser would go now
                match = re.search(rb"(?i)content-length: *(\d+)", head)
                if match and len(rest) >= int(match.group(1)):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        sock.close()
        return data

    @inlineCallbacks
    def test_refusal_lines_are_rate_limited_per_client(self) -> None:
        """100 refused WebSockets from one client: a handful of log lines, not 100."""
        log = LogCapture(self)
        yield self.serve()
        started = time.monotonic()
        for _ in range(100):
            response = yield deferToThread(self.upgrade)
            self.assertEqual(status_of(response), 101)
        elapsed = time.monotonic() - started
        refused = log.matching(r"^Console refused: peer=127\.0\.0\.1 ")
        # A burst of 5, then one every 5 s.
        self.assertLessEqual(len(refused), 5 + int(elapsed / 5) + 1)
        self.assertEqual(self.server.relay.token_refusals, {"malformed": 100})

    @inlineCallbacks
    def test_upgrades_are_rate_limited_per_client(self) -> None:
        yield self.serve(upgrade_limiter=RateLimiter(reactor, rate=0.01, burst=5))
        statuses = []
        for _ in range(8):
            response = yield deferToThread(self.upgrade)
            statuses.append(status_of(response))
        self.assertEqual(statuses, [101] * 5 + [429] * 3)
        self.assertEqual(self.server.relay.token_refusals, {"malformed": 5})
        other = yield deferToThread(self.upgrade, "127.0.0.2")
        self.assertEqual(status_of(other), 101)
        # The 429s are in the access log, but rate-limited like refusals.
        self.assertLessEqual(len([x for x in self.access_log.lines if '" 429 ' in x]), 5)

    @inlineCallbacks
    def test_suppressed_refusals_are_counted_in_the_next_line(self) -> None:
        clock = Clock()
        log = LogCapture(self)
        yield self.serve(refusal_lines=LineThrottle(clock, rate=0.2, burst=2))
        for _ in range(7):
            yield deferToThread(self.upgrade)
        self.assertEqual(len(log.matching(r"^Console refused: peer=127\.0\.0\.1 ")), 2)
        clock.advance(5)
        yield deferToThread(self.upgrade)
        self.assertEqual(len(log.matching(r"^Console refused: peer=127\.0\.0\.1 ")), 3)
        self.assertEqual(log.matching("suppressed"), ["5 refusals from 127.0.0.1 suppressed"])

    @inlineCallbacks
    def test_upgrade_rate_behind_a_frontend(self) -> None:
        """
        Behind a trusted frontend the named client is limited; the frontend
        naming nobody (another zone's proxy hopping here) is not.
        """
        yield self.serve(
            trusted=("127.0.0.1",), upgrade_limiter=RateLimiter(reactor, rate=0.01, burst=2)
        )
        forwarded = b"X-Forwarded-For: 192.0.2.7\r\n"
        statuses = []
        for _ in range(3):
            statuses.append(status_of((yield deferToThread(self.upgrade, headers=forwarded))))
        self.assertEqual(statuses, [101, 101, 429])
        statuses = []
        for _ in range(4):
            statuses.append(status_of((yield deferToThread(self.upgrade))))
        self.assertEqual(statuses, [101] * 4)


# -- at the descriptor limit: a real twistd ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DescriptorReserveTests(SynchronousTestCase):
    """
    A real ``twistd consoleproxy`` whose descriptor limit is 200 (soft 100 at
    exec, raised to the hard 200 at start): one address floods it with 300
    connections; ``/healthz`` still answers another address, an existing
    keep-alive connection still works, other new requests get 503 or are
    refused, and the process never holds more than its limit.
    """

    LIMIT = 200

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="consoleproxy-fd-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.port = _free_port()
        config = self.directory / "consoleproxy.toml"
        config.write_text(
            f"""
[server]
listen = ["tcp:{self.port}:interface=127.0.0.1"]
max_connections_per_client = 100000
descriptor_reserve = 40

[guacd]
endpoint = "none"

[tokens]
key_file = "{self.directory / "keys"}"
"""
        )
        self.log_path = self.directory / "twistd.log"
        # Started through a small Python that lowers its limits, then execs twistd.
        lower_then_exec = (
            "import os, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, (100, {self.LIMIT})); "
            "os.execv(sys.argv[1], sys.argv[1:])"
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                lower_then_exec,
                str(Path(sys.executable).parent / "twistd"),
                "-n",
                "--pidfile=",
                f"--logfile={self.log_path}",
                "consoleproxy",
                "--config",
                str(config),
            ],
            cwd=self.directory,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(self._stop)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if status_of(blocking_get(self.port, "/healthz", timeout=1)) == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.fail(f"twistd did not start: {self._log()}")

    def _log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def _stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def test_healthz_and_existing_connections_work_at_the_limit(self) -> None:
        self.assertIn("soft 200 (was 100), hard 200", self._log())
        existing = client_socket("127.0.0.4")
        existing.settimeout(5)
        existing.connect(("127.0.0.1", self.port))
        self.addCleanup(existing.close)
        self.assertEqual(
            status_of(blocking_get(self.port, "/api/console-modes", sock=existing)), 200
        )

        flood = []
        for _ in range(300):
            sock = client_socket("127.0.0.1")
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
            flood.append(sock)
        time.sleep(1.5)
        held = open_descriptors(self.process.pid)
        self.assertLessEqual(held, self.LIMIT)
        self.assertGreater(server_descriptors(self.port, str(self.process.pid)), 100)

        self.assertEqual(status_of(blocking_get(self.port, "/healthz", "127.0.0.2")), 200)
        self.assertEqual(
            status_of(blocking_get(self.port, "/api/console-modes", sock=existing)), 200
        )
        try:
            other = status_of(blocking_get(self.port, "/api/console-modes", "127.0.0.3"))
        except OSError:
            other = None  # refused at accept
        self.assertIn(other, (503, None))
        self.assertLessEqual(open_descriptors(self.process.pid), self.LIMIT)
        self.assertNotIn("EMFILE", self._log())

        for sock in flood:
            sock.close()
        time.sleep(1.5)  # the next count of descriptors sees them gone
        self.assertEqual(status_of(blocking_get(self.port, "/api/console-modes", "127.0.0.3")), 200)


class TlsCapTests(TestCase):
    """Over TLS (ssl: endpoints): refused before the handshake; a WSS session keeps its place."""

    @inlineCallbacks
    def test_refused_before_the_handshake_and_wss_released_on_close(self) -> None:
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        key, cert, ca = make_tls_files(FilePath(self.mktemp()))
        server = yield start_server(self, guacd_port=guacd.port)
        gate = ConnectionGate(1)
        site = build_site(
            ConsoleProxyWeb(
                TokenApi(server.cloud, server.cloud, server.tokens), RelayResource(server.relay)
            ),
            reactor,
            gate=gate,
        )
        listening = yield serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        ).listen(site)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        token = server.tokens.seal(ALICE, VNC)
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca)),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port),
        )
        client = yield endpoint.connect(
            ClientFactory(
                f"wss://localhost:{port}/guacamole?token={token}", protocols=["guacamole"]
            )
        )
        yield client.opened
        conn = yield guacd.wait_for_connection()
        self.assertEqual(gate.total, 1)

        def second() -> bytes:
            sock = client_socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a ClientHello
            try:
                return sock.recv(100)
            except ConnectionResetError:
                return b""
            finally:
                sock.close()

        self.assertEqual((yield deferToThread(second)), b"")  # closed, no ServerHello
        client.sendClose(1000)
        yield client.closed
        yield conn.closed
        yield wait(0.2)
        self.assertEqual(gate.total, 0)
