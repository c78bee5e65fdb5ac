"""
A real haproxy on loopback running examples/haproxy.cfg, for the scale-out tests.

The example is the configuration under test: L{haproxy_config} substitutes only its
ports, addresses, paths and the lines that need root (chroot, user, syslog), and each
substitution must find its text, so the example cannot drift from what is tested.
HAProxy terminates TLS on 127.0.0.1 with a certificate of the test CA (key and chain
in one PEM file, as HAProxy wants them) and forwards to the consoleproxy ports given.
Its administration socket (the example's ``stats socket``) is in the helper's
directory: L{HAProxy.servers} reads each server's state through it, as an operator's
``show stat`` does.  A missing haproxy raises L{SkipTest} naming the Debian package.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import tempfile
from typing import Any

from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.helpers.realservers import (
    LOOPBACK,
    START_TIMEOUT,
    ServerStartError,
    _descendants,
    _new_directory,
    _proc_table,
    _require,
    _run,
    _spawn,
    free_port,
)
from tests.helpers.testca import make_tls_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "haproxy.cfg")
CERTIFICATE = "/etc/haproxy/certs/console.example.com.pem"


def substitute(text: str, replacements: list[tuple[str, str]]) -> str:
    """Replace each text (once at least); fail loudly when the example no longer has it."""
    for old, new in replacements:
        if old not in text:
            raise AssertionError(f"examples/haproxy.cfg no longer has {old!r}")
        text = text.replace(old, new)
    return text


def haproxy_config(*, https: int, http: int, servers: tuple[int, int], pem: str, admin: str) -> str:
    """
    The example with this machine's ports and paths: TLS on 127.0.0.1:C{https}, the
    redirect on C{http}, servers ``a`` and ``b`` on 127.0.0.1 at C{servers}, the
    certificate C{pem}, the admin socket C{admin}; logs to standard error, no chroot,
    no user change (a test runs it as whoever runs the tests), 1000 connections at most.
    """
    return substitute(
        FilePath(EXAMPLE).getContent().decode(),
        [
            ("    log /dev/log local0\n", "    log stderr format raw local0\n"),
            ("    chroot /var/lib/haproxy\n", ""),
            ("    user haproxy\n    group haproxy\n", ""),
            # 20000 connections want 40000 descriptors: more than a test process may have.
            ("    maxconn 20000\n", "    maxconn 1000\n"),
            ("/run/haproxy/admin.sock", admin),
            ("    bind :80\n    bind :::80 v6only\n", f"    bind {LOOPBACK}:{http}\n"),
            (
                f"    bind :443 ssl crt {CERTIFICATE} alpn http/1.1\n"
                f"    bind :::443 v6only ssl crt {CERTIFICATE} alpn http/1.1\n",
                f"    bind {LOOPBACK}:{https} ssl crt {pem} alpn http/1.1\n",
            ),
            ("    server a 10.0.0.11:2616\n", f"    server a {LOOPBACK}:{servers[0]}\n"),
            ("    server b 10.0.0.12:2616\n", f"    server b {LOOPBACK}:{servers[1]}\n"),
        ],
    )


def one_pem(path: str, cert: str, key: str) -> str:
    """The certificate and its key in one PEM file (mode 0600), as HAProxy's C{crt} wants."""
    with open(path, "wb") as out:
        for part in (cert, key):
            with open(part, "rb") as f:
                out.write(f.read())
    os.chmod(path, 0o600)
    return path


class HAProxy:
    """One haproxy (``haproxy -W -db -f CFG``: a master and its worker) before two servers."""

    def __init__(self, testcase: TestCase, reactor: Any, servers: tuple[int, int]) -> None:
        self.testcase = testcase
        self.reactor = reactor
        self.program = _require("haproxy", "haproxy")
        self.directory = _new_directory(testcase)
        self.https, self.http = free_port(), free_port()
        # A UNIX socket's path has at most ~100 bytes: a short directory of its own.
        sockets = tempfile.mkdtemp(prefix="haproxy-")
        testcase.addCleanup(shutil.rmtree, sockets, True)
        self.admin = os.path.join(sockets, "admin.sock")
        key, cert, self.ca_pem = make_tls_files(
            FilePath(os.path.join(self.directory, "tls")), ("localhost", LOOPBACK)
        )
        self.pem = one_pem(os.path.join(self.directory, "tls", "console.pem"), cert, key)
        self.config = os.path.join(self.directory, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(
                haproxy_config(
                    https=self.https,
                    http=self.http,
                    servers=servers,
                    pem=self.pem,
                    admin=self.admin,
                )
            )
        self.child: Any = None

    @property
    def origin(self) -> str:
        """The browser's Origin for pages served through this haproxy."""
        return f"https://localhost:{self.https}"

    async def start(self) -> None:
        """Check the configuration (``-c``), start, and wait until the TLS port accepts."""
        await _run(
            self.reactor,
            [self.program, "-c", "-f", self.config],
            env={},
            path=self.directory,
        )
        self.child = _spawn(
            self.testcase,
            self.reactor,
            "haproxy",
            # Master-worker (-W) as Debian's systemd unit runs it (-Ws): SIGUSR2 reloads.
            [self.program, "-W", "-db", "-f", self.config],
            env={},
            path=self.directory,
        )
        deadline = self.reactor.seconds() + START_TIMEOUT
        while not (self._accepts() and os.path.exists(self.admin)):
            if not self.child.running:
                raise ServerStartError(f"haproxy exited: {self.child.tail()}")
            if self.reactor.seconds() > deadline:
                raise ServerStartError(f"haproxy did not listen: {self.child.tail()}")
            await deferLater(self.reactor, 0.05)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.https), timeout=0.5):
                return True
        except OSError:
            return False

    def command(self, line: str) -> str:
        """One command on the admin socket (blocking, local, short): its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(self.admin)
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name -> its row (``status``, ``scur``...)."""
        text = self.command("show stat").lstrip("# ")
        return {
            row["svname"]: row
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "consoleproxy" and row["svname"] in ("a", "b")
        }

    def status(self) -> dict[str, str]:
        """Each server's state: ``UP``, ``DOWN``, or a transition (``UP 1/2``...)."""
        return {name: row["status"] for name, row in self.servers().items()}

    def reload(self) -> None:
        """Reload as ``systemctl reload haproxy`` does: SIGUSR2 to the master process."""
        self.child.transport.signalProcess(signal.SIGUSR2)

    def workers(self) -> list[int]:
        """The pids of the master's worker processes (old ones stay while they hold tunnels)."""
        return sorted(_descendants(self.child.transport.pid, _proc_table()))

    async def stop(self) -> None:
        """Stop haproxy (SIGTERM, then SIGKILL)."""
        await self.child.terminate()


async def check_as_shipped(testcase: TestCase, reactor: Any) -> str:
    """
    ``haproxy -c`` of the example with only its certificate path replaced (by a test CA's
    key and certificate): the lines the running tests substitute (binds on all addresses,
    chroot, user, syslog, maxconn) are checked too.  haproxy's output.
    """
    program = _require("haproxy", "haproxy")
    directory = _new_directory(testcase)
    key, cert, _ = make_tls_files(FilePath(os.path.join(directory, "tls")))
    pem = one_pem(os.path.join(directory, "console.pem"), cert, key)
    config = os.path.join(directory, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(substitute(FilePath(EXAMPLE).getContent().decode(), [(CERTIFICATE, pem)]))
    return await _run(reactor, [program, "-c", "-f", config], env={}, path=directory)


async def start_haproxy(testcase: TestCase, reactor: Any, servers: tuple[int, int]) -> HAProxy:
    """A running L{HAProxy} in front of 127.0.0.1 at C{servers}, stopped when the test ends."""
    proxy = HAProxy(testcase, reactor, servers)
    await proxy.start()
    return proxy
