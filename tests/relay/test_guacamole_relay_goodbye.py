"""
When the browser's side ends, guacd hears ``disconnect`` before its socket
closes, however the session ends: the browser closing or vanishing, the idle
and absolute timeouts, drain, and the hop to another zone (whose proxy tells
its own guacd).  guacd 1.6 would otherwise notice the closed socket only when
it next writes: for an idle SSH console, 15 s later with "User is not
responding".  The fake guacd records which came first (``ended_by``).
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from consoleproxy.guacamole.instructions import encode
from consoleproxy.relay.sessions import SessionTable
from tests.helpers.support import wait
from tests.relay.test_federation import FederationTestCase
from tests.relay.test_guacamole_relay import GOODBYE, RelayTestCase
from tests.relay.test_sessions import RelayPolicyTestCase


class BrowserLeavesTests(RelayTestCase):
    @inlineCallbacks
    def test_browser_close(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        client.sendMessage(encode("key", "65", "1").encode())
        client.sendClose(1000)
        yield conn.closed
        self.assertEqual(conn.ended_by, "disconnect")
        self.assertEqual(conn.received, [["key", "65", "1"], *GOODBYE])

    @inlineCallbacks
    def test_not_after_guacd_ended_the_session(self):  # type: ignore[no-untyped-def]
        """guacd's own 'error' ended it: nothing more is written to guacd."""
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        conn.send_error("Aborted. See logs.", 519)
        yield client.closed
        yield conn.closed
        self.assertEqual(conn.received, [])


class PolicyEndsTests(RelayPolicyTestCase):
    @inlineCallbacks
    def ended_by_policy(self, expected: tuple[int, str], **policy: float):  # type: ignore[no-untyped-def]
        """The policy ends the session with C{expected}; guacd heard the goodbye first."""
        yield self.start(**policy)
        client = yield self.connect()
        conn = yield self.guacd.wait_for_connection()
        self.assertEqual((yield client.closed), expected)
        yield conn.closed
        self.assertEqual((conn.ended_by, conn.received), ("disconnect", GOODBYE))

    def test_idle_timeout(self):  # type: ignore[no-untyped-def]
        return self.ended_by_policy((1002, "522"), idle_timeout=0.3)

    def test_absolute_limit(self):  # type: ignore[no-untyped-def]
        return self.ended_by_policy((1002, "523"), session_timeout=0.3)

    @inlineCallbacks
    def test_drain(self):  # type: ignore[no-untyped-def]
        table = SessionTable(reactor, max_total=10, max_per_user=10)
        yield self.start(table=table)
        client = yield self.connect()
        conn = yield self.guacd.wait_for_connection()
        drained = table.drain(0.2)
        self.assertEqual((yield client.closed), (1001, "523"))
        yield drained
        yield conn.closed
        self.assertEqual((conn.ended_by, conn.received), ("disconnect", GOODBYE))


class ZoneHopTests(FederationTestCase):
    @inlineCallbacks
    def test_browser_leaving_tells_the_remote_zones_guacd(self):  # type: ignore[no-untyped-def]
        client = yield self.browser(path="guacamole")
        yield client.opened
        conn = yield self.guacd.wait_for_connection()
        yield wait(0.1)
        client.transport.abortConnection()
        yield conn.closed
        self.assertEqual((conn.ended_by, conn.received), ("disconnect", GOODBYE))
