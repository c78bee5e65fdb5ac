"""ClusterState: the parts wired to one client; the workers rule."""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.cluster.state import build, workers_problem
from tests.helpers.redis_server import start_redis, until


class WorkersTests(SynchronousTestCase):
    def test_several_workers_need_redis(self) -> None:
        self.assertIsNone(workers_problem(1, ""))
        self.assertIsNone(workers_problem(4, "redis://r/0"))
        self.assertIn("needs cluster.redis", workers_problem(4, "") or "")


class BuildTests(TestCase):
    timeout = 60

    def test_parts_share_one_redis(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor, password="pw")
            state = build(
                reactor,
                url=server.url,
                password_file=server.password_file,
                prefix="t1:",
                max_sessions=5,
                max_sessions_per_user=1,
                api_rate=1.0,
                api_burst=1,
            )
            state.start()
            self.addCleanup(state.stop)
            await until(reactor, lambda: state.client.available)
            self.assertTrue(await state.spent.spend(b"id", time.time() + 60))
            lease = await state.leases.acquire("alice")
            await state.registry.register(
                "s", user="alice", vm="1", type="vnc", zone="0", client="-"
            )
            self.assertIsNone(await state.api_rate.take("192.0.2.1"))
            keys = server.command("KEYS", "t1:*").decode()
            for key in ("t1:spent:6964", "t1:leases", "t1:session:s", "t1:rate:api:192.0.2.1"):
                self.assertIn(key, keys)
            await state.leases.release(lease)

        return ensureDeferred(go())
