"""
L{LiveSessions} without a cluster: this process's table is listed (by role)
and a session is ended with the kill's status, close words and reason.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.cluster.redis_client import RedisUnavailable
from consoleproxy.consoles import Identity
from consoleproxy.errors import CloudUnavailable, NotFound
from consoleproxy.guacamole.status import Status
from consoleproxy.interfaces import LiveSession as ClusterRecord
from consoleproxy.relay.cluster_sessions import ClusterSessions
from consoleproxy.relay.live_sessions import LiveSessions
from consoleproxy.relay.sessions import SessionTable
from tests.helpers.support import session_record


class FakeSession:
    """What the listing reads of a relay session, and what a kill calls."""

    STATE_OPEN = 3

    def __init__(self, session_id: str, user: str, opened_at: float, *, opened: bool = True):
        self.record = (
            session_record(session_id=session_id, user=user, opened_at=opened_at, viewers=2)
            if opened
            else None
        )
        self.state = self.STATE_OPEN
        self.bytes_to_browser = 1000
        self.bytes_from_browser = 20
        self.ended: list[tuple[Status, str, str]] = []

    def end_by_request(self, status: Status, message: str, words: str = "") -> None:
        self.ended.append((status, message, words))
        self.state = 4  # closing

    def shut_down(self) -> None:
        pass


class LocalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.table = SessionTable(Clock(), max_total=10, max_per_user=10)
        self.alice = FakeSession("a" * 32, "alice", 20.0)
        self.bob = FakeSession("b" * 32, "bob", 10.0)
        self.opening = FakeSession("", "alice", 0.0, opened=False)  # no upstream yet
        for session in (self.alice, self.bob, self.opening):
            self.table.reserve(session, session.record.user if session.record else "alice")
        self.live = LiveSessions(self.table, limit=10)

    def listing(self, identity: Identity) -> list[str]:
        return [s.id for s in self.successResultOf(self.live.listing(identity))]

    def test_listing_by_role(self) -> None:
        self.assertEqual(self.listing(Identity("root", admin=True)), ["b" * 32, "a" * 32])
        self.assertEqual(self.listing(Identity("alice")), ["a" * 32])
        self.assertEqual(self.listing(Identity("carol")), [])
        (first,) = self.successResultOf(self.live.listing(Identity("bob")))
        self.assertEqual(
            (first.user, first.vm, first.type, first.client, first.started),
            ("bob", "7", "vnc", "192.0.2.1", 10.0),
        )
        self.assertEqual((first.bytes_to_browser, first.bytes_from_browser), (1000, 20))
        self.assertEqual((first.viewers, first.recording), (2, None))

    def test_listing_is_bounded(self) -> None:
        self.live.limit = 1
        self.assertEqual(self.listing(Identity("root", admin=True)), ["b" * 32])

    def test_end(self) -> None:
        ended = self.successResultOf(
            self.live.end(Identity("root", admin=True), "a" * 32, "by root")
        )
        self.assertEqual(ended.id, "a" * 32)
        self.assertEqual(
            self.alice.ended,
            [
                (
                    Status.SESSION_CLOSED,
                    "ended by an administrator: by root",
                    "ended by an administrator",
                )
            ],
        )
        self.assertEqual(self.bob.ended, [])
        # Closing now: not listed, and not found again.
        self.assertEqual(self.listing(Identity("root", admin=True)), ["b" * 32])
        self.failureResultOf(self.live.end(Identity("root", admin=True), "a" * 32, ""), NotFound)

    def test_unknown_id(self) -> None:
        failure = self.failureResultOf(
            self.live.end(Identity("root", admin=True), "c" * 32, ""), NotFound
        )
        self.assertIn("c" * 32, failure.value.message)


class StubRegistry:
    """A registry that keeps records in memory (the real one is tested against Redis)."""

    worker = "host:1"

    def __init__(self) -> None:
        self.refresher = None
        self.kills: list[tuple[str, str]] = []

    def subscribe(self, handler: object) -> None:
        self.handler = handler

    def register(self, session_id: str, **fields: str) -> Deferred[None]:
        return succeed(None)

    async def sessions(self, limit: int) -> list[ClusterRecord]:
        raise RedisUnavailable("Redis at 10.0.0.1:6379 is unavailable")

    def record(self, session_id: str) -> Deferred[None]:
        return fail(RedisUnavailable("Redis at 10.0.0.1:6379 is unavailable"))


class ClusterSideTests(SynchronousTestCase):
    def test_renewals_carry_the_held_session_s_counts(self) -> None:
        """ClusterSessions sets the registry's refresher: bytes, viewers, recording of now."""
        registry = StubRegistry()
        cluster = ClusterSessions(None, registry)  # type: ignore[arg-type]
        session = FakeSession("a" * 32, "alice", 1.0)
        session.record.recording = "a" * 32
        cluster.opened("a" * 32, session, user="alice", vm="7", type="vnc", zone="", client="-")
        stale = ClusterRecord("a" * 32, "alice", "7", "vnc", "", "-", 1.0, worker="host:1")
        fresh = registry.refresher(stale)
        self.assertEqual(
            (fresh.bytes_to_browser, fresh.bytes_from_browser, fresh.viewers, fresh.recording),
            (1000, 20, 2, "a" * 32),
        )
        other = replace(stale, id="b" * 32)
        self.assertEqual(registry.refresher(other), other)  # not held here: unchanged

    def test_redis_away_is_a_503_that_names_no_address(self) -> None:
        cluster = ClusterSessions(None, StubRegistry())  # type: ignore[arg-type]
        live = LiveSessions(SessionTable(Clock(), max_total=1, max_per_user=1), cluster)
        root = Identity("root", admin=True)
        for d in (live.listing(root), live.end(root, "a" * 32, "")):
            failure = self.failureResultOf(d, CloudUnavailable)
            self.assertEqual((failure.value.status, failure.value.retry_after), (503, 5.0))
            self.assertNotIn("10.0.0.1", failure.value.message)
