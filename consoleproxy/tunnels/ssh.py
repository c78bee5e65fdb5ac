"""
SSH connections to hypervisors, with Twisted Conch, carrying ``direct-tcpip``
channels: FireEdge's ``ssh -N -L`` child process per console, done in-process.

One connection per (host, port, user) carries every console to that host.
The connection is shared from its first attempt: consoles that arrive while
it is still connecting wait for the same attempt.  It is closed when its
last channel has been closed for a grace period, or when keepalives go
unanswered; a lost connection closes its channels, whose consoles end with a
clear status, and the next console connects afresh.

Host keys are checked against a known_hosts file by this module itself:
Conch's own C{KnownHostsFile.verifyHostKey} asks a user on a terminal, which
a daemon has not got.  Unknown keys are refused unless C{accept_new} is set,
in which case they are appended (never rewritten) to the file; changed keys
are always refused.

Flow control: Conch re-grants a channel's receive window as soon as data
arrives, which would let a hypervisor push data into memory faster than
guacd reads it.  Here a channel's window is re-granted only while its
consumer (the socket to guacd) is not paused, so at most one window per
channel is ever buffered.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from twisted.conch.client.knownhosts import HostKeyChanged, KnownHostsFile
from twisted.conch.error import ConchError
from twisted.conch.ssh import agent, channel, connection, forwarding, keys, userauth
from twisted.conch.ssh.transport import (
    DISCONNECT_HOST_KEY_NOT_VERIFIABLE,
    SSHClientTransport,
)
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from consoleproxy.guacamole.status import GuacamoleError, Status
from consoleproxy.net.factories import SingleProtocolFactory, quiet_factory

#: Bytes a channel may receive before we re-grant window: what one console
#: can have buffered between the hypervisor and guacd.
CHANNEL_WINDOW = 1024 * 1024
CHANNEL_MAX_PACKET = 32 * 1024
#: SSH_MSG_CHANNEL_OPEN_FAILURE reason codes (RFC 4254).
_ADMINISTRATIVELY_PROHIBITED = 1
_CONNECT_FAILED = 2


class TunnelError(GuacamoleError):
    """An SSH tunnel could not be made or was lost; the message says what to fix."""


@dataclass(frozen=True)
class SSHSettings:
    """
    How consoleproxy logs in to hypervisors.

    @ivar keys: private keys (already loaded and decrypted).
    @ivar agent_socket: an SSH agent's socket path, or None.
    @ivar known_hosts: the known_hosts file.
    @ivar accept_new: add unknown host keys to it instead of refusing.
    """

    known_hosts: str
    keys: tuple[keys.Key, ...] = field(default=(), repr=False)
    agent_socket: str | None = None
    accept_new: bool = False
    connect_timeout: float = 10.0
    keepalive_interval: float = 15.0
    keepalive_count: int = 3
    idle_grace: float = 30.0


def load_private_key(path: str, passphrase: bytes | None = None) -> keys.Key:
    """
    Load a private key file, decrypting it with C{passphrase}.

    @raise ValueError: naming the file (never the passphrase).
    """
    try:
        return keys.Key.fromFile(path, passphrase=passphrase)
    except keys.EncryptedKeyError as e:
        raise ValueError(f"{path} is encrypted: give its passphrase") from e
    except (keys.BadKeyError, OSError) as e:
        raise ValueError(f"cannot load private key {path}: {e}") from e


def known_hosts_name(host: str, port: int) -> bytes:
    """The name OpenSSH writes in known_hosts: ``host``, or ``[host]:port``."""
    return (host if port == 22 else f"[{host}]:{port}").encode("utf-8")


class _KnownHosts:
    """Checks host keys; appends new ones when allowed. One per file."""

    def __init__(self, path: str, accept_new: bool) -> None:
        self.path = path
        self.accept_new = accept_new

    def verify(self, host: str, port: int, key: keys.Key) -> None:
        """@raise TunnelError: unknown (and not accepted) or changed key."""
        name = known_hosts_name(host, port)
        fingerprint = "SHA256:" + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")
        try:
            known = KnownHostsFile.fromPath(FilePath(self.path)).hasHostKey(name, key)
        except HostKeyChanged as e:
            raise TunnelError(
                Status.UPSTREAM_ERROR,
                f"the SSH host key of {name.decode()} CHANGED ({fingerprint}); it differs from "
                f"{self.path} line {e.lineno}: check the host, then fix that line",
            ) from e
        if known:
            return
        if not self.accept_new:
            raise TunnelError(
                Status.UPSTREAM_ERROR,
                f"the SSH host key of {name.decode()} ({fingerprint}) is not in {self.path}: "
                f"add it (ssh-keyscan -p {port} {host} >> {self.path}) or set accept_new",
            )
        self._append(name, key)

    def _append(self, name: bytes, key: keys.Key) -> None:
        line = name + b" " + key.toString("openssh") + b"\n"
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


class DirectTcpipChannel(channel.SSHChannel):
    """
    A ``direct-tcpip`` channel whose receive window follows its consumer.

    @ivar opened: fires with the channel when the hypervisor accepted it, or
        fails with L{TunnelError}.
    @ivar sink: where received bytes go (a transport's C{write}), set by
        L{attach}; until then they are held, and the window is withheld.
    """

    name = b"direct-tcpip"
    _log = Logger()

    def __init__(self, target: tuple[str, int], description: str, **kwargs: Any) -> None:
        super().__init__(localWindow=CHANNEL_WINDOW, localMaxPacket=CHANNEL_MAX_PACKET, **kwargs)
        self.target = target
        self.description = description
        self.opened: Deferred[DirectTcpipChannel] = Deferred()
        self.closed_by_peer: Deferred[None] = Deferred()
        self.paused = True  # until attached
        self.withheld = 0
        self.bytes_received = 0
        self._held: list[bytes] = []
        self._sink: Callable[[bytes], None] | None = None
        self._on_close: Callable[[], None] | None = None
        self._writer_paused: Callable[[bool], None] | None = None

    def channelOpen(self, specificData: bytes) -> None:
        if self.opened.called:  # given up on meanwhile
            self.loseConnection()
        else:
            self.opened.callback(self)

    def openFailed(self, reason: Failure | ConchError) -> None:
        error = reason.value if isinstance(reason, Failure) else reason
        code = error.data if isinstance(error, ConchError) else None
        text = error.args[0] if error.args else str(error)
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        host, port = self.target
        if code == _ADMINISTRATIVELY_PROHIBITED:
            why = TunnelError(
                Status.UPSTREAM_ERROR,
                f"{self.description} refuses TCP forwarding ({text}): set AllowTcpForwarding yes",
            )
        else:
            why = TunnelError(
                Status.UPSTREAM_NOT_FOUND,
                f"{self.description} cannot reach {host}:{port} ({text}): is the console's "
                "port open on the hypervisor?",
            )
        if not self.opened.called:
            self.opened.errback(why)

    # -- data from the hypervisor ----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self._sink is None:
            self._held.append(data)
        else:
            self._sink(data)

    def attach(
        self,
        sink: Callable[[bytes], None],
        on_close: Callable[[], None],
        writer_paused: Callable[[bool], None],
    ) -> None:
        """
        Start delivering to C{sink}; C{on_close} runs when the channel ends;
        C{writer_paused(True/False)} when the hypervisor's window is full/free.
        """
        self._sink = sink
        self._on_close = on_close
        self._writer_paused = writer_paused
        held, self._held = self._held, []
        for data in held:
            sink(data)
        self.resumeProducing()

    # IPushProducer, registered on the socket to guacd: its buffer drives the window.
    def pauseProducing(self) -> None:
        """Stop re-granting window: the hypervisor stops after what it may still send."""
        self.paused = True

    def resumeProducing(self) -> None:
        """Re-grant what was withheld."""
        self.paused = False
        if self.withheld and not self.localClosed:
            withheld, self.withheld = self.withheld, 0
            self.conn.adjustWindow(self, withheld)

    def stopProducing(self) -> None:
        """The consumer is gone: close the channel."""
        self.loseConnection()

    # -- data to the hypervisor ------------------------------------------------------

    def stopWriting(self) -> None:
        if self._writer_paused is not None:
            self._writer_paused(True)

    def startWriting(self) -> None:
        if self._writer_paused is not None:
            self._writer_paused(False)

    # -- end -------------------------------------------------------------------------

    def eofReceived(self) -> None:
        self.loseConnection()

    def closeReceived(self) -> None:
        self.loseConnection()

    def closed(self) -> None:
        if not self.opened.called:
            self.opened.errback(
                TunnelError(Status.UPSTREAM_UNAVAILABLE, f"{self.description} closed the channel")
            )
        if not self.closed_by_peer.called:
            self.closed_by_peer.callback(None)
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


class _Connection(connection.SSHConnection):
    """Withholds window adjustments for paused channels (see module docstring)."""

    def __init__(self, host: SSHHost) -> None:
        super().__init__()
        self.host = host

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.host._authenticated(self)

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        if isinstance(channel, DirectTcpipChannel) and channel.paused:
            channel.withheld += bytesToAdd
            return
        super().adjustWindow(channel, bytesToAdd)


class _UserAuth(userauth.SSHUserAuthClient):
    """Public-key authentication with the agent's keys, then key files; nothing else."""

    preferredOrder: ClassVar[list[bytes]] = [b"publickey"]

    def __init__(
        self, user: str, conn: _Connection, settings: SSHSettings, agent_client: Any
    ) -> None:
        super().__init__(user.encode("utf-8"), conn)
        self._private = {key.public().blob(): key for key in settings.keys}
        self._agent = agent_client
        self._candidates: list[keys.Key] | None = None

    def getPublicKey(self) -> Any:
        if self._candidates is None:
            files = [key.public() for key in self._private.values()]
            if self._agent is None:
                self._candidates = files
            else:

                def listed(identities: list[tuple[bytes, bytes]]) -> keys.Key | None:
                    agent_keys = [keys.Key.fromString(blob) for blob, _ in identities]
                    self._candidates = agent_keys + [
                        k for k in files if k.blob() not in {a.blob() for a in agent_keys}
                    ]
                    return self._next()

                return self._agent.requestIdentities().addCallback(listed)
        return self._next()

    def _next(self) -> keys.Key | None:
        assert self._candidates is not None
        return self._candidates.pop(0) if self._candidates else None

    def signData(self, publicKey: keys.Key, signData: bytes) -> Deferred[bytes] | None:
        private = self._private.get(publicKey.blob())
        if private is not None:
            return succeed(private.sign(signData))
        if self._agent is not None:
            return self._agent.signData(publicKey.blob(), signData)
        return None


class _Transport(SSHClientTransport):
    def __init__(self, host: SSHHost) -> None:
        self.host = host
        self.failure: TunnelError | None = None

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[int]:
        try:
            self.host.known_hosts.verify(
                self.host.host, self.host.port, keys.Key.fromString(hostKey)
            )
        except TunnelError as e:
            self.failure = e
            return fail(e)
        return succeed(1)

    def connectionSecure(self) -> None:
        conn = _Connection(self.host)
        self.requestService(
            _UserAuth(self.host.user, conn, self.host.settings, self.host.agent_client)
        )

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if self.failure is None:
            self.failure = TunnelError(
                Status.UPSTREAM_ERROR,
                f"{self.host.description} disconnected: {description.decode('utf-8', 'replace')}",
            )

    def sendDisconnect(self, reason: int, desc: bytes) -> None:
        if self.failure is None and reason != DISCONNECT_HOST_KEY_NOT_VERIFIABLE:
            self.failure = TunnelError(
                Status.UPSTREAM_ERROR,
                f"{self.host.description}: {desc.decode('utf-8', 'replace')} (is our public key "
                f"in ~{self.host.user}/.ssh/authorized_keys there?)",
            )
        super().sendDisconnect(reason, desc)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.host._lost(self.failure, reason)


class SSHHost:
    """
    The one SSH connection to one (host, port, user), shared by its consoles.

    Use L{SSHPool.host} to get one.
    """

    log = Logger()

    def __init__(
        self,
        pool: SSHPool,
        host: str,
        port: int,
        user: str,
    ) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.user = user
        self.settings = pool.settings
        self.known_hosts = pool.known_hosts
        self.agent_client: Any = None
        self.description = f"SSH {user}@{host}:{port}"
        self.connection: _Connection | None = None
        self.channels: set[DirectTcpipChannel] = set()
        self._waiting: list[Deferred[_Connection]] = []
        self._transport: _Transport | None = None
        self._keepalive: LoopingCall | None = None
        self._unanswered = 0
        self._idle_timer: Any = None
        self._closing = False
        self._gone = False
        self._lost_waiters: list[Deferred[None]] = []

    # -- connecting ------------------------------------------------------------------

    def _connected(self) -> Deferred[_Connection]:
        """The connection, connecting first (once, for all who wait)."""
        if self.connection is not None:
            return succeed(self.connection)
        d: Deferred[_Connection] = Deferred()
        self._waiting.append(d)
        if len(self._waiting) == 1:
            self._connect()
        return d

    def _connect(self) -> None:
        self.log.info("Connecting {ssh}", ssh=self.description)
        reactor = self.pool.reactor
        agent_step: Deferred[Any] = succeed(None)
        if self.settings.agent_socket:
            agent_step = UNIXClientEndpoint(reactor, self.settings.agent_socket).connect(
                quiet_factory(agent.SSHAgentClient)
            )

        def with_agent(client: Any) -> Deferred[Any]:
            self.agent_client = client
            self._transport = _Transport(self)
            endpoint = HostnameEndpoint(
                reactor, self.host, self.port, timeout=self.settings.connect_timeout
            )
            return endpoint.connect(SingleProtocolFactory(self._transport))

        def unreachable(failure: Failure) -> None:
            self._fail_waiting(
                TunnelError(
                    Status.UPSTREAM_NOT_FOUND,
                    f"cannot connect {self.description}: {failure.getErrorMessage()}",
                )
            )

        agent_step.addCallback(with_agent).addErrback(unreachable)

    def _authenticated(self, conn: _Connection) -> None:
        self.connection = conn
        self.log.info("Connected {ssh}", ssh=self.description)
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = self.pool.reactor
        self._keepalive.start(self.settings.keepalive_interval, now=False)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.callback(conn)
        self._maybe_idle()

    def _fail_waiting(self, error: TunnelError) -> None:
        self.log.warn("{ssh} failed: {why}", ssh=self.description, why=str(error))
        self.pool._forget(self)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.errback(error)

    # -- keepalive -------------------------------------------------------------------

    def _ping(self) -> None:
        conn = self.connection
        if conn is None:
            return
        if self._unanswered >= self.settings.keepalive_count:
            self.log.warn(
                "{ssh}: {n} keepalives unanswered, closing",
                ssh=self.description,
                n=self._unanswered,
            )
            conn.transport.transport.abortConnection()
            return
        self._unanswered += 1

        def answered(_: object) -> None:
            self._unanswered = 0

        # Any reply, success or failure, proves the peer is alive.
        d = conn.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=True)
        d.addCallbacks(answered, answered)

    # -- channels --------------------------------------------------------------------

    def open_channel(
        self, target: tuple[str, int], origin: tuple[str, int]
    ) -> Deferred[DirectTcpipChannel]:
        """Open a ``direct-tcpip`` channel to C{target} as seen from the host."""
        self._cancel_idle()

        def connected(conn: _Connection) -> Deferred[DirectTcpipChannel]:
            chan = DirectTcpipChannel(target, self.description, conn=conn)
            self.channels.add(chan)
            chan.closed_by_peer.addBoth(lambda _: self._channel_gone(chan))
            conn.openChannel(chan, forwarding.packOpen_direct_tcpip(target, origin))
            return chan.opened

        return self._connected().addCallback(connected)

    def _channel_gone(self, chan: DirectTcpipChannel) -> None:
        self.channels.discard(chan)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.channels or self.connection is None or self._closing:
            return
        self._cancel_idle()
        self._idle_timer = self.pool.reactor.callLater(self.settings.idle_grace, self.close)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    # -- ending ----------------------------------------------------------------------

    def close(self, abort: bool = False) -> Deferred[None]:
        """Close the connection (and so its channels); fires once it is gone."""
        self._closing = True
        self._cancel_idle()
        transport = self._transport
        if transport is None or transport.transport is None or self._gone:
            self.pool._forget(self)
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._lost_waiters.append(done)
        if abort:
            transport.transport.abortConnection()
        else:
            transport.transport.loseConnection()
        return done

    def _lost(self, failure: TunnelError | None, reason: Failure) -> None:
        self._gone = True
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._cancel_idle()
        if self.agent_client is not None and self.agent_client.transport is not None:
            self.agent_client.transport.loseConnection()
        was_connected = self.connection is not None
        self.connection = None
        self.pool._forget(self)
        if self._waiting:
            self._fail_waiting(
                failure
                or TunnelError(
                    Status.UPSTREAM_UNAVAILABLE,
                    f"{self.description} closed during login: {reason.getErrorMessage()}",
                )
            )
        if was_connected:
            level = self.log.info if self._closing else self.log.warn
            level(
                "{ssh} closed ({why})",
                ssh=self.description,
                why="idle" if self._closing else reason.getErrorMessage(),
            )
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class SSHPool:
    """
    SSH connections by (host, port, user).

    @param reactor: for connections and timers (a clock in tests is fine for
        the timers, but connections need a real reactor).
    """

    def __init__(self, reactor: Any, settings: SSHSettings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.known_hosts = _KnownHosts(settings.known_hosts, settings.accept_new)
        self._hosts: dict[tuple[str, int, str], SSHHost] = {}
        self._closing: set[SSHHost] = set()

    def host(self, host: str, port: int, user: str) -> SSHHost:
        """The shared connection for (host, port, user), created on first use."""
        key = (host, port, user)
        found = self._hosts.get(key)
        if found is None or found._closing:
            found = self._hosts[key] = SSHHost(self, host, port, user)
        return found

    def _forget(self, host: SSHHost) -> None:
        key = (host.host, host.port, host.user)
        if self._hosts.get(key) is host:
            del self._hosts[key]
        transport = host._transport
        if host._gone or transport is None or transport.transport is None:
            self._closing.discard(host)
        else:
            self._closing.add(host)  # still connected while it closes

    @property
    def connections(self) -> int:
        """Live or connecting SSH connections."""
        return len(self._hosts)

    @property
    def channels(self) -> int:
        """Open or opening ``direct-tcpip`` channels, over all connections."""
        return sum(len(h.channels) for h in set(self._hosts.values()) | self._closing)

    def close(self) -> Deferred[Any]:
        """Close every connection at once (shutdown)."""
        hosts = set(self._hosts.values()) | self._closing
        return gatherResults([h.close(abort=True) for h in hosts])
