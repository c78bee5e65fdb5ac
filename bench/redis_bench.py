"""
Redis cost per console session: the round trips a session set-up adds when
consoleproxy runs as a cluster (consoleproxy/cluster/), each timed on loopback.

Starts its own redis-server (no persistence, a free 127.0.0.1 port), connects
one L{RedisClient} as a consoleproxy process would, and times each call
C{CALLS} times, one after another (the latency a session waits, not the
throughput): median and p99 in microseconds.

Run: ``PYTHONPATH=. .venv/bin/python bench/redis_bench.py [CALLS]`` (needs
redis-server; scripts/setup installs it).  Prints a Markdown table.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, task

from consoleproxy.cluster.holdings import BATCH
from consoleproxy.cluster.leases import ClusterLeases
from consoleproxy.cluster.ratelimit import ClusterRateLimiter
from consoleproxy.cluster.redis_client import RedisClient, parse_redis_url
from consoleproxy.cluster.registry import SessionRegistry
from consoleproxy.cluster.spent_tokens import RedisSpentTokens

CALLS = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", directory, "--loglevel", "warning"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.01)
    process.kill()
    raise SystemExit("redis-server did not start")


async def timed(calls: int, one: Callable[[int], Awaitable[Any]]) -> list[float]:
    """Microseconds of each of C{calls} sequential calls (after 100 warm-up calls)."""
    for n in range(100):
        await one(-n - 1)
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        await one(n)
        samples.append((time.perf_counter() - started) * 1e6)
    return samples


def row(name: str, trips: str, samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"| {name} | {trips} | {statistics.median(samples):.0f} | {p99:.0f} |"


async def main(reactor: Any, calls: int) -> None:

    directory = tempfile.mkdtemp(prefix="redis-bench-")
    process, port = start_redis(directory)
    try:
        client = RedisClient(reactor, parse_redis_url(f"redis://127.0.0.1:{port}/0"))
        client.start()
        await client.when_available()
        print("\n".join(await measure(reactor, client, calls)))
        await client.stop()
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


async def measure(reactor: Any, client: RedisClient, calls: int) -> list[str]:
    """The table's lines."""
    spent = RedisSpentTokens(client, reactor)
    leases = ClusterLeases(client, reactor, max_total=10**6, max_per_user=10**6)
    registry = SessionRegistry(client, reactor)
    limiter = ClusterRateLimiter(client, reactor, 10**6, 10**6)
    expires = time.time() + 60

    async def setup_sequential(n: int) -> None:
        assert await spent.spend(f"s{n}".encode(), expires)
        lease = await leases.acquire(f"user{n % 50}")
        await registry.register(
            f"s{n}", user=lease.user, vm="7", type="vnc", zone="0", client="192.0.2.1"
        )

    async def setup_overlapped(n: int) -> None:
        assert await spent.spend(f"o{n}".encode(), expires)
        user = f"user{n % 50}"
        acquire = leases.acquire(user)
        register = registry.register(
            f"o{n}", user=user, vm="7", type="vnc", zone="0", client="192.0.2.1"
        )
        await defer.gatherResults([acquire, register])

    lines = [
        f"Redis {subprocess.check_output(['redis-server', '--version']).decode().split()[2]}"
        f", loopback TCP, {calls} sequential calls each, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores while measuring.",
        "",
        "| call | round trips | median µs | p99 µs |",
        "| --- | --- | --- | --- |",
        row("PING (the floor)", "1", await timed(calls, lambda n: client.execute("PING"))),
        row(
            "token spend (SET NX PX)",
            "1",
            await timed(calls, lambda n: spent.spend(f"t{n}".encode(), expires)),
        ),
    ]
    held = []

    async def acquire(n: int) -> None:
        held.append(await leases.acquire(f"user{n % 50}"))

    lines.append(row("lease acquire (Lua)", "1", await timed(calls, acquire)))
    lines.append(
        row(
            "registry register (SET PX)",
            "1",
            await timed(
                calls,
                lambda n: registry.register(
                    f"r{n}", user="u", vm="7", type="vnc", zone="0", client="192.0.2.1"
                ),
            ),
        )
    )
    lines.append(
        row("rate limit take (GCRA, Lua)", "1", await timed(calls, lambda n: limiter.take("k")))
    )
    lines.append(
        row(
            "**set-up: spend, acquire, register**",
            "3 sequential",
            await timed(calls, setup_sequential),
        )
    )
    lines.append(
        row(
            "**set-up: spend, then acquire + register pipelined**",
            "2",
            await timed(calls, setup_overlapped),
        )
    )

    async def teardown(n: int) -> None:
        lease = held.pop() if held else await leases.acquire("x")
        await defer.gatherResults([leases.release(lease), registry.unregister(f"r{n}")])

    lines.append(
        row(
            "teardown: release + unregister pipelined",
            "1",
            await timed(min(calls, len(held) - 100), teardown),
        )
    )
    started = time.perf_counter()
    await leases.renew()
    refresh_ms = (time.perf_counter() - started) * 1000
    lines.append("")
    lines.append(
        f"Refreshing this process's {len(leases)} leases (one Lua call per {BATCH}): "
        f"{refresh_ms:.1f} ms, every 10 s."
    )
    return lines


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else CALLS
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, count)))
