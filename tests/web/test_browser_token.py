"""
The console page's token request carries the page's credentials the first time
(issue 13, item 19), in headless Chromium against the server as tap builds it.

Before, the page asked ``/api/vm/<id>/guacamole/<type>``, outside the protection
space the browser had authenticated for the page: the first request went out
without credentials, drew a 401 ("Token refused: 401 credentials required" in
the log, a refused token request in ``/metrics``), and the browser's retry carried
them.  Now the page asks ``/console/<id>/<type>/token``, below its own URL.

Skipped, naming the missing package, without node, chromium or the npm packages.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from consoleproxy.config import Config
from consoleproxy.relay.origins import OriginPolicy
from consoleproxy.tap import build_parts
from tests.helpers.browser import Browser, require_browser
from tests.helpers.consoleserver import console_inventory
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import http_request, write_inventory


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric family of a /metrics page, by their sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


class FirstTokenRequestTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        require_browser()
        self.guacd = FakeGuacd(reactor)
        yield self.guacd.start()
        self.addCleanup(self.guacd.stop)
        directory = os.path.abspath(self.mktemp())
        config = Config.load(
            overrides={
                "key_file": os.path.join(directory, "keys"),
                "inventory": write_inventory(directory, console_inventory()),
                "guacd": f"tcp:127.0.0.1:{self.guacd.port}",
            }
        )
        parts = build_parts(config, reactor)
        self.table = parts["table"]
        listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            parts["site"]
        )
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        origins = OriginPolicy([f"http://127.0.0.1:{self.port}"], allow_missing=False)
        parts["relay"].policy.origins = origins
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.browser = yield Browser.start(self)

    @inlineCallbacks
    def metrics(self):  # type: ignore[no-untyped-def]
        """The server's /metrics, as text."""
        code, _, body = yield http_request(self.port, "/metrics")
        self.assertEqual(code, 200)
        return body.decode("utf-8")

    @inlineCallbacks
    def open_and_connect(self, path: str, connection: int):  # type: ignore[no-untyped-def]
        """Open the console page with alice's credentials; wait for guacd's C{connection}."""
        opened = yield self.browser.command(
            "open",
            url=f"http://127.0.0.1:{self.port}{path}",
            user="alice",
            password="wonderland",
        )
        self.assertEqual(opened["status"], 200)
        conn = yield self.guacd.wait_for_connection(connection)
        self.assertEqual(conn.connect["hostname"], "127.0.0.1")

    @inlineCallbacks
    def test_console_opens_without_a_refused_token_request(self):  # type: ignore[no-untyped-def]
        # Connection 1 is /api/console-modes asking whether guacd is reachable; 2 the console.
        yield self.open_and_connect("/console/7/vnc", 2)
        # And the same page under /fireedge, and Reconnect (a new token from the same page).
        yield self.open_and_connect("/fireedge/console/7/vnc", 3)
        yield self.browser.command("click", selector="#reconnect")
        yield self.guacd.wait_for_connection(4)

        text = yield self.metrics()
        token_requests = samples(text, "consoleproxy_api_requests_total")
        self.assertEqual(
            {
                labels: value
                for labels, value in token_requests.items()
                if ("route", "token") in labels
            },
            {(("code", "200"), ("route", "token")): 3.0},
        )
        self.assertEqual(samples(text, "consoleproxy_token_refusals_total"), {})
        self.assertEqual(samples(text, "consoleproxy_session_refusals_total"), {})
        lines = [formatEvent(event) for event in self.events]
        self.assertEqual([line for line in lines if "Token refused" in line], [])
        self.assertEqual(len([line for line in lines if line.startswith("Token issued")]), 3)

    @inlineCallbacks
    def test_busy_server_says_when_to_try_again(self):  # type: ignore[no-untyped-def]
        # A 503 with Retry-After (here: draining; likewise a full queue of password checks
        # or a spent failed-login budget) is shown with when to press Reconnect.
        self.table.draining = True
        self.addCleanup(setattr, self.table, "draining", False)
        opened = yield self.browser.command(
            "open",
            url=f"http://127.0.0.1:{self.port}/console/7/vnc",
            user="alice",
            password="wonderland",
        )
        self.assertEqual(opened["status"], 200)
        shown = yield self.browser.command("wait_state", states=["error"], timeout=15000)
        self.assertIn("cannot take this request now: the server is shutting down.", shown["error"])
        self.assertIn("Press Reconnect in 30 s.", shown["error"])
