"""
Roles with OpenNebula: an administrator is a user in one of
C{opennebula.admin_groups} (default oneadmin, group 0), found with
``one.user.info`` (id -1, the user's own session) against the fake oned.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from consoleproxy import tap
from consoleproxy.clouds.opennebula import cloud as cloud_module
from consoleproxy.config import Config, ConfigError
from consoleproxy.consoles import Identity
from consoleproxy.errors import Unauthenticated
from tests.helpers.fakeoned import FakeOned


class RoleTests(TestCase):
    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.oned = FakeOned(reactor)
        yield self.oned.start()
        self.addCleanup(self.oned.stop)
        self.oned.add_user("oneadmin", "admin-pw", admin=True)
        self.oned.add_user("alice", "wonderland")
        self.oned.add_user("second", "pw", groups=[1, 0])  # oneadmin as a secondary group
        ops = self.oned.add_user("olga", "pw")
        ops.gid, ops.gname, ops.groups = 105, "ops", [105, 1]
        self.clock = Clock()

    def cloud(self, **overrides):  # type: ignore[no-untyped-def]
        config = Config.load(
            overrides={"cloud": "opennebula", "one_xmlrpc": self.oned.url, **overrides}
        )
        cloud = tap.build_cloud(config, reactor)
        cloud._clock = self.clock
        self.addCleanup(cloud.close)
        return cloud

    @staticmethod
    def who(name: str, password: str) -> Identity:
        return Identity(name, secret=f"{name}:{password}")

    @inlineCallbacks
    def test_oneadmin_group_primary_or_secondary(self):  # type: ignore[no-untyped-def]
        cloud = self.cloud()
        for name, password, admin in (
            ("oneadmin", "admin-pw", True),
            ("second", "pw", True),
            ("alice", "wonderland", False),
            ("olga", "pw", False),
        ):
            identity = yield cloud.with_role(self.who(name, password))
            self.assertEqual((identity.name, identity.admin), (name, admin))
        # Each asked oned once, as itself, for its own document (id -1).
        calls = [(m, u, a[:1]) for m, u, a in self.oned.calls]
        self.assertIn(("one.user.info", "second", (-1,)), calls)

    @inlineCallbacks
    def test_configured_groups_by_name_and_id(self):  # type: ignore[no-untyped-def]
        cloud = self.cloud(one_admin_groups=["ops"])
        olga = yield cloud.with_role(self.who("olga", "pw"))
        second = yield cloud.with_role(self.who("second", "pw"))
        self.assertEqual((olga.admin, second.admin), (True, False))
        cloud = self.cloud(one_admin_groups=[1])  # "users", here as a secondary group of olga
        olga = yield cloud.with_role(self.who("olga", "pw"))
        self.assertTrue(olga.admin)

    @inlineCallbacks
    def test_cached_briefly_never_for_a_wrong_password(self):  # type: ignore[no-untyped-def]
        cloud = self.cloud()
        yield cloud.with_role(self.who("oneadmin", "admin-pw"))
        yield cloud.with_role(self.who("oneadmin", "admin-pw"))
        self.assertEqual(len(self.oned.calls), 1)
        yield self.assertFailure(cloud.with_role(self.who("oneadmin", "wrong")), Unauthenticated)
        self.assertEqual(len(self.oned.calls), 2)
        self.clock.advance(cloud_module.ROLE_CACHE_SECONDS + 0.1)
        yield cloud.with_role(self.who("oneadmin", "admin-pw"))
        self.assertEqual(len(self.oned.calls), 3)

    @inlineCallbacks
    def test_cache_is_bounded(self):  # type: ignore[no-untyped-def]
        self.patch(cloud_module, "ROLE_CACHE_SIZE", 2)
        cloud = self.cloud()
        for name, password in (("oneadmin", "admin-pw"), ("alice", "wonderland"), ("olga", "pw")):
            yield cloud.with_role(self.who(name, password))
        self.assertEqual(len(cloud._roles), 2)
        yield cloud.with_role(self.who("oneadmin", "admin-pw"))  # the oldest was forgotten
        self.assertEqual(len(self.oned.calls), 4)

    def test_bad_admin_groups_refused(self) -> None:
        for value in ("oneadmin", [True], [""], [-1], [{"a": 1}]):
            with self.assertRaises(ConfigError) as raised:
                Config.load(overrides={"one_admin_groups": value})
            self.assertIn("opennebula.admin_groups", str(raised.exception))
