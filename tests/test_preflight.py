"""
``consoleproxy check-config``: every problem a start-up would meet, one line each, without
starting and without changing the machine; ``--probe`` listens and asks guacd and the cloud.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import write_inventory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_config(*args: str) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "consoleproxy", "check-config", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=60,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).splitlines()


class CheckConfigTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write(self, text: str) -> str:
        path = os.path.join(self.directory, "consoleproxy.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def config(self, guacd: str = "none", port: int = 1, extra: str = "") -> str:
        return self.write(
            f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
            f'[guacd]\nendpoint = "{guacd}"\n'
            f'[tokens]\nkey_file = "{self.directory}/state/token.keys"\n'
            f'[inventory]\npath = "{write_inventory(self.directory)}"\n' + extra
        )

    def test_good_file_is_ok_and_nothing_is_created(self) -> None:
        path = self.config()
        before = sorted(os.listdir(self.directory))
        code, lines = check_config(path)
        self.assertEqual((code, lines), (0, [f"{path}: OK"]))
        self.assertEqual(sorted(os.listdir(self.directory)), before)

    def test_every_problem_one_line_each(self) -> None:
        key_file = os.path.join(self.directory, "open.keys")
        with open(key_file, "w") as f:
            f.write("x\n")
        os.chmod(key_file, 0o644)
        path = self.write(
            '[guacd]\nendpoint = "tls:127.0.0.1:4822:trustRoots=/nonexistent"\n'
            f'[tokens]\nkey_file = "{key_file}"\n'
            '[cloud]\nbackend = "opennebula"\n'
            '[opennebula]\nserver_admin_auth = "/nonexistent/sunstone_auth"\n'
        )
        code, lines = check_config(path)
        self.assertEqual(code, 1)
        self.assertEqual(len(lines), 3, lines)
        for line, key in zip(
            lines,
            ("guacd.endpoint", "tokens.key_file", "opennebula.server_admin_auth"),
            strict=True,
        ):
            self.assertTrue(line.startswith(f"{path}: {key}: "), line)
        self.assertNotIn("Traceback", "\n".join(lines))

    def test_a_value_error_is_one_line(self) -> None:
        code, lines = check_config(self.write('[api]\nrate = "fast"\n'))
        self.assertEqual(code, 1)
        self.assertEqual(
            lines, [f"{self.directory}/consoleproxy.toml: api.rate: a number of requests "
                    "per second, not 'fast'"],
        )  # fmt: skip

    @inlineCallbacks
    def test_probe_finds_a_port_in_use_and_guacd_down(self):  # type: ignore[no-untyped-def]
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, lines = yield deferToThread(
            check_config, self.config("tcp:127.0.0.1:1", port), "--probe"
        )
        self.assertEqual(code, 1)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(f"server.listen: cannot listen on tcp:{port}:interface=127.0.0.1", lines[0])
        self.assertIn("guacd: does not answer", lines[1])

    @inlineCallbacks
    def test_probe_ok_when_guacd_answers(self):  # type: ignore[no-untyped-def]
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path = self.config(f"tcp:127.0.0.1:{guacd.port}", port)
        code, lines = yield deferToThread(check_config, path, "--probe")
        self.assertEqual((code, lines), (0, [f"{path}: OK (guacd and the cloud answered)"]))
