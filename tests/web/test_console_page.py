"""The console page, its static files, /api/console-modes, ?mode=rfb, configuration, twistd."""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from consoleproxy.config import Config, ConfigError, NoGuacd
from consoleproxy.tap import build_parts
from consoleproxy.tokens import TokenError
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.console_page import GuacdProbe
from tests.helpers.consoleserver import start_console_server
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import basic

ALICE = basic("alice", "wonderland")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@inlineCallbacks
def fetch(url: str, headers: dict[bytes, bytes] | None = None, method: bytes = b"GET"):  # type: ignore[no-untyped-def]
    """Request C{url}; return (status, headers, body)."""
    raw = Headers({name: [value] for name, value in (headers or {}).items()})
    response = yield Agent(reactor).request(method, url.encode(), raw)
    body = yield readBody(response)
    return response.code, response.headers, body


def header(headers: Headers, name: bytes) -> bytes | None:
    """One header's value."""
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def fake_node_modules(directory: str) -> str:
    """A node_modules with the two packages the page serves, and a file outside them."""
    for package, version, files in (
        ("guacamole-common-js", "1.5.0", {"dist/esm/guacamole-common.min.js": "export {};"}),
        ("@novnc/novnc", "1.7.0", {"core/rfb.js": "export default 1;", "README.md": "# no"}),
    ):
        folder = os.path.join(directory, package)
        os.makedirs(folder)
        with open(os.path.join(folder, "package.json"), "w") as f:
            json.dump({"name": package, "version": version}, f)
        for name, text in files.items():
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    with open(os.path.join(directory, "secret.js"), "w") as f:
        f.write("secret")
    os.symlink(
        os.path.join(directory, "secret.js"), os.path.join(directory, "@novnc/novnc/core/link.js")
    )
    return directory


class StaticFileTests(TestCase):
    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.modules = fake_node_modules(os.path.abspath(self.mktemp()))
        self.server = yield start_console_server(self, node_modules=self.modules)

    @inlineCallbacks
    def test_own_and_vendor_files(self):  # type: ignore[no-untyped-def]
        for path, kind, cache in (
            ("/static/console.js", b"text/javascript; charset=utf-8", b"no-cache"),
            ("/fireedge/static/console.css", b"text/css; charset=utf-8", b"no-cache"),
            (
                "/static/vendor/novnc@1.7.0/core/rfb.js",
                b"text/javascript; charset=utf-8",
                b"public, max-age=31536000, immutable",
            ),
            (
                "/static/vendor/guacamole-common-js@1.5.0/guacamole-common.min.js",
                b"text/javascript; charset=utf-8",
                b"public, max-age=31536000, immutable",
            ),
        ):
            code, headers, body = yield fetch(self.server.url(path))
            self.assertEqual(code, 200, path)
            self.assertEqual(header(headers, b"content-type"), kind)
            self.assertEqual(header(headers, b"cache-control"), cache)
            self.assertEqual(header(headers, b"x-content-type-options"), b"nosniff")
            self.assertTrue(body)
            etag = header(headers, b"etag")
            assert etag is not None
            code, _, body = yield fetch(self.server.url(path), {b"If-None-Match": etag})
            self.assertEqual((code, body), (304, b""))
            code, headers, body = yield fetch(self.server.url(path), method=b"HEAD")
            self.assertEqual((code, body), (200, b""))
            self.assertGreater(int(header(headers, b"content-length") or 0), 0)

    @inlineCallbacks
    def test_refusals(self):  # type: ignore[no-untyped-def]
        for path in (
            "/static/",
            "/static/vendor/",
            "/static/vendor/novnc@1.7.0/",
            "/static/vendor/novnc@1.7.0/core",  # a directory: never listed
            "/static/vendor/novnc@1.6.0/core/rfb.js",  # not the installed version
            "/static/vendor/novnc/core/rfb.js",
            "/static/vendor/novnc@1.7.0/README.md",  # not a served type
            "/static/vendor/novnc@1.7.0/package.json",
            "/static/vendor/novnc@1.7.0/core/link.js",  # a link out of the package
            "/static/vendor/novnc@1.7.0/../../secret.js",
            "/static/vendor/novnc@1.7.0/core/%2e%2e/%2e%2e/%2e%2e/secret.js",
            "/static/vendor/novnc@1.7.0/core/..%2f..%2f..%2fsecret.js",
            "/static/..%2f..%2fnode_modules/secret.js",
            "/static/.hidden.js",
            "/static/console.js/",
            "/static//console.js",
            "/static/vendor/guacamole-common-js@1.5.0/../esm/guacamole-common.min.js",
            "/static/no-such.js",
        ):
            code, headers, body = yield fetch(self.server.url(path))
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"secret", body)
            self.assertEqual(header(headers, b"content-type"), b"text/plain; charset=utf-8")
        code, headers, _ = yield fetch(self.server.url("/static/console.js"), method=b"POST")
        self.assertEqual(code, 405)
        self.assertEqual(header(headers, b"allow"), b"GET, HEAD")

    def test_missing_packages(self) -> None:
        assets = StaticFiles(self.mktemp())
        self.assertEqual(assets.missing, ["guacamole-common-js", "@novnc/novnc"])
        self.assertIsNone(assets.entry_url("novnc"))


class PageTests(TestCase):
    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.server = yield start_console_server(self)

    @inlineCallbacks
    def test_needs_basic_auth(self):  # type: ignore[no-untyped-def]
        for authorization in (None, basic("alice", "wrong"), b"Bearer nope"):
            code, headers, body = yield fetch(
                self.server.url("/console/7/vnc"),
                {b"Authorization": authorization} if authorization else None,
            )
            self.assertEqual(code, 401)
            self.assertEqual(
                header(headers, b"www-authenticate"), b'Basic realm="consoleproxy", charset="UTF-8"'
            )
            self.assertEqual(header(headers, b"content-type"), b"text/html; charset=utf-8")
            self.assertIn(b"user name and password", body)

    @inlineCallbacks
    def test_page(self):  # type: ignore[no-untyped-def]
        for prefix in ("", "/fireedge"):
            code, headers, body = yield fetch(
                self.server.url(f"{prefix}/console/7/vnc"), {b"Authorization": ALICE}
            )
            self.assertEqual(code, 200)
            self.assertEqual(header(headers, b"cache-control"), b"no-store")
            policy = header(headers, b"content-security-policy") or b""
            self.assertIn(b"script-src 'self';", policy)
            self.assertIn(b"connect-src 'self';", policy)
            text = body.decode()
            self.assertIn(f'data-base="{prefix}"', text)
            self.assertIn('data-vm="7" data-type="vnc"', text)
            self.assertIn(f'src="{prefix}/static/console.js"', text)
            self.assertRegex(text, r'data-novnc-js="[^"]*/static/vendor/novnc@[0-9.]+/core/rfb.js"')
            self.assertNotIn("<script>", text)  # no inline script (the policy forbids it)
            for button in ("cad", "fullscreen", "reconnect", "clipboard-toggle"):
                self.assertIn(f'id="{button}"', text)

    @inlineCallbacks
    def test_unknown_console(self):  # type: ignore[no-untyped-def]
        for path in ("/console/7/spice", "/console/x/vnc", "/console/99999999999/vnc"):
            code, _, body = yield fetch(self.server.url(path), {b"Authorization": ALICE})
            self.assertEqual(code, 404, path)
            self.assertIn(b"No such console", body)

    @inlineCallbacks
    def test_missing_libraries_are_named(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self, node_modules=self.mktemp())
        _, _, body = yield fetch(server.url("/console/7/vnc"), {b"Authorization": ALICE})
        self.assertIn(b'data-missing="guacamole-common-js @novnc/novnc"', body)


class ModesTests(TestCase):
    @inlineCallbacks
    def test_guacd_reachable_or_not(self):  # type: ignore[no-untyped-def]
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        for where, rfb, expected in (
            (f"tcp:127.0.0.1:{guacd.port}", True, {"guacamole": True, "rfb": True}),
            ("tcp:127.0.0.1:1", True, {"guacamole": False, "rfb": True}),
            (None, False, {"guacamole": False, "rfb": False}),
        ):
            server = yield start_console_server(self, guacd=where, rfb=rfb)
            for prefix in ("", "/fireedge"):
                code, _, body = yield fetch(server.url(f"{prefix}/api/console-modes"))
                self.assertEqual(code, 200)
                self.assertEqual(json.loads(body)["data"], expected)
        yield guacd.wait_for_connection(2)

    def test_probe_is_cached_and_shared(self) -> None:
        clock = Clock()
        attempts = []

        class Endpoint:
            def connect(self, factory):  # type: ignore[no-untyped-def]
                from twisted.internet.defer import Deferred  # noqa: PLC0415

                d: Deferred[object] = Deferred()
                attempts.append(d)
                return d

        probe = GuacdProbe(Endpoint(), clock, ttl=5, timeout=2)  # type: ignore[arg-type]
        first, second = probe.reachable(), probe.reachable()
        self.assertEqual(len(attempts), 1)
        clock.advance(2)  # no answer within the timeout: unreachable
        self.assertEqual(
            (self.successResultOf(first), self.successResultOf(second)), (False, False)
        )
        self.assertFalse(self.successResultOf(probe.reachable()))
        self.assertEqual(len(attempts), 1)
        clock.advance(5)
        probe.reachable()
        self.assertEqual(len(attempts), 2)
        self.assertFalse(self.successResultOf(GuacdProbe(None, clock).reachable()))


class RfbTokenApiTests(TestCase):
    @inlineCallbacks
    def test_mode_rfb(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self, vnc_password="vnc-secret")
        for prefix in ("", "/fireedge"):
            code, _, body = yield fetch(
                server.url(f"{prefix}/api/vm/7/guacamole/vnc?mode=rfb"), {b"Authorization": ALICE}
            )
            self.assertEqual(code, 200)
            answer = json.loads(body)
            self.assertEqual(set(answer), {"id", "message", "data"})
            self.assertNotIn(b"vnc-secret", body)
            claims = server.rfb_tokens.open(answer["data"])
            self.assertEqual((claims.console.vm_id, claims.console.console_type), (7, "vnc"))
            self.assertEqual(claims.console.parameters["password"], "vnc-secret")
        # A raw VNC token is no Guacamole token, and the other way round.
        _, _, body = yield fetch(
            server.url("/api/vm/7/guacamole/vnc?mode=rfb"), {b"Authorization": ALICE}
        )
        self.assertRaises(TokenError, server.tokens.open, json.loads(body)["data"])
        _, _, body = yield fetch(
            server.url("/api/vm/7/guacamole/vnc?mode=guacamole"), {b"Authorization": ALICE}
        )
        self.assertRaises(TokenError, server.rfb_tokens.open, json.loads(body)["data"])
        server.tokens.open(json.loads(body)["data"])

    @inlineCallbacks
    def test_refusals(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self)
        for query, status, words in (
            ("/api/vm/7/guacamole/ssh?mode=rfb", 400, "vnc consoles only"),
            ("/api/vm/7/guacamole/vnc?mode=spice", 400, "guacamole or rfb"),
            ("/api/vm/7/guacamole/vnc?mode=rfb&mode=rfb", 400, "more than once"),
        ):
            code, _, body = yield fetch(server.url(query), {b"Authorization": ALICE})
            self.assertEqual(code, status, query)
            self.assertIn(words, json.loads(body)["data"])
        off = yield start_console_server(self, rfb=False)
        code, _, body = yield fetch(
            off.url("/api/vm/7/guacamole/vnc?mode=rfb"), {b"Authorization": ALICE}
        )
        self.assertEqual(code, 404)
        self.assertIn("not enabled", json.loads(body)["data"])
        code, _, _ = yield fetch(off.url("/rfb"))
        self.assertEqual(code, 404)


class ConfigurationTests(SynchronousTestCase):
    def test_keys(self) -> None:
        config = Config.load(overrides={"guacd": "none"})
        self.assertFalse(config.has_guacd)
        endpoint = config.guacd_endpoint(reactor)
        self.assertIsInstance(endpoint, NoGuacd)
        self.failureResultOf(endpoint.connect(None))
        self.assertTrue(Config.load().rfb_enabled)
        for name, value, key in (
            ("rfb_enabled", "yes", "rfb.enabled"),
            ("rfb_handshake_timeout", 0, "rfb.handshake_timeout"),
            ("node_modules", 3, "console.node_modules"),
        ):
            error = self.assertRaises(ConfigError, Config.load, None, {name: value})
            self.assertEqual(error.key, key)

    def test_twistd_parts(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        key_file = os.path.join(directory, "keys")
        parts = build_parts(Config.load(overrides={"key_file": key_file}), reactor)
        self.assertIsNotNone(parts["rfb"])
        self.assertEqual(parts["rfb"].max_message_size, 65536)
        parts = build_parts(
            Config.load(overrides={"key_file": key_file, "rfb_enabled": False}), reactor
        )
        self.assertIsNone(parts["rfb"])
        self.assertEqual(
            parts["assets"].node_modules, StaticFiles().node_modules
        )  # beside the source tree by default
