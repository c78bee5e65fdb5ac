"""SessionRegistry: live sessions listed cluster-wide, ended from another process."""

from __future__ import annotations

import json
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from consoleproxy.cluster.registry import LiveSession, SessionRegistry
from tests.helpers.redis_server import connected, start_redis, until


class RegistryTests(TestCase):
    timeout = 60

    async def two(self, **kwargs: object) -> tuple[SessionRegistry, SessionRegistry, object]:
        server = await start_redis(self, reactor)
        pair = []
        for n in range(2):
            client = await connected(self, reactor, server.url, initial_delay=0.2, max_delay=0.5)
            registry = SessionRegistry(client, reactor, worker=f"host{n}:1", **kwargs)  # type: ignore[arg-type]
            self.addCleanup(registry.stop)
            pair.append(registry)
        return pair[0], pair[1], server

    def test_list_across_processes(self) -> Deferred[None]:
        async def go() -> None:
            a, b, _ = await self.two()
            await a.register("s1", user="alice", vm="7", type="vnc", zone="0", client="192.0.2.1")
            await b.register("s2", user="bob", vm="8", type="ssh", zone="0", client="192.0.2.2")
            listed = {s.id: s for s in await b.sessions()}
            self.assertEqual(set(listed), {"s1", "s2"})
            self.assertEqual((listed["s1"].user, listed["s1"].worker), ("alice", "host0:1"))
            await a.unregister("s1")
            self.assertEqual([s.id for s in await b.sessions()], ["s2"])

        return ensureDeferred(go())

    def test_list_is_bounded(self) -> Deferred[None]:
        async def go() -> None:
            a, _, _ = await self.two()
            for n in range(30):
                await a.register(f"s{n}", user="u", vm="1", type="vnc", zone="0", client="-")
            self.assertEqual(len(await a.sessions(limit=10, count=5)), 10)
            self.assertEqual(len(await a.sessions()), 30)

        return ensureDeferred(go())

    def test_records_of_a_dead_process_lapse(self) -> Deferred[None]:
        async def go() -> None:
            a, b, _ = await self.two(ttl=1.0, refresh=0.25)
            a.start()
            await a.register("live", user="u", vm="1", type="vnc", zone="0", client="-")
            await b.register("dead", user="u", vm="1", type="vnc", zone="0", client="-")
            await deferLater(reactor, 1.5)
            self.assertEqual([s.id for s in await a.sessions()], ["live"])

        return ensureDeferred(go())

    def test_kill_reaches_the_holder(self) -> Deferred[None]:
        async def go() -> None:
            a, b, server = await self.two()
            killed: list[tuple[str, str]] = []
            a.subscribe(lambda sid, why: a.holds(sid) and killed.append((sid, why)))
            b.subscribe(lambda sid, why: b.holds(sid) and killed.append(("wrong", sid)))
            await a.register("s1", user="alice", vm="7", type="vnc", zone="0", client="-")
            await until(
                reactor, lambda: server.command("PUBSUB", "NUMSUB", a.channel).endswith(b":2\r\n")
            )  # type: ignore[attr-defined]
            self.assertEqual(await b.publish_kill("s1", "admin ended it"), 2)
            await until(reactor, lambda: killed)
            self.assertEqual(killed, [("s1", "admin ended it")])

        return ensureDeferred(go())

    def test_subscription_renewed_after_outage_and_bad_messages_ignored(self) -> Deferred[None]:
        async def go() -> None:
            a, b, server = await self.two()
            got: list[str] = []
            a.subscribe(lambda sid, why: got.append(sid))
            await until(
                reactor, lambda: server.command("PUBSUB", "NUMSUB", a.channel).endswith(b":1\r\n")
            )  # type: ignore[attr-defined]
            await server.stop()  # type: ignore[attr-defined]
            await until(reactor, lambda: not b.client.available)
            await server.restart()  # type: ignore[attr-defined]
            await until(reactor, lambda: b.client.available)
            await until(
                reactor, lambda: server.command("PUBSUB", "NUMSUB", a.channel).endswith(b":1\r\n")
            )  # type: ignore[attr-defined]
            await b.client.publish(a.channel, "not json")
            await b.client.publish(a.channel, '{"session": 5}')
            await b.publish_kill("s9", "")
            await until(reactor, lambda: got)
            self.assertEqual(got, ["s9"])

        return ensureDeferred(go())


class FreshRecordTests(TestCase):
    timeout = 60

    def test_renewal_carries_fresh_bytes_and_one_record_is_read_by_id(self) -> Deferred[None]:
        """The refresher's values reach Redis with the renewal; records() of newer fields load."""

        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url)
            registry = SessionRegistry(client, reactor, worker="host:1")
            await registry.register("s1", user="u", vm="1", type="vnc", zone="", client="-")
            self.assertEqual((await registry.record("s1")).bytes_to_browser, 0)
            registry.refresher = lambda r: replace(
                r, bytes_to_browser=4096, bytes_from_browser=8, viewers=1, recording="s1"
            )
            await registry.renew()
            record = await registry.record("s1")
            self.assertEqual(
                (record.bytes_to_browser, record.bytes_from_browser, record.viewers),
                (4096, 8, 1),
            )
            self.assertEqual(record.recording, "s1")
            self.assertIsNone(await registry.record("nope"))
            # A record with a field this version does not know still loads.
            newer = json.loads(record.to_json()) | {"future": 1}
            self.assertEqual(LiveSession.from_json(json.dumps(newer)), record)

        return ensureDeferred(go())
