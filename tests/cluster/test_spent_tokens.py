"""RedisSpentTokens: one token, one session, in the whole cluster."""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from consoleproxy import interfaces
from consoleproxy.cluster.redis_client import RedisUnavailable
from consoleproxy.cluster.spent_tokens import RedisSpentTokens
from tests.helpers.redis_server import connected, start_redis, until


class InterfaceTests(SynchronousTestCase):
    def test_provides_ispenttokens(self) -> None:
        """Once issue 13's seam is merged, the Redis store provides it."""
        seam = getattr(interfaces, "ISpentTokens", None)
        if seam is None:
            self.skipTest("consoleproxy.interfaces.ISpentTokens is not on this branch yet")
        self.assertTrue(verifyObject(seam, RedisSpentTokens(None, reactor)))  # type: ignore[arg-type]


class SpendTests(TestCase):
    timeout = 60

    def test_exactly_one_of_fifty_concurrent_wins(self) -> Deferred[None]:
        """50 spends of one token from two connections (two processes): one True."""

        async def go() -> None:
            server = await start_redis(self, reactor)
            stores = [
                RedisSpentTokens(await connected(self, reactor, server.url), reactor)
                for _ in range(2)
            ]
            expires = time.time() + 60
            answers = await gatherResults(
                [stores[i % 2].spend(b"token-one-0", expires) for i in range(50)]
            )
            self.assertEqual(answers.count(True), 1)
            self.assertEqual(answers.count(False), 49)

        return ensureDeferred(go())

    def test_spent_after_reconnect_until_expiry(self) -> Deferred[None]:
        """A restarted consoleproxy (a new client) still finds the token spent; then it lapses."""

        async def go() -> None:
            server = await start_redis(self, reactor)
            first = await connected(self, reactor, server.url)
            store = RedisSpentTokens(first, reactor, clock_skew=0)
            expires = time.time() + 1.0
            self.assertTrue(await store.spend(b"abc", expires))
            await first.stop()
            again = RedisSpentTokens(await connected(self, reactor, server.url), reactor)
            self.assertFalse(await again.spend(b"abc", expires))
            ttl = int(server.command("PTTL", "consoleproxy:spent:616263").split(b":")[1])
            self.assertTrue(0 < ttl <= 1000 + 30_000, ttl)  # its remaining life plus the skew
            await until(reactor, lambda: server.command("EXISTS", store.key(b"abc")) == b":0\r\n")

        return ensureDeferred(go())

    def test_lifetime_and_skew(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            store = RedisSpentTokens(await connected(self, reactor, server.url), reactor)
            self.assertTrue(await store.spend(b"\x01", time.time() + 60))
            ttl = int(server.command("PTTL", store.key(b"\x01")).split(b":")[1])
            self.assertTrue(89_000 < ttl <= 90_000, ttl)

        return ensureDeferred(go())

    def test_answer_is_not_a_bool(self) -> Deferred[None]:
        """A caller that forgets to wait gets an error, not a replay let through."""

        async def go() -> None:
            server = await start_redis(self, reactor)
            store = RedisSpentTokens(await connected(self, reactor, server.url), reactor)
            answer = store.spend(b"t", time.time() + 60)
            with self.assertRaises(TypeError):
                bool(answer)
            self.assertTrue(await answer)

        return ensureDeferred(go())

    def test_redis_down_fails_closed(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url)
            store = RedisSpentTokens(client, reactor)
            await server.stop()
            await until(reactor, lambda: not client.available)
            with self.assertRaises(RedisUnavailable) as caught:
                await store.spend(b"x", time.time() + 60)
            self.assertEqual(int(caught.exception.status), 512)

        return ensureDeferred(go())
