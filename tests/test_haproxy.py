"""
examples/haproxy.cfg in a real haproxy, in front of two real consoleproxy processes.

The example itself runs (ports, paths and addresses substituted: L{haproxy_config}),
terminating TLS on 127.0.0.1 with a certificate of the test CA.  Instances A and B are
``twistd consoleproxy`` children sharing one key file (a token sealed by one opens on
the other), each with its own fake guacd (so a test sees where a console went), its own
audit log and spent-token file, ``trusted_proxies = ["127.0.0.1"]`` (HAProxy's address)
and ``cluster.redis`` pointing at one real redis-server.

The test clients connect from 127.0.0.2, HAProxy to the instances from 127.0.0.1: the
audit log names 127.0.0.2 only if consoleproxy took the client from HAProxy's
X-Forwarded-For.

What needs the Redis wiring (issue14-i: single use and caps across instances, Redis
outages) or worker processes (issue14-h: ``server.workers``) is skipped, by a probe of
the code under test, until that code exists; those tests state the documented behaviour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import tempfile
import time
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from consoleproxy import tap
from consoleproxy.config import Config
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.haproxy import HAProxy, check_as_shipped
from tests.helpers.realservers import _descendants, _proc_table
from tests.helpers.redis_server import RedisServer, start_redis
from tests.helpers.support import basic, wait, write_inventory
from tests.helpers.twistd import Twistd, free_port, run_twistd, until_serving
from tests.helpers.wsclient import ClientFactory, GuacamoleClient

#: Where the test clients connect from: not HAProxy's 127.0.0.1, not a trusted proxy.
CLIENT = "127.0.0.2"
#: The instances' drain grace: long enough to watch HAProxy take A out during it.
GRACE = 8.0
#: HAProxy marks a server down within inter (1 s) + fastinter (250 ms) of its first
#: failing check, plus the checks' own time; allowed here, on a loaded machine:
MARKED_DOWN_WITHIN = 4.0
PER_USER = 3


def require_cluster() -> None:
    """L{SkipTest} until the Redis wiring is in the server (probed once)."""
    if "cluster" not in _probed:
        _probed["cluster"] = _cluster_probe()
    if not _probed["cluster"]:
        raise SkipTest("needs the Redis wiring (issue14-i): tap.build_parts has no 'cluster' part")


def require_workers() -> None:
    """L{SkipTest} until ``server.workers`` exists."""
    keys = {f.metadata.get("key") for f in dataclasses.fields(Config)}
    if "server.workers" not in keys:
        raise SkipTest("needs worker processes (issue14-h): Config has no server.workers")


_probed: dict[str, bool] = {}


def _cluster_probe() -> bool:
    """Whether C{tap.build_parts} of a configuration with C{cluster.redis} has a 'cluster' part."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "c.toml")
        with open(path, "w") as f:
            f.write(
                f'[tokens]\nkey_file = "{directory}/k"\n'
                f'[inventory]\npath = "{write_inventory(directory)}"\n'
                '[cluster]\nredis = "redis://127.0.0.1:1/0"\n'
            )
        parts = tap.build_parts(Config.load(path), MemoryReactorClock())
        return "cluster" in parts


def consoles(guacd: FakeGuacd) -> list[Any]:
    """guacd's connections that carry a console (HAProxy's /readyz checks make consoleproxy
    connect to guacd and close, without a handshake, every second)."""
    return [c for c in guacd.connections if c.select is not None]


class ExampleTests(TestCase):
    """The example as shipped (only the certificate path replaced) passes ``haproxy -c``."""

    def test_valid_as_shipped(self) -> Deferred[None]:
        async def check() -> None:
            output = await check_as_shipped(self, reactor)
            self.assertIn("Configuration file is valid", output)
            self.assertNotIn("WARNING", output)

        return ensureDeferred(check())


class Instance:
    """One consoleproxy under twistd with its own fake guacd, audit log and spent file."""

    def __init__(self, name: str, process: Twistd, port: int, directory: str, guacd: FakeGuacd):
        self.name = name
        self.process = process
        self.port = port
        self.directory = directory
        self.guacd = guacd

    def audit(self, event: str = "session_opened") -> list[dict[str, Any]]:
        try:
            with open(f"{self.directory}/audit.jsonl") as f:
                return [e for e in map(json.loads, f) if e["event"] == event]
        except FileNotFoundError:
            return []


class HAProxyTestCase(TestCase):
    """Redis, two consoleproxy instances, HAProxy in front: everything real but guacd."""

    timeout = 120
    workers = 1
    #: relay.max_sessions_per_user: per instance today, for the cluster with Redis wired.
    per_user = 20

    async def _start(self) -> None:
        self.shared = os.path.abspath(self.mktemp())
        os.makedirs(self.shared)
        self.redis: RedisServer = await start_redis(self, reactor)
        ports = (free_port(), free_port())
        # HAProxy first: its origin goes into the instances' allowed_origins.
        self.proxy: HAProxy = HAProxy(self, reactor, ports)
        self.instances = []
        for name, port in zip("ab", ports, strict=True):
            self.instances.append(await self._instance(name, port))
        await self.proxy.start()
        # Both in the pool before a test begins (rise 3 at 1 s: about 3 s).
        await self.until(lambda: self.proxy.status() == {"a": "UP", "b": "UP"}, 15)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(
            reactor,
            contextFactory=BrowserLikePolicyForHTTPS(ssl.Certificate.loadPEM(self.proxy.ca_pem)),
            bindAddress=(CLIENT, 0),
            pool=self.pool,
        )

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self._start())

    async def _instance(self, name: str, port: int) -> Instance:
        directory = os.path.join(self.shared, name)
        os.makedirs(directory)
        guacd = FakeGuacd(reactor)
        await guacd.start()
        self.addCleanup(guacd.stop)
        config = f"{directory}/consoleproxy.toml"
        workers = f"workers = {self.workers}\n" if self.workers > 1 else ""
        with open(config, "w") as f:
            f.write(
                f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
                f'trusted_proxies = ["127.0.0.1"]\ndrain_grace = {GRACE}\n{workers}'
                f'[guacd]\nendpoint = "tcp:127.0.0.1:{guacd.port}"\n'
                f'[tokens]\nkey_file = "{self.shared}/keys"\n'
                f'spent_file = "{directory}/spent"\n'
                f'[inventory]\npath = "{write_inventory(self.shared)}"\n'
                f'[relay]\nallowed_origins = ["{self.proxy.origin}"]\n'
                f"max_sessions_per_user = {self.per_user}\n"
                "upgrade_rate = 1000.0\nupgrade_burst = 1000\n"
                "[api]\nrate = 1000.0\nburst = 1000\n"
                f'[operations]\naudit_log = "{directory}/audit.jsonl"\n'
                f'[cluster]\nredis = "{self.redis.url}"\n'
            )
        # One at a time: the first creates the shared key file, the second reads it.
        process = run_twistd(self, f"--config={config}")
        await until_serving(self, process, port)
        return Instance(name, process, port, directory, guacd)

    async def until(self, condition: Any, timeout: float) -> float:
        """Poll C{condition} every 50 ms until true; the seconds it took, or fail."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                self.fail(f"not true within {timeout} s: {self.proxy.status()}")
            await wait(0.05)
        return time.monotonic() - start

    @inlineCallbacks
    def get(self, path: str, headers: dict[bytes, bytes] | None = None):  # type: ignore[no-untyped-def]
        """GET through HAProxy over TLS from 127.0.0.2: (status, body)."""
        url = f"https://localhost:{self.proxy.https}{path}".encode()
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        response = yield self.agent.request(b"GET", url, sent)
        body = yield readBody(response)
        return response.code, body

    @inlineCallbacks
    def mint(self, user: str = "bob", password: str = "builder", **headers: bytes):  # type: ignore[no-untyped-def]
        """A token for VM 8 (RDP) from the token API, through HAProxy."""
        sent = {b"Authorization": basic(user, password)}
        sent.update({k.replace("_", "-").encode(): v for k, v in headers.items()})
        code, body = yield self.get("/api/vm/8/guacamole/rdp", sent)
        self.assertEqual(code, 200, body)
        return json.loads(body)["data"]

    @inlineCallbacks
    def open(self, token: str, *, port: int | None = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        """A Guacamole WebSocket: through HAProxy (wss, from 127.0.0.2), or to C{port} directly."""
        if port is None:
            url = f"wss://localhost:{self.proxy.https}/guacamole?token={token}"
            endpoint = wrapClientTLS(
                ssl.optionsForClientTLS(
                    "localhost", trustRoot=ssl.Certificate.loadPEM(self.proxy.ca_pem)
                ),
                TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.https, bindAddress=(CLIENT, 0)),
            )
        else:
            url = f"ws://127.0.0.1:{port}/guacamole?token={token}"
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        factory = ClientFactory(
            url, protocols=["guacamole"], origin=self.proxy.origin, headers=headers
        )
        factory.setProtocolOptions(openHandshakeTimeout=30, closeHandshakeTimeout=2)
        client: GuacamoleClient = yield endpoint.connect(factory)
        self.addCleanup(self.close, client)
        return client

    @inlineCallbacks
    def console(self, **kwargs: Any):  # type: ignore[no-untyped-def]
        """Mint, open through HAProxy, wait until guacd has it: (client, instance, guacd's side)."""
        before = [len(consoles(i.guacd)) for i in self.instances]
        token = yield self.mint()
        client = yield self.open(token, **kwargs)
        yield client.opened
        for _ in range(200):
            grown = [
                i for i, n in zip(self.instances, before, strict=True) if len(consoles(i.guacd)) > n
            ]
            if grown:
                break
            yield wait(0.02)
        self.assertEqual(len(grown), 1, "one console, one guacd connection")
        conn = consoles(grown[0].guacd)[-1]
        yield conn.handshake_done
        yield wait(0.05)  # the audit line is written as the session opens
        return client, grown[0], conn

    @staticmethod
    def close(client: GuacamoleClient) -> Deferred[Any] | None:
        if client.closed.called:
            return None
        client.sendClose(1000)
        client.closed.addTimeout(5, reactor)
        return client.closed.addErrback(lambda _: client.dropConnection(abort=True))

    def opened_on(self) -> dict[str, int]:
        """Sessions opened so far, per instance (their audit logs)."""
        return {i.name: len(i.audit()) for i in self.instances}

    @inlineCallbacks
    def relays(self, guacd_connection: Any, client: GuacamoleClient, value: str):  # type: ignore[no-untyped-def]
        """guacd's sync C{value} reaches the browser through the instance and HAProxy."""
        count = len(client.messages)
        guacd_connection.send("sync", value)
        self.assertFalse(client.closed.called, "the console was closed")
        yield client.wait_messages(count + 1).addTimeout(5, reactor)
        self.assertIn(f"4.sync,{len(value)}.{value};", client.text())


class ThroughHAProxyTests(HAProxyTestCase):
    """What works with today's server: TLS, WebSockets, spreading, client addresses, drain."""

    @inlineCallbacks
    def test_consoles_spread_by_least_connections(self):  # type: ignore[no-untyped-def]
        # Each console is a token request, then a WebSocket: round robin, which counts
        # requests, would send every WebSocket to the same instance.
        placed = []
        for _ in range(4):
            client, instance, conn = yield self.console()
            placed.append((client, instance, conn))
        self.assertEqual(self.opened_on(), {"a": 2, "b": 2})
        self.assertEqual(sorted(self.proxy.servers()[s]["scur"] for s in "ab"), ["2", "2"])
        # Each relays both ways through HAProxy's TLS tunnel.
        for n, (client, _, conn) in enumerate(placed):
            self.assertEqual(client.subprotocol, "guacamole")
            yield self.relays(conn, client, str(n))
            client.send(f"3.key,2.6{n},1.1;")
        for n, (_, _, conn) in enumerate(placed):
            yield ensureDeferred(
                self.until(lambda c=conn, n=n: ["key", f"6{n}", "1"] in c.received, 5)
            )
        # Least connections, not turns: with A's two consoles closed, the next two both go
        # to A (round robin would put one on B, which still holds two).
        for client, instance, _ in placed:
            if instance.name == "a":
                yield self.close(client)
        yield ensureDeferred(self.until(lambda: self.proxy.servers()["a"]["scur"] == "0", 5))
        for _ in range(2):
            _, instance, _ = yield self.console()
            self.assertEqual(instance.name, "a")
        self.assertEqual(self.opened_on(), {"a": 4, "b": 2})

    @inlineCallbacks
    def test_real_client_address_and_no_forgery(self):  # type: ignore[no-untyped-def]
        token = yield self.mint(X_Forwarded_For=b"203.0.113.9")
        client = yield self.open(token, headers={"X-Forwarded-For": "198.51.100.7"})
        yield client.opened
        yield wait(0.2)
        opened = [e for i in self.instances for e in i.audit()]
        self.assertEqual([e["client"] for e in opened], [CLIENT])
        for instance in self.instances:
            log = instance.process.output.decode()
            self.assertNotIn("203.0.113.9", log)
            self.assertNotIn("198.51.100.7", log)
        self.assertIn(
            f'"{CLIENT}" - - ', "".join(i.process.output.decode() for i in self.instances)
        )

    @inlineCallbacks
    def test_plain_http_redirects_and_metrics_hidden(self):  # type: ignore[no-untyped-def]
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.proxy.http}/console/8/rdp".encode()
        )
        self.assertEqual(response.code, 301)
        self.assertEqual(
            response.headers.getRawHeaders(b"location"),
            [f"https://127.0.0.1:{self.proxy.http}/console/8/rdp".encode()],
        )
        code, _ = yield self.get("/metrics")
        self.assertEqual(code, 404)
        code, body = yield self.get("/readyz")
        self.assertEqual(code, 200, body)

    @inlineCallbacks
    def test_drain_takes_a_out_while_its_console_finishes(self):  # type: ignore[no-untyped-def]
        a, b = self.instances
        clients = {}
        for _ in range(2):
            client, instance, conn = yield self.console()
            clients[instance.name] = (client, conn)
        self.assertEqual(sorted(clients), ["a", "b"])  # least connections: one each

        a.process.transport.signalProcess("TERM")
        signalled = time.monotonic()
        # Token requests in the moment before HAProxy notices: A answers 503, HAProxy
        # retries them on B (retry-on 503), so none fails.
        for _ in range(4):
            yield self.mint()
        yield ensureDeferred(self.until(lambda: self.proxy.status()["a"].startswith("DOWN"), 10))
        down_after = time.monotonic() - signalled
        self.assertLess(down_after, MARKED_DOWN_WITHIN)
        self.assertEqual(self.proxy.status()["b"], "UP")
        # New consoles go to B only, though A still has fewer connections.
        for _ in range(2):
            _, instance, _ = yield self.console()
            self.assertIs(instance, b)
        self.assertEqual(self.opened_on(), {"a": 1, "b": 3})
        # A's console keeps relaying through HAProxy during the grace, B's too.
        for name in ("a", "b"):
            client, conn = clients[name]
            yield self.relays(conn, client, f"4{name}")
        self.assertLess(time.monotonic() - signalled, GRACE - 1)  # within the grace, indeed
        # At the end of the grace A closes it (1001 "523": going away).
        closed = yield clients["a"][0].closed
        self.assertEqual(closed, (1001, "523"))
        self.assertGreater(time.monotonic() - signalled, GRACE - 1)
        yield a.process.ended
        self.assertFalse(clients["b"][0].closed.called)
        yield self.relays(clients["b"][1], clients["b"][0], "after")
        self.assertNotIn(b"Traceback", a.process.output)

    @inlineCallbacks
    def test_reload_keeps_running_consoles(self):  # type: ignore[no-untyped-def]
        client, _, conn = yield self.console()
        (old,) = self.proxy.workers()
        self.proxy.reload()
        yield ensureDeferred(self.until(lambda: len(self.proxy.workers()) == 2, 10))
        # The old worker stays for the console it holds (no hard-stop-after in the
        # example; a short one would have cut it by now), which relays both ways.
        yield wait(2)
        yield self.relays(conn, client, "r1")
        client.send("3.key,2.66,1.1;")
        yield ensureDeferred(self.until(lambda: ["key", "66", "1"] in conn.received, 5))
        self.assertIn(old, self.proxy.workers())
        # The new worker takes new consoles (its health checks bring both servers up).
        yield ensureDeferred(self.until(lambda: self.proxy.status() == {"a": "UP", "b": "UP"}, 15))
        other, _, _ = yield self.console()
        self.assertFalse(other.closed.called)
        # The console ends: the old worker has nothing left and exits.
        yield self.close(client)
        yield ensureDeferred(self.until(lambda: old not in self.proxy.workers(), 10))
        self.assertEqual(len(self.proxy.workers()), 1)


class AcrossInstancesTests(HAProxyTestCase):
    """
    Single use and caps hold for the cluster, not per instance, through one Redis; a Redis
    outage refuses new consoles cleanly and leaves running ones alone (docs/notes-g.md).
    """

    per_user = PER_USER

    def setUp(self) -> Deferred[None]:
        require_cluster()
        return super().setUp()

    @inlineCallbacks
    def outcome(self, client: GuacamoleClient):  # type: ignore[no-untyped-def]
        """
        ("opened", None) or ("closed", (code, reason)) of a WebSocket being opened.

        The relay refuses a token by accepting the WebSocket and closing it at once
        (guacamole-common-js reads the reason only from a close frame): a session is open
        when its first instruction (the tunnel UUID) arrives, refused when the close comes
        first.
        """
        client.opened.addErrback(lambda _: None)  # refused before the upgrade: seen below
        yield DeferredList(
            [client.wait_messages(1), client.closed], fireOnOneCallback=True, consumeErrors=True
        )
        if client.messages:
            return "opened", None
        closed = yield client.closed
        return "closed", closed

    @inlineCallbacks
    def test_token_opened_on_a_is_refused_on_b(self):  # type: ignore[no-untyped-def]
        a, b = self.instances
        token = yield self.mint()
        first = yield self.open(token, port=a.port)
        yield first.opened
        replay = yield self.open(token, port=b.port)
        result = yield self.outcome(replay)
        self.assertEqual(result, ("closed", (1008, "769")))
        self.assertEqual((len(consoles(a.guacd)), len(consoles(b.guacd))), (1, 0))

    @inlineCallbacks
    def test_racing_opens_one_wins(self):  # type: ignore[no-untyped-def]
        a, b = self.instances
        # Directly on both instances at once, then through HAProxy (least connections
        # sends two simultaneous opens to different instances).
        for ports in ((a.port, b.port), (None, None)):
            token = yield self.mint()
            racers = []
            for port in ports:
                client = yield self.open(token, port=port)
                racers.append(client)
            results = yield DeferredList([self.outcome(c) for c in racers])
            outcomes = sorted(r for _, r in results)
            self.assertEqual(outcomes, [("closed", (1008, "769")), ("opened", None)])
        self.assertEqual(len(consoles(a.guacd)) + len(consoles(b.guacd)), 2)

    @inlineCallbacks
    def test_per_user_cap_holds_over_both_instances(self):  # type: ignore[no-untyped-def]
        placed = []
        for _ in range(PER_USER):
            client, instance, _ = yield self.console()
            placed.append((client, instance))
        self.assertEqual(sorted(set(i.name for _, i in placed)), ["a", "b"])  # spread
        for port in (None, *(i.port for i in self.instances)):
            token = yield self.mint()
            over = yield self.open(token, port=port)
            result = yield self.outcome(over)
            self.assertEqual(result, ("closed", (1008, "797")), port)
        # A slot given back on one instance is usable on either.
        yield self.close(placed[0][0])
        yield wait(0.5)
        yield self.console()

    @inlineCallbacks
    def test_redis_outage_refuses_new_consoles_only(self):  # type: ignore[no-untyped-def]
        a, _ = self.instances
        client, _, conn = yield self.console()
        spare = yield self.mint()
        yield ensureDeferred(self.redis.stop())
        # A new console is refused cleanly: "server error, try again" from the instance
        # (1011 "512"), never opened.
        refused = yield self.open(spare, port=a.port)
        result = yield self.outcome(refused)
        self.assertEqual(result, ("closed", (1011, "512")))
        # Through HAProxy it is refused too (by the instance, or by HAProxy with 503 once
        # /readyz took both instances out of the pool).
        token = yield self.mint_or_none()
        if token is not None:
            other = yield self.open(token)
            result = yield self.outcome(other)
            self.assertEqual(result[0], "closed")
        # The running console relays both ways all along.
        yield self.relays(conn, client, "77")
        client.send("3.key,2.65,1.1;")
        yield ensureDeferred(self.until(lambda: ["key", "65", "1"] in conn.received, 5))
        # Redis back: consoles open again (reconnection back-off: 10 s at most).
        yield ensureDeferred(self.redis.restart())
        start = time.monotonic()
        while True:
            token = yield self.mint_or_none()
            if token is not None:
                again = yield self.open(token)
                result = yield self.outcome(again)
                if result[0] == "opened":
                    break
            self.assertLess(time.monotonic() - start, 20, "no console within 20 s of Redis")
            yield wait(0.5)
        self.assertFalse(client.closed.called)

    @inlineCallbacks
    def mint_or_none(self):  # type: ignore[no-untyped-def]
        """A token through HAProxy, or None when the answer is 503 (no instance ready)."""
        code, body = yield self.get(
            "/api/vm/8/guacamole/rdp", {b"Authorization": basic("bob", "builder")}
        )
        if code == 503:
            return None
        self.assertEqual(code, 200, body)
        return json.loads(body)["data"]


def guacd_sockets(pid: int, guacd_port: int) -> int:
    """How many TCP connections process C{pid} holds to 127.0.0.1:C{guacd_port}."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return 0
    wanted = f"0100007F:{guacd_port:04X}"
    count = 0
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[2] == wanted and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


class WorkerKillTests(HAProxyTestCase):
    """server.workers = 2 on each instance; one worker of A dies by SIGKILL."""

    workers = 2
    per_user = PER_USER

    def setUp(self) -> Deferred[None]:
        require_workers()
        require_cluster()
        return super().setUp()

    @inlineCallbacks
    def test_killing_a_worker_loses_only_its_sessions(self):  # type: ignore[no-untyped-def]
        a, _ = self.instances
        placed = []
        for _ in range(PER_USER):
            client, instance, conn = yield self.console()
            placed.append((client, instance, conn))
        workers = sorted(_descendants(a.process.transport.pid, _proc_table()))
        held = {pid: guacd_sockets(pid, a.guacd.port) for pid in workers}
        victims = [pid for pid, n in held.items() if n]
        if not victims:
            self.fail(f"no worker of A holds a console: {held}")
        victim = victims[0]
        os.kill(victim, signal.SIGKILL)
        # Its consoles end (guacd and the browser both see it); the others relay on.
        yield wait(1.0)
        lost = [(c, conn) for c, i, conn in placed if c.closed.called]
        self.assertEqual(len(lost), held[victim])
        for client, _, conn in placed:
            if not client.closed.called:
                yield self.relays(conn, client, "5")
        # New consoles keep opening (another user's at once); the dead worker's cap slots
        # come back (lease TTL: 30 s at most), so bob reaches his cap again.
        token = yield self.mint("alice", "wonderland")
        other = yield self.open(token)
        yield other.opened
        start = time.monotonic()
        opened = 0
        while opened < held[victim]:
            token = yield self.mint()
            client = yield self.open(token)
            try:
                yield client.opened
                opened += 1
            except ConnectionError:
                self.assertLess(time.monotonic() - start, 45, "slots not back in 45 s")
                yield wait(1.0)
        self.assertFalse(a.process.ended.called)
