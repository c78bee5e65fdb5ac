"""
The cluster's state wired into the server: two consoleproxy servers (built by
tap.build_parts, as twistd builds one) sharing one real redis-server, a fake
guacd behind both, real WebSockets over loopback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy import tap
from consoleproxy.config import Config
from consoleproxy.consoles import Console, Identity
from consoleproxy.tokens import KeyRing, TokenAuthority, TokenError
from tests.helpers.fakeguacd import Behaviour, FakeGuacd
from tests.helpers.redis_server import RedisServer, start_redis, until
from tests.helpers.support import get_json, http_request, write_inventory
from tests.helpers.wsclient import GuacamoleClient, connect

CONSOLE = Console(7, "vnc", {"hostname": "127.0.0.1", "port": "5900"})


@dataclass
class Proxy:
    """One consoleproxy server of the cluster."""

    parts: dict[str, Any]
    port: int

    def token(self, user: str = "alice") -> str:
        return self.parts["relay"].tokens.seal(Identity(user), CONSOLE)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def open(self, token: str) -> Deferred[GuacamoleClient]:
        return connect(f"ws://127.0.0.1:{self.port}/guacamole?token={token}&width=800&height=600")


async def start_proxy(
    testcase: TestCase, redis: RedisServer, guacd: FakeGuacd, name: str, **overrides: Any
) -> Proxy:
    """A server built by tap.build_parts on Redis C{redis}, listening, its cluster started."""
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory, exist_ok=True)
    shared = os.path.abspath("cluster-keys")  # every server of a test shares the keys
    config = Config.load(
        None,
        {
            "key_file": shared,
            "spent_file": os.path.join(directory, f"{name}.spent"),
            "inventory": write_inventory(directory),
            "guacd": f"tcp:127.0.0.1:{guacd.port}",
            "allow_missing_origin": True,
            "cluster_redis": redis.url,
            "cluster_key_prefix": "wiring:",
            **overrides,
        },
    )
    parts = tap.build_parts(config, reactor)
    cluster = parts["cluster"]
    cluster.start()
    testcase.addCleanup(cluster.stop)
    testcase.addCleanup(parts["spent"].close)
    listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(parts["site"])
    testcase.addCleanup(listening.stopListening)
    testcase.addCleanup(_close_sessions, parts)
    await until(reactor, lambda: cluster.client.available)
    return Proxy(parts, listening.getHost().port)


def _close_sessions(parts: dict[str, Any]) -> Deferred[None]:
    for session in parts["table"].sessions():
        session.shut_down()
    return succeed(None)


async def opened(client: GuacamoleClient) -> GuacamoleClient:
    """The client once its console opened (the tunnel id arrived)."""
    await client.opened
    await client.wait_messages(1)
    return client


class WiringTests(TestCase):
    timeout = 60

    async def _setup(self, behaviour: Behaviour | None = None, **overrides: Any) -> None:
        self.redis = await start_redis(self, reactor)
        self.guacd = FakeGuacd(reactor, behaviour=behaviour)
        await self.guacd.start()
        self.addCleanup(self.guacd.stop)
        self.a = await start_proxy(self, self.redis, self.guacd, "a", **overrides)
        self.b = await start_proxy(self, self.redis, self.guacd, "b", **overrides)

    def test_replay_on_another_server_refused(self) -> Deferred[None]:
        """A token opened through server A is refused by B: 1008 "769"."""

        async def go() -> None:
            await self._setup()
            token = self.a.token()
            first = await opened(await self.a.open(token))
            again = await self.b.open(token)
            self.assertEqual(await again.closed, (1008, "769"))
            self.assertEqual(self.b.parts["relay"].token_refusals, {"replayed": 1})
            first.sendClose(1000)
            await first.closed

        return ensureDeferred(go())

    def test_raw_vnc_replay_on_another_server_refused(self) -> Deferred[None]:
        """The raw VNC relay spends its tokens in Redis too."""

        async def go() -> None:
            await self._setup()
            closed_port = Console(7, "vnc", {"hostname": "127.0.0.1", "port": "1"})
            token = self.a.parts["rfb"].tokens.seal(Identity("alice"), closed_port)
            url = "ws://127.0.0.1:{}/rfb?token=" + token
            first = await connect(url.format(self.a.port), protocols=["binary"])
            _, reason = await first.closed  # nothing listens on port 1: refused upstream
            self.assertNotEqual(reason, "769")
            again = await connect(url.format(self.b.port), protocols=["binary"])
            self.assertEqual(await again.closed, (1008, "769"))

        return ensureDeferred(go())

    def test_racing_opens_one_wins(self) -> Deferred[None]:
        """One token opened at once on A and B (five times each): exactly one opens."""

        async def go() -> None:
            await self._setup()
            token = self.a.token()
            clients = [await proxy.open(token) for _ in range(5) for proxy in (self.a, self.b)]
            # a refused one is accepted, then closed: wait for the tunnel id or the close
            await DeferredList(
                [
                    DeferredList([c.wait_messages(1), c.closed], fireOnOneCallback=True)
                    for c in clients
                ]
            )
            winners = [c for c in clients if c.messages]
            self.assertEqual(len(winners), 1)
            for client in clients:
                if client not in winners:
                    self.assertEqual(await client.closed, (1008, "769"))
            winners[0].sendClose(1000)
            await winners[0].closed

        return ensureDeferred(go())

    def test_user_cap_across_servers(self) -> Deferred[None]:
        """relay.max_sessions_per_user = 2 holds over both servers; a close gives back."""

        async def go() -> None:
            await self._setup(max_sessions_per_user=2)
            one = await opened(await self.a.open(self.a.token()))
            two = await opened(await self.b.open(self.b.token()))
            third = await self.a.open(self.a.token())
            self.assertEqual(await third.closed, (1008, "797"))
            fourth = await self.b.open(self.b.token())
            self.assertEqual(await fourth.closed, (1008, "797"))
            # bob is another user: not capped by alice's sessions
            bob = await opened(await self.a.open(self.a.token("bob")))
            one.sendClose(1000)
            await one.closed
            leases = self.a.parts["cluster"].leases
            await until(reactor, lambda: len(leases) == 1)
            again = await opened(await self.b.open(self.b.token()))
            for client in (two, bob, again):
                client.sendClose(1000)
                await client.closed
            await until(reactor, lambda: self.redis.command("ZCARD", "wiring:leases") == b":0\r\n")

        return ensureDeferred(go())

    def test_lease_given_back_on_refusal_and_handshake_failure(self) -> Deferred[None]:
        """A session refused by guacd, or whose browser leaves during set-up, keeps no slot."""

        async def go() -> None:
            await self._setup(
                lambda n: Behaviour(refuse_select=("no", 0x0207)) if n == 1 else Behaviour(),
                max_sessions_per_user=1,
            )
            failed = await self.a.open(self.a.token())
            self.assertEqual(await failed.closed, (1011, "519"))
            gone = await self.b.open(self.b.token())
            gone.opened.addErrback(lambda _: None)  # it never opens: that is the point
            gone.dropConnection(abort=True)
            await gone.closed
            for proxy in (self.a, self.b):
                leases = proxy.parts["cluster"].leases
                await until(reactor, lambda leases=leases: len(leases) == 0)
            await until(reactor, lambda: self.redis.command("ZCARD", "wiring:leases") == b":0\r\n")
            ok = await opened(await self.a.open(self.a.token()))
            ok.sendClose(1000)
            await ok.closed

        return ensureDeferred(go())

    def test_redis_away_fails_closed_and_comes_back(self) -> Deferred[None]:
        """
        Redis stopped: new consoles are refused with 1011 "512", /readyz says
        not ready, the gauge says 0, a running console keeps relaying; Redis
        back: consoles open again.
        """

        async def go() -> None:
            await self._setup(Behaviour(echo=True))
            running = await opened(await self.a.open(self.a.token()))
            await self.redis.stop()
            client = self.a.parts["cluster"].client
            await until(reactor, lambda: not client.available)
            refused = await self.a.open(self.a.token())
            self.assertEqual(await refused.closed, (1011, "512"))
            self.assertEqual(self.a.parts["relay"].token_refusals, {"cluster-unavailable": 1})
            code, _, body = await get_json(self.a.url("/readyz").encode())
            self.assertEqual(code, 503)
            self.assertIn("Redis unavailable", body["checks"]["cluster.redis"])
            gauge = self.a.parts["metrics"].cluster_redis_available
            self.assertEqual(gauge._value.get(), 0)
            # the running console still relays both ways
            count = len(running.messages)
            running.send("3.key,5.65307,1.1;")
            await running.wait_messages(count + 1)
            self.assertIn("3.key,5.65307,1.1;", running.text())
            await self.redis.restart()
            await until(reactor, lambda: client.available, timeout=20)
            self.assertEqual(gauge._value.get(), 1)

            async def ready() -> bool:
                code, _, body = await get_json(self.a.url("/readyz").encode())
                return bool(code == 200 and body["checks"]["cluster.redis"] == "ok")

            for _ in range(30):  # (/readyz keeps a result for a second)
                if await ready():
                    break
                await deferLater(reactor, 0.1)
            self.assertTrue(await ready())
            back = await opened(await self.a.open(self.a.token()))
            for c in (running, back):
                c.sendClose(1000)
                await c.closed

        return ensureDeferred(go())

    def test_kill_through_pubsub(self) -> Deferred[None]:
        """A kill asked of server A closes B's session (523, its words), guacd told first."""

        async def go() -> None:
            await self._setup()
            client = await opened(await self.b.open(self.b.token()))
            (session,) = self.b.parts["relay"].sessions
            session_id = session.cluster_id
            records = await self.a.parts["cluster"].registry.sessions()
            self.assertEqual([(r.id, r.user, r.vm) for r in records], [(session_id, "alice", "7")])
            kills = self.a.parts["relay"].policy.cluster
            reached = await kills.kill_session(session_id, "maintenance")
            self.assertEqual(reached, 2)  # both servers subscribe; B holds it
            self.assertEqual(await client.closed, (1002, "523 ended by an administrator"))
            conn = self.guacd.connections[0]
            await conn.closed
            self.assertEqual(conn.ended_by, "disconnect")
            await until(reactor, lambda: not self.b.parts["cluster"].registry.holds(session_id))
            records = await self.a.parts["cluster"].registry.sessions()
            self.assertEqual(records, [])

        return ensureDeferred(go())

    def test_page_rate_limit_across_servers(self) -> Deferred[None]:
        """api.burst counts one address's requests on both servers together."""

        async def go() -> None:
            await self._setup(api_rate=0.01, api_burst=2)
            codes = []
            for proxy in (self.a, self.b, self.a):
                code, _, _ = await http_request(proxy.port, "/console/7/vnc")
                codes.append(code)
            self.assertEqual(codes[2], 429)
            self.assertNotIn(429, codes[:2])

        return ensureDeferred(go())


class _DeferredStore:
    """A spent-token store that answers later (as Redis does)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.answers: list[Deferred[bool]] = []

    def spend(self, token_id: bytes, expires: float) -> Deferred[bool]:
        first = token_id not in self.seen
        self.seen.add(token_id)
        d: Deferred[bool] = Deferred()
        self.answers.append(d)
        d.first = first  # type: ignore[attr-defined]
        return d


class OpenTests(SynchronousTestCase):
    """TokenAuthority.open waits for a store that answers a Deferred."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.keys = KeyRing([os.urandom(32)])

    def test_immediate_store_answers_at_once(self) -> None:
        tokens = TokenAuthority(self.keys, self.clock)
        token = tokens.seal(Identity("alice"), CONSOLE)
        self.assertEqual(tokens.open(token).user, "alice")  # not a Deferred
        self.assertRaises(TokenError, tokens.open, token)

    def test_deferred_store(self) -> None:
        store = _DeferredStore()
        tokens = TokenAuthority(self.keys, self.clock, spent=store)  # type: ignore[arg-type]
        token = tokens.seal(Identity("alice"), CONSOLE)
        first, second = tokens.open(token), tokens.open(token)
        self.assertIsInstance(first, Deferred)
        for answer in store.answers:
            answer.callback(answer.first)  # type: ignore[attr-defined]
        self.assertEqual(self.successResultOf(first).user, "alice")
        self.assertEqual(self.failureResultOf(second, TokenError).value.reason, "replayed")
        self.assertEqual(tokens.spent, 0)  # kept by the shared store, not counted here
        # checks before spending still raise at once
        self.assertRaises(TokenError, tokens.open, "x" + token[1:-2])
