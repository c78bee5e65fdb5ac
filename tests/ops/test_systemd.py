"""systemd: sd_notify to a real datagram socket, socket activation, the example units.

What can be tested without systemd as PID 1: a real twistd tells a real AF_UNIX
datagram socket (our NOTIFY_SOCKET) READY=1 once it listens and STOPPING=1 on SIGTERM;
a real twistd adopts a listening socket it inherits as systemd passes it (descriptor 3,
LISTEN_FDS, LISTEN_PID) and answers HTTP on it; the example units pass
``systemd-analyze verify`` without a single warning (skipped where it is not installed).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from consoleproxy.ops.systemd import SystemdNotifier, notify
from tests.helpers.realservers import free_port
from tests.helpers.support import wait, write_inventory
from tests.helpers.twistd import (
    TwistdProcess,
    base_environment,
    start_twistd,
    wait_until_serving,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = os.path.join(ROOT, "examples", "systemd")


class NotifySocket(DatagramProtocol):
    """A NOTIFY_SOCKET as systemd has it: an AF_UNIX datagram socket; keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._waiting: list[tuple[str, Deferred[str]]] = []

    def datagramReceived(self, datagram: bytes, address: Any) -> None:
        text = datagram.decode("utf-8")
        self.messages.append(text)
        for entry in list(self._waiting):
            if entry[0] in text.split("\n"):
                self._waiting.remove(entry)
                entry[1].callback(text)

    def wait_for(self, line: str, timeout: float = 20.0) -> Deferred[str]:
        """Fire with the first message that has C{line}."""
        for text in self.messages:
            if line in text.split("\n"):
                return Deferred.fromCoroutine(_now(text))
        d: Deferred[str] = Deferred()
        self._waiting.append((line, d))
        return d.addTimeout(timeout, reactor)


async def _now(text: str) -> str:
    return text


def listen_notify(testcase: TestCase) -> tuple[str, NotifySocket]:
    """A bound NOTIFY_SOCKET in a fresh short directory (108 bytes at most); path, protocol."""
    directory = tempfile.mkdtemp(prefix="cp-notify-")
    testcase.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "notify")
    receiver = NotifySocket()
    port = reactor.listenUNIXDatagram(path, receiver)
    testcase.addCleanup(port.stopListening)
    return path, receiver


@inlineCallbacks
def take_port(testcase: TestCase):  # type: ignore[no-untyped-def]
    """A port on 127.0.0.1 that something else listens on (until cleanup)."""
    taken = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    testcase.addCleanup(taken.stopListening)
    return taken


class NotifyTests(TestCase):
    """notify() and SystemdNotifier in this process, against a real datagram socket."""

    @inlineCallbacks
    def test_path_and_abstract_addresses(self):  # type: ignore[no-untyped-def]
        path, receiver = listen_notify(self)
        self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": path}))
        text = yield receiver.wait_for("READY=1")
        self.assertEqual(text, "READY=1")
        # The abstract namespace: "@name" is "\0name".
        name = f"consoleproxy-test-{os.getpid()}-{id(self)}"
        abstract = NotifySocket()
        port = reactor.listenUNIXDatagram("\0" + name, abstract)
        self.addCleanup(port.stopListening)
        self.assertTrue(notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}))
        text = yield abstract.wait_for("STOPPING=1")
        self.assertEqual(text, "STOPPING=1")

    def test_outside_systemd_or_broken_nothing_fails(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertFalse(notify("READY=1", {}))
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}))
        missing = os.path.abspath(self.mktemp())
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": missing}))
        self.assertEqual(len(logged), 2)

    @inlineCallbacks
    def test_ready_only_when_every_endpoint_listens(self):  # type: ignore[no-untyped-def]
        path, receiver = listen_notify(self)
        taken = yield take_port(self)
        for descriptions, ready in (
            (["tcp:0:interface=127.0.0.1"], True),
            (
                ["tcp:0:interface=127.0.0.1", f"tcp:{taken.getHost().port}:interface=127.0.0.1"],
                False,
            ),
        ):
            receiver.messages.clear()
            tree = MultiService()
            listening = [
                StreamServerEndpointService(
                    serverFromString(reactor, d), Factory.forProtocol(Protocol)
                )
                for d in descriptions
            ]
            for service in listening:
                service.setServiceParent(tree)
            notifier = SystemdNotifier(reactor, listening, {"NOTIFY_SOCKET": path})
            notifier.setServiceParent(tree)
            tree.startService()
            yield wait(0.2)
            self.assertEqual(notifier.ready_sent, ready)
            if ready:
                port = listening[0]._waitingForPort.result.getHost().port
                self.assertIn(f"port={port}", receiver.messages[0])
                self.assertTrue(receiver.messages[0].startswith("READY=1\n"))
            else:
                self.assertEqual(len(receiver.messages), 1)
                self.assertNotIn("READY=1", receiver.messages[0])
                self.flushLoggedErrors()
            yield tree.stopService()
            text = yield receiver.wait_for("STOPPING=1")
            self.assertIn("STATUS=draining", text)


def checkout_environment() -> dict[str, str]:
    """
    What the server of this checkout needs (its source on the path), and what systemd
    sets for every service (INVOCATION_ID: ``consoleproxy serve`` then logs for the journal).
    """
    return {**base_environment(), "PYTHONPATH": ROOT, "INVOCATION_ID": "0" * 32}


def write_config(directory: str, listen: str | None) -> str:
    """A configuration with no guacd, keys and the inventory in C{directory}."""
    path = os.path.join(directory, "consoleproxy.toml")
    with open(path, "w") as f:
        if listen is not None:
            f.write(f'[server]\nlisten = ["{listen}"]\n')
        f.write(
            f'[guacd]\nendpoint = "none"\n[tokens]\nkey_file = "{directory}/keys"\n'
            f'[inventory]\npath = "{write_inventory(directory)}"\n'
        )
    return path


class TwistdSystemdTests(TestCase):
    """A real twistd under what systemd gives a service: NOTIFY_SOCKET, LISTEN_FDS."""

    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def start_notifying(self, notify_socket: str, listen: str) -> TwistdProcess:
        """twistd listening on C{listen}, with NOTIFY_SOCKET set."""
        return start_twistd(
            self,
            f"--config={write_config(self.directory, listen)}",
            cwd=self.directory,
            env={**checkout_environment(), "NOTIFY_SOCKET": notify_socket},
            serve=True,
        )

    @inlineCallbacks
    def test_ready_after_listening_stopping_on_sigterm(self):  # type: ignore[no-untyped-def]
        path, receiver = listen_notify(self)
        port = free_port()
        process = self.start_notifying(path, f"tcp:{port}:interface=127.0.0.1")
        ready = yield receiver.wait_for("READY=1")
        self.assertIn(f"port={port}", ready)
        # Ready means listening: the first request after it is answered.
        code, _ = yield wait_until_serving(self, process, f"http://127.0.0.1:{port}/healthz", 0)
        self.assertEqual(code, 200)
        process.transport.signalProcess("TERM")
        stopping = yield receiver.wait_for("STOPPING=1")
        self.assertIn("STATUS=draining", stopping)
        yield process.ended
        self.assertEqual([m.split("\n")[0] for m in receiver.messages], ["READY=1", "STOPPING=1"])
        self.assertNotIn(b"Traceback", process.output)

    @inlineCallbacks
    def test_no_ready_when_the_port_is_taken(self):  # type: ignore[no-untyped-def]
        path, receiver = listen_notify(self)
        taken = yield take_port(self)
        process = self.start_notifying(path, f"tcp:{taken.getHost().port}:interface=127.0.0.1")
        status = yield receiver.wait_for("STATUS=could not listen on every endpoint (see the log)")
        self.assertNotIn("READY=1", status)
        self.assertIn(b"Address already in use", process.output)
        yield wait(0.3)
        self.assertFalse(any("READY=1" in m for m in receiver.messages))

    @inlineCallbacks
    def test_adopts_the_inherited_socket(self):  # type: ignore[no-untyped-def]
        # What systemd does for consoleproxy.socket: bind and listen, then hand the socket
        # to the service as descriptor 3 with LISTEN_FDS=1, LISTEN_FDNAMES (the socket
        # unit's name by default) and LISTEN_PID=<its pid>.
        inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(inherited.close)
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(16)
        port = inherited.getsockname()[1]
        config = write_config(self.directory, None)
        process = start_twistd(
            self,
            f"--config={config}",
            "--listen=systemd:domain=INET:index=0",
            cwd=self.directory,
            env={
                **checkout_environment(),
                "LISTEN_FDS": "1",
                "LISTEN_FDNAMES": "consoleproxy.socket",
            },
            child_fds={0: "w", 1: "r", 2: "r", 3: inherited.fileno()},
            # LISTEN_PID is the service's own pid: a shell sets it, then becomes twistd.
            wrapper=("/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"'),
            serve=True,
        )
        inherited.close()  # only the child holds it now
        code, body = yield wait_until_serving(self, process, f"http://127.0.0.1:{port}/healthz")
        self.assertEqual((code, body), (200, b'{"status": "ok"}'))
        self.assertNotIn(b"Traceback", process.output)


class UnitFileTests(TestCase):
    """The example units parse: ``systemd-analyze verify``, not one warning."""

    @inlineCallbacks
    def test_units_verify(self):  # type: ignore[no-untyped-def]
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (Debian package systemd)")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # verify checks that ExecStart's program exists: point it at this Python.
        for name in ("consoleproxy.service", "consoleproxy.socket"):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read()
            if name.endswith(".service"):
                self.assertIn("/opt/consoleproxy/bin/consoleproxy serve", text)
            with open(os.path.join(directory, name), "w") as f:
                f.write(text.replace("/opt/consoleproxy/bin/consoleproxy", sys.executable))
        out, err, code = yield getProcessOutputAndValue(
            analyze,
            ["verify", "consoleproxy.socket", "consoleproxy.service"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            path=directory,
        )
        self.assertEqual((code, (out + err).decode()), (0, ""))
        with open(os.path.join(UNITS, "consoleproxy.service")) as f:
            service = f.read()
        for option in (
            "Type=notify",
            "User=consoleproxy",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "ReadWritePaths=/var/lib/consoleproxy",
            "LimitNOFILE=",
            "--listen=systemd:domain=INET:index=0",
        ):
            self.assertIn(option, service)
