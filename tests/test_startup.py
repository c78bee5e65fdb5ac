"""
Start-up as twistd runs it: a port in use and a bad configuration each end
start-up with one line and a non-zero exit, never a server that listens
nowhere or a page of usage text.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.support import write_inventory
from tests.helpers.twistd import free_port, run_twistd

#: Seconds a refused start-up may take (importing everything included).
STARTUP = 30


class StartupTests(TestCase):
    timeout = 120

    def directory(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    @inlineCallbacks
    def ended_within(self, process, seconds: float):  # type: ignore[no-untyped-def]
        """The exit code, or a failure if the process is still up after C{seconds}."""
        timer = reactor.callLater(seconds, process.transport.signalProcess, "KILL")
        code = yield process.ended
        self.assertTrue(timer.active(), f"still running after {seconds} s: {process.output!r}")
        timer.cancel()
        return code

    @inlineCallbacks
    def test_port_in_use_stops_startup_with_one_line(self):  # type: ignore[no-untyped-def]
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        directory = self.directory()
        process = run_twistd(
            self,
            f"--listen=tcp:{free_port()}:interface=127.0.0.1",
            f"--listen=tcp:{port}:interface=127.0.0.1",
            f"--key-file={directory}/k",
            f"--inventory={write_inventory(directory)}",
        )
        code = yield self.ended_within(process, STARTUP)
        self.assertEqual(code, 1)
        self.assertEqual(
            process.errors.decode(),
            f"consoleproxy: cannot listen on tcp:{port}:interface=127.0.0.1: "
            "Address already in use\n",
        )
        self.assertNotIn(b"Traceback", process.output)
        self.assertNotIn(b"CannotListenError", process.output)

    @inlineCallbacks
    def test_configuration_error_is_one_line_exit_2(self):  # type: ignore[no-untyped-def]
        directory = self.directory()
        config = f"{directory}/c.toml"
        with open(config, "w") as f:
            f.write(f'[tokens]\nkey_file = "{directory}/k"\n[api]\nrate = "fast"\n')
        process = run_twistd(self, f"--config={config}", f"--listen=tcp:{free_port()}")
        code = yield self.ended_within(process, STARTUP)
        self.assertEqual(code, 2)
        self.assertEqual(
            process.output.decode(),
            "consoleproxy: configuration error: api.rate: "
            "a number of requests per second, not 'fast'\n",
        )

    @inlineCallbacks
    def test_checked_at_start(self):  # type: ignore[no-untyped-def]
        """Each of these used to start, and fail later (or never say why)."""
        directory = self.directory()
        empty = f"{directory}/empty-ca"
        os.makedirs(empty)
        for args, line in (
            (
                ["--guacd=tls:guacd.example:4822:trustRoots=/nonexistent/ca"],
                "guacd.endpoint: trustRoots directory /nonexistent/ca does not exist",
            ),
            (
                [f"--guacd=tls:guacd.example:4822:trustRoots={empty}"],
                f"guacd.endpoint: trustRoots directory {empty} holds no certificate (*.pem)",
            ),
        ):
            process = run_twistd(
                self, f"--key-file={directory}/k", f"--listen=tcp:{free_port()}", *args
            )
            code = yield self.ended_within(process, STARTUP)
            self.assertEqual(
                (code, process.output.decode()),
                (2, f"consoleproxy: configuration error: {line}\n"),
            )
