"""
The live sessions API across two ``twistd`` processes sharing one real
redis-server: a console held by server A is listed by server B (from the
cluster's registry) and ended from B through the kill channel (Redis
pub/sub): the browser gets 1002 "523 ended by an administrator", guacd
``disconnect``; an id no process holds is a 404.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.helpers.redis_server import start_redis
from tests.helpers.support import admin_inventory, http_request, wait
from tests.helpers.twistd import Served, fake_guacd, serve
from tests.web.test_sessions_twistd import ALICE, BOB, KILLED, ROOT, ask, open_console


async def ready(server: Served) -> None:
    """Wait until C{/readyz} answers 200 (the cluster's Redis is connected)."""
    for _ in range(200):
        code, _, _ = await http_request(server.port, "/readyz")
        if code == 200:
            return
        await wait(0.05)
    raise AssertionError("not ready")


class ClusterKillTests(TestCase):
    timeout = 90

    def test_kill_on_one_instance_ends_the_other_s_session(self) -> Deferred[None]:
        async def go() -> None:
            redis = await start_redis(self, reactor)
            guacd = await fake_guacd(self)
            tail = f'[cluster]\nredis = "{redis.url}"\n'
            a = await serve(self, guacd, inventory=admin_inventory(), tail=tail)
            b = await serve(self, guacd, inventory=admin_inventory(), tail=tail)
            await ready(a)
            await ready(b)
            client = await open_console(a)
            conn = guacd.connections[-1]

            code, answer = await ask(b, "/api/sessions", ROOT)
            self.assertEqual(code, 200, answer)
            (listed,) = answer["data"]
            self.assertEqual((listed["user"], listed["vm"], listed["type"]), ("alice", "7", "vnc"))
            self.assertTrue(listed["worker"].endswith(f":{a.process.transport.pid}"), listed)
            code, answer = await ask(b, "/api/sessions", ALICE)
            self.assertEqual([s["id"] for s in answer["data"]], [listed["id"]])
            code, answer = await ask(b, "/api/sessions", BOB)
            self.assertEqual(answer["data"], [])
            code, _ = await ask(b, f"/api/sessions/{'0' * 32}", ROOT, b"DELETE")
            self.assertEqual(code, 404)

            code, answer = await ask(b, f"/api/sessions/{listed['id']}", ROOT, b"DELETE")
            self.assertEqual((code, answer["data"]["id"]), (200, listed["id"]))
            self.assertEqual(await client.closed, KILLED)
            await conn.closed
            self.assertEqual(conn.ended_by, "disconnect")

            async def gone() -> bool:
                code, answer = await ask(a, "/api/sessions", ROOT)
                return code == 200 and answer["data"] == []

            for _ in range(100):
                if await gone():
                    break
                await wait(0.05)
            else:
                self.fail("the killed session is still listed")
            code, _ = await ask(b, f"/api/sessions/{listed['id']}", ROOT, b"DELETE")
            self.assertEqual(code, 404)

        return ensureDeferred(go())

    def test_kill_with_two_workers(self) -> Deferred[None]:
        """server.workers = 2 (Redis required): any worker lists and ends any worker's session."""

        async def go() -> None:
            redis = await start_redis(self, reactor)
            guacd = await fake_guacd(self)
            tail = f'[cluster]\nredis = "{redis.url}"\n[api]\nburst = 1000\n'
            served = await serve(
                self, guacd, inventory=admin_inventory(), server="workers = 2\n", tail=tail
            )
            for _ in range(8):  # whichever worker answers, each is ready
                await ready(served)
            clients = [await open_console(served) for _ in range(4)]
            code, answer = await ask(served, "/api/sessions", ROOT)
            self.assertEqual((code, len(answer["data"])), (200, 4), answer)
            # (Both workers usually hold some: the kernel spreads the connections.)
            for session in answer["data"]:
                code, _ = await ask(served, f"/api/sessions/{session['id']}", ROOT, b"DELETE")
                self.assertEqual(code, 200)
            for client in clients:
                self.assertEqual(await client.closed, KILLED)

        return ensureDeferred(go())
