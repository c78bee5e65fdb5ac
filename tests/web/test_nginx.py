"""examples/nginx.conf in a real nginx, in front of a real twistd consoleproxy.

The example is the configuration under test: only its ports, names and certificate
paths are substituted (each substitution must find its text, so the example cannot
drift from what is tested).  nginx (Debian's package) terminates TLS on loopback with a
certificate of the test CA, on 127.0.0.1 and [::1]; consoleproxy listens on 127.0.0.1
with ``trusted_proxies = ["127.0.0.1"]`` and the nginx URL as its allowed Origin.

The browser (headless Chromium) opens the console at ``https://[::1]:PORT``: so the
client's address (::1) differs from nginx's own (127.0.0.1), and the audit log shows
that consoleproxy took the client from X-Forwarded-For.  Both relays go through nginx:
Guacamole (the fake guacd draws) and noVNC (a real x11vnc on Xvfb).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.http_headers import Headers

from tests.helpers.browser import Browser, open_guacamole_console, require_browser, trust_key
from tests.helpers.consoleserver import console_inventory
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.realservers import free_port
from tests.helpers.support import basic, wait
from tests.helpers.testca import make_tls_files
from tests.helpers.twistd import TwistdProcess, base_environment, start_twistd, wait_until_serving

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "nginx.conf")
NGINX = "/usr/sbin/nginx"
ORANGE = (255, 128, 0)


def require_nginx() -> str:
    """nginx's path; L{SkipTest} naming the package otherwise, or without IPv6 loopback."""
    if not os.access(NGINX, os.X_OK):
        raise SkipTest("nginx is not installed (Debian package nginx; scripts/setup)")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        raise SkipTest(f"no IPv6 loopback (::1) to tell the client from nginx: {e}") from e
    return NGINX


def substitute(text: str, replacements: list[tuple[str, str]]) -> str:
    """Replace each text once at least; fail loudly when the example no longer has it."""
    for old, new in replacements:
        if old not in text:
            raise AssertionError(f"examples/nginx.conf no longer has {old!r}")
        text = text.replace(old, new)
    return text


def nginx_config(
    directory: str, *, https: int, http: int, upstream: int, key: str, cert: str
) -> str:
    """The example for this test, inside a main configuration of its own; its path."""
    site = substitute(
        FilePath(EXAMPLE).getContent().decode(),
        [
            ("server 127.0.0.1:2616;", f"server 127.0.0.1:{upstream};"),
            ("listen 80;", f"listen 127.0.0.1:{http};"),
            ("listen [::]:80;", f"listen [::1]:{http};"),
            ("listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;"),
            ("listen [::]:443 ssl;", f"listen [::1]:{https} ssl;"),
            ("server_name console.example.com;", "server_name localhost;"),
            ("/etc/nginx/tls/console.example.com.pem", cert),
            ("/etc/nginx/tls/console.example.com.key", key),
        ],
    )
    with open(os.path.join(directory, "consoleproxy.conf"), "w") as f:
        f.write(site)
    main = os.path.join(directory, "nginx.conf")
    temp = "\n".join(
        f"    {kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    with open(main, "w") as f:
        f.write(
            "daemon off;\nworker_processes 1;\n"
            f"pid {directory}/nginx.pid;\nerror_log stderr info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"    access_log {directory}/access.log;\n{temp}\n"
            f"    include {directory}/consoleproxy.conf;\n"
            "}\n"
        )
    return main


class NginxFrontendTests(TestCase):
    """A console through nginx: TLS, the headers, both WebSocket relays."""

    timeout = 120

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        nginx = require_nginx()
        require_browser()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.guacd = FakeGuacd(reactor)
        yield self.guacd.start()
        self.addCleanup(self.guacd.stop)
        from tests.helpers.realservers import start_vnc_desktop  # noqa: PLC0415

        self.desktop = yield start_vnc_desktop(
            self, reactor, width=320, height=240, password="vnc-pass", colour=ORANGE
        )
        self.addCleanup(self.desktop.stop)

        # consoleproxy, as the example's comment configures it.
        self.https, http, upstream = free_port(), free_port(), free_port()
        self.origin = f"https://[::1]:{self.https}"
        inventory = os.path.join(self.directory, "inventory.toml")
        with open(inventory, "w") as f:
            f.write(console_inventory(self.desktop.port, "vnc-pass"))
        self.audit = os.path.join(self.directory, "audit.jsonl")
        config = os.path.join(self.directory, "consoleproxy.toml")
        with open(config, "w") as f:
            f.write(
                f'[server]\nlisten = ["tcp:{upstream}:interface=127.0.0.1"]\n'
                'trusted_proxies = ["127.0.0.1"]\n'
                f'[guacd]\nendpoint = "tcp:127.0.0.1:{self.guacd.port}"\n'
                f'[tokens]\nkey_file = "{self.directory}/keys"\n'
                f'[inventory]\npath = "{inventory}"\n'
                f'[relay]\nallowed_origins = ["{self.origin}"]\n'
                f'[operations]\naudit_log = "{self.audit}"\n'
            )
        self.consoleproxy = start_twistd(
            self,
            f"--config={config}",
            cwd=self.directory,
            env={**base_environment(), "PYTHONPATH": ROOT},
        )
        yield wait_until_serving(self, self.consoleproxy, f"http://127.0.0.1:{upstream}/healthz")

        # nginx with the example, a certificate of the test CA for localhost, 127.0.0.1, ::1.
        key, cert, self.ca_pem = make_tls_files(
            FilePath(self.directory).child("tls"), ("localhost", "127.0.0.1", "::1")
        )
        with open(cert, "rb") as f:
            self.cert_pem = f.read()
        main = nginx_config(
            self.directory, https=self.https, http=http, upstream=upstream, key=key, cert=cert
        )
        out, err, code = yield getProcessOutputAndValue(
            nginx, ["-t", "-e", "stderr", "-p", self.directory, "-c", main], env={}
        )
        self.assertEqual(code, 0, (out + err).decode())
        self.nginx = TwistdProcess()
        reactor.spawnProcess(
            self.nginx, nginx, [nginx, "-e", "stderr", "-p", self.directory, "-c", main], env={}
        )
        self.addCleanup(self.stop_nginx)
        self.http = http
        self.agent = Agent(
            reactor,
            contextFactory=BrowserLikePolicyForHTTPS(ssl.Certificate.loadPEM(self.ca_pem)),
        )
        for _ in range(100):
            try:
                code, body = yield self.get("/healthz")
                break
            except Exception:
                self.assertFalse(self.nginx.ended.called, self.nginx.output.decode())
                yield wait(0.1)
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))

    @inlineCallbacks
    def stop_nginx(self):  # type: ignore[no-untyped-def]
        """TERM (the master stops its workers), KILL if it hangs."""
        if self.nginx.ended.called:
            return
        self.nginx.transport.signalProcess("TERM")
        timer = reactor.callLater(10, self.nginx.transport.signalProcess, "KILL")
        yield self.nginx.ended
        if timer.active():
            timer.cancel()

    @inlineCallbacks
    def get(self, path: str, headers: dict[bytes, bytes] | None = None, host: str = "localhost"):  # type: ignore[no-untyped-def]
        """GET through nginx over TLS, the chain checked against the test CA."""
        url = f"https://{host}:{self.https}{path}".encode()
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        response = yield self.agent.request(b"GET", url, sent)
        body = yield readBody(response)
        return response.code, body

    def audit_events(self) -> list[dict[str, Any]]:
        with open(self.audit) as f:
            return [json.loads(line) for line in f]

    @inlineCallbacks
    def test_console_through_nginx(self):  # type: ignore[no-untyped-def]
        # Plain HTTP only redirects; /metrics is not for the world.
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.http}/console/7/vnc".encode()
        )
        self.assertEqual(response.code, 301)
        self.assertEqual(
            response.headers.getRawHeaders(b"location"),
            [b"https://127.0.0.1/console/7/vnc"],
        )
        code, _ = yield self.get("/metrics")
        self.assertEqual(code, 404)
        # A forged X-Forwarded-For is replaced by nginx with the real address.
        code, body = yield self.get(
            "/api/vm/7/guacamole/vnc",
            {b"Authorization": basic("alice", "wonderland"), b"X-Forwarded-For": b"203.0.113.9"},
            host="127.0.0.1",
        )
        self.assertEqual(code, 200, body)

        browser = yield Browser.start(self, extra_args=[trust_key(self.cert_pem)])
        # Guacamole: the page, its libraries and the /guacamole WebSocket through nginx.
        shown = yield open_guacamole_console(browser, self.guacd, f"{self.origin}/console/7/vnc")
        self.assertEqual(shown["status"], 200)
        self.assertEqual((shown["state"], shown["mode"]), ("connected", "guacamole"), shown)
        # noVNC: the /rfb WebSocket through nginx to a real x11vnc.
        opened = yield browser.command(
            "open",
            url=f"{self.origin}/console/7/vnc?mode=rfb",
            user="alice",
            password="wonderland",
        )
        shown = yield browser.command("wait_state", states=["connected", "error"], timeout=15000)
        self.assertEqual((shown["state"], shown["mode"]), ("connected", "rfb"), shown)
        yield browser.stop()
        for _ in range(50):
            closed = [e for e in self.audit_events() if e["event"] == "session_closed"]
            if len(closed) == 2:
                break
            yield wait(0.1)
        opened = [e for e in self.audit_events() if e["event"] == "session_opened"]
        # The browser (::1) is the client, not nginx (127.0.0.1): X-Forwarded-For was used.
        self.assertEqual(
            sorted((e["relay"], e["client"]) for e in opened),
            [("guacamole", "::1"), ("rfb", "::1")],
        )
        log = self.consoleproxy.output.decode()
        self.assertIn('"::1" - - ', log)
        self.assertNotIn("203.0.113.9", log)
        self.assertNotIn(b"[emerg]", self.nginx.output)
