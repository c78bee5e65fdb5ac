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

from tests.helpers.support import get_json, wait

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
