"""
Relay benchmark: consoleproxy against guacamole-lite 1.2.0 (Guacamole) and
websockify (raw VNC), with the fake upstream read directly over TCP as the
limit, all on this machine in one run.  ``bench/run`` installs the peers and
calls this; it writes ``bench/results/relay.md``, ``relay.json`` and
``relay.png``.

Processes (all on the same two cores; one target is measured at a time, the
others sit idle):

  - bench/streamservers.py: the fake guacd and the fake VNC server;
  - consoleproxy under twistd, configured here (temporary keys, inventory);
  - guacamole-lite (bench/peers_guacamole_lite.js) and websockify;
  - bench/loadgen.js: the browsers, one Node.js process per measurement;
  - py-spy, once, on consoleproxy for the profile.

Every figure is the median of several runs, taken in rounds (each round
measures every target once), so a drift of the machine hits all targets alike;
ratios are of those medians, from this one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from consoleproxy.clouds.passwords import hash_password

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PASSWORD = "bench-password"
SETUP_CONCURRENCY = (8, 64)
WORKLOAD_VMS = {"blob": 1, "small": 2, "echo": 3, "idle": 4, "rfb": 5}


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    runs: int
    duration: float
    warmup: float
    round_trips: int
    interval_ms: float
    setup_count: int
    setup_count_argon2: int
    idle_sessions: int
    hold_seconds: float
    profile_seconds: float


FULL = Plan(
    runs=3,
    duration=3.0,
    warmup=0.5,
    round_trips=10000,
    interval_ms=50,
    setup_count=300,
    setup_count_argon2=40,
    idle_sessions=4000,
    hold_seconds=20,
    profile_seconds=8,
)
QUICK = Plan(
    runs=2,
    duration=1.0,
    warmup=0.3,
    round_trips=2000,
    interval_ms=50,
    setup_count=100,
    setup_count_argon2=12,
    idle_sessions=1000,
    hold_seconds=5,
    profile_seconds=4,
)


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[Any], name: str) -> None:
    """Wait until C{port} accepts connections; fail if C{process} died."""
    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{name} never listened on {port}")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                found.append(int(child))
                todo.append(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children, live and reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime are fields 14-17 (11-14 after the command)
    total = sum(int(f) for f in fields[11:15])
    for child in _descendants(pid):
        try:
            total += sum(int(f) for f in _stat_fields(child)[11:13])
        except OSError:
            continue
    return total / tick


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (everything the bench ran)."""
    me, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def rss_kib(pid: int) -> int:
    """Resident set size of one process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Fleet:
    """Starts the processes under test and stops them all at the end."""

    def __init__(self, peers: Path, directory: Path) -> None:
        self.peers = peers
        self.directory = directory
        self.processes: dict[str, subprocess.Popen[Any]] = {}
        self.node_env = {**os.environ, "NODE_PATH": str(peers / "node" / "node_modules")}

    def spawn(self, name: str, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process, its output in a log file of the temporary directory."""
        if "stdout" not in kwargs:
            kwargs["stdout"] = (self.directory / f"{name}.log").open("w")
            kwargs["stderr"] = subprocess.STDOUT
        kwargs.setdefault("cwd", ROOT)
        process = subprocess.Popen(args, **kwargs)
        self.processes[name] = process
        return process

    def stop(self) -> None:
        """Terminate everything, newest first."""
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()

    def pid(self, name: str) -> int:
        """A started process's pid."""
        return self.processes[name].pid

    def start_fakes(self) -> dict[str, int]:
        """The fake guacd and VNC server; their ports."""
        process = self.spawn(
            "fakes",
            [sys.executable, str(BENCH / "streamservers.py")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        return dict(json.loads(process.stdout.readline()))

    def start_consoleproxy(
        self,
        guacd_port: int,
        rfb_port: int,
        source: Path = ROOT,
        name: str = "consoleproxy",
        lifts: dict[str, str] | None = None,
    ) -> int:
        """
        consoleproxy under twistd with a bench configuration; its port.

        C{source} is the tree it runs from (another revision for C{--baseline}),
        C{lifts} configuration lines by section (``server``, ``relay``, ...) that lift
        that revision's own per-client limits.
        """
        port = free_port()
        lifts = lifts or {}
        d = self.directory / name.replace(" ", "-").replace("@", "-")
        d.mkdir(exist_ok=True)
        quick = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
        vms = []
        for workload, vm in WORKLOAD_VMS.items():
            host, vnc_port = ("127.0.0.1", rfb_port) if workload == "rfb" else (workload, 5900)
            vms.append(
                f'[[vm]]\nid = {vm}\nname = "{workload}"\nusers = ["*"]\n'
                f'[vm.vnc]\nhostname = "{host}"\nport = {vnc_port}\n'
            )
        (d / "inventory.toml").write_text(
            # "argon2": argon2-cffi's default cost, as consoleproxy-passwd makes it;
            # "quick": the tests' cheap parameters (the check is then negligible).
            f'[users.argon2]\npassword_hash = "{hash_password(PASSWORD)}"\n'
            f'[users.quick]\npassword_hash = "{quick}"\n\n' + "\n".join(vms)
        )
        (d / "known_hosts").write_text("")
        config = d / "consoleproxy.toml"
        config.write_text(
            f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
            + lifts.get("server", "")
            + f'[guacd]\nendpoint = "tcp:127.0.0.1:{guacd_port}"\ntimezone = "UTC"\n'
            f'[tokens]\nkey_file = "{d / "consoleproxy.keys"}"\n'
            # One client address and one user open every session here: lift the token
            # API's per-address rate limit and the per-user session cap, which would
            # otherwise measure themselves.  The Origin is the one the load generator sends.
            f'[relay]\nallowed_origins = ["http://127.0.0.1:{port}"]\n'
            "max_sessions = 1000000\nmax_sessions_per_user = 1000000\n"
            + lifts.get("relay", "")
            + "[api]\nrate = 1000000.0\nburst = 1000000\n"
            f'[inventory]\npath = "{d / "inventory.toml"}"\n'
            f'[tunnels]\nknown_hosts = "{d / "known_hosts"}"\n' + lifts.get("", "")
        )
        twistd = ROOT / ".venv" / "bin" / "twistd"
        args = [str(twistd), "-n", "--pidfile=", "-l", str(d / "consoleproxy-twistd.log")]
        process = self.spawn(
            name,
            [*args, "consoleproxy", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(source)},
            cwd=source,
        )
        wait_port(port, process, name)
        return port

    def start_guacamole_lite(self, guacd_port: int, key: str) -> int:
        """guacamole-lite's stock server against the fake guacd; its port."""
        port = free_port()
        script = str(BENCH / "peers_guacamole_lite.js")
        process = self.spawn(
            "guacamole-lite", ["node", script, str(port), str(guacd_port), key], env=self.node_env
        )
        wait_port(port, process, "guacamole-lite")
        return port

    def start_websockify(self, rfb_port: int) -> int:
        """websockify (its default: a process per connection) to the fake VNC server."""
        port = free_port()
        websockify = str(self.peers / "venv" / "bin" / "websockify")
        process = self.spawn(
            "websockify", [websockify, f"127.0.0.1:{port}", f"127.0.0.1:{rfb_port}"]
        )
        wait_port(port, process, "websockify")
        return port


# -- measuring ------------------------------------------------------------------------


class Bench:
    """Runs the load generator against each target; gathers the figures."""

    def __init__(
        self,
        plan: Plan,
        fleet: Fleet,
        targets: dict[str, dict[str, Any]],
        baseline: str | None = None,
    ) -> None:
        self.plan = plan
        self.fleet = fleet
        self.targets = targets
        self.loadgen = str(BENCH / "loadgen.js")
        #: The target name of consoleproxy at the --baseline revision, if any.
        self.baseline = baseline

    def ours(self) -> list[str]:
        """consoleproxy, and beside it the same at the --baseline revision."""
        return ["consoleproxy", *([self.baseline] if self.baseline else [])]

    def relay_pid(self, target: str) -> int | None:
        """The process doing the relaying for C{target}, if it is one of ours."""
        if target == self.baseline:
            return self.fleet.pid(target)
        name = {
            "consoleproxy": "consoleproxy",
            "consoleproxy /rfb": "consoleproxy",
            "consoleproxy, Argon2 user": "consoleproxy",
            "guacamole-lite": "guacamole-lite",
            "websockify": "websockify",
        }.get(target)
        return self.fleet.pid(name) if name else None

    def run(self, target: str, spec: dict[str, Any]) -> dict[str, Any]:
        """One load generator run against C{target}; adds the relay's CPU use (cores)."""
        pid = self.relay_pid(target)
        before = cpu_seconds(pid) if pid else 0.0
        start = time.perf_counter()
        process = subprocess.Popen(
            ["node", self.loadgen, json.dumps({**spec, "target": self.targets[target]})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.fleet.node_env,
        )
        peak_rss = 0
        while True:  # sample the relay's RSS while the load runs
            try:
                stdout, stderr = process.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if pid:
                    peak_rss = max(peak_rss, rss_kib(pid))
        elapsed = time.perf_counter() - start
        lines = stdout.strip().splitlines()
        if not lines:
            raise SystemExit(
                f"load generator said nothing against {target} (exit {process.returncode}): "
                f"{stderr[-2000:]}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        if "fatal" in result:
            raise SystemExit(f"load generator failed against {target}: {result['fatal']}")
        if pid:
            used = cpu_seconds(pid) - before
            result["relay_cpu"] = used / elapsed
            if result.get("samples"):  # latency: the relay's CPU per round trip
                result["relay_cpu_us_per_trip"] = used / result["samples"] * 1e6
            result["relay_peak_rss_kib"] = peak_rss
        time.sleep(0.3)  # let closed sessions drain before the next run
        return result

    def rounds(
        self, label: str, cases: list[tuple[str, dict[str, Any]]], targets: list[str]
    ) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """Every case against every target, C{plan.runs} rounds."""
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for number in range(self.plan.runs):
            for case, spec in cases:
                for target in targets:
                    result = self.run(target, spec)
                    results.setdefault(case, {}).setdefault(target, []).append(result)
                    print(
                        f"[{label} {number + 1}/{self.plan.runs}] {case} {target}: "
                        f"{_brief(result)}",
                        flush=True,
                    )
        return results

    # -- the figures ----------------------------------------------------------------

    def throughput(self) -> dict[str, Any]:
        """MB/s guacd -> browser, blob and small streams, 1 and 20 sessions."""
        p = self.plan
        cases = [
            (
                f"{workload}/{sessions}",
                {
                    "command": "throughput",
                    "workload": workload,
                    "sessions": sessions,
                    "warmup": p.warmup,
                    "duration": p.duration,
                },
            )
            for workload in ("blob", "small")
            for sessions in (1, 20)
        ]
        return self.rounds("throughput", cases, [*self.ours(), "guacamole-lite", "direct TCP"])

    def latency(self) -> dict[str, Any]:
        """Round trips browser -> guacd echo -> browser, with 1 and 100 sessions."""
        p = self.plan
        cases = [
            (
                "1",
                {
                    "command": "latency",
                    "sessions": 1,
                    "warmup_trips": 100,
                    "round_trips": p.round_trips,
                },
            ),
            (
                "100",
                {
                    "command": "latency",
                    "sessions": 100,
                    "warmup": p.warmup,
                    "duration": max(p.duration, 2.0),
                    "interval": p.interval_ms,
                },
            ),
        ]
        return self.rounds("latency", cases, [*self.ours(), "guacamole-lite", "direct TCP"])

    def rfb(self) -> dict[str, Any]:
        """Raw VNC: the same FramebufferUpdate stream through /rfb and websockify."""
        p = self.plan
        cases = [
            (
                str(sessions),
                {
                    "command": "rfb",
                    "sessions": sessions,
                    "warmup": p.warmup,
                    "duration": p.duration,
                },
            )
            for sessions in (1, 20)
        ]
        return self.rounds("rfb", cases, ["consoleproxy /rfb", "websockify", "direct TCP (VNC)"])

    def setup(self) -> dict[str, Any]:
        """
        Sessions set up per second (token, WebSocket, guacd handshake, first
        instruction), with 8 and with 64 in flight; by concurrency, then target.
        """
        p = self.plan
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        targets = ("consoleproxy, Argon2 user", *self.ours(), "guacamole-lite", "direct TCP")
        for number in range(p.runs):
            for concurrency in SETUP_CONCURRENCY:
                for target in targets:
                    count = p.setup_count_argon2 if "Argon2" in target else p.setup_count
                    spec = {"command": "setup", "count": count, "concurrency": concurrency}
                    result = self.run(target, spec)
                    results.setdefault(str(concurrency), {}).setdefault(target, []).append(result)
                    print(
                        f"[setup {number + 1}/{p.runs}] {concurrency} in flight, {target}: "
                        f"{_brief(result)}",
                        flush=True,
                    )
        return results

    def capacity(self, target: str) -> dict[str, Any]:
        """Hold C{plan.idle_sessions} idle sessions; RSS per session; do they stay?"""
        p = self.plan
        pid = self.relay_pid(target)
        assert pid is not None
        time.sleep(1)
        before = rss_kib(pid)
        spec = {
            "command": "hold",
            "count": p.idle_sessions,
            "concurrency": 64,
            "target": self.targets[target],
        }
        process = subprocess.Popen(
            ["node", self.loadgen, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.fleet.node_env,
        )
        assert process.stdin is not None and process.stdout is not None
        opened = json.loads(process.stdout.readline())
        time.sleep(2)
        held = rss_kib(pid)
        time.sleep(max(0.0, p.hold_seconds - 2))
        process.stdin.write("count\n")
        process.stdin.flush()
        alive = json.loads(process.stdout.readline())["alive"]
        after = rss_kib(pid)
        process.stdin.close()
        process.wait(timeout=120)
        time.sleep(2)
        result = {
            **opened,
            "alive": alive,
            "held_seconds": p.hold_seconds,
            "rss_before_kib": before,
            "rss_held_kib": max(held, after),
            "kib_per_session": (max(held, after) - before) / max(1, opened["opened"]),
        }
        print(f"[capacity] {target}: {_brief(result)}", flush=True)
        return result

    def profile(self, py_spy: Path, output: Path, spec: dict[str, Any]) -> dict[str, Any]:
        """py-spy on consoleproxy while the load generator runs C{spec} against it."""
        p = self.plan
        pid = self.fleet.pid("consoleproxy")
        spy = subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(p.profile_seconds)),
                "--rate",
                str(PROFILE_RATE),
                "--format",
                "raw",
                "--function",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        load = self.run("consoleproxy", {**spec, "warmup": 0.3, "duration": p.profile_seconds})
        spy.wait(timeout=120)
        costs = top_costs(output)
        costs["busy_share"] = costs["samples"] / (PROFILE_RATE * p.profile_seconds)
        return {"load": _brief(load), **costs}


def _brief(result: dict[str, Any]) -> str:
    keys = (
        "mbps",
        "p50_us",
        "p99_us",
        "rate",
        "opened",
        "alive",
        "kib_per_session",
        "relay_cpu",
        "loadgen_cpu",
        "errors",
        "check",
        "lost",
    )
    parts = []
    for key in keys:
        if key in result and result[key] not in ({}, None):
            value = result[key]
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _frame_name(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``pkg/mod.py:func``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{name}"


PROFILE_RATE = 200
#: Frames every reactor callback runs under: left out of the inclusive list.
PLUMBING = (
    "twistd:",
    "twisted/application/",
    "twisted/scripts/",
    "twisted/python/",
    "twisted/internet/base.py:",
    "twisted/internet/posixbase.py:",
    "twisted/internet/epollreactor.py:EPollReactor.doPoll",
    "<frozen",
)


def top_costs(raw: Path, count: int = 15) -> dict[str, Any]:
    """
    Own and inclusive time per function from py-spy's raw (collapsed) output,
    recorded without --idle: only samples of a thread on the CPU are there.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack:
            continue
        samples = int(number)
        frames = [_frame_name(f) for f in stack.split(";")]
        if any(f.startswith("threading.py:") for f in frames):
            continue  # the reactor's thread pool (Argon2 checks), not the relay
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    busy = max(1, total)
    return {
        "samples": total,
        "own": [(name, n / busy) for name, n in own.most_common(count)],
        "inclusive": [
            (name, n / busy)
            for name, n in inclusive.most_common(80)
            if not name.startswith(PLUMBING)
        ][:count],
    }


# -- the report -----------------------------------------------------------------------


def med(runs: list[dict[str, Any]], key: str) -> float:
    """Median of one figure over runs."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> str:
    """a / b, formatted."""
    return f"{a / b:.2f}" if b else "n/a"


def machine() -> str:
    """One line about this machine."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    distro = "Linux"
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            distro = line.split("=", 1)[1].strip('"')
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, {distro}, kernel {platform.release()}"
    )


def versions(peers: Path) -> dict[str, str]:
    """Versions of everything measured."""

    def npm_version(name: str) -> str:
        path = peers / "node" / "node_modules" / name / "package.json"
        return str(json.loads(path.read_text())["version"])

    def pip_version(name: str) -> str:
        python = peers / "venv" / "bin" / "python"
        code = f"import importlib.metadata as m; print(m.version({name!r}))"
        return subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()

    import autobahn  # noqa: PLC0415

    import twisted  # noqa: PLC0415

    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True)
    return {
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "autobahn": autobahn.__version__,
        "node": node.stdout.strip(),
        "guacamole-lite": npm_version("guacamole-lite"),
        "ws": npm_version("ws"),
        "websockify": pip_version("websockify"),
        "py-spy": pip_version("py-spy"),
    }


def report(results: dict[str, Any]) -> str:
    """relay.md."""
    plan = results["plan"]
    t, lat, rfb, setup = (
        results["throughput"],
        results["latency"],
        results["rfb"],
        results["setup"],
    )
    cap, prof = results["capacity"], results["profile"]
    lines = [
        "# Relay benchmark",
        "",
        f"Run {results['date']} on {results['machine']}, by `bench/run"
        f"{' --quick' if results['quick'] else ''}` in {results['elapsed_s']:.0f} s. "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + ".",
        "",
        f"Each figure is the median of {plan['runs']} runs taken in rounds (every target "
        "once per round); ratios are consoleproxy / peer from this one run.  Everything "
        "shares the two cores: the relay under test, the fake guacd / VNC server "
        "(bench/streamservers.py), and the load generator (bench/loadgen.js, Node.js + ws, "
        'its own process).  "direct TCP" reads the same fake server without a relay: the '
        "limit of this machine and of the load generator.  Processes other than the "
        f"bench's kept {results['background_cores']['during']:.2f} cores busy on average "
        f"during the run ({results['background_cores']['before']:.2f} just before it).",
        "",
        "## Throughput guacd → browser (MB/s)",
        "",
        "blob: `img`, 32 `blob`s of 8064 base64 characters, `end`, `sync`, repeated; "
        "small: `rect`/`cfill`/`copy`/`cursor`/`move`/`mouse` of 20-40 bytes, a `sync` every "
        f"48.  {plan['duration']:g} s per run after {plan['warmup']:g} s of warm-up.  CPU: "
        "cores used by the relay process during the run.",
        "",
        "| stream | sessions | consoleproxy | guacamole-lite | direct TCP | cp / g-lite "
        "| cp / direct | cp CPU | g-lite CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, by in t.items():
        workload, sessions = case.split("/")
        cells = rate_cells(by, "consoleproxy", "guacamole-lite", "direct TCP")
        lines.append(f"| {workload} | {sessions} | {cells} |")
    peaks = {
        name: max(r.get("relay_peak_rss_kib", 0) for by in t.values() for r in by[name]) / 1024
        for name in ("consoleproxy", "guacamole-lite")
    }
    lines += [
        "",
        f"Peak RSS during these runs: consoleproxy {peaks['consoleproxy']:.0f} MiB, "
        f"guacamole-lite {peaks['guacamole-lite']:.0f} MiB.",
        "",
        "## Round-trip latency browser → guacd (echo) → browser (µs)",
        "",
        f"1 session: {plan['round_trips']} sequential round trips (after 100 unmeasured).  "
        f"100 sessions: each sends one round trip every {plan['interval_ms']:g} ms (a "
        f"moving mouse), at its own phase, {max(plan['duration'], 2.0):g} s; 2000 round "
        "trips a second in all.  The instruction is `4.echo,...;` (≈ 40 bytes).",
        "",
        "| sessions | consoleproxy p50 | p99 | guacamole-lite p50 | p99 | direct TCP p50 | p99 "
        "| p99 cp / g-lite |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, by in lat.items():
        row = [
            (med(by[k], "p50_us"), med(by[k], "p99_us"))
            for k in ("consoleproxy", "guacamole-lite", "direct TCP")
        ]
        cells = " | ".join(f"{a:.0f} | {b:.0f}" for a, b in row)
        lines.append(f"| {case} | {cells} | {ratio(row[0][1], row[1][1])} |")
    lines += [
        "",
        "## Capacity: idle sessions and set-up rate",
        "",
        f"Idle: {plan['idle_sessions']} sessions opened 64 at a time and held "
        f"{plan['hold_seconds']:g} s; the load generator sends a `nop` from every session every "
        "5 s (guacamole-lite drops a browser silent for 10 s) and the fake guacd sends guacd's "
        "keep-alive `nop` every 5 s (guacamole-lite drops a guacd silent for 10 s); the fake "
        "guacd has no 15 s receive timeout.  RSS per session = (RSS held - RSS before) / "
        "sessions, of the relay process.",
        "",
        "| relay | sessions opened | still open at the end | RSS before MiB | RSS held MiB "
        "| KiB per session | opened per s (64 in flight) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for target, c in cap.items():
        lines.append(
            f"| {target} | {c['opened']} | {c['alive']} | {c['rss_before_kib'] / 1024:.0f} | "
            f"{c['rss_held_kib'] / 1024:.0f} | {c['kib_per_session']:.1f} | {c['rate']:.0f} |"
        )
    lines += [
        "",
        "Set-up: token + WebSocket + guacd handshake until the first instruction (consoleproxy's "
        "tunnel UUID, guacamole-lite's connection id), with 8 and with 64 sessions in flight "
        "(each kept open until the run ends).  consoleproxy's token is "
        '`GET /api/vm/<id>/guacamole/vnc` with HTTP Basic: "Argon2 user" has a hash of '
        "argon2-cffi's default cost (as `consoleproxy-passwd` makes), the other user a hash of "
        "the tests' cheap parameters; guacamole-lite's token is encrypted by the load "
        "generator (AES-256-CBC), as an application would.  The bench configuration lifts "
        "consoleproxy's token API rate limit (default 2 per s and client address, burst 20) "
        "and per-user session cap (default 20): every session here comes from one address "
        "and one user.",
        "",
        "| target | per s, 8 in flight | per s, 64 in flight | median token ms (8) "
        "| median WebSocket → ready ms (8) | median total ms (8) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    low, high = (setup[str(c)] for c in SETUP_CONCURRENCY)
    for target, runs in low.items():
        lines.append(
            f"| {target} | {med(runs, 'rate'):.0f} | {med(high[target], 'rate'):.0f} | "
            f"{med(runs, 'token_ms'):.2f} | {med(runs, 'ready_ms'):.2f} | "
            f"{med(runs, 'total_ms'):.2f} |"
        )
    lines += [
        "",
        "## Raw VNC: consoleproxy /rfb vs websockify (MB/s)",
        "",
        "The same stream from the fake VNC server: FramebufferUpdates of 16 raw 64x64 32-bpp "
        "rectangles.  consoleproxy authenticates to the VNC server itself and plays the RFB "
        "server for the browser (security None); through websockify the browser does the "
        "VNC server's handshake.  websockify runs as it does by default: a process per "
        "connection (so its CPU column can exceed one core).",
        "",
        "| sessions | consoleproxy /rfb | websockify | direct TCP | cp / websockify "
        "| cp / direct | cp CPU | websockify CPU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, by in rfb.items():
        cells = rate_cells(by, "consoleproxy /rfb", "websockify", "direct TCP (VNC)")
        lines.append(f"| {case} | {cells} |")
    lines += [
        "",
        "## Goals (consoleproxy against the peers, from this run)",
        "",
        "| goal | measured | met |",
        "| --- | --- | :---: |",
        *goal_rows(results),
    ]
    for label, prof in results["profile"].items():
        lines += profile_section(label, prof, plan)
    checks = results["checks"]
    lines += [
        "",
        "## Checks",
        "",
        "The first MiB each session received was parsed (Guacamole framing and opcodes, "
        "8064-character blobs intact; RFB FramebufferUpdate framing): "
        + ("no errors." if not checks else "errors: " + "; ".join(checks)),
        f"Load generator CPU, highest in any relay run: {results['max_loadgen_cpu']:.2f} cores.",
        "",
    ]
    return "\n".join(lines)


def rate_cells(by: dict[str, list[dict[str, Any]]], ours: str, peer: str, limit: str) -> str:
    """MB/s of ours, the peer and the limit; ours / peer, ours / limit; both relays' CPU."""
    a, b, c = (med(by[k], "mbps") for k in (ours, peer, limit))
    cpu = (med(by[k], "relay_cpu") for k in (ours, peer))
    return " | ".join(
        [f"{a:.0f}", f"{b:.0f}", f"{c:.0f}", ratio(a, b), ratio(a, c), *(f"{x:.2f}" for x in cpu)]
    )


def profile_section(label: str, prof: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """One profile: own and inclusive time of consoleproxy's reactor thread."""
    lines = [
        "",
        f"## Profile: consoleproxy, {label}",
        "",
        f"py-spy at {PROFILE_RATE} Hz for {plan['profile_seconds']:g} s, the reactor thread "
        f"only: {prof['samples']} samples on the CPU, so it was busy {prof['busy_share']:.0%} "
        f"of the time (load meanwhile: {prof['load']}; py-spy pauses the process to sample).  "
        "Shares are of the on-CPU samples; a function's own time includes the system calls "
        "it makes (recv in doRead, send in untilConcludes, epoll_ctl in _add/_remove).",
        "",
        "Own time (the function itself, not its callees):",
        "",
        "| # | function | share |",
        "| ---: | --- | ---: |",
    ]
    lines += [f"| {n} | `{name}` | {share:.1%} |" for n, (name, share) in enumerate(prof["own"], 1)]
    lines += [
        "",
        "Inclusive time (with callees; the reactor's own frames left out):",
        "",
        "| # | function | share |",
        "| ---: | --- | ---: |",
    ]
    lines += [
        f"| {n} | `{name}` | {share:.1%} |" for n, (name, share) in enumerate(prof["inclusive"], 1)
    ]
    return lines


def goal_rows(results: dict[str, Any]) -> list[str]:
    """The issue's later goal, criterion by criterion."""
    setup = {"": results["setup"][str(SETUP_CONCURRENCY[-1])]}
    # (what, cases by name, figure, consoleproxy's target, the peer's, unit, higher is better)
    criteria = [
        ("throughput {} session(s)", results["throughput"], "mbps", "consoleproxy",
         "guacamole-lite", "MB/s", True),
        ("p99 latency, {} session(s)", results["latency"], "p99_us", "consoleproxy",
         "guacamole-lite", "µs", False),
        (f"set-up rate, {SETUP_CONCURRENCY[-1]} in flight{{}}", setup, "rate",
         "consoleproxy", "guacamole-lite", "per s", True),
        (f"set-up rate, {SETUP_CONCURRENCY[-1]} in flight{{}}, Argon2 user", setup, "rate",
         "consoleproxy, Argon2 user", "guacamole-lite", "per s", True),
        ("raw VNC, {} session(s)", results["rfb"], "mbps", "consoleproxy /rfb", "websockify",
         "MB/s", True),
    ]  # fmt: skip
    rows = []
    for what, cases, key, ours, peer, unit, higher in criteria:
        for case, by in cases.items():
            a, b = med(by[ours], key), med(by[peer], key)
            relation = "≥" if higher else "≤"
            rows.append(
                _goal(
                    f"{what.format(case.replace('/', ', '))} {relation} {peer}",
                    f"{a:.0f} vs {b:.0f} {unit}",
                    a >= b if higher else a <= b,
                )
            )
    cap = results["capacity"]["consoleproxy"]
    rows.append(
        _goal(
            "RSS per idle session < 64 KiB",
            f"{cap['kib_per_session']:.1f} KiB",
            cap["kib_per_session"] < 64 and cap["alive"] == cap["opened"],
        )
    )
    return rows


def _goal(what: str, measured: str, met: bool) -> str:
    return f"| {what} | {measured} | {'yes' if met else 'no'} |"


def collect_checks(results: dict[str, Any]) -> tuple[list[str], float]:
    """Framing errors seen by the load generator, and its highest CPU use."""
    errors = []
    highest = 0.0
    for section in ("throughput", "rfb", "latency"):
        for case, by in results[section].items():
            for target, runs in by.items():
                for r in runs:
                    if r.get("check", {}).get("error"):
                        errors.append(f"{section} {case} {target}: {r['check']['error']}")
                    if r.get("errors"):
                        errors.append(f"{section} {case} {target}: {r['errors']}")
                    if target.startswith("direct"):
                        continue
                    highest = max(highest, r.get("loadgen_cpu", 0.0))
    return sorted(set(errors)), highest


SECTIONS = ("capacity", "setup", "throughput", "latency", "rfb", "profile")
#: Configuration lines (by section; "": new sections at the end) that lift limits of the
#: current revision which would otherwise measure themselves here (one client address
#: opens every session): the per-address connection cap and WebSocket upgrade rate.
LIFTS = {
    "server": "max_connections_per_client = 1000000\n",
    "relay": "upgrade_rate = 1000000.0\nupgrade_burst = 1000000\n",
}


def checkout(revision: str, directory: Path) -> Path:
    """The tree of C{revision} (git archive), for a --baseline instance."""
    tree = directory / f"tree-{revision}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def compare(results: dict[str, Any], baseline: str) -> str:
    """
    A Markdown table: each case's median (and the range over the rounds),
    this tree against the --baseline revision.

    The round trip's relay CPU (CPU seconds of the relay process per round
    trip) is beside the latencies: unlike them, it hardly moves with what
    else the machine is doing, so it says whether the relay's own work grew.
    """
    other = f"consoleproxy@{baseline}"
    figures = (
        ("setup", "rate", "sessions set up/s"),
        ("throughput", "mbps", "MB/s"),
        ("latency", "p50_us", "p50 round trip (µs)"),
        ("latency", "p99_us", "p99 round trip (µs)"),
        ("latency", "relay_cpu_us_per_trip", "relay CPU per round trip (µs)"),
    )
    lines = [
        f"| section | case | figure | this tree (range) | {baseline} (range) | this / {baseline} |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for section, key, label in figures:
        for case, by_target in results.get(section, {}).items():
            if other not in by_target or "consoleproxy" not in by_target:
                continue
            ours, theirs = by_target["consoleproxy"], by_target[other]
            if math.isnan(med(ours, key)) or math.isnan(med(theirs, key)):
                continue  # a figure one of the two does not report
            lines.append(
                f"| {section} | {case} | {label} | {_spread(ours, key)} | {_spread(theirs, key)} "
                f"| {ratio(med(ours, key), med(theirs, key))} |"
            )
    return "\n".join(lines) + "\n"


def _spread(runs: list[dict[str, Any]], key: str) -> str:
    """C{median (min to max)} of one figure over runs."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{med(runs, key):.4g} ({min(values):.4g} to {max(values):.4g})"


def measure(
    plan: Plan,
    fleet: Fleet,
    peers: Path,
    only: tuple[str, ...] = SECTIONS,
    baseline: tuple[str, Path] | None = None,
) -> dict[str, Any]:
    """
    Start every process, take every figure (or those of the sections in C{only}).

    C{baseline}, a revision and the tree checked out at it, adds that
    consoleproxy as one more target of the setup, throughput and latency cases.
    """
    key = secrets.token_hex(16)  # 32 characters: an AES-256 key, as guacamole-lite takes it
    fakes = fleet.start_fakes()
    cp_port = fleet.start_consoleproxy(fakes["guacd"], fakes["rfb"], lifts=LIFTS)
    gl_port = fleet.start_guacamole_lite(fakes["guacd"], key)
    ws_port = fleet.start_websockify(fakes["rfb"])
    consoleproxy = {
        "kind": "consoleproxy",
        "port": cp_port,
        "user": "quick",
        "password": PASSWORD,
        "vms": WORKLOAD_VMS,
    }
    targets = {
        "consoleproxy": consoleproxy,
        "consoleproxy, Argon2 user": {**consoleproxy, "user": "argon2"},
        "consoleproxy /rfb": {**consoleproxy, "kind": "consoleproxy-rfb"},
        "guacamole-lite": {"kind": "guacamole-lite", "port": gl_port, "key": key},
        "direct TCP": {"kind": "direct", "guacd": fakes["guacd"]},
        "websockify": {"kind": "websockify", "port": ws_port},
        "direct TCP (VNC)": {"kind": "rfb-direct", "rfb": fakes["rfb"]},
    }
    base_name = None
    if baseline is not None:
        base_name = f"consoleproxy@{baseline[0]}"
        base_port = fleet.start_consoleproxy(
            fakes["guacd"], fakes["rfb"], source=baseline[1], name=base_name
        )
        targets[base_name] = {**consoleproxy, "port": base_port}
    bench = Bench(plan, fleet, targets, base_name)
    results: dict[str, Any] = {"plan": asdict(plan)}
    # Capacity first: RSS is measured before any stream has grown the heaps.
    if "capacity" in only:
        results["capacity"] = {t: bench.capacity(t) for t in ("consoleproxy", "guacamole-lite")}
    for section in ("setup", "throughput", "latency", "rfb"):
        if section in only:
            results[section] = getattr(bench, section)()
    if "profile" not in only:
        return results
    py_spy = peers / "venv" / "bin" / "py-spy"
    results["profile"] = {
        f"{label} stream, 20 sessions": bench.profile(
            py_spy,
            fleet.directory / f"profile-{label}.raw",
            {"command": "throughput", "workload": label, "sessions": 20},
        )
        for label in ("blob", "small")
    }
    results["profile"]["round trips, 100 sessions"] = bench.profile(
        py_spy,
        fleet.directory / "profile-latency.raw",
        {"command": "latency", "sessions": 100, "interval": plan.interval_ms},
    )
    return results


def run_only(args: argparse.Namespace) -> None:
    """C{--only}: some sections, printed as JSON (and the --baseline comparison)."""
    only = tuple(args.only.split(","))
    directory = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    fleet = Fleet(args.peers, directory)
    baseline = (args.baseline, checkout(args.baseline, directory)) if args.baseline else None
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = replace(plan, runs=args.rounds)
    try:
        partial = measure(plan, fleet, args.peers, only, baseline)
    finally:
        fleet.stop()
    print(json.dumps(partial, indent=1))
    if args.baseline:
        write_comparison(partial, args.baseline, plan)
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    """Run everything; write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=Path, default=BENCH / ".peers")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite relay.md and relay.png from relay.json"
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="a git revision: run consoleproxy at it beside this tree (setup, throughput, "
        "latency) and write results/baseline.md",
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds of every case (default: the plan's)"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections of {', '.join(SECTIONS)}: print them, write nothing",
    )
    args = parser.parse_args()
    if args.only:
        run_only(args)
        return
    if args.report_only:
        write_report(json.loads((RESULTS / "relay.json").read_text()), args.peers)
        return
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = replace(plan, runs=args.rounds)
    busy = machine_busy_seconds()
    time.sleep(1)
    background = machine_busy_seconds() - busy
    if background > 0.2:
        print(
            f"relay_bench: other processes keep {background:.1f} cores busy: the figures "
            "will be noisy",
            flush=True,
        )
    began = time.perf_counter()
    busy, own = machine_busy_seconds(), own_cpu_seconds()
    directory = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    os.chmod(directory, 0o700)
    fleet = Fleet(args.peers, directory)
    baseline = (args.baseline, checkout(args.baseline, directory)) if args.baseline else None
    try:
        results = measure(plan, fleet, args.peers, baseline=baseline)
        results["quick"] = args.quick
    finally:
        fleet.stop()
    elapsed = time.perf_counter() - began
    results["background_cores"] = {
        "before": background,
        "during": max(0.0, (machine_busy_seconds() - busy) - (own_cpu_seconds() - own)) / elapsed,
    }
    results["checks"], results["max_loadgen_cpu"] = collect_checks(results)
    results["date"] = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    results["machine"] = machine()
    results["versions"] = versions(args.peers)
    results["elapsed_s"] = elapsed
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "relay.json").write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    write_report(results, args.peers)
    if args.baseline:
        write_comparison(results, args.baseline, plan)


def _plan_name(plan: Plan) -> str:
    return "quick" if plan.duration == QUICK.duration else "full"


def write_comparison(results: dict[str, Any], baseline: str, plan: Plan) -> None:
    """results/baseline.md: this tree against the --baseline revision, from one run."""
    head = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    text = (
        f"# consoleproxy {head} against {baseline}, in one run\n\n"
        f"Medians of {plan.runs} rounds ({_plan_name(plan)} plan); "
        f"both instances ran on this machine with the same configuration, one measured at "
        f"a time.  Written by `bench/run --baseline {baseline}`.\n\n" + compare(results, baseline)
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "baseline.md").write_text(text)
    print(text)


def write_report(results: dict[str, Any], peers: Path) -> None:
    """relay.md and relay.png from the results."""
    (RESULTS / "relay.md").write_text(report(results))
    subprocess.run(
        [
            str(peers / "venv" / "bin" / "python"),
            str(BENCH / "relay_plot.py"),
            str(RESULTS / "relay.json"),
            str(RESULTS / "relay.png"),
        ],
        check=True,
    )
    print((RESULTS / "relay.md").read_text())


if __name__ == "__main__":
    main()
