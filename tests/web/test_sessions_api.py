"""
The live sessions API over real HTTP on loopback: the inventory's users (one
of them an administrator), an in-memory L{ILiveSessions}; authentication,
roles, validation and errors in the token API's shape, rate limits, audit.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from consoleproxy.clouds.inventory import InventoryCloud
from consoleproxy.consoles import Identity
from consoleproxy.errors import NotFound
from consoleproxy.interfaces import ILiveSessions, LiveSession
from consoleproxy.net.ratelimit import RateLimiter
from consoleproxy.tokens import KeyRing, TokenAuthority
from consoleproxy.web.api import TokenApi
from consoleproxy.web.sessions_api import SessionsApi
from consoleproxy.web.site import ConsoleProxyWeb, Operations, build_site
from tests.helpers.support import (
    admin_inventory,
    basic,
    http_request,
    synchronous_verifier,
)

ROOT = basic("root", "toor")
ALICE = basic("alice", "wonderland")
BOB = basic("bob", "builder")
A_ID = "a" * 32
B_ID = "b" * 32


@implementer(ILiveSessions)
class Sessions:
    """Two open sessions (alice's and bob's); remembers what it was asked to end."""

    def __init__(self) -> None:
        self.open = {
            A_ID: LiveSession(A_ID, "alice", "7", "vnc", "", "192.0.2.1", 100.0, 10, 2),
            B_ID: LiveSession(B_ID, "bob", "8", "rdp", "", "192.0.2.2", 50.0, 30, 4, 1, "rec"),
        }
        self.ended: list[tuple[str, str, str]] = []

    def listing(self, identity: Identity):  # type: ignore[no-untyped-def]
        found = [s for s in self.open.values() if identity.admin or s.user == identity.name]
        return succeed(sorted(found, key=lambda s: s.started))

    def end(self, identity: Identity, session_id: str, reason: str):  # type: ignore[no-untyped-def]
        session = self.open.pop(session_id, None)
        if session is None:
            return fail(NotFound(f"no open session {session_id}"))
        self.ended.append((identity.name, session_id, reason))
        return succeed(session)


class SessionsApiTests(TestCase):
    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "inventory.toml")
        with open(path, "w") as f:
            f.write(admin_inventory())
        cloud = InventoryCloud(path, synchronous_verifier())
        self.sessions = Sessions()
        self.kills: list[tuple[str, str, str]] = []
        tokens = TokenAuthority(KeyRing([os.urandom(32)]), reactor)
        self.limiter = RateLimiter(reactor, 1000.0, 1000)
        web = ConsoleProxyWeb(
            TokenApi(cloud, cloud, tokens),
            Resource(),
            operations=Operations(limiter=self.limiter),
            sessions=SessionsApi(
                cloud,
                cloud,
                self.sessions,
                on_kill=lambda by, s, client: self.kills.append((by, s.id, client)),
            ),
        )
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            build_site(web, reactor)
        )
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @inlineCallbacks
    def ask(self, path, authorization=None, method=b"GET"):  # type: ignore[no-untyped-def]
        headers = {b"Authorization": authorization} if authorization else {}
        code, response, body = yield http_request(self.port, path, method, headers)
        answer = json.loads(body)
        self.assertEqual(answer["id"], code)
        return code, response, answer

    @inlineCallbacks
    def test_administrator_lists_all_others_their_own(self):  # type: ignore[no-untyped-def]
        code, _, answer = yield self.ask("/api/sessions", ROOT)
        self.assertEqual((code, answer["message"]), (200, "OK"))
        self.assertEqual([s["id"] for s in answer["data"]], [B_ID, A_ID])  # oldest first
        self.assertEqual(
            answer["data"][0],
            {
                "id": B_ID,
                "user": "bob",
                "vm": "8",
                "type": "rdp",
                "zone": "",
                "client": "192.0.2.2",
                "started": 50.0,
                "bytes_to_browser": 30,
                "bytes_from_browser": 4,
                "viewers": 1,
                "recording": "rec",
                "worker": "",
            },
        )
        code, _, answer = yield self.ask("/api/sessions", ALICE)
        self.assertEqual((code, [s["id"] for s in answer["data"]]), (200, [A_ID]))

    @inlineCallbacks
    def test_credentials_required(self):  # type: ignore[no-untyped-def]
        for authorization in (None, basic("root", "wrong")):
            code, headers, _ = yield self.ask("/api/sessions", authorization)
            self.assertEqual(code, 401)
            self.assertEqual(
                headers.getRawHeaders(b"www-authenticate"),
                [b'Basic realm="consoleproxy", charset="UTF-8"'],
            )
            code, _, _ = yield self.ask(f"/api/sessions/{A_ID}", authorization, b"DELETE")
            self.assertEqual(code, 401)
        self.assertEqual(self.sessions.ended, [])

    @inlineCallbacks
    def test_only_administrators_end_sessions(self):  # type: ignore[no-untyped-def]
        for who in (ALICE, BOB):  # alice owns A_ID: still refused
            code, _, answer = yield self.ask(f"/api/sessions/{A_ID}", who, b"DELETE")
            self.assertEqual((code, answer["message"]), (403, "Forbidden"))
            self.assertIn("administrators", answer["data"])
        code, _, answer = yield self.ask(f"/api/sessions/{A_ID}", ROOT, b"DELETE")
        self.assertEqual(code, 200)
        self.assertEqual((answer["data"]["id"], answer["data"]["user"]), (A_ID, "alice"))
        self.assertEqual(self.sessions.ended, [("root", A_ID, "by root")])
        self.assertEqual(self.kills, [("root", A_ID, "127.0.0.1")])
        code, _, answer = yield self.ask(f"/api/sessions/{A_ID}", ROOT, b"DELETE")
        self.assertEqual(code, 404)
        self.assertIn(A_ID, answer["data"])

    @inlineCallbacks
    def test_garbage_ids_400_before_any_password_check(self):  # type: ignore[no-untyped-def]
        for bad in ("x", "A" * 32, "a" * 31, "a" * 33, "%00" * 4, "g" * 32, "%D9%A3" * 16):
            code, _, answer = yield self.ask(f"/api/sessions/{bad}", None, b"DELETE")
            self.assertEqual(code, 400, bad)
            self.assertIn("32 lowercase hexadecimal", answer["data"])

    @inlineCallbacks
    def test_methods(self):  # type: ignore[no-untyped-def]
        code, headers, _ = yield self.ask("/api/sessions", ROOT, b"DELETE")
        self.assertEqual(code, 405)
        code, headers, _ = yield self.ask(f"/api/sessions/{A_ID}", ROOT, b"GET")
        self.assertEqual((code, headers.getRawHeaders(b"allow")), (405, [b"DELETE"]))

    @inlineCallbacks
    def test_rate_limited_like_the_token_api(self):  # type: ignore[no-untyped-def]
        self.limiter.rate, self.limiter.burst = 0.001, 2
        codes = []
        for _ in range(4):
            code, headers, _ = yield self.ask("/api/sessions", ROOT)
            codes.append(code)
        self.assertEqual(codes[-1], 429)
        self.assertTrue(headers.getRawHeaders(b"retry-after"))
