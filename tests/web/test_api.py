"""The token API over real HTTP on loopback, with the inventory cloud."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from consoleproxy.errors import Overloaded
from consoleproxy.tokens import KeyRing, TokenAuthority
from consoleproxy.web.api import TokenApi
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.console_page import ConsolePage
from consoleproxy.web.site import ConsoleProxyWeb, build_site
from tests.helpers.support import basic, get_json, http_request, serve_web, start_server

ALICE = basic("alice", "wonderland")


class BusyCloud:
    """An authenticator whose password checks are refused: the server is too busy."""

    def authenticate(self, authorization: bytes | None) -> None:
        raise Overloaded("the server is busy checking other passwords; retry in 3 s", 2.5)

    def console(self, *args: object) -> None:
        raise AssertionError("never reached")


class TokenApiTests(TestCase):
    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.server = yield start_server(self)

    @inlineCallbacks
    def test_token_in_fireedge_shape(self):  # type: ignore[no-untyped-def]
        for prefix in ("", "/fireedge"):
            code, headers, body = yield get_json(
                self.server.url(f"{prefix}/api/vm/7/guacamole/vnc"), ALICE
            )
            self.assertEqual(code, 200)
            self.assertEqual(set(body), {"id", "message", "data"})
            self.assertEqual((body["id"], body["message"]), (200, "OK"))
            self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
            claims = self.server.tokens.open(body["data"])
            self.assertEqual(claims.user, "alice")
            self.assertEqual((claims.console.vm_id, claims.console.console_type), (7, "vnc"))
            self.assertEqual(claims.console.parameters["password"], "vnc-secret")
            self.assertEqual(claims.console.parameters["port"], "5907")

    @inlineCallbacks
    def test_everyone_vm_and_bool_parameters(self):  # type: ignore[no-untyped-def]
        code, _, body = yield get_json(
            self.server.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
        )
        self.assertEqual(code, 200)
        claims = self.server.tokens.open(body["data"])
        self.assertEqual(claims.console.parameters["ignore-cert"], "true")

    @inlineCallbacks
    def assertRefused(self, path, authorization, status, words):  # type: ignore[no-untyped-def]
        code, headers, body = yield get_json(self.server.url(path), authorization)
        self.assertEqual(code, status)
        self.assertEqual(body["id"], status)
        self.assertIn(words, body["data"])
        return headers

    @inlineCallbacks
    def test_unknown_type_400(self):  # type: ignore[no-untyped-def]
        yield self.assertRefused("/api/vm/7/guacamole/spice", ALICE, 400, "unknown console type")

    @inlineCallbacks
    def test_bad_vm_id_400(self):  # type: ignore[no-untyped-def]
        for vm in ("x", "-1", "99999999999", "7.0", "%D9%A3"):
            yield self.assertRefused(f"/api/vm/{vm}/guacamole/vnc", ALICE, 400, "VM id")

    @inlineCallbacks
    def test_missing_console_400(self):  # type: ignore[no-untyped-def]
        yield self.assertRefused("/api/vm/7/guacamole/rdp", ALICE, 400, "no rdp console")

    @inlineCallbacks
    def test_no_credentials_401(self):  # type: ignore[no-untyped-def]
        headers = yield self.assertRefused("/api/vm/7/guacamole/vnc", None, 401, "credentials")
        self.assertEqual(
            headers.getRawHeaders(b"www-authenticate"),
            [b'Basic realm="consoleproxy", charset="UTF-8"'],
        )

    @inlineCallbacks
    def test_bad_credentials_401(self):  # type: ignore[no-untyped-def]
        for authorization in (
            basic("alice", "wrong"),
            basic("nobody", "wonderland"),
            b"Basic !!!",
            b"Bearer alice:wonderland",
            b"Basic " + b"A" * 5000,
        ):
            headers = yield self.assertRefused("/api/vm/7/guacamole/vnc", authorization, 401, "")
            self.assertTrue(headers.hasHeader(b"www-authenticate"))

    @inlineCallbacks
    def test_forbidden_403(self):  # type: ignore[no-untyped-def]
        yield self.assertRefused(
            "/api/vm/7/guacamole/vnc", basic("bob", "builder"), 403, "may not open"
        )

    @inlineCallbacks
    def test_no_such_vm_404(self):  # type: ignore[no-untyped-def]
        yield self.assertRefused("/api/vm/70/guacamole/vnc", ALICE, 404, "does not exist")

    @inlineCallbacks
    def test_zone_unknown_to_inventory_404(self):  # type: ignore[no-untyped-def]
        yield self.assertRefused("/api/vm/7/guacamole/vnc?zone=3", ALICE, 404, "zone 3")
        yield self.assertRefused("/api/vm/7/guacamole/vnc?zone=x", ALICE, 400, "zone")

    @inlineCallbacks
    def test_unknown_path_and_method(self):  # type: ignore[no-untyped-def]
        yield self.assertRefused("/api/vm/7", ALICE, 404, "no such resource")
        yield self.assertRefused("/nothing-here", ALICE, 404, "no such resource")
        yield self.assertRefused("/", ALICE, 404, "the landing page is not enabled")

    @inlineCallbacks
    def test_no_secret_in_logs(self):  # type: ignore[no-untyped-def]
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, _, body = yield get_json(self.server.url("/api/vm/7/guacamole/vnc"), ALICE)
        yield get_json(self.server.url("/api/vm/7/guacamole/vnc"), basic("alice", "wr0ng"))
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertRegex(text, r"Token issued: user=alice vm=7 type=vnc .*peer=127\.0\.0\.1")
        for secret in ("wonderland", "wr0ng", "vnc-secret", body["data"], ALICE.decode()):
            self.assertNotIn(secret, text)

    @inlineCallbacks
    def test_token_under_the_console_page(self):  # type: ignore[no-untyped-def]
        # The console page asks here: below its own URL, where the browser sends the
        # page's credentials with the first request (RFC 7617, 2.2).
        for prefix in ("", "/fireedge"):
            code, _, body = yield get_json(self.server.url(f"{prefix}/console/7/ssh/token"), ALICE)
            self.assertEqual(code, 200)
            claims = self.server.tokens.open(body["data"])
            self.assertEqual((claims.console.vm_id, claims.console.console_type), (7, "ssh"))
        headers = yield self.assertRefused("/console/7/vnc/token", None, 401, "credentials")
        self.assertTrue(headers.hasHeader(b"www-authenticate"))
        yield self.assertRefused("/console/7/vnc/token?zone=3", ALICE, 404, "zone 3")


class BusyTests(TestCase):
    """A password check the server cannot take now: 503, Retry-After, words; at once."""

    @inlineCallbacks
    def test_token_api_and_page(self):  # type: ignore[no-untyped-def]
        server = yield start_server(self, cloud=BusyCloud())
        code, headers, body = yield get_json(server.url("/api/vm/7/guacamole/vnc"), ALICE)
        self.assertEqual((code, body["id"], body["message"]), (503, 503, "Service Unavailable"))
        self.assertIn("busy checking other passwords", body["data"])
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"3"])
        self.assertFalse(headers.hasHeader(b"www-authenticate"))
        port = yield serve_web(self, server, page=ConsolePage(BusyCloud(), StaticFiles()))
        code, headers, page = yield http_request(
            port, "/console/7/vnc", headers={b"Authorization": ALICE}
        )
        self.assertEqual(code, 503)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"3"])
        self.assertIn(b"busy checking other passwords", page)

    @inlineCallbacks
    def test_busy_refusals_logged_once_in_a_while(self):  # type: ignore[no-untyped-def]
        clock = Clock()
        tokens = TokenAuthority(KeyRing([os.urandom(32)]), clock)
        web = ConsoleProxyWeb(TokenApi(BusyCloud(), BusyCloud(), tokens, clock=clock), Resource())
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            build_site(web, reactor)
        )
        self.addCleanup(listening.stopListening)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        port = listening.getHost().port
        for _ in range(5):
            code, headers, _ = yield http_request(
                port, "/api/vm/7/guacamole/vnc", headers={b"Authorization": ALICE}
            )
            self.assertEqual((code, headers.getRawHeaders(b"retry-after")), (503, [b"3"]))
        clock.advance(TokenApi.BUSY_LOG_INTERVAL)
        yield http_request(port, "/api/vm/7/guacamole/vnc", headers={b"Authorization": ALICE})
        lines = [formatEvent(e) for e in events if "Token refused" in formatEvent(e)]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("busy checking other passwords", lines[0])
        self.assertNotIn("more refused", lines[0])
        self.assertIn("; 4 more refused as busy since the last such line", lines[1])
