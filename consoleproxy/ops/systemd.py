"""
systemd's readiness protocol (``sd_notify``) for ``Type=notify`` units.

systemd starts the units that need consoleproxy (nginx in front of it, say)
only once it says ``READY=1``, and it should say so only when every
``--listen`` endpoint is really listening (a port already taken must not
look like a started service).  At shutdown ``STOPPING=1`` tells systemd that
the sessions are draining, so it waits (``TimeoutStopSec``) instead of
thinking the service hung.  The protocol is one datagram per message to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
abstract namespace); outside systemd the variable is unset and nothing is
sent.  A failure to send is logged, never fatal: the service works without.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import gatherResults
from twisted.logger import Logger

log = Logger()


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{message} (``KEY=value`` lines) to ``$NOTIFY_SOCKET``.

    @return: whether it was sent (C{False} outside systemd or on an error,
        which is logged).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warn("NOTIFY_SOCKET is neither a path nor @abstract: not notifying systemd")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            sender.sendto(message.encode("utf-8"), address)
    except OSError as e:
        log.warn("Could not notify systemd ({message}): {error}", message=message, error=e)
        return False
    return True


class SystemdNotifier(Service):
    """
    ``READY=1`` once every listening service listens, ``STOPPING=1`` when
    stopping.

    Added to the service tree after the listening services, so that it stops
    first: systemd hears ``STOPPING=1`` as the drain begins.
    """

    def __init__(
        self,
        reactor: Any,
        listening: Iterable[StreamServerEndpointService],
        environ: Mapping[str, str] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """
        @param listening: the services whose endpoints must listen first.
        @param environ: where ``NOTIFY_SOCKET`` is read (default: os.environ).
        @param on_ready: called too once every endpoint listens (a worker
            tells its main process, which tells systemd once all are ready).
        """
        self.on_ready = on_ready
        self.reactor = reactor
        self.listening = list(listening)
        self.environ = environ
        self.ready_sent = False

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._when_listening)

    def _when_listening(self) -> None:
        # StreamServerEndpointService keeps its listen() result there: the
        # port, or None once it has logged why listening failed.
        waiting = [service._waitingForPort for service in self.listening]
        gatherResults([w for w in waiting if w is not None]).addCallback(self._listened)

    def _listened(self, ports: list[Any]) -> None:
        if not self.running:
            return
        if any(port is None for port in ports) or len(ports) < len(self.listening):
            notify("STATUS=could not listen on every endpoint (see the log)", self.environ)
            return
        if self.on_ready is not None:
            self.on_ready()
        addresses = ", ".join(str(port.getHost()) for port in ports)
        self.ready_sent = notify(f"READY=1\nSTATUS=listening on {addresses}", self.environ)

    def stopService(self) -> None:
        super().stopService()
        notify("STOPPING=1\nSTATUS=draining the console sessions", self.environ)
