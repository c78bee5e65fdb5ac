"""
How guacd reaches a console: directly, or through an SSH tunnel.

The policy maps hypervisor host patterns (and OpenNebula cluster ids) to
``direct``, ``ssh`` or ``auto``; ``auto`` tests the console's port once, with
a short timeout, from this host, and remembers the answer for a while.

A tunnelled console gets its own listener, on an address guacd can reach and
an ephemeral port (or one from a configured range).  It accepts exactly one
connection (optionally only from guacd's address), then stops listening; it
gives up if guacd has not connected in time, and closes with the console.
The ``direct-tcpip`` channel is opened before guacd is asked to connect, so
a closed port or an unreachable hypervisor ends the console with a clear
status before guacd is even involved.
"""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from consoleproxy.consoles import Console
from consoleproxy.guacamole.status import Status
from consoleproxy.interfaces import ITunnels
from consoleproxy.net.factories import quiet_factory
from consoleproxy.tunnels.ssh import DirectTcpipChannel, SSHPool, TunnelError

MODES = ("direct", "ssh", "auto")


@dataclass(frozen=True)
class TunnelRule:
    """Hosts (fnmatch patterns) and/or OpenNebula clusters that get C{mode}."""

    mode: str
    hosts: tuple[str, ...] = ()
    clusters: frozenset[str] = frozenset()
    user: str | None = None
    port: int | None = None

    def matches(self, host: str, cluster: str | None) -> bool:
        """Whether this rule covers the hypervisor C{host} (in C{cluster})."""
        if cluster is not None and cluster in self.clusters:
            return True
        return any(fnmatch.fnmatchcase(host.lower(), p.lower()) for p in self.hosts)


@dataclass(frozen=True)
class TunnelSettings:
    """Policy and listener settings; see the ``[tunnels]`` configuration section."""

    default_mode: str = "direct"
    rules: tuple[TunnelRule, ...] = ()
    user: str = "oneadmin"
    ssh_port: int = 22
    #: Where the channel goes, seen from the hypervisor (VNC listens there).
    target: str = "127.0.0.1"
    #: Where the per-console listener listens: an address guacd can reach.
    listen_address: str = "127.0.0.1"
    port_range: tuple[int, int] | None = None
    #: Accept the listener's one connection only from this address.
    guacd_address: str | None = None
    #: Seconds guacd gets to connect to the listener (its handshake included).
    accept_timeout: float = 20.0
    #: Seconds to set a tunnel up (SSH login and channel).
    setup_timeout: float = 15.0
    probe_timeout: float = 2.0
    probe_cache: float = 300.0
    types: frozenset[str] = field(default_factory=lambda: frozenset({"vnc"}))


@dataclass(eq=False)
class Route:
    """
    The way to one console: the parameters guacd gets, and how to end it.

    @ivar on_lost: set by the relay; called with a L{TunnelError} when the
        tunnel breaks under a running console.
    """

    parameters: Mapping[str, str] = field(repr=False)
    tunnelled: bool = False
    on_lost: Callable[[TunnelError], None] | None = None
    _close: Callable[[], None] | None = None

    def close(self) -> None:
        """Release the route (idempotent)."""
        close, self._close = self._close, None
        if close is not None:
            close()


@implementer(ITunnels)
class DirectRoutes:
    """Every console is reached directly (no tunnels configured)."""

    def route(self, console: Console) -> Deferred[Route]:
        """The console's own parameters."""
        return succeed(Route(dict(console.parameters)))


@implementer(ITunnels)
class Tunnels:
    """Decides direct or SSH per console, and builds SSH routes."""

    log = Logger()

    def __init__(self, reactor: Any, settings: TunnelSettings, pool: SSHPool) -> None:
        self.reactor = reactor
        self.settings = settings
        self.pool = pool
        self._probes: dict[str, tuple[float, bool]] = {}
        self.routes: set[Route] = set()

    @property
    def active(self) -> int:
        """SSH tunnels in use now: one per tunnelled console (its listener and channel)."""
        return len(self.routes)

    def rule_for(self, host: str, cluster: str | None) -> TunnelRule:
        """The first matching rule, else the default."""
        for rule in self.settings.rules:
            if rule.matches(host, cluster):
                return rule
        return TunnelRule(mode=self.settings.default_mode)

    @inlineCallbacks
    def route(self, console: Console):  # type: ignore[no-untyped-def]
        """Fire with a L{Route} for C{console}, or fail with L{TunnelError}."""
        parameters = dict(console.parameters)
        if console.console_type not in self.settings.types:
            return Route(parameters)
        host, port = parameters["hostname"], int(parameters["port"])
        rule = self.rule_for(host, console.cluster)
        mode = rule.mode
        if mode == "auto":
            reachable = yield self._reachable(host, port)
            mode = "direct" if reachable else "ssh"
        if mode == "direct":
            return Route(parameters)
        setup = self._ssh_route(console, parameters, rule)
        setup.addTimeout(self.settings.setup_timeout, self.reactor, onTimeoutCancel=self._slow)
        route = yield setup
        return route

    def _slow(self, result: Any, timeout: float) -> Failure:
        return Failure(
            TunnelError(Status.UPSTREAM_TIMEOUT, f"SSH tunnel not ready within {timeout:g} s")
        )

    @inlineCallbacks
    def _ssh_route(self, console: Console, parameters: dict[str, str], rule: TunnelRule):  # type: ignore[no-untyped-def]
        host = parameters["hostname"]
        ssh_host = self.pool.host(
            host, rule.port or self.settings.ssh_port, rule.user or self.settings.user
        )
        target = (self.settings.target, int(parameters["port"]))
        chan: DirectTcpipChannel = yield ssh_host.open_channel(target, ("127.0.0.1", 0))
        try:
            listener = yield _OneShotListener.start(self, chan)
        except BaseException:
            chan.loseConnection()
            raise
        route = Route(
            {**parameters, "hostname": self.settings.listen_address, "port": str(listener.port)},
            tunnelled=True,
        )

        def close() -> None:
            # The console is over: what is still buffered for guacd is moot.
            self.routes.discard(route)
            listener.close(abort=True)
            chan.loseConnection()

        def lost(_: object) -> None:
            # The hypervisor's side ended: guacd still gets what was sent.
            if route._close is None:
                return
            route._close = None
            self.routes.discard(route)
            listener.close(abort=False)
            if route.on_lost is not None:
                route.on_lost(
                    TunnelError(
                        Status.UPSTREAM_UNAVAILABLE,
                        f"{ssh_host.description}: the tunnel of VM {console.vm_id} closed",
                    )
                )

        route._close = close
        chan.closed_by_peer.addCallback(lost)
        self.routes.add(route)
        self.log.info(
            "Tunnel for VM {vm} via {ssh} to {target}:{port} on {address}:{local}",
            vm=console.vm_id,
            ssh=ssh_host.description,
            target=target[0],
            port=target[1],
            address=self.settings.listen_address,
            local=listener.port,
        )
        return route

    def _reachable(self, host: str, port: int) -> Deferred[bool]:
        now = self.reactor.seconds()
        cached = self._probes.get(host)
        if cached is not None and cached[0] > now:
            return succeed(cached[1])
        endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.settings.probe_timeout)

        def answer(reachable: bool) -> bool:
            self._probes[host] = (self.reactor.seconds() + self.settings.probe_cache, reachable)
            self.log.info(
                "Probed {host}:{port}: {how}",
                host=host,
                port=port,
                how="direct" if reachable else "not reachable, using SSH",
            )
            return reachable

        def connected(protocol: Protocol) -> bool:
            protocol.transport.abortConnection()
            return True

        d = endpoint.connect(quiet_factory(Protocol)).addCallbacks(connected, lambda _: False)
        return d.addCallback(answer)


class _Splice(Protocol):
    """guacd's connection to the listener, spliced to the channel."""

    def __init__(self, chan: DirectTcpipChannel) -> None:
        self.chan = chan

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.chan, True)
        self.chan.attach(self.transport.write, self.finish, self._hypervisor_full)

    def finish(self) -> None:
        """Close after what is buffered for guacd has been sent."""
        if self.transport is not None:
            # A transport with a registered producer never finishes closing.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _hypervisor_full(self, full: bool) -> None:
        if full:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.chan.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.chan.loseConnection()


class _OneShotListener(ServerFactory):
    """Accepts one connection (from the allowed address), then stops listening."""

    log = Logger()

    def __init__(self, tunnels: Tunnels, chan: DirectTcpipChannel) -> None:
        self.tunnels = tunnels
        self.chan = chan
        self.port = 0
        self._listening: Any = None
        self._accepted: _Splice | None = None
        self._timer: Any = None

    @classmethod
    @inlineCallbacks
    def start(cls, tunnels: Tunnels, chan: DirectTcpipChannel):  # type: ignore[no-untyped-def]
        """Listen on the configured address; fire with the listener."""
        self = cls(tunnels, chan)
        settings = tunnels.settings
        ports = [0]
        if settings.port_range is not None:
            low, high = settings.port_range
            ports = list(range(low, high + 1))
            start = random.randrange(len(ports))  # noqa: S311 - not security relevant
            ports = ports[start:] + ports[:start]
        endpoint_type = TCP6ServerEndpoint if ":" in settings.listen_address else TCP4ServerEndpoint
        for port in ports:
            try:
                self._listening = yield endpoint_type(
                    tunnels.reactor, port, interface=settings.listen_address
                ).listen(self)
                break
            except CannotListenError:
                continue
        else:
            raise TunnelError(
                Status.SERVER_BUSY,
                f"no free port for a tunnel in {settings.port_range} on {settings.listen_address}",
            )
        self.port = self._listening.getHost().port
        self._timer = tunnels.reactor.callLater(settings.accept_timeout, self._too_late)
        return self

    def buildProtocol(self, addr: Any) -> Protocol | None:
        allowed = self.tunnels.settings.guacd_address
        if self._accepted is not None or (allowed is not None and addr.host != allowed):
            self.log.warn(
                "Tunnel listener {port}: refused a connection from {peer}",
                port=self.port,
                peer=getattr(addr, "host", addr),
            )
            return None
        self._accepted = _Splice(self.chan)
        self._stop_listening()
        return self._accepted

    def _too_late(self) -> None:
        self._timer = None
        self.log.warn(
            "Tunnel listener {port}: guacd did not connect within {t:g} s",
            port=self.port,
            t=self.tunnels.settings.accept_timeout,
        )
        self.close(abort=True)
        self.chan.loseConnection()

    def _stop_listening(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._listening is not None:
            listening, self._listening = self._listening, None
            listening.stopListening()

    def close(self, abort: bool = True) -> None:
        """Stop listening; drop (C{abort}) or finish the accepted connection, if any."""
        self._stop_listening()
        if self._accepted is not None and self._accepted.transport is not None:
            if abort:
                self._accepted.transport.abortConnection()
            else:
                self._accepted.finish()
