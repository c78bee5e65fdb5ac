"""A real ``twistd -n consoleproxy`` child process, as an operator (or systemd) starts it.

L{start_twistd} runs any Python (the checkout's, or a fresh virtualenv's) in any working
directory with the environment and inherited descriptors given, collects its output and
kills it at cleanup; L{wait_until_serving} polls a URL until the server answers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody

from tests.helpers.support import wait

#: twistd's own entry point, for Pythons that have no ``twistd`` script of their own.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class TwistdProcess(ProcessProtocol):
    """A twistd child process: collects output, fires C{ended} with the exit code."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int | None] = Deferred()
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

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
) -> TwistdProcess:
    """
    Start ``twistd -n --pidfile= consoleproxy ARGS`` with C{python} in C{cwd}; killed at
    cleanup.  C{env} is the whole environment (nothing of this process's is added), and
    C{child_fds} (spawnProcess's childFDs) passes descriptors on, e.g. a listening socket;
    C{wrapper} comes first on the command line (a shell that sets LISTEN_PID, say).
    With C{serve}, the command is ``python -m consoleproxy serve ARGS`` (the same
    service, as the systemd unit runs it).
    """
    process = TwistdProcess()
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
def wait_until_serving(testcase: Any, process: TwistdProcess, url: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
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
