"""
Tunnel benchmark: throughput and added latency of consoleproxy's in-process
Conch tunnel, against a direct TCP connection and an ``ssh -N -L`` process
tunnel (FireEdge's way), side by side in one run.

Three processes besides sshd:

  - targets: a TCP echo service and a byte source ("the VNC server");
  - tunnels: consoleproxy's Tunnels/SSHPool with one route per measurement,
    plus the throwaway OpenSSH sshd they log in to (the "hypervisor");
  - this driver: the load generator (plain blocking sockets, as guacd).

Run: ``PYTHONPATH=. .venv/bin/python bench/tunnel_bench.py`` (needs
openssh-server and openssh-client; scripts/setup installs them).  Writes
``bench/results/tunnel.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE_BYTES = 256 * 1024 * 1024
ROUND_TRIPS = 2000
RUNS = 3


# -- targets process ------------------------------------------------------------------


async def _targets() -> None:
    chunk = os.urandom(256 * 1024)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sent = 0
        while sent < SOURCE_BYTES:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
        writer.close()

    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    source_server = await asyncio.start_server(source, "127.0.0.1", 0)
    ports = {
        "echo": echo_server.sockets[0].getsockname()[1],
        "source": source_server.sockets[0].getsockname()[1],
    }
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


# -- tunnels process ------------------------------------------------------------------


class _Shim:
    """What tests.helpers.realservers needs of a test case, outside trial."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="tunnel-bench-")
        self.cleanups: list[Any] = []
        self.count = 0

    def mktemp(self) -> str:
        self.count += 1
        return os.path.join(self.directory, f"t{self.count}")

    def addCleanup(self, f: Any, *args: Any) -> None:
        self.cleanups.append((f, args))


def _tunnels(echo: int, source: int, routes: int) -> None:
    from twisted.internet import defer, reactor  # noqa: PLC0415

    from consoleproxy.consoles import Console  # noqa: PLC0415
    from consoleproxy.tunnels.routes import Tunnels, TunnelSettings  # noqa: PLC0415
    from consoleproxy.tunnels.ssh import SSHPool, SSHSettings, load_private_key  # noqa: PLC0415
    from tests.helpers.realservers import start_sshd  # noqa: PLC0415

    shim = _Shim()

    async def main() -> None:
        sshd = await start_sshd(shim, reactor)
        known_hosts = os.path.join(shim.directory, "known_hosts")
        Path(known_hosts).write_text(sshd.known_hosts_line() + "\n")
        pool = SSHPool(
            reactor,
            SSHSettings(known_hosts=known_hosts, keys=(load_private_key(sshd.client_key_path),)),
        )
        tunnels = Tunnels(
            reactor,
            TunnelSettings(
                default_mode="ssh", user=sshd.user, ssh_port=sshd.port, accept_timeout=600
            ),
            pool,
        )
        ports: dict[str, Any] = {
            "sshd": sshd.port,
            "key": sshd.client_key_path,
            "known_hosts": known_hosts,
            "user": sshd.user,
        }
        for name, port in (("echo", echo), ("source", source)):
            made = []
            for _ in range(routes):
                route = await tunnels.route(
                    Console(0, "vnc", {"hostname": "127.0.0.1", "port": str(port)})
                )
                made.append(int(route.parameters["port"]))
            ports[name] = made
        print(json.dumps(ports), flush=True)

    async def shutdown() -> None:
        for f, args in reversed(shim.cleanups):
            result = f(*args)
            if isinstance(result, defer.Deferred):
                await result

    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addErrback(_die, reactor))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(shutdown()))
    reactor.run()


def _die(failure: Any, reactor: Any) -> None:
    print(json.dumps({"error": failure.getTraceback()}), flush=True)
    reactor.stop()


# -- driver ---------------------------------------------------------------------------


def _spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    info = json.loads(process.stdout.readline())
    if "error" in info:
        raise SystemExit(info["error"])
    return process, info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def _throughput(port: int) -> float:
    """MB/s reading the whole source through C{port}."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        buffer = bytearray(1 << 20)
        total = 0
        start = time.perf_counter()
        while True:
            n = s.recv_into(buffer)
            if not n:
                break
            total += n
        elapsed = time.perf_counter() - start
    if total != SOURCE_BYTES:
        raise SystemExit(f"got {total} bytes of {SOURCE_BYTES} through port {port}")
    return total / elapsed / 1e6


def _latency(port: int) -> tuple[float, float]:
    """p50 and p99 in microseconds of a 64-byte round trip through C{port}."""
    payload = os.urandom(64)
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(ROUND_TRIPS):
            start = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(s.recv(65536))
            samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def main() -> None:
    targets, ports = _spawn("--targets")
    tunnel_proc, tunnel = _spawn(
        "--tunnels", str(ports["echo"]), str(ports["source"]), str(RUNS + 1)
    )
    echo_local, source_local = _free_port(), _free_port()
    ssh = subprocess.Popen(
        [
            "ssh",
            "-N",
            "-p",
            str(tunnel["sshd"]),
            "-i",
            tunnel["key"],
            "-o",
            f"UserKnownHostsFile={tunnel['known_hosts']}",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-L",
            f"127.0.0.1:{echo_local}:127.0.0.1:{ports['echo']}",
            "-L",
            f"127.0.0.1:{source_local}:127.0.0.1:{ports['source']}",
            f"{tunnel['user']}@127.0.0.1",
        ]
    )
    try:
        _wait_port(echo_local)
        paths = {
            "direct": ([ports["source"]] * (RUNS + 1), [ports["echo"]] * 2),
            "Conch tunnel (consoleproxy)": (tunnel["source"], tunnel["echo"][:2]),
            "ssh -L process (FireEdge)": ([source_local] * (RUNS + 1), [echo_local] * 2),
        }
        results = {}
        for name, (source_ports, echo_ports) in paths.items():
            _throughput(source_ports[0])  # warm-up
            rates = [_throughput(p) for p in source_ports[1 : RUNS + 1]]
            p50, p99 = _latency(echo_ports[1])
            results[name] = (statistics.median(rates), p50, p99)
            print(f"{name}: {results[name]}", flush=True)
    finally:
        for process in (ssh, tunnel_proc, targets):
            process.terminate()
        for process in (ssh, tunnel_proc, targets):
            process.wait(timeout=20)
    direct_rate, direct_p50, _ = results["direct"]
    lines = [
        "# Tunnel benchmark",
        "",
        f"{SOURCE_BYTES >> 20} MiB read through each path (median of {RUNS} runs), and "
        f"{ROUND_TRIPS} round trips of 64 bytes; one machine, loopback, sshd from OpenSSH.",
        "",
        "| path | throughput MB/s | vs direct | RTT p50 µs | RTT p99 µs | added p50 µs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (rate, p50, p99) in results.items():
        lines.append(
            f"| {name} | {rate:.0f} | {rate / direct_rate:.2f} | {p50:.0f} | {p99:.0f} | "
            f"{p50 - direct_p50:.0f} |"
        )
    conch, process = results["Conch tunnel (consoleproxy)"], results["ssh -L process (FireEdge)"]
    lines += [
        "",
        f"Conch vs ssh -L: throughput {conch[0] / process[0]:.2f}x, "
        f"p50 latency {conch[1] / process[1]:.2f}x.",
        "",
    ]
    out = ROOT / "bench" / "results" / "tunnel.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--targets"]:
        asyncio.run(_targets())
    elif sys.argv[1:2] == ["--tunnels"]:
        _tunnels(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
