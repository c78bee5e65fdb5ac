"""
The ``consoleproxy`` command, run as an operator runs it: a real process, a real terminal
where it matters (passwd), real log lines from a real server (serve).
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from argon2 import PasswordHasher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.cli import serve_argv
from consoleproxy.ops.logformat import format_journal, format_json
from consoleproxy.tokens import KeyRing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT}
for name in ("JOURNAL_STREAM", "INVOCATION_ID"):
    ENV.pop(name, None)


def command(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "consoleproxy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or ENV,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def on_terminal(args: list[str], *answers: tuple[bytes, bytes]) -> tuple[int, str]:
    """
    Run C{consoleproxy ARGS} on a pseudo-terminal; for each C{(prompt, keys)} in turn,
    type C{keys} once C{prompt} has appeared (getpass flushes what was typed before).
    """
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(sys.executable, [sys.executable, "-m", "consoleproxy", *args], ENV)
    output = b""
    pending = list(answers)
    seen = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if pending and pending[0][0] in output[seen:]:
            seen = output.rindex(pending[0][0]) + len(pending[0][0])
            os.write(fd, pending.pop(0)[1])
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


class SmallCommandsTests(SynchronousTestCase):
    def test_version_names_consoleproxy_and_dependencies(self) -> None:
        code, out, _ = command("version")
        self.assertEqual(code, 0)
        self.assertRegex(out, r"^consoleproxy \d+\.\d+")
        self.assertIn("\nTwisted ", out)
        self.assertIn("\nautobahn ", out)

    def test_keygen_prints_a_key_line_the_key_file_takes(self) -> None:
        code, out, _ = command("keygen")
        self.assertEqual(code, 0)
        path = self.mktemp()
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(out)
        self.assertEqual(len(KeyRing.from_file(path, create=False).keys), 1)

    def test_passwd_from_a_pipe(self) -> None:
        code, out, _ = command("passwd", stdin="s3cret\n")
        self.assertEqual(code, 0)
        self.assertTrue(PasswordHasher().verify(out.strip(), "s3cret"))

    def test_passwd_help_does_not_prompt(self) -> None:
        code, output = on_terminal(["passwd", "--help"])
        self.assertEqual(code, 0)
        self.assertIn("usage: consoleproxy passwd", output)
        self.assertNotIn("Password:", output)

    def test_passwd_ctrl_c_and_ctrl_d_end_without_traceback(self) -> None:
        for keys in (b"\x03", b"\x04"):
            code, output = on_terminal(["passwd"], (b"Password:", keys))
            self.assertEqual(code, 130, output)
            self.assertNotIn("Traceback", output)
            self.assertIn("no password read", output)

    def test_passwd_on_terminal_twice(self) -> None:
        code, output = on_terminal(["passwd"], (b"Password:", b"abc\n"), (b"Again:", b"abd\n"))
        self.assertEqual(code, 1)
        self.assertIn("the passwords differ", output)
        code, output = on_terminal(["passwd"], (b"Password:", b"abc\n"), (b"Again:", b"abc\n"))
        self.assertEqual(code, 0, output)
        self.assertIn("$argon2id$", output)

    def test_unknown_command_and_arguments(self) -> None:
        self.assertEqual(command("frobnicate")[0], 2)
        code, _, err = command("keygen", "--extra")
        self.assertEqual(code, 2)
        self.assertIn("unknown arguments", err)


class ServeArgvTests(SynchronousTestCase):
    def test_text_keeps_twistd_lines_outside_systemd(self) -> None:
        self.assertEqual(
            serve_argv("text", ["--listen", "tcp:1"], {}),
            ["twistd", "--nodaemon", "--pidfile=", "consoleproxy", "--listen", "tcp:1"],
        )

    def test_journal_lines_under_systemd_and_json_anywhere(self) -> None:
        self.assertIn("consoleproxy.ops.logformat.journal_observer", serve_argv(
            "text", [], {"JOURNAL_STREAM": "8:123"}
        ))  # fmt: skip
        self.assertIn("consoleproxy.ops.logformat.json_observer", serve_argv("json", [], {}))


class LogFormatTests(SynchronousTestCase):
    def event(self, **extra: object) -> dict[str, object]:
        from twisted.logger import LogLevel  # noqa: PLC0415

        return {
            "log_format": "Console opened: user={user}",
            "user": "alice",
            "log_level": LogLevel.warn,
            "log_namespace": "consoleproxy.relay",
            "log_time": 1_800_000_000.25,
            **extra,
        }

    def test_json_line_has_the_text_line_fields(self) -> None:
        line = format_json(self.event())
        self.assertTrue(line.endswith("\n"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(
            json.loads(line),
            {
                "time": "2027-01-15T08:00:00.250+00:00",
                "level": "warn",
                "system": "consoleproxy.relay",
                "message": "Console opened: user=alice",
            },
        )

    def test_json_escapes_control_characters(self) -> None:
        line = format_json(self.event(user="a\nb\x1b[31m"))
        self.assertEqual(line.count("\n"), 1)
        self.assertEqual(json.loads(line)["message"], "Console opened: user=a\nb\x1b[31m")

    def test_journal_line_has_priority_and_no_timestamp(self) -> None:
        self.assertEqual(
            format_journal(self.event()), "<4>[consoleproxy.relay] Console opened: user=alice\n"
        )


class ServeTests(TestCase):
    """C{consoleproxy serve} runs the real server; its log lines are in the chosen format."""

    timeout = 60

    def serve(self, *extra: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        process = subprocess.Popen(
            [
                sys.executable, "-m", "consoleproxy", "serve", *extra,
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--key-file", os.path.join(directory, "keys"), "--guacd", "none",
            ],
            cwd="/",
            env=env or ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                        self.assertEqual(r.status, 200)
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        return process.returncode, output.splitlines()

    def test_json_log_format(self) -> None:
        _, lines = self.serve("--log-format", "json")
        self.assertTrue(lines)
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        self.assertTrue(any("healthz" in r["message"] for r in records), lines)
        self.assertEqual({"time", "level", "system", "message"} - set(records[0]), set())

    def test_under_systemd_lines_carry_no_timestamp(self) -> None:
        _, lines = self.serve(env={**ENV, "JOURNAL_STREAM": "8:12345"})
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"^<[2-7]>\[")
        self.assertFalse([line for line in lines if "+0000" in line or "2026-" in line])
