"""ClusterRateLimiter: the token API's per-client limit, counted across processes."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from consoleproxy.cluster.ratelimit import ClusterRateLimiter
from consoleproxy.net.clients import Client
from tests.helpers.redis_server import connected, start_redis, until


class ClusterRateTests(TestCase):
    timeout = 60

    def test_burst_shared_by_two_processes(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            limiters = [
                ClusterRateLimiter(await connected(self, reactor, server.url), reactor, 2.0, 6)
                for _ in range(2)
            ]
            key = Client("2001:db8::1", "http").rate_key()
            answers = [await limiters[i % 2].take(key) for i in range(6)]
            self.assertEqual(answers, [None] * 6)
            wait = await limiters[0].take(key)
            self.assertIsNotNone(wait)
            self.assertTrue(0.3 < wait <= 0.5, wait)  # type: ignore[operator]
            # the same /64 from the other process: the same bucket
            other = Client("2001:db8::ffff", "http").rate_key()
            self.assertIsNotNone(await limiters[1].take(other))
            # another client is not affected
            self.assertIsNone(await limiters[1].take(Client("192.0.2.7", "http").rate_key()))
            await deferLater(reactor, 0.55)
            self.assertIsNone(await limiters[1].take(key))  # refilled at 2/s

        return ensureDeferred(go())

    def test_bucket_key_expires_when_full(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            limiter = ClusterRateLimiter(
                await connected(self, reactor, server.url), reactor, 10.0, 2
            )
            await limiter.take("192.0.2.1")
            ttl = int(server.command("PTTL", "consoleproxy:rate:api:192.0.2.1").split(b":")[1])
            self.assertTrue(0 < ttl <= 100, ttl)

        return ensureDeferred(go())

    def test_falls_back_to_this_process_without_redis(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url)
            limiter = ClusterRateLimiter(client, Clock(), 1.0, 2)
            await server.stop()
            await until(reactor, lambda: not client.available)
            self.assertEqual([await limiter.take("k") for _ in range(3)], [None, None, 1.0])

        return ensureDeferred(go())
