"""A real ``twistd -n consoleproxy`` child process, as an operator (or systemd) starts it.

L{start_twistd} runs any Python (the checkout's, or a fresh virtualenv's) in any working
directory with the environment and inherited descriptors given, collects its output and
kills it at cleanup; L{wait_until_serving} polls a URL until the server answers.
L{run_twistd} is the common case (this checkout, a fresh directory), and L{serve} a
whole server with a fake guacd, the test inventory and an audit log.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody

from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import wait, write_inventory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: twistd's own entry point, for Pythons that have no ``twistd`` script of their own.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class Twistd(ProcessProtocol):
    """
    A twistd child process: collects its output (C{output}: both streams,
    C{errors}: standard error alone), fires C{ended} with the exit code.
    """

    def __init__(self) -> None:
        self.output = b""
        self.errors = b""
        self.ended: Deferred[int | None] = Deferred()
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data
        self.errors += data

    def processEnded(self, reason: Failure) -> None:
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(reason.value.exitCode)


def start_twistd(
    testcase: Any,
    *args: str,
    python: str = sys.executable,
    cwd: str,
    env: Mapping[str, str],
    child_fds: dict[int, Any] | None = None,
    wrapper: tuple[str, ...] = (),
    serve: bool = False,
) -> Twistd:
    """
    Start ``twistd -n --pidfile= consoleproxy ARGS`` with C{python} in C{cwd}; killed at
    cleanup.  C{env} is the whole environment (nothing of this process's is added), and
    C{child_fds} (spawnProcess's childFDs) passes descriptors on, e.g. a listening socket;
    C{wrapper} comes first on the command line (a shell that sets LISTEN_PID, say).
    With C{serve}, the command is ``python -m consoleproxy serve ARGS`` (the same
    service, as the systemd unit runs it).
    """
    process = Twistd()
    if serve:
        command = [python, "-m", "consoleproxy", "serve"]
    else:
        command = [python, "-c", TWISTD, "-n", "--pidfile=", "consoleproxy"]
    argv = [*wrapper, *command, *args]
    process.transport = reactor.spawnProcess(
        process,
        argv[0],
        argv,
        env=dict(env),
        path=cwd,
        childFDs=child_fds or {0: "w", 1: "r", 2: "r"},
    )

    def stop() -> Deferred[int | None]:
        if not process.ended.called:
            process.transport.signalProcess("KILL")
        return process.ended

    testcase.addCleanup(stop)
    return process


def base_environment() -> dict[str, str]:
    """A minimal environment: PATH and HOME only (no PYTHONPATH, no NOTIFY_SOCKET)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
    }


@inlineCallbacks
def wait_until_serving(testcase: Any, process: Twistd, url: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    """GET C{url} until anything answers; fire with (status, body); fail if twistd ended."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            response = yield Agent(reactor).request(b"GET", url.encode())
            body = yield readBody(response)
            return response.code, body
        except ConnectError:
            if process.ended.called:
                testcase.fail(f"twistd ended:\n{process.output.decode(errors='replace')}")
            if reactor.seconds() > deadline:
                testcase.fail(f"twistd did not serve {url}:\n{process.output.decode()}")
            yield wait(0.1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_twistd(testcase: Any, *args: str) -> Twistd:
    """``twistd -n --pidfile= consoleproxy ARGS`` from this checkout, in a new directory."""
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    return start_twistd(testcase, *args, cwd=directory, env={**os.environ, "PYTHONPATH": ROOT})


@inlineCallbacks
def until_serving(testcase: Any, process: Twistd, port: int):  # type: ignore[no-untyped-def]
    """Wait (15 s at most) until C{/healthz} answers on C{port}; fire with (code, JSON body)."""
    url = f"http://127.0.0.1:{port}/healthz"
    code, body = yield wait_until_serving(testcase, process, url, timeout=15.0)
    return code, json.loads(body)


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
def serve(  # type: ignore[no-untyped-def]
    testcase: Any,
    guacd: Any,
    *,
    grace: float = 1.0,
    directory: str = "",
    port: int = 0,
    server: str = "",
    tail: str = "",
    inventory: str | None = None,
):
    """
    Start consoleproxy under twistd on 127.0.0.1 with C{guacd} (a started
    fake), the test inventory and an audit log, and wait until it serves.

    @param directory: where its configuration, keys and state live (a new
        one when empty): give the same one to restart the same server.
    @param server: more C{[server]} lines (C{workers = 2}, say).
    @param tail: more sections (C{[cluster]}, say), at the end.
    @param inventory: the inventory's text (the test inventory when C{None}).
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
            f"{server}"
            f'[guacd]\nendpoint = "tcp:127.0.0.1:{guacd.port}"\n'
            f'[tokens]\nkey_file = "{directory}/k"\n'
            f'[inventory]\npath = "{write_inventory(directory, inventory)}"\n'
            "[relay]\nallow_missing_origin = true\n"
            f'[operations]\naudit_log = "{directory}/audit.jsonl"\n'
            f"{tail}"
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
