"""``twistd -n consoleproxy`` as an operator runs it, in a child process of a test."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import get_json, wait, write_inventory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Twistd(ProcessProtocol):
    """
    A twistd child process: collects its output (C{output}: both streams,
    C{errors}: standard error alone), fires C{ended} with the exit code.
    """

    def __init__(self) -> None:
        self.output = b""
        self.errors = b""
        self.signal: int | None = None
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data
        self.errors += data

    def processEnded(self, reason: Failure) -> None:
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(reason.value.exitCode)


def run_twistd(testcase: Any, *args: str) -> Twistd:
    """Start ``twistd -n --pidfile= consoleproxy ARGS`` (killed on cleanup)."""
    directory = testcase.mktemp()
    os.makedirs(directory)
    code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    process = Twistd()
    process.transport = reactor.spawnProcess(
        process,
        sys.executable,
        [sys.executable, "-c", code, "-n", "--pidfile=", "consoleproxy", *args],
        env={**os.environ, "PYTHONPATH": ROOT},
        path=directory,
    )

    def stop() -> Deferred[int]:
        if not process.ended.called:
            process.transport.signalProcess("KILL")
        return process.ended

    testcase.addCleanup(stop)
    return process


@inlineCallbacks
def until_serving(testcase: Any, process: Twistd, port: int):  # type: ignore[no-untyped-def]
    """Wait (15 s at most) until C{/healthz} answers on C{port}; fire with (code, body)."""
    url = f"http://127.0.0.1:{port}/healthz".encode()
    for _ in range(150):
        try:
            code, _, body = yield get_json(url)
            return code, body
        except ConnectError:
            testcase.assertFalse(process.ended.called, process.output)
            yield wait(0.1)
    testcase.fail(f"twistd did not serve: {process.output!r}")


class Served:
    """A consoleproxy under twistd, with a fake guacd and its own files (see L{serve})."""

    def __init__(self, process: Twistd, port: int, directory: str, guacd: Any) -> None:
        self.process = process
        self.port = port
        self.directory = directory
        self.guacd = guacd
        self.audit = f"{directory}/audit.jsonl"

    def url(self, path: str) -> bytes:
        """An http:// URL of this server."""
        return f"http://127.0.0.1:{self.port}{path}".encode()


@inlineCallbacks
def serve(testcase: Any, guacd: Any, *, grace: float = 1.0, directory: str = "", port: int = 0):  # type: ignore[no-untyped-def]
    """
    Start consoleproxy under twistd on 127.0.0.1 with C{guacd} (a started
    fake), the test inventory and an audit log, and wait until it serves.

    @param directory: where its configuration, keys and state live (a new
        one when empty): give the same one to restart the same server.
    @return: a Deferred firing with a L{Served}.
    """
    if not directory:
        directory = os.path.abspath(testcase.mktemp())
        os.makedirs(directory)
    port = port or free_port()
    config = f"{directory}/consoleproxy.toml"
    with open(config, "w") as f:
        f.write(
            f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
            f"drain_grace = {grace}\n"
            f'[guacd]\nendpoint = "tcp:127.0.0.1:{guacd.port}"\n'
            f'[tokens]\nkey_file = "{directory}/k"\n'
            f'[inventory]\npath = "{write_inventory(directory)}"\n'
            "[relay]\nallow_missing_origin = true\n"
            f'[operations]\naudit_log = "{directory}/audit.jsonl"\n'
        )
    process = run_twistd(testcase, f"--config={config}")
    code, body = yield until_serving(testcase, process, port)
    testcase.assertEqual((code, body), (200, {"status": "ok"}))
    return Served(process, port, directory, guacd)


@inlineCallbacks
def fake_guacd(testcase: Any):  # type: ignore[no-untyped-def]
    """A started L{FakeGuacd} on loopback, stopped on cleanup."""
    guacd = FakeGuacd(reactor)
    yield guacd.start()
    testcase.addCleanup(guacd.stop)
    return guacd
