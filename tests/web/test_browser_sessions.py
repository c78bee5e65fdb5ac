"""
The console page in headless Chromium (Guacamole and noVNC paths) when an
administrator ends its session (the sessions API's kill): it says so in words,
"ended by an administrator".
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest

from consoleproxy.consoles import Identity
from consoleproxy.relay.live_sessions import LiveSessions
from tests.helpers.consoleserver import start_console_server
from tests.helpers.fakeguacd import FakeGuacd
from tests.web.test_browser import BrowserTestCase


class KilledSessionPageTests(BrowserTestCase):
    @inlineCallbacks
    def kill_and_read(self, table):  # type: ignore[no-untyped-def]
        """End the one session of C{table} as an administrator; the page says so."""
        live = LiveSessions(table)
        (session,) = yield live.listing(Identity("root", admin=True))
        yield live.end(Identity("root", admin=True), session.id, "by root")
        shown = yield self.wait_state("error")
        self.assertIn("The session was ended by an administrator.", shown["error"])
        self.assertIn("523", shown["error"])

    @inlineCallbacks
    def test_page_says_ended_by_an_administrator(self):  # type: ignore[no-untyped-def]
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        server = yield start_console_server(self, guacd=f"tcp:127.0.0.1:{guacd.port}")
        yield self.open_console(server.url("/console/7/vnc"))
        conn = yield guacd.wait_for_connection(2)  # 1 is /api/console-modes' probe
        conn.send("size", "0", "400", "300")
        conn.send_sync(1)
        shown = yield self.wait_state("connected", "error")
        self.assertEqual(shown["state"], "connected", shown)

        yield self.kill_and_read(server.relay.table)
        yield conn.closed
        self.assertEqual(conn.ended_by, "disconnect")

    @inlineCallbacks
    def test_novnc_page_says_ended_by_an_administrator(self):  # type: ignore[no-untyped-def]
        try:
            from tests.helpers.realservers import start_vnc_desktop  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover - the fixture module is part of tests/
            raise SkipTest(f"tests.helpers.realservers is not available: {e}") from e
        desktop = yield start_vnc_desktop(self, reactor, width=320, height=240, password="vp")
        self.addCleanup(desktop.stop)
        server = yield start_console_server(
            self, guacd=None, vnc_port=desktop.port, vnc_password="vp"
        )
        yield self.open_console(server.url("/console/7/vnc"), in_url=True)
        shown = yield self.wait_state("connected", "error")
        self.assertEqual((shown["state"], shown["mode"]), ("connected", "rfb"), shown)

        yield self.kill_and_read(server.rfb.table)
