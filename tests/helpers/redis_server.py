"""
A real redis-server on loopback for the cluster tests.

L{start_redis} starts ``redis-server`` on a free 127.0.0.1 port (no
persistence, its files in a fresh temp directory), optionally with a password
(C{requirepass}) or TLS only (C{tls-port}, certificates from L{testca}), and
fires once it answers PING.  The server is stopped by a test cleanup (see
L{realservers._spawn}); L{RedisServer.stop} and L{RedisServer.restart} stop
and start it on the same port, as an outage would.  A missing redis-server
raises L{SkipTest} naming the Debian package.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from consoleproxy.cluster.redis_client import RedisClient, parse_redis_url
from tests.helpers import realservers
from tests.helpers.realservers import (
    LOOPBACK,
    START_TIMEOUT,
    ServerStartError,
    _new_directory,
    _require,
    _spawn,
    _write_file,
    free_port,
)
from tests.helpers.testca import make_tls_files


class RedisServer:
    """One redis-server process (restartable on its port)."""

    def __init__(
        self,
        testcase: TestCase,
        reactor: Any,
        *,
        password: str | None = None,
        tls: bool = False,
    ) -> None:
        self.testcase = testcase
        self.reactor = reactor
        self.program = _require("redis-server", "redis-server")
        self.directory = _new_directory(testcase)
        self.port = free_port()
        self.password = password
        self.password_file = ""
        self.tls = tls
        self.ca_pem = b""
        self.ca_file = ""
        self.child: Any = None
        if password is not None:
            self.password_file = os.path.join(self.directory, "redis.password")
            _write_file(self.password_file, password.encode() + b"\n", 0o600)
        if tls:
            tls_dir = os.path.join(self.directory, "tls")
            key, cert, self.ca_pem = make_tls_files(FilePath(tls_dir))
            self.key_file, self.cert_file = key, cert
            self.ca_file = os.path.join(tls_dir, "ca", "ca.pem")

    @property
    def url(self) -> str:
        """The C{cluster.redis} URL of this server (database 0)."""
        return f"{'rediss' if self.tls else 'redis'}://{LOOPBACK}:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [self.program, "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        argv += ["--dir", self.directory, "--daemonize", "no", "--loglevel", "warning"]
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", self.cert_file, "--tls-key-file", self.key_file]
            argv += ["--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv

    async def start(self) -> None:
        """Start on C{self.port} and wait until it answers PING."""
        self.child = _spawn(
            self.testcase,
            self.reactor,
            "redis-server",
            self.argv(),
            env={"PATH": realservers.SAFE_PATH},
            path=self.directory,
        )
        deadline = self.reactor.seconds() + START_TIMEOUT
        while not self._pings():
            if not self.child.running:
                raise ServerStartError(f"redis-server exited: {self.child.tail()}")
            if self.reactor.seconds() > deadline:
                raise ServerStartError(f"redis-server did not answer: {self.child.tail()}")
            await deferLater(self.reactor, 0.02)

    def _connect(self) -> Any:
        """A blocking socket to the server (TLS and AUTH done), for probes and checks."""
        sock: Any = socket.create_connection((LOOPBACK, self.port), timeout=2)
        try:
            if self.tls:
                context = ssl.create_default_context(cadata=self.ca_pem.decode())
                sock = context.wrap_socket(sock, server_hostname=LOOPBACK)
            if self.password is not None:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    raise OSError("AUTH refused")
        except BaseException:
            sock.close()
            raise
        return sock

    def _pings(self) -> bool:
        """Whether the server answers PING now (a blocking loopback probe, short)."""
        try:
            with self._connect() as sock:
                sock.sendall(b"PING\r\n")
                return bool(sock.recv(64).startswith(b"+PONG"))
        except OSError:
            return False

    async def stop(self) -> None:
        """Stop the server (SIGTERM; it saves nothing)."""
        await self.child.terminate()

    async def restart(self) -> None:
        """Start it again on the same port."""
        await self.start()

    def command(self, *words: str) -> bytes:
        """Send one inline command (blocking, loopback) and return the raw reply."""
        with self._connect() as sock:
            sock.sendall(" ".join(words).encode() + b"\r\n")
            return bytes(sock.recv(65536))


async def start_redis(
    testcase: TestCase, reactor: Any, *, password: str | None = None, tls: bool = False
) -> RedisServer:
    """A running L{RedisServer}, stopped when the test ends."""
    server = RedisServer(testcase, reactor, password=password, tls=tls)
    await server.start()
    return server


async def connected(testcase: TestCase, reactor: Any, url: str, **kwargs: Any) -> RedisClient:
    """A started L{RedisClient} for C{url}, connected, stopped when the test ends."""
    client = RedisClient(reactor, parse_redis_url(url), **kwargs)
    client.start()
    testcase.addCleanup(client.stop)
    waiting = client.when_available()
    waiting.addTimeout(START_TIMEOUT, reactor)
    await waiting
    return client


async def until(reactor: Any, condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait (polling every 20 ms) until C{condition()} is true, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:g} s: {condition}")
        await deferLater(reactor, 0.02)
