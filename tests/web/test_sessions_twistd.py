"""
The live sessions API in a real ``twistd`` with the fake guacd, over real
sockets: a console opened over WebSocket is listed (all for the
administrator, their own for the owner, nothing for another user), ended by
``DELETE`` (the browser gets 1002 "523 ended by an administrator", guacd
``disconnect``), and the audit log says who ended which session.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.helpers.support import admin_inventory, basic, get_json, http_request
from tests.helpers.twistd import Served, fake_guacd, serve
from tests.helpers.wsclient import GuacamoleClient, connect

ROOT = basic("root", "toor")
ALICE = basic("alice", "wonderland")
BOB = basic("bob", "builder")
#: The close a killed session ends with: SESSION_CLOSED's WebSocket code, its status and words.
KILLED = (1002, "523 ended by an administrator")


@inlineCallbacks
def open_console(server: Served, authorization: bytes = ALICE):  # type: ignore[no-untyped-def]
    """A token for alice's VM 7 from C{server}, then its console open over WebSocket."""
    code, _, body = yield get_json(server.url("/api/vm/7/guacamole/vnc"), authorization)
    assert code == 200, body
    client: GuacamoleClient = yield connect(
        f"ws://127.0.0.1:{server.port}/guacamole?token={body['data']}&width=800&height=600"
    )
    yield client.opened
    yield client.wait_messages(1)
    return client


@inlineCallbacks
def ask(server: Served, path: str, authorization: bytes | None, method: bytes = b"GET"):  # type: ignore[no-untyped-def]
    """(status, JSON answer) of C{method} C{path}."""
    headers = {b"Authorization": authorization} if authorization else {}
    code, _, body = yield http_request(server.port, path, method, headers)
    return code, json.loads(body)


def audit_events(server: Served, event: str) -> list[dict[str, Any]]:
    with open(server.audit) as f:
        return [e for e in map(json.loads, f) if e["event"] == event]


class SessionsUnderTwistdTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_list_and_kill(self):  # type: ignore[no-untyped-def]
        guacd = yield fake_guacd(self)
        server = yield serve(self, guacd, inventory=admin_inventory())
        client = yield open_console(server)
        conn = guacd.connections[-1]

        code, answer = yield ask(server, "/api/sessions", ROOT)
        self.assertEqual(code, 200, answer)
        (listed,) = answer["data"]
        self.assertEqual(
            (listed["user"], listed["vm"], listed["type"], listed["client"]),
            ("alice", "7", "vnc", "127.0.0.1"),
        )
        self.assertGreater(listed["bytes_to_browser"], 0)  # the tunnel id at least
        self.assertEqual((listed["viewers"], listed["recording"]), (0, None))
        session_id = listed["id"]
        code, answer = yield ask(server, "/api/sessions", ALICE)
        self.assertEqual((code, [s["id"] for s in answer["data"]]), (200, [session_id]))
        code, answer = yield ask(server, "/api/sessions", BOB)
        self.assertEqual((code, answer["data"]), (200, []))

        # Not for the owner, nor anyone but an administrator; garbage and unknown ids.
        for who in (ALICE, BOB):
            code, _ = yield ask(server, f"/api/sessions/{session_id}", who, b"DELETE")
            self.assertEqual(code, 403)
        code, _ = yield ask(server, "/api/sessions/nonsense", ROOT, b"DELETE")
        self.assertEqual(code, 400)
        code, _ = yield ask(server, f"/api/sessions/{'0' * 32}", ROOT, b"DELETE")
        self.assertEqual(code, 404)
        self.assertFalse(client.closed.called)

        code, answer = yield ask(server, f"/api/sessions/{session_id}", ROOT, b"DELETE")
        self.assertEqual((code, answer["data"]["id"]), (200, session_id))
        self.assertEqual((yield client.closed), KILLED)
        yield conn.closed
        self.assertEqual(conn.ended_by, "disconnect")
        self.assertIn(["disconnect"], conn.received)
        code, answer = yield ask(server, "/api/sessions", ROOT)
        self.assertEqual(answer["data"], [])

        (killed,) = audit_events(server, "session_killed")
        self.assertEqual(
            (killed["by"], killed["session"], killed["user"], killed["vm"]),
            ("root", session_id, "alice", "7"),
        )
        (closed,) = audit_events(server, "session_closed")
        self.assertEqual((closed["session"], closed["status"]), (session_id, 523))
        self.assertEqual(closed["reason"], "ended by an administrator: by root")
