"""
What the adversarial tests share: a consoleproxy in front of the fake guacd
with one honest session open beside the attacks, which must keep relaying
both ways whatever the attacker does, and attack sessions opened with a raw
WebSocket client (L{tests.helpers.rawws}).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from consoleproxy.guacamole.instructions import encode
from consoleproxy.tokens import KeyRing
from tests.helpers.fakeguacd import Behaviour, FakeGuacd, FakeGuacdConnection
from tests.helpers.rawws import RawWebSocket, close_frame, raw_connect, raw_open
from tests.helpers.support import start_server, wait
from tests.relay.test_guacamole_relay import ALICE, UUID, VNC, RelayTestCase


@inlineCallbacks
def until(condition: Callable[[], bool], what: str = "condition", timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """Poll C{condition} every 10 ms of real time; fail after C{timeout} seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield wait(0.01)


class AdversaryTestCase(RelayTestCase):
    """
    A fake guacd and a consoleproxy (with a key ring the test knows), and an
    honest session (guacd connection 1) open before every test.
    """

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.guacd = FakeGuacd(reactor, behaviour=self.behaviour)
        yield self.guacd.start()
        self.addCleanup(self.guacd.stop)
        self.server = yield self.start_proxy()
        self.honest = yield self.open()
        self.honest_guacd = yield self.guacd.wait_for_connection(1)
        self.assertRegex((yield self.honest.wait_messages(1))[0], UUID)
        self._rounds = 0

    def start_proxy(self) -> Any:
        """Start the consoleproxy under attack (keys in C{self.keyring}); fire with it."""
        self.keyring = KeyRing([os.urandom(32)])
        return start_server(self, guacd_port=self.guacd.port, keyring=self.keyring)

    def behaviour(self, number: int) -> Behaviour:  # type: ignore[override]
        """The fake guacd's script for its C{number}-th connection."""
        return Behaviour()

    @inlineCallbacks
    def assert_undisturbed(self):  # type: ignore[no-untyped-def]
        """The honest session still relays both ways, in order, and is open."""
        self._rounds += 1
        mark = str(90000 + self._rounds)
        count = len(self.honest.messages)
        self.honest_guacd.send("name", mark)
        messages = yield self.honest.wait_messages(count + 1)
        self.assertEqual(messages[-1], encode("name", mark))
        self.honest.send(encode("key", mark, "1"))
        yield until(lambda: ["key", mark, "1"] in self.honest_guacd.received, "honest input")
        self.assertFalse(self.honest.closed.called)
        self.assertEqual(self.honest_guacd.state, "running")

    def other_connections(self) -> list[FakeGuacdConnection]:
        """guacd's connections but the honest session's."""
        return self.guacd.connections[1:]

    @inlineCallbacks
    def raw(self, path: str, protocols: tuple[str, ...] = ("guacamole",)):  # type: ignore[no-untyped-def]
        """A raw client's upgrade to C{path}, answered; aborted at cleanup."""
        client = yield raw_open(self.server.port, path, protocols)
        self.addCleanup(self._abort, client)
        return client

    @inlineCallbacks
    def raw_request(self, request: bytes):  # type: ignore[no-untyped-def]
        """Send C{request} as it is; fire with the raw client once the server answered."""
        client = yield raw_connect(self.server.port, request)
        self.addCleanup(self._abort, client)
        yield client.response
        return client

    @inlineCallbacks
    def attack_session(self, console: Any = VNC):  # type: ignore[no-untyped-def]
        """An open session of the attacker's (a real token): (raw client, its guacd connection)."""
        token = self.server.tokens.seal(ALICE, console)
        before = len(self.guacd.connections)
        client = yield self.raw(f"/guacamole?token={token}")
        self.assertEqual(client.status, 101)
        self.assertRegex((yield client.wait_messages(1))[0], UUID)
        self.assertEqual(len(self.guacd.connections), before + 1)
        return client, self.guacd.connections[-1]

    @inlineCallbacks
    def closed_with(self, client: RawWebSocket, expected: tuple[int, str]):  # type: ignore[no-untyped-def]
        """
        The server closed C{client} with C{expected} (code, reason): answer the
        close as a browser would and wait until the socket is gone.
        """
        code, reason = yield client.closed
        if code is not None and client.transport.connected:
            client.send(close_frame(code))
        yield client.lost
        self.assertEqual((code, reason), expected)

    @inlineCallbacks
    def refused_before_guacd(self, path: str, expected: tuple[int, str] = (1008, "769")):  # type: ignore[no-untyped-def]
        """C{path} is accepted and closed at once with C{expected}; guacd never hears of it."""
        before = len(self.guacd.connections)
        client = yield self.raw(path)
        self.assertEqual(client.status, 101, client.body[:200])
        yield self.closed_with(client, expected)
        self.assertEqual(client.messages(), [])
        self.assertEqual(len(self.guacd.connections), before)

    @staticmethod
    def _abort(client: RawWebSocket) -> Any:
        if client.transport is not None and client.transport.connected:
            client.transport.abortConnection()
        return client.lost
