"""
Writing to a TCP socket at once, instead of on the reactor's next turn.

Twisted's C{transport.write} only queues: the reactor registers the socket
for writing with epoll, sends on its next turn, then unregisters it.  For a
console's stream of small messages (a key, an echo, a screen update) that is
two extra epoll calls and one extra reactor turn per message each way, and
it showed as the largest cost of a round trip in C{bench/} (more than the
relay's own work).  So when nothing is queued on a plain TCP transport, the
bytes are sent straight away; whatever the kernel does not take is queued
with C{transport.write} as usual, which keeps Twisted's backpressure
(producers are paused as the queue grows) and its error handling (a failed
send is left to Twisted to find and report).

Any other transport (TLS, UNIX sockets, test transports) just gets
C{writeSequence}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.tcp import Connection


def write_now(transport: Any, parts: Sequence[bytes]) -> None:
    """Write C{parts} (in order) to C{transport}, sending at once when it can."""
    if (
        isinstance(transport, Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.sendmsg(parts)
        except OSError:
            sent = 0  # full (EAGAIN) or broken: Twisted's own write finds out which
        if sent:
            parts = _rest(parts, sent)
            if not parts:
                return
    transport.writeSequence(parts)


def _rest(parts: Sequence[bytes], sent: int) -> list[bytes]:
    """What is left of C{parts} once the first C{sent} bytes are gone."""
    rest = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        rest.append(part[sent:] if sent else part)
        sent = 0
    return rest
