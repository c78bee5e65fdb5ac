"""The redis-server helper: starts, answers, restarts on its port, skips when missing."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SkipTest, TestCase

from tests.helpers import realservers, redis_server
from tests.helpers.redis_server import RedisServer, start_redis


class RedisServerTests(TestCase):
    timeout = 60

    def test_restart_keeps_the_port(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            port = server.port
            server.command("SET", "k", "v")
            await server.stop()
            self.assertFalse(server._pings())
            await server.restart()
            self.assertEqual(server.port, port)
            self.assertEqual(server.command("GET", "k"), b"$-1\r\n")  # no persistence

        return ensureDeferred(go())

    def test_password_and_tls(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor, password="p1", tls=True)
            self.assertTrue(server.url.startswith("rediss://127.0.0.1:"))
            self.assertEqual(server.command("PING"), b"+PONG\r\n")

        return ensureDeferred(go())

    def test_missing_program_skips_naming_the_package(self) -> None:
        self.patch(
            redis_server,
            "_require",
            lambda program, package: realservers._require("no-such-redis-server", package),
        )
        with self.assertRaises(SkipTest) as caught:
            RedisServer(self, reactor)
        self.assertIn("apt-get install redis-server", str(caught.exception))
