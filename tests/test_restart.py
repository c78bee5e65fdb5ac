"""
Single use across a restart, in real twistd processes: a token that opened a
session before the restart is refused after it (1008 "769"), within its
lifetime, because the spent ids live in a file beside the key file.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.support import basic, get_json
from tests.helpers.twistd import fake_guacd, serve
from tests.helpers.wsclient import connect


class RestartTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_spent_token_stays_spent_after_a_restart(self):  # type: ignore[no-untyped-def]
        guacd = yield fake_guacd(self)
        first = yield serve(self, guacd, grace=0.2)
        code, _, body = yield get_json(
            first.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
        )
        self.assertEqual(code, 200)
        token = body["data"]
        client = yield connect(f"ws://127.0.0.1:{first.port}/guacamole?token={token}")
        yield client.opened
        yield guacd.wait_for_connection()
        client.sendClose(1000)
        yield client.closed
        first.process.transport.signalProcess("TERM")
        yield first.process.ended

        # The same key file and state directory, a new process.
        second = yield serve(self, guacd, grace=0.2, directory=first.directory)
        replay = yield connect(f"ws://127.0.0.1:{second.port}/guacamole?token={token}")
        closed = yield replay.closed
        self.assertEqual(closed, (1008, "769"))
        # A token the new process mints still opens.
        code, _, body = yield get_json(
            second.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder")
        )
        fresh = yield connect(f"ws://127.0.0.1:{second.port}/guacamole?token={body['data']}")
        yield fresh.opened
        yield guacd.wait_for_connection()
        fresh.sendClose(1000)
        yield fresh.closed
