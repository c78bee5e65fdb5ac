"""
The live demo as a newcomer starts it: ``scripts/run --port N`` in a real process.

Everything that names the port agrees (the listening endpoint, the Origin list, the printed
URLs), both demo VMs' consoles mint tokens, the demo shell's sshd takes the inventory's key
and proves the host key the inventory gives guacd, and Ctrl-C leaves nothing running.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import urllib.request

from twisted.trial.unittest import SkipTest, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS = ("/usr/bin/Xvfb", "/usr/bin/x11vnc", "/usr/sbin/sshd", "/usr/bin/ssh")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, auth: str = "demo:demo") -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class DemoTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        missing = [path for path in NEEDS if not os.path.exists(path)]
        if missing or not os.path.exists(os.path.join(ROOT, ".venv", "bin", "twistd")):
            raise SkipTest(f"scripts/setup has not installed {missing or '.venv'}")
        # A copy of the checkout's scripts and package, so the demo's state/ is its own.
        self.tree = tempfile.mkdtemp(prefix="demo-")
        self.addCleanup(shutil.rmtree, self.tree, True)
        for name in ("scripts", "consoleproxy", "twisted"):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(self.tree, name))
        for name in (".venv", "node_modules"):
            if os.path.exists(os.path.join(ROOT, name)):
                os.symlink(os.path.join(ROOT, name), os.path.join(self.tree, name))
        # scripts/setup is the checkout's job (already done); the demo's own steps follow.
        with open(os.path.join(self.tree, "scripts", "setup"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        self.port = free_port()
        self.output = open(os.path.join(self.tree, "run.log"), "w+")  # noqa: SIM115
        self.addCleanup(self.output.close)
        self.process = subprocess.Popen(
            ["bash", "scripts/run", "--port", str(self.port)],
            cwd=self.tree,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(self.stop)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.fail(f"scripts/run exited {self.process.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            self.fail(f"the demo did not listen on {self.port}: {self.log()}")

    def log(self) -> str:
        self.output.flush()
        self.output.seek(0)
        return self.output.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def inventory(self) -> dict:  # type: ignore[type-arg]
        with open(os.path.join(self.tree, "state", "demo-inventory.toml"), "rb") as f:
            return tomllib.load(f)

    def test_one_port_everywhere(self) -> None:
        urls = set(re.findall(r"http://[\w.]+:(\d+)", self.log()))
        self.assertEqual(urls, {str(self.port)})
        with open(os.path.join(self.tree, "state", "demo.toml"), "rb") as f:
            config = tomllib.load(f)
        self.assertEqual(config["server"]["listen"], [f"tcp:{self.port}:interface=127.0.0.1"])
        self.assertEqual(
            config["relay"]["allowed_origins"],
            [f"http://127.0.0.1:{self.port}", f"http://localhost:{self.port}"],
        )

    def test_both_consoles_mint_tokens(self) -> None:
        for path in ("0/guacamole/vnc", "0/guacamole/vnc?mode=rfb", "1/guacamole/ssh"):
            status, body = get(f"http://127.0.0.1:{self.port}/api/vm/{path}")
            self.assertEqual((status, json.loads(body)["message"]), (200, "OK"), path)
        status, _ = get(f"http://127.0.0.1:{self.port}/api/vm/0/guacamole/vnc", "demo:wrong")
        self.assertEqual(status, 401)

    def test_demo_shell_takes_the_inventory_key_and_host_key(self) -> None:
        ssh = self.inventory()["vm"][1]["ssh"]
        directory = tempfile.mkdtemp(prefix="demo-ssh-")
        self.addCleanup(shutil.rmtree, directory, True)
        key = os.path.join(directory, "key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(ssh["private-key"])
        known = os.path.join(directory, "known_hosts")
        with open(known, "w") as f:
            f.write(ssh["host-key"] + "\n")
        result = subprocess.run(
            [
                "ssh", "-i", key, "-p", str(ssh["port"]), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                f"{ssh['username']}@{ssh['hostname']}", "echo demo-shell-works",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )  # fmt: skip
        self.assertIn("demo-shell-works", result.stdout, result.stderr)

    def test_ctrl_c_stops_everything(self) -> None:
        pid = self.process.pid
        self.stop()
        self.assertEqual(self.process.returncode, 130)
        time.sleep(0.5)
        left = subprocess.run(
            ["pgrep", "-s", str(pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        self.assertEqual(left, [])
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
