"""
Write the live demo's configuration and inventory (called by ``scripts/run``).

Everything that names the demo's port is written from one value, so the Origin
list, the printed URLs and the listening endpoint always agree::

    python3 scripts/demo_config.py STATE PORT VNC_PORT [SSH_PORT SSH_USER KEY HOST_KEY]

writes ``STATE/demo.toml`` (the server's configuration) and
``STATE/demo-inventory.toml`` (VM 0: the demo desktop over VNC; VM 1, when an
SSH port is given: a shell on the demo's own loopback sshd, reached with a
throwaway key whose host key guacd verifies).
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

#: The example inventory, whose user "demo" (password "demo") the demo keeps.
EXAMPLE = Path(__file__).resolve().parent.parent / "consoleproxy" / "examples" / "inventory.toml"


def demo_hash() -> str:
    """The example inventory's Argon2id hash of the demo user's password."""
    with EXAMPLE.open("rb") as f:
        return str(tomllib.load(f)["users"]["demo"]["password_hash"])


def toml_string(value: str) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    return json.dumps(value)


def inventory(vnc_port: int, ssh: tuple[int, str, str, str] | None) -> str:
    """The demo inventory: the desktop, and the shell when the demo's sshd runs."""
    text = (
        "# Written by scripts/run for the live demo; re-written at every start.\n"
        f"[users.demo]\npassword_hash = {toml_string(demo_hash())}\n\n"
        '[[vm]]\nid = 0\nname = "demo-desktop"\nusers = ["demo"]\n'
        f'[vm.vnc]\nhostname = "127.0.0.1"\nport = {vnc_port}\npassword = "demo-vnc"\n'
    )
    if ssh is not None:
        port, user, key, host_key = ssh
        text += (
            '\n[[vm]]\nid = 1\nname = "demo-shell"\nusers = ["demo"]\n'
            f'[vm.ssh]\nhostname = "127.0.0.1"\nport = {port}\n'
            f"username = {toml_string(user)}\n"
            f"private-key = {toml_string(key)}\n"
            f"host-key = {toml_string(f'[127.0.0.1]:{port} {host_key}')}\n"
            'color-scheme = "gray-black"\n'
        )
    return text


def config(state: Path, port: int) -> str:
    """The server's configuration: one port, named the same way everywhere."""
    origins = [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]
    return (
        "# Written by scripts/run for the live demo; re-written at every start.\n"
        f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
        f"[relay]\nallowed_origins = {json.dumps(origins)}\n"
        f"[tokens]\nkey_file = {toml_string(str(state / 'consoleproxy.keys'))}\n"
        f"[inventory]\npath = {toml_string(str(state / 'demo-inventory.toml'))}\n"
    )


def main(argv: list[str]) -> None:
    """Write both files; see the module's docstring for the arguments."""
    state, port, vnc_port = Path(argv[0]).resolve(), int(argv[1]), int(argv[2])
    ssh = None
    if len(argv) > 3:
        key = Path(argv[5]).read_text()
        host_key = " ".join(Path(argv[6]).read_text().split()[:2])
        ssh = (int(argv[3]), argv[4], key, host_key)
    for name, text in (
        ("demo-inventory.toml", inventory(vnc_port, ssh)),
        ("demo.toml", config(state, port)),
    ):
        path = state / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])
