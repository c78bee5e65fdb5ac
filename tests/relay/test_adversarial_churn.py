"""
1,000 sessions opened and closed over real sockets, in concurrent batches:
afterwards nothing is left behind (sessions, lingering upstreams, timers,
file descriptors, guacd connections), and the honest session kept relaying.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks

from tests.helpers.adversary import AdversaryTestCase, until
from tests.helpers.wsclient import connect
from tests.relay.test_guacamole_relay import ALICE, VNC

SESSIONS = 1000
BATCH = 50


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def new_timers(before: list[Any]) -> list[Any]:
    """
    Delayed calls of functions not scheduled in C{before}: periodic ones
    (guacd's keep-alive, the web site's clock) come back as new calls of the
    same function, and trial's own timeout is not the server's.
    """
    return [
        call
        for call in reactor.getDelayedCalls()
        if call.func not in before and "TestCase._run" not in getattr(call.func, "__qualname__", "")
    ]


class ChurnTests(AdversaryTestCase):
    @inlineCallbacks
    def one_session(self, number: int):  # type: ignore[no-untyped-def]
        """Open a session, relay one instruction, close it (half by close frame, half by abort)."""
        token = self.server.tokens.seal(ALICE, VNC)
        client = yield connect(self.server.ws_url(f"/guacamole?token={token}"))
        yield client.opened
        yield client.wait_messages(1)
        if number % 2:
            client.sendClose(1000)
        else:
            client.transport.abortConnection()
        yield client.closed

    def leftovers(self) -> tuple[int, int, int]:
        """(sessions, lingering upstreams, guacd connections still open) beyond the honest one."""
        relay = self.server.relay
        live = [c for c in self.guacd.connections if not c._lost]
        return len(relay.sessions) - 1, len(relay.lingering), len(live) - 1

    @inlineCallbacks
    def test_thousand_sessions_leave_nothing(self):  # type: ignore[no-untyped-def]
        fds = open_fds()
        timers = [call.func for call in reactor.getDelayedCalls()]
        for start in range(0, SESSIONS, BATCH):
            yield gatherResults([self.one_session(n) for n in range(start, start + BATCH)])
        self.assertEqual(len(self.guacd.connections), SESSIONS + 1)
        yield until(lambda: self.leftovers() == (0, 0, 0), "every session gone", 10)
        # Nothing scheduled survives them: Autobahn's timers, lingers, guacd's own.
        yield until(lambda: not new_timers(timers), "timers gone", 3)
        yield until(lambda: open_fds() <= fds, "descriptors closed", 10)
        self.assertEqual(self.server.relay.table.count_of("alice"), 1)
        yield self.assert_undisturbed()
