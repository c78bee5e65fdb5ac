"""
Twisted factories for the connections consoleproxy makes (guacd, VNC
servers, SSH, probes): quiet, and one prepared protocol each.

Twisted's factories log "Starting factory" and "Stopping factory" for every
connection they make: two log lines per console session, which cost more
CPU than the rest of opening a session and say nothing useful.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory


class SingleProtocolFactory(Factory):
    """Hands out one prepared protocol instance, without log lines."""

    noisy = False

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Any:
        """The prepared protocol."""
        return self._protocol


def quiet_factory(protocol: type[Any]) -> Factory:
    """C{Factory.forProtocol(protocol)}, without log lines per connection."""
    factory = Factory.forProtocol(protocol)
    factory.noisy = False
    return factory
