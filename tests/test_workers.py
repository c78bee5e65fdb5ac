"""
Several worker processes (server.workers = 2) in real twistd processes, with a
real redis-server: both workers answer on the one port, a worker killed is
started again while the other's sessions go on, SIGTERM drains every worker,
SIGHUP reaches every worker, one /metrics scrape counts both, and start-up
problems (no Redis, a port in use) stop start-up with one line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import tempfile
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import LogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from consoleproxy.config import Config, ConfigError
from consoleproxy.workers import (
    FIRST_DELAY,
    LONGEST_DELAY,
    WorkerSupervisor,
    listen_arguments,
    tag_log_lines,
    twistd_logger,
)
from tests.helpers.redis_server import start_redis
from tests.helpers.support import basic, get_json, wait
from tests.helpers.testca import make_tls_files
from tests.helpers.twistd import fake_guacd, free_port, run_twistd, serve, start_twistd
from tests.helpers.wsclient import connect
from tests.ops.test_systemd import checkout_environment, listen_notify, write_config

GRACE = 3.0


def children(pid: int) -> set[int]:
    """The processes whose parent is C{pid} (Linux /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def state(pid: int) -> str:
    """A process's state letter (Z: a zombie), or "Z" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def holder_of(pids: set[int], *, local: int = 0, remote: int = 0) -> int | None:
    """
    Which of C{pids} holds the TCP socket with this local or remote port
    (Linux /proc): a worker's end of a client's or of guacd's connection.
    """
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            ports = int(parts[1].split(":")[1], 16), int(parts[2].split(":")[1], 16)
            if (local and ports[0] == local) or (remote and ports[1] == remote):
                inodes.add(parts[9])
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


@inlineCallbacks
def answered_by(url: bytes):  # type: ignore[no-untyped-def]
    """GET C{url} on a new connection; (status, the worker header, body)."""
    response = yield Agent(reactor).request(b"GET", url)
    body = yield readBody(response)
    worker = (response.headers.getRawHeaders(b"consoleproxy-worker") or [b"?"])[0]
    return response.code, worker.decode(), body


class WorkersTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def start(self, grace: float = GRACE):  # type: ignore[no-untyped-def]
        """2 workers on Redis, a fake guacd; once both answer: (served, guacd, redis)."""
        redis = yield ensureDeferred(start_redis(self, reactor))
        guacd = yield fake_guacd(self)
        served = yield serve(
            self,
            guacd,
            grace=grace,
            server="workers = 2\n",
            # Sessions are opened 4 at a time until both workers hold one: more token
            # requests than the default burst when the kernel favours one worker.
            tail=f'[cluster]\nredis = "{redis.url}"\n[api]\nburst = 1000\n',
        )
        yield self.until_both(served)
        return served, guacd

    @inlineCallbacks
    def until_both(self, served: Any, timeout: float = 20.0):  # type: ignore[no-untyped-def]
        """Wait until 2 workers run and each has answered; their pids."""
        deadline = reactor.seconds() + timeout
        seen: set[str] = set()
        while True:
            pids = children(served.process.transport.pid)
            code, worker, _ = yield answered_by(served.url("/healthz"))
            self.assertEqual(code, 200)
            seen.add(worker)
            if len(pids) == 2 and seen == {"0", "1"}:
                return pids
            if reactor.seconds() > deadline:
                self.fail(f"workers {seen}, pids {pids}:\n{served.process.output.decode()}")
            yield wait(0.05)

    @inlineCallbacks
    def session(self, served: Any, guacd: Any):  # type: ignore[no-untyped-def]
        """A Guacamole session open through the proxy: (client, guacd's side)."""
        code, _, body = yield get_json(
            served.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
        )
        self.assertEqual(code, 200)
        number = len(guacd.connections) + 1
        client = yield connect(f"ws://127.0.0.1:{served.port}/guacamole?token={body['data']}")
        yield client.opened
        conn = yield guacd.wait_for_connection(number)
        return client, conn

    @inlineCallbacks
    def client(self, served: Any):  # type: ignore[no-untyped-def]
        """A WebSocket client with its session open."""
        code, _, body = yield get_json(
            served.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
        )
        self.assertEqual(code, 200)
        client = yield connect(f"ws://127.0.0.1:{served.port}/guacamole?token={body['data']}")
        yield client.opened
        return client

    @inlineCallbacks
    def session_in_each(self, served: Any, guacd: Any, pids: set[int]):  # type: ignore[no-untyped-def]
        """
        Open sessions (4 at once: sequential ones often all land on one worker)
        until each worker holds one: {pid: (client, guacd's side)}.
        """
        for _ in range(10):
            opened = yield gatherResults([self.client(served) for _ in range(4)])
            kept: dict[int | None, Any] = {}
            for client in opened:
                holder = holder_of(pids, remote=client.transport.getHost().port)
                if holder in kept or holder is None:
                    client.sendClose(1000)
                    yield client.closed
                else:
                    kept[holder] = client
            if set(kept) == pids:
                break
            for client in kept.values():
                client.sendClose(1000)
                yield client.closed
        else:
            self.fail("the sessions all went to one worker")
        yield wait(0.3)  # the closed ones' guacd connections close too
        held = {}
        for conn in guacd.connections:
            if conn.transport.connected:
                holder = holder_of(pids, local=conn.transport.getPeer().port)
                held[holder] = (kept[holder], conn)
        self.assertEqual(set(held), pids)
        return held

    @inlineCallbacks
    def test_both_workers_answer_and_metrics_count_both(self):  # type: ignore[no-untyped-def]
        served, _ = yield self.start()
        workers = set()
        for _ in range(12):
            code, headers, _ = yield get_json(
                served.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
            )
            self.assertEqual(code, 200)
            workers.update(headers.getRawHeaders(b"consoleproxy-worker"))
        self.assertEqual(workers, {b"0", b"1"})
        # One scrape, whichever worker answers it, counts every worker's answers.
        for _ in range(4):
            code, worker, text = yield answered_by(served.url("/metrics"))
            self.assertEqual(code, 200)
            counted = re.search(
                rb'consoleproxy_api_requests_total\{code="200",route="token"\} (\S+)', text
            )
            self.assertIsNotNone(counted, text.decode())
            self.assertEqual(float(counted.group(1)), 12.0, f"scraped from worker {worker}")

    @inlineCallbacks
    def test_killed_worker_restarts_others_sessions_go_on(self):  # type: ignore[no-untyped-def]
        served, guacd = yield self.start()
        pids = children(served.process.transport.pid)
        client, conn = yield self.session(served, guacd)
        keeper = holder_of(pids, local=conn.transport.getPeer().port)
        self.assertIn(keeper, pids)
        (victim,) = pids - {keeper}
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        # New connections are served all along (the other worker accepts).
        for _ in range(10):
            code, _, _ = yield answered_by(served.url("/healthz"))
            self.assertEqual(code, 200)
        now = yield self.until_both(served)
        restart = time.monotonic() - killed
        self.assertNotIn(victim, now)
        self.assertIn(keeper, now)
        self.assertIn(
            "killed by SIGKILL; starting it again in 0.5 s", served.process.output.decode()
        )
        # The other worker's session kept relaying.
        conn.send("sync", "42")
        yield client.wait_messages(2)
        self.assertIn("4.sync,2.42;", client.text())
        self.assertFalse(client.closed.called)
        print(f"\nworker restart: {restart:.2f} s from SIGKILL until it answers")
        client.sendClose(1000)
        yield client.closed

    @inlineCallbacks
    def test_sigterm_drains_every_worker(self):  # type: ignore[no-untyped-def]
        served, guacd = yield self.start()
        pids = children(served.process.transport.pid)
        held = yield self.session_in_each(served, guacd, pids)
        served.process.transport.signalProcess("TERM")
        signalled = reactor.seconds()
        yield wait(0.5)
        for _ in range(4):
            code, _, body = yield get_json(served.url("/readyz"))
            self.assertEqual((code, body), (503, {"status": "draining"}))
        for client, conn in held.values():
            conn.send("sync", "7")
            yield client.wait_messages(2)
            self.assertIn("4.sync,1.7;", client.text())
            self.assertFalse(client.closed.called)
        for client, _ in held.values():
            closed = yield client.closed
            self.assertEqual(closed, (1001, "523"))
        self.assertGreater(reactor.seconds() - signalled, GRACE - 0.5)
        yield served.process.ended
        # As one process does: twistd ends by the signal it stopped for.
        self.assertEqual(served.process.signal, signal.SIGTERM)
        self.assertEqual({p for p in pids if os.path.exists(f"/proc/{p}")}, set())

    @inlineCallbacks
    def test_sigterm_to_every_process_still_drains(self):  # type: ignore[no-untyped-def]
        # systemd's default KillMode=control-group signals every process of the unit
        # at once: the workers hear SIGTERM from it and the drain from the main process.
        # That is one stop, not two (a second would end the grace at once).
        served, guacd = yield self.start()
        pids = children(served.process.transport.pid)
        held = yield self.session_in_each(served, guacd, pids)
        for pid in [served.process.transport.pid, *pids]:
            os.kill(pid, signal.SIGTERM)
        signalled = reactor.seconds()
        yield wait(0.5)
        code, _, body = yield get_json(served.url("/readyz"))
        self.assertEqual((code, body), (503, {"status": "draining"}))
        for client, _ in held.values():
            closed = yield client.closed
            self.assertEqual(closed, (1001, "523"))
        self.assertGreater(reactor.seconds() - signalled, GRACE - 0.5)
        yield served.process.ended

    @inlineCallbacks
    def test_workers_leave_when_the_main_process_dies(self):  # type: ignore[no-untyped-def]
        served, _ = yield self.start(grace=0.5)
        pids = children(served.process.transport.pid)
        served.process.transport.signalProcess("KILL")
        yield served.process.ended
        deadline = reactor.seconds() + 10
        while any(os.path.exists(f"/proc/{p}/stat") and "Z" not in state(p) for p in pids):
            self.assertLess(reactor.seconds(), deadline, "workers outlived their main process")
            yield wait(0.1)

    @inlineCallbacks
    def test_second_sigterm_ends_every_grace(self):  # type: ignore[no-untyped-def]
        served, guacd = yield self.start(grace=60)
        pids = children(served.process.transport.pid)
        held = yield self.session_in_each(served, guacd, pids)
        served.process.transport.signalProcess("TERM")
        yield wait(0.5)
        self.assertFalse(any(client.closed.called for client, _ in held.values()))
        served.process.transport.signalProcess("TERM")
        signalled = reactor.seconds()
        for client, _ in held.values():
            closed = yield client.closed
            self.assertEqual(closed, (1001, "523"))
        yield served.process.ended
        self.assertLess(reactor.seconds() - signalled, 10)

    @inlineCallbacks
    def test_sighup_reaches_every_worker(self):  # type: ignore[no-untyped-def]
        served, guacd = yield self.start()
        pids = children(served.process.transport.pid)
        first = yield self.session_in_each(served, guacd, pids)
        for client, _ in first.values():
            client.sendClose(1000)
            yield client.closed
        yield wait(0.3)
        rotated = served.audit + ".1"
        os.rename(served.audit, rotated)
        size = os.path.getsize(rotated)
        served.process.transport.signalProcess("HUP")
        yield wait(0.5)
        again = yield self.session_in_each(served, guacd, pids)
        for client, _ in again.values():
            client.sendClose(1000)
            yield client.closed
        yield wait(0.3)
        # Every worker writes to the new file; none to the rotated one.
        self.assertEqual(os.path.getsize(rotated), size)
        with open(served.audit) as f:
            opened = [line for line in f if '"session_opened"' in line]
        self.assertGreaterEqual(len(opened), 2)

    def twistd_with(self, toml: str) -> Any:
        """twistd with the configuration C{toml} (plus a key file) in a new directory."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = f"{directory}/c.toml"
        with open(path, "w") as f:
            f.write(f'{toml}[tokens]\nkey_file = "{directory}/k"\n')
        return run_twistd(self, f"--config={path}")

    @inlineCallbacks
    def test_workers_without_redis_refused(self):  # type: ignore[no-untyped-def]
        process = self.twistd_with("[server]\nworkers = 2\n")
        code = yield process.ended
        self.assertEqual(code, 2)
        lines = process.errors.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("server.workers = 2 needs cluster.redis", lines[0])

    @inlineCallbacks
    def test_port_in_use_one_line_no_children(self):  # type: ignore[no-untyped-def]
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        process = self.twistd_with(
            f'[server]\nworkers = 2\nlisten = ["tcp:{free_port()}:interface=127.0.0.1",'
            f' "tcp:{port}:interface=127.0.0.1"]\n[cluster]\nredis = "redis://127.0.0.1:1"\n'
        )
        code = yield process.ended
        self.assertNotEqual(code, 0)
        lines = process.errors.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1", lines[0])
        self.assertNotIn("Worker 0", process.output.decode())


class EndpointKindsTests(TestCase):
    """Workers serve every kind of endpoint: systemd's socket, TLS, a UNIX socket."""

    timeout = 90

    @inlineCallbacks
    def test_systemd_tls_and_unix_with_ready_once_all_serve(self):  # type: ignore[no-untyped-def]
        redis = yield ensureDeferred(start_redis(self, reactor))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        key, cert, _ = make_tls_files(FilePath(directory).child("tls"))
        ca = f"{directory}/tls/ca/ca.pem"
        inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(inherited.close)
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(16)
        port = inherited.getsockname()[1]
        tls_port = free_port()
        short = tempfile.mkdtemp(prefix="cpw-")  # AF_UNIX paths: 107 bytes at most
        self.addCleanup(shutil.rmtree, short, True)
        unix_path = f"{short}/cp.sock"
        config = write_config(directory, None)
        with open(config, "a") as f:
            f.write(f'[cluster]\nredis = "{redis.url}"\n')
        path, receiver = listen_notify(self)
        process = start_twistd(
            self,
            f"--config={config}",
            "--workers=2",
            "--drain-grace=0.5",
            "--listen=systemd:domain=INET:index=0",
            f"--listen=ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            f"--listen=unix:{unix_path}",
            cwd=directory,
            env={
                **checkout_environment(),
                "LISTEN_FDS": "1",
                "LISTEN_FDNAMES": "consoleproxy.socket",
                "NOTIFY_SOCKET": path,
            },
            child_fds={0: "w", 1: "r", 2: "r", 3: inherited.fileno()},
            wrapper=("/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"'),
            serve=True,
        )
        inherited.close()
        try:
            ready = yield receiver.wait_for("READY=1")
        except Exception:
            self.fail(process.output.decode(errors="replace"))
        self.assertIn("2 workers", ready)
        seen: dict[str, set[str]] = {"systemd": set(), "tls": set(), "unix": set()}
        context = ssl.create_default_context(cafile=ca)
        for _ in range(30):
            seen["systemd"].add(blocking_get(socket.create_connection(("127.0.0.1", port))))
            raw = socket.create_connection(("127.0.0.1", tls_port))
            seen["tls"].add(blocking_get(context.wrap_socket(raw, server_hostname="127.0.0.1")))
            unix = socket.socket(socket.AF_UNIX)
            unix.connect(unix_path)
            seen["unix"].add(blocking_get(unix))
            if all(found == {"0", "1"} for found in seen.values()):
                break
        self.assertEqual(seen, {"systemd": {"0", "1"}, "tls": {"0", "1"}, "unix": {"0", "1"}})
        process.transport.signalProcess("TERM")
        yield receiver.wait_for("STOPPING=1")
        yield process.ended
        self.assertEqual([m.split("\n")[0] for m in receiver.messages], ["READY=1", "STOPPING=1"])
        self.assertNotIn(b"Traceback", process.output)


def blocking_get(sock: socket.socket) -> str:
    """GET /healthz on a connected socket (loopback: quick); the worker that answered."""
    with sock:
        sock.settimeout(5)
        sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    found = re.search(rb"(?i)consoleproxy-worker: (\d+)", answer)
    return found.group(1).decode() if found else answer.decode(errors="replace")


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(Clock):
    """A clock that records spawned processes instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        protocol.makeConnection(FakeTransport(1000 + len(self.spawned)))
        # The worker's end of its control socket (the supervisor closes its own copy).
        control = max(kwargs["childFDs"])
        protocol.theirs = socket.socket(fileno=os.dup(kwargs["childFDs"][control]))
        self.spawned.append((protocol, args, kwargs))

    def commands(self) -> list[bytes]:
        """What each worker was told over its control socket so far."""
        told = []
        for protocol, _, _ in self.spawned:
            protocol.theirs.setblocking(False)
            try:
                told.append(protocol.theirs.recv(100))
            except BlockingIOError:
                told.append(b"")
        return told


class Ended(Exception):
    exitCode = None
    signal = 9


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        # The supervisor sets SIGHUP, SIGTERM and SIGINT handlers: give this process its own back.
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))

    def test_back_off_doubles_and_resets(self) -> None:
        """Deaths in a row wait 0.5, 1, 2 ... 30 s; after 60 s alive it is 0.5 s again."""
        clock = FakeReactor()
        supervisor = WorkerSupervisor(clock, 1, [], [], [], 1.0, lambda d, e: e, environ={})
        supervisor.privilegedStartService()
        supervisor.startService()
        self.addCleanup(lambda: supervisor.metrics_dir and os.rmdir(supervisor.metrics_dir))
        delays = []
        for _ in range(8):
            worker = clock.spawned[-1][0]
            worker.processEnded(Failure(Ended()))
            call = supervisor.restarts[0]
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        self.assertEqual(delays, [FIRST_DELAY, 1.0, 2.0, 4.0, 8.0, 16.0, LONGEST_DELAY, 30.0])
        clock.advance(61)
        clock.spawned[-1][0].processEnded(Failure(Ended()))
        self.assertEqual(supervisor.restarts[0].getTime() - clock.seconds(), FIRST_DELAY)
        self.assertEqual(len(supervisor.deaths), 9)

    def test_stop_drains_every_worker_and_does_not_restart(self) -> None:
        clock = FakeReactor()
        supervisor = WorkerSupervisor(clock, 2, [], [], [], 1.0, lambda d, e: e, environ={})
        supervisor.startService()
        self.addCleanup(lambda: [p.theirs.close() for p, _, _ in clock.spawned])
        stopped = supervisor.stopService()
        # Told over the control socket, never by a signal (see WorkerControl).
        self.assertEqual(clock.commands(), [b"drain\n", b"drain\n"])
        self.assertEqual([p.transport.signals for p, _, _ in clock.spawned], [[], []])
        supervisor.tell_all(b"now")
        self.assertEqual(clock.commands(), [b"now\n", b"now\n"])
        self.assertNoResult(stopped)
        for protocol, _, _ in clock.spawned:
            protocol.processEnded(Failure(Ended()))
        self.successResultOf(stopped)
        self.assertEqual(supervisor.restarts, {})
        self.assertEqual(len(clock.spawned), 2)
        self.assertFalse(os.path.exists(supervisor.metrics_dir))

    def test_sighup_reaches_every_worker(self) -> None:
        clock = FakeReactor()
        supervisor = WorkerSupervisor(clock, 3, [], [], [], 1.0, lambda d, e: e, environ={})
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        supervisor.reopen()
        self.assertEqual([p.transport.signals for p, _, _ in clock.spawned], [["HUP"]] * 3)

    def test_worker_environment_drops_systemd(self) -> None:
        supervisor = WorkerSupervisor(
            Clock(),
            2,
            [],
            [],
            [],
            1.0,
            lambda d, e: e,
            environ={"NOTIFY_SOCKET": "/x", "LISTEN_FDS": "1", "LISTEN_PID": "3", "PATH": "/b"},
        )
        env = supervisor.worker_environment(1, 5, 6)
        self.assertEqual(env["PATH"], "/b")
        self.assertEqual(env["CONSOLEPROXY_WORKER"], "1")
        self.assertEqual(env["CONSOLEPROXY_WORKER_CONTROL"], "6")
        self.assertNotIn("NOTIFY_SOCKET", env)
        self.assertNotIn("LISTEN_FDS", env)


class WorkerConfigTests(SynchronousTestCase):
    def test_auto_is_the_cores(self) -> None:
        config = Config.load(overrides={"workers": "auto", "cluster_redis": "redis://h:1"})
        self.assertEqual(config.workers, os.cpu_count())

    def test_option_string(self) -> None:
        config = Config.load(overrides={"workers": "3", "cluster_redis": "redis://h:1"})
        self.assertEqual(config.workers, 3)

    def test_bad_values(self) -> None:
        for value in (0, -1, 257, "many", 1.5, True):
            with self.assertRaises(ConfigError) as caught:
                Config.load(overrides={"workers": value, "cluster_redis": "redis://h:1"})
            self.assertEqual(caught.exception.key, "server.workers")

    def test_more_than_one_needs_redis(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            Config.load(overrides={"workers": 2})
        self.assertEqual(caught.exception.key, "server.workers")
        self.assertEqual(Config.load().workers, 1)

    def test_log_lines_name_the_worker(self) -> None:
        publisher, seen = LogPublisher(), []
        tag_log_lines(3, publisher)
        publisher.addObserver(seen.append)
        publisher({"log_namespace": "consoleproxy.tap", "log_format": "x"})
        publisher({"log_system": "-", "log_namespace": "log_legacy", "log_format": "y"})
        self.assertEqual(
            [e["log_system"] for e in seen], ["worker 3 consoleproxy.tap", "worker 3 -"]
        )

    def test_twistd_logger_passed_on(self) -> None:
        plugin = ["--config=c", "--logger", "not-this"]
        for twistd, expected in (
            (["twistd", "-n", "--logger", "a.b", "consoleproxy"], ["--logger", "a.b"]),
            (["twistd", "--logger=a.b", "-n", "consoleproxy"], ["--logger=a.b"]),
            (["twistd", "-n", "--logfile=x", "consoleproxy"], []),
        ):
            self.assertEqual(twistd_logger([*twistd, *plugin], plugin), expected)

    def test_listen_arguments(self) -> None:
        argv = ["--config=c", "--listen", "tcp:1", "--listen=unix:/s", "--workers=2"]
        self.assertEqual(
            listen_arguments(argv, ["unix:/s", "ssl:443:k=k", "systemd:domain=INET:index=0"]),
            [
                "--config=c",
                "--workers=2",
                "--listen=tcp:1:interface=127.0.0.1",
                "--listen=ssl:443:k=k",
                "--listen=tcp:1:interface=127.0.0.1",
            ],
        )
