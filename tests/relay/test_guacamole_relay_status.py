"""
Why a console closed, in the status the browser gets (item 10 of issue 13):

  - guacd itself unreachable: UPSTREAM_NOT_FOUND (519, WebSocket 1011), as
    Apache's guacamole-common reports it, not an internal error (512): see
    test_guacamole_relay.GuacdUnreachableTests.
  - guacd 1.6 ending a session with a bare ``disconnect`` before it drew
    anything (the VM's console could not be reached): the browser gets an
    ``error`` with 519 just before the ``disconnect``, and the close says 519.
  - A bare ``disconnect`` after the console drew (a ``sync``) is an ordinary
    end: no error, close 1000 "0".
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks

from consoleproxy.consoles import Console
from consoleproxy.guacamole.guacd import UNREACHABLE_CONSOLE
from consoleproxy.guacamole.instructions import encode
from tests.helpers.fakeguacd import Behaviour
from tests.relay.test_guacamole_relay import RelayTestCase

#: A VNC console nobody listens for (a refused connection, at once).
UNREACHABLE = Console(7, "vnc", {"hostname": "127.0.0.1", "port": "1", "password": "x"})


class BareDisconnectTests(RelayTestCase):
    def behaviour(self) -> Behaviour:
        return Behaviour(upstream=True, unreachable_disconnect=True)

    @inlineCallbacks
    def test_vm_unreachable_bare_disconnect_is_519(self):  # type: ignore[no-untyped-def]
        client = yield self.open(console=UNREACHABLE)
        conn = yield self.guacd.wait_for_connection()
        self.assertEqual((yield client.closed), (1011, "519"))
        error = encode("error", UNREACHABLE_CONSOLE, "519")
        self.assertTrue(client.text().endswith(error + encode("disconnect")), client.text())
        self.assertEqual(conn.upstream_banner, None)


class OrdinaryDisconnectTests(RelayTestCase):
    @inlineCallbacks
    def test_disconnect_after_a_frame_is_a_clean_end(self):  # type: ignore[no-untyped-def]
        client = yield self.open()
        conn = yield self.guacd.wait_for_connection()
        conn.send_sync()
        yield client.wait_messages(2)
        conn._finish_user()
        self.assertEqual((yield client.closed), (1000, "0"))
        self.assertNotIn("5.error,", client.text())
        self.assertTrue(client.text().endswith(encode("disconnect")))
