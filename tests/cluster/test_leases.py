"""ClusterLeases: session caps that hold across processes and outlive none of them."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from consoleproxy.cluster.leases import ClusterLeases, Lease, SessionCapReached
from consoleproxy.cluster.redis_client import RedisUnavailable
from consoleproxy.guacamole.status import Status
from tests.helpers.redis_server import connected, start_redis, until


class LeaseTests(TestCase):
    timeout = 60

    async def two(self, **kwargs: object) -> tuple[ClusterLeases, ClusterLeases, object]:
        server = await start_redis(self, reactor)
        pair = []
        for n in range(2):
            client = await connected(self, reactor, server.url)
            leases = ClusterLeases(client, reactor, worker=f"w{n}", **kwargs)  # type: ignore[arg-type]
            self.addCleanup(leases.stop)
            pair.append(leases)
        return pair[0], pair[1], server

    def test_caps_hold_across_two_processes(self) -> Deferred[None]:
        async def go() -> None:
            a, b, _ = await self.two(max_total=5, max_per_user=3)
            await a.acquire("alice")
            await b.acquire("alice")
            await a.acquire("alice")
            with self.assertRaises(SessionCapReached) as caught:
                await b.acquire("alice")
            self.assertEqual(
                (caught.exception.cap, caught.exception.status), ("user", Status.CLIENT_TOO_MANY)
            )
            await b.acquire("bob")
            await a.acquire("bob")
            with self.assertRaises(SessionCapReached) as caught:
                await b.acquire("carol")
            self.assertEqual(
                (caught.exception.cap, caught.exception.status), ("global", Status.SERVER_BUSY)
            )

        return ensureDeferred(go())

    def test_concurrent_acquires_never_exceed_the_cap(self) -> Deferred[None]:
        async def go() -> None:
            a, b, _ = await self.two(max_total=100, max_per_user=7)
            tries = [(a if i % 2 else b).acquire("alice") for i in range(40)]
            results = await gatherResults(
                [d.addErrback(lambda f: f.trap(SessionCapReached)) for d in tries]
            )
            self.assertEqual(sum(isinstance(r, Lease) for r in results), 7)
            self.assertEqual(len(a) + len(b), 7)

        return ensureDeferred(go())

    def test_release_gives_the_slot_back(self) -> Deferred[None]:
        async def go() -> None:
            a, b, _ = await self.two(max_total=10, max_per_user=1)
            lease = await a.acquire("alice")
            with self.assertRaises(SessionCapReached):
                await b.acquire("alice")
            await a.release(lease)
            await b.acquire("alice")
            self.assertEqual((len(a), len(b)), (0, 1))

        return ensureDeferred(go())

    def test_dead_process_slots_come_back_after_ttl(self) -> Deferred[None]:
        """A process that stops refreshing (dead) loses its slots after the TTL; a live one not."""

        async def go() -> None:
            a, b, _ = await self.two(max_total=10, max_per_user=2, ttl=1.0, refresh=0.25)
            a.start()
            await a.acquire("alice")
            await b.acquire("alice")  # b never refreshes: a dead process
            with self.assertRaises(SessionCapReached):
                await a.acquire("alice")
            await deferLater(reactor, 1.5)
            await a.acquire("alice")  # b's slot is back; a's first lease is still held
            with self.assertRaises(SessionCapReached):
                await a.acquire("alice")

        return ensureDeferred(go())

    def test_refresh_restores_a_lapsed_lease(self) -> Deferred[None]:
        async def go() -> None:
            a, _, server = await self.two(max_total=10, max_per_user=5, ttl=1.0, refresh=10)
            await a.acquire("alice")
            server.command("DEL", a.global_key, a.user_key("alice"))  # type: ignore[attr-defined]
            await a.renew()
            self.assertEqual(server.command("ZCARD", a.global_key), b":1\r\n")  # type: ignore[attr-defined]

        return ensureDeferred(go())

    def test_redis_down(self) -> Deferred[None]:
        async def go() -> None:
            a, _, server = await self.two(max_total=10, max_per_user=5)
            lease = await a.acquire("alice")
            await server.stop()  # type: ignore[attr-defined]
            await until(reactor, lambda: not a.client.available)
            with self.assertRaises(RedisUnavailable):
                await a.acquire("alice")
            await a.release(lease)  # never fails
            await a.renew()  # nor this
            self.assertEqual(len(a), 0)

        return ensureDeferred(go())
