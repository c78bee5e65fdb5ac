"""
Roles with OpenNebula: an administrator is a user in one of
C{opennebula.admin_groups} (default oneadmin, group 0), found with
``one.user.info`` (id -1, the user's own session) against the fake oned.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from consoleproxy import tap
from consoleproxy.clouds.opennebula import cloud as cloud_module
from consoleproxy.config import Config, ConfigError
from consoleproxy.consoles import Identity
from consoleproxy.errors import Unauthenticated
from consoleproxy.tokens import KeyRing, TokenAuthority
from consoleproxy.web.api import TokenApi
from consoleproxy.web.sessions_api import SessionsApi
from consoleproxy.web.site import ConsoleProxyWeb, build_site
from tests.helpers.fakeoned import FakeOned
from tests.helpers.support import basic, http_request
from tests.web.test_sessions_api import A_ID, Sessions


class OnedCase(TestCase):
    """A fake oned: oneadmin, alice, "second" (oneadmin as a secondary group), olga (ops)."""

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


class RoleTests(OnedCase):
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


class SessionsApiWithOnedTests(OnedCase):
    """The sessions API on the OpenNebula backend: roles from oned, credentials checked by it."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        cloud = self.cloud()
        self.sessions = Sessions()
        tokens = TokenAuthority(KeyRing([os.urandom(32)]), reactor)
        web = ConsoleProxyWeb(
            TokenApi(cloud, cloud, tokens),
            Resource(),
            sessions=SessionsApi(cloud, cloud, self.sessions),
        )
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            build_site(web, reactor)
        )
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @inlineCallbacks
    def ask(self, path, authorization, method=b"GET"):  # type: ignore[no-untyped-def]
        code, _, body = yield http_request(
            self.port, path, method, {b"Authorization": authorization}
        )
        return code, json.loads(body)

    @inlineCallbacks
    def test_sessions_api(self):  # type: ignore[no-untyped-def]
        code, answer = yield self.ask("/api/sessions", basic("oneadmin", "admin-pw"))
        self.assertEqual((code, len(answer["data"])), (200, 2))
        code, answer = yield self.ask("/api/sessions", basic("alice", "wonderland"))
        self.assertEqual((code, [s["user"] for s in answer["data"]]), (200, ["alice"]))
        code, _ = yield self.ask("/api/sessions", basic("alice", "wrong"))
        self.assertEqual(code, 401)
        code, _ = yield self.ask(f"/api/sessions/{A_ID}", basic("alice", "wonderland"), b"DELETE")
        self.assertEqual(code, 403)
        code, _ = yield self.ask(f"/api/sessions/{A_ID}", basic("second", "pw"), b"DELETE")
        self.assertEqual(code, 200)
        self.assertEqual(self.sessions.ended, [("second", A_ID, "by second")])
