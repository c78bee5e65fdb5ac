"""The real-server fixtures of L{tests.helpers.realservers} work, and clean up after themselves."""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Callable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from twisted.conch.client.knownhosts import ConsoleUI, KnownHostsFile
from twisted.conch.endpoints import AuthenticationFailed, SSHCommandClientEndpoint
from twisted.conch.ssh import forwarding
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.keys import BadKeyError, EncryptedKeyError, Key
from twisted.internet import error, protocol, reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import ITransport
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.helpers import realservers
from tests.helpers.realservers import (
    LOOPBACK,
    ServerStartError,
    Sshd,
    VncDesktop,
    free_port,
    make_client_key,
    start_sshd,
    start_tcp_echo,
    start_vnc_desktop,
)

# -- helpers ------------------------------------------------------------------------------


def _listen_addresses(port: int) -> set[str]:
    """The local addresses listening on TCP C{port}, from /proc/net/tcp{,6} (hex form)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # TCP_LISTEN
                found.add(address)
    return found


LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp prints it (little-endian)


def _our_children(command: str) -> list[int]:
    """Pids of this process's children (zombies included) whose command is C{command}."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except (OSError, NotADirectoryError):
            continue
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode()
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == os.getpid() and comm == command:
            found.append(int(name))
    return found


async def _refused(port: int) -> bool:
    """Whether 127.0.0.1:C{port} refuses TCP connections."""
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=2)
    try:
        connected = await connectProtocol(endpoint, protocol.Protocol())
    except error.ConnectionRefusedError:
        return True
    connected.transport.abortConnection()
    await deferLater(reactor, 0)
    return False


async def _until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll C{condition()} every 10 ms until true, or fail after C{timeout}."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"still false after {timeout} s: {condition}")
        await deferLater(reactor, 0.01)


class _Collect(protocol.Protocol):
    """Collect what arrives; C{done} fires with (data, reason) on connectionLost."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[tuple[bytes, Failure]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback((self.data, reason))


def _known_hosts(testcase: TestCase, sshd: Sshd) -> KnownHostsFile:
    """A known_hosts file trusting C{sshd} only, as Conch looks hosts up."""
    path = sshd.write_known_hosts(os.path.abspath(testcase.mktemp()))
    return KnownHostsFile.fromPath(FilePath(path))


def _command_endpoint(
    testcase: TestCase, sshd: Sshd, command: bytes, key: Key | None = None
) -> SSHCommandClientEndpoint:
    """A Conch endpoint running C{command} on C{sshd} as its user, with the client key."""
    return SSHCommandClientEndpoint.newConnection(
        reactor,
        command,
        sshd.user.encode(),
        LOOPBACK.encode(),
        sshd.port,
        keys=[key or Key.fromFile(sshd.client_key_path)],
        knownHosts=_known_hosts(testcase, sshd),
        # An unknown host key would be answered "no" instead of prompting on a tty.
        ui=ConsoleUI(_NoAnswer),
    )


class _NoAnswer:
    """A file for L{ConsoleUI}: swallows prompts and answers nothing (that is, "no")."""

    def write(self, data: bytes) -> None:
        pass

    def readline(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


async def _wait_disconnected(transport: ITransport) -> None:
    """Wait until a TCP transport has really closed its socket."""
    await _until(lambda: getattr(transport, "disconnected", False))


async def _run_ssh(testcase: TestCase, sshd: Sshd, command: bytes, key: Key | None = None) -> bytes:
    """Run C{command} over a new SSH connection; its output once the connection closed."""
    collect = _Collect()
    endpoint = _command_endpoint(testcase, sshd, command, key)
    await endpoint.connect(protocol.Factory.forProtocol(lambda: collect))
    tcp = collect.transport.conn.transport.transport
    data, reason = await collect.done
    reason.trap(error.ConnectionDone)
    await _wait_disconnected(tcp)
    return data


class _Channel(SSHChannel):
    """A client channel: C{opened} fires on open (or fails); collects data until closed."""

    def __init__(self, name: bytes, conn: SSHConnection) -> None:
        super().__init__(conn=conn)
        self.name = name
        self.opened: Deferred[None] = Deferred()
        self.received = b""

    def channelOpen(self, specificData: bytes) -> None:
        self.opened.callback(None)

    def openFailed(self, reason: Failure) -> None:
        self.opened.errback(reason)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


# -- RFB (VNC) ----------------------------------------------------------------------------


class _Rfb(protocol.Protocol):
    """A minimal RFB 3.8 viewer: exact reads over a byte buffer."""

    def __init__(self) -> None:
        self.buffer = b""
        self.pending: tuple[int, Deferred[bytes]] | None = None
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._deliver()

    def _deliver(self) -> None:
        if self.pending is not None and len(self.buffer) >= self.pending[0]:
            (n, d), self.pending = self.pending, None
            chunk, self.buffer = self.buffer[:n], self.buffer[n:]
            d.callback(chunk)

    def read(self, n: int) -> Deferred[bytes]:
        """The next C{n} bytes."""
        d: Deferred[bytes] = Deferred()
        self.pending = (n, d)
        self._deliver()
        return d

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.pending is not None:
            self.pending[1].errback(reason)
            self.pending = None
        self.lost.callback(None)


def _vnc_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: DES-encrypt the challenge with the bit-mirrored password."""
    raw = password.encode("latin-1")[:8].ljust(8, b"\0")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in raw)
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


async def _rfb_connect(port: int, password: str | None) -> tuple[_Rfb, list[int], int, bytes]:
    """Handshake up to the security result: (client, offered types, result, reason)."""
    rfb = _Rfb()
    await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), rfb)
    assert await rfb.read(12) == b"RFB 003.008\n"
    rfb.transport.write(b"RFB 003.008\n")
    (count,) = await rfb.read(1)
    types = list(await rfb.read(count))
    chosen = 1 if password is None else 2
    rfb.transport.write(bytes([chosen]))
    if chosen == 2:
        assert password is not None
        rfb.transport.write(_vnc_response(password, await rfb.read(16)))
    (result,) = struct.unpack("!I", await rfb.read(4))
    reason = b""
    if result != 0:
        (length,) = struct.unpack("!I", await rfb.read(4))
        reason = await rfb.read(length)
    return rfb, types, result, reason


async def _rfb_server_init(rfb: _Rfb) -> tuple[int, int, bytes]:
    """Send a shared ClientInit; the ServerInit's (width, height, name)."""
    rfb.transport.write(b"\x01")
    width, height = struct.unpack("!HH", await rfb.read(4))
    await rfb.read(16)  # pixel format
    (length,) = struct.unpack("!I", await rfb.read(4))
    return width, height, await rfb.read(length)


async def _rfb_close(rfb: _Rfb) -> None:
    rfb.transport.abortConnection()
    await rfb.lost


# -- tests --------------------------------------------------------------------------------


class FreePortTests(SynchronousTestCase):
    def test_free_port_is_bindable(self) -> None:
        """free_port() returns a port that 127.0.0.1 can bind right away."""
        port = free_port()
        self.assertTrue(1024 <= port < 65536)
        with socket.socket() as s:
            s.bind((LOOPBACK, port))

    def test_missing_program_skips_with_package(self) -> None:
        """A missing binary is a SkipTest naming the apt package."""
        self.patch(realservers, "SSHD", "/nonexistent/sshd")
        exc = self.assertRaises(SkipTest, start_sshd, self, reactor)
        self.assertIn("apt-get install openssh-server", str(exc))


class SshdTests(TestCase):
    async def test_client_key_logs_in(self) -> None:
        """The generated client key logs in (Conch, host key checked) and runs a command."""
        sshd = await start_sshd(self, reactor)
        output = await _run_ssh(self, sshd, b"echo hello; id -un; echo $HOME")
        self.assertEqual(output, f"hello\n{sshd.user}\n{sshd.home}\n".encode())
        self.assertIn(f"Accepted publickey for {sshd.user} from 127.0.0.1", sshd.log)
        self.assertEqual(_listen_addresses(sshd.port), {LOOPBACK_HEX})

    async def test_configuration(self) -> None:
        """Files are private and in the temp dir; sshd -T shows the settings asked for."""
        sshd = await start_sshd(self, reactor, extra_config={"maxauthtries": "3"})
        self.assertTrue(sshd.directory.startswith(os.path.abspath(".")))
        for path in (sshd.client_key_path, os.path.join(sshd.directory, "ssh_host_ed25519_key")):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
            with open(path) as f:
                self.assertEqual(f.readline(), "-----BEGIN OPENSSH PRIVATE KEY-----\n")
        settings = sshd.effective_config.splitlines()
        for line in (
            "passwordauthentication no",
            "kbdinteractiveauthentication no",
            "usepam no",
            "permitrootlogin without-password",  # sshd -T's name for prohibit-password
            "allowtcpforwarding yes",
            "maxsessions 100",
            "maxstartups 100:30:100",
            "loglevel VERBOSE",
            "strictmodes no",
            "maxauthtries 3",
            f"authorizedkeysfile {sshd.authorized_keys_path}",
        ):
            self.assertIn(line, settings)
        hostkeys = [line for line in settings if line.startswith("hostkey ")]
        self.assertEqual(hostkeys, [f"hostkey {sshd.directory}/ssh_host_ed25519_key"])

    async def test_known_hosts_line(self) -> None:
        """known_hosts_line() is OpenSSH's [host]:port form and matches the served key."""
        sshd = await start_sshd(self, reactor)
        line = sshd.known_hosts_line()
        self.assertEqual(line, f"[127.0.0.1]:{sshd.port} {sshd.host_key_public_openssh}")
        self.assertTrue(line.split()[2].startswith("AAAA"))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(line + "\n")
        known = KnownHostsFile.fromPath(FilePath(path))
        served = Key.fromString(sshd.host_key_public_openssh)
        self.assertTrue(known.hasHostKey(f"[127.0.0.1]:{sshd.port}".encode(), served))
        self.assertFalse(known.hasHostKey(f"[127.0.0.1]:{sshd.port + 1}".encode(), served))
        # The key sshd really serves is that one: Conch checks it against the file.
        self.assertEqual(await _run_ssh(self, sshd, b"true"), b"")

    async def test_encrypted_client_key(self) -> None:
        """make_client_key() with a passphrase: encrypted, loads with it, logs in once added."""
        sshd = await start_sshd(self, reactor)
        path, public = make_client_key(self.mktemp(), passphrase=b"open sesame")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertRaises(EncryptedKeyError, Key.fromFile, path)
        self.assertRaises(BadKeyError, Key.fromFile, path, passphrase=b"wrong")
        key = Key.fromFile(path, passphrase=b"open sesame")
        self.assertEqual(key.public().toString("openssh").decode(), public)
        with self.assertRaises(AuthenticationFailed):
            await _run_ssh(self, sshd, b"true", key)
        sshd.add_authorized_key(public)
        self.assertEqual(await _run_ssh(self, sshd, b"echo in", key), b"in\n")

    async def test_unauthorized_key_refused(self) -> None:
        """authorized_keys=[] authorizes nothing; stop() reaps what sshd orphaned meanwhile."""
        sshd = await start_sshd(self, reactor, authorized_keys=[])
        with self.assertRaises(AuthenticationFailed):
            await _run_ssh(self, sshd, b"true")
        self.assertIn("Failed publickey for", sshd.log)
        # sshd leaves the pre-authentication process of a refused connection orphaned;
        # it is re-parented to us (not to pid 1) and reaped by stop().
        await sshd.stop()
        self.assertEqual(_our_children("sshd"), [])

    async def test_many_sessions_and_forwarding(self) -> None:
        """60 session channels open on one connection, and direct-tcpip reaches the echo."""
        sshd = await start_sshd(self, reactor)
        echo_port = await start_tcp_echo(self, reactor)
        anchor = _Collect()
        await _command_endpoint(self, sshd, b"cat").connect(
            protocol.Factory.forProtocol(lambda: anchor)
        )
        conn = anchor.transport.conn
        tcp = conn.transport.transport
        sessions = [_Channel(b"session", conn) for _ in range(60)]
        for channel in sessions:
            conn.openChannel(channel)
        results = await DeferredList([c.opened for c in sessions], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True] * 60, results)

        tunnel = _Channel(b"direct-tcpip", conn)
        conn.openChannel(
            tunnel, forwarding.packOpen_direct_tcpip((LOOPBACK, echo_port), (LOOPBACK, 1))
        )
        await tunnel.opened
        tunnel.write(b"ping through sshd")
        await _until(lambda: tunnel.received == b"ping through sshd")

        conn.transport.loseConnection()
        await _wait_disconnected(tcp)

    async def test_kill_mid_session(self) -> None:
        """kill() drops live sessions at once, kills their processes, and the port refuses."""
        sshd = await start_sshd(self, reactor)
        session = _Collect()
        await _command_endpoint(self, sshd, b"echo up; exec sleep 30").connect(
            protocol.Factory.forProtocol(lambda: session)
        )
        tcp = session.transport.conn.transport.transport
        await _until(lambda: session.data == b"up\n")
        pids = sshd.processes()
        self.assertGreaterEqual(len(pids), 3, "listener, connection, sleep")
        started = reactor.seconds()
        await sshd.kill()
        # The client's TCP connection drops.  (Conch's command endpoint never tells its
        # protocol about an unclean close: twisted/twisted#7901, so watch the socket.)
        await _wait_disconnected(tcp)
        self.assertLess(reactor.seconds() - started, 2.0)
        self.assertFalse(sshd.running)
        self.assertEqual([p for p in pids if os.path.exists(f"/proc/{p}")], [])
        self.assertTrue(await _refused(sshd.port))
        await sshd.stop()  # idempotent, as the cleanup will call it again

    async def test_stop_leaves_nothing(self) -> None:
        """stop() ends sshd and its sessions; no process, fd or port is left over."""
        # Snapshot once the reactor runs: trial starts it (and its SIGCHLD waker pipe)
        # only when the test first waits.
        await deferLater(reactor, 0)
        fds = set(os.listdir("/proc/self/fd"))
        sshd = await start_sshd(self, reactor)
        session = _Collect()
        await _command_endpoint(self, sshd, b"echo up; exec sleep 30").connect(
            protocol.Factory.forProtocol(lambda: session)
        )
        tcp = session.transport.conn.transport.transport
        await _until(lambda: session.data == b"up\n")
        pids = sshd.processes()
        await sshd.stop()
        await _wait_disconnected(tcp)  # see test_kill_mid_session
        self.assertEqual([p for p in pids if os.path.exists(f"/proc/{p}")], [])
        self.assertTrue(await _refused(sshd.port))
        leaked = set(os.listdir("/proc/self/fd")) - fds
        self.assertEqual(
            {
                fd: os.readlink(f"/proc/self/fd/{fd}")
                for fd in leaked
                if os.path.exists(f"/proc/self/fd/{fd}")
            },
            {},
        )

    async def test_port_taken_meanwhile_is_retried(self) -> None:
        """When another process takes the chosen port before sshd binds it, sshd moves on."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind((LOOPBACK, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = [busy, busy]  # the configuration check, then the first attempt
        real_free_port = realservers.free_port
        self.patch(realservers, "free_port", lambda: ports.pop(0) if ports else real_free_port())
        sshd = await start_sshd(self, reactor)
        self.assertNotEqual(sshd.port, busy)
        self.assertEqual(await _run_ssh(self, sshd, b"echo ok"), b"ok\n")

    async def test_bad_configuration_fails_clearly(self) -> None:
        """An option sshd rejects fails the start with sshd's own complaint."""
        with self.assertRaises(ServerStartError) as raised:
            await start_sshd(self, reactor, extra_config={"NoSuchOption": "yes"})
        self.assertIn("NoSuchOption", str(raised.exception))


class EchoTests(TestCase):
    async def test_echoes(self) -> None:
        """The echo server writes back what it receives, on 127.0.0.1 only."""
        port = await start_tcp_echo(self, reactor)
        self.assertEqual(_listen_addresses(port), {LOOPBACK_HEX})
        client = _Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, port), client)
        client.transport.write(b"hello echo")
        await _until(lambda: client.data == b"hello echo")
        # Left open on purpose: the cleanup must close the server side too.


class VncDesktopTests(TestCase):
    async def test_desktop(self) -> None:
        """RFB greeting, loopback only, screen size, and the painted colour read from X."""
        desktop: VncDesktop = await start_vnc_desktop(self, reactor)
        self.assertEqual(_listen_addresses(desktop.port), {LOOPBACK_HEX})
        rfb = _Rfb()
        await connectProtocol(TCP4ClientEndpoint(reactor, LOOPBACK, desktop.port), rfb)
        self.assertEqual(await rfb.read(12), b"RFB 003.008\n")
        await _rfb_close(rfb)
        self.assertEqual(await desktop.xdotool("getdisplaygeometry"), "320 240\n")
        self.assertEqual(await desktop.screenshot_rgb(0, 0), (0x33, 0x66, 0x99))
        self.assertEqual(await desktop.screenshot_rgb(319, 239), (0x33, 0x66, 0x99))
        self.assertTrue(os.path.exists(f"/tmp/.X11-unix/X{desktop.display[1:]}"))

    async def test_password_and_keys(self) -> None:
        """The password authenticates (a wrong one does not); keys typed via VNC reach X."""
        desktop = await start_vnc_desktop(self, reactor, password="s3cret")
        rfb, types, result, _ = await _rfb_connect(desktop.port, "s3cret")
        self.assertEqual((types, result), ([2], 0))
        self.assertEqual((await _rfb_server_init(rfb))[:2], (320, 240))
        self.assertEqual(desktop.key_events(), [])
        for down in (1, 0):
            rfb.transport.write(struct.pack("!BBxxI", 4, down, ord("q")))
        await desktop.wait_for_key("q", "KeyRelease")
        self.assertEqual(desktop.key_events(), [("KeyPress", "q"), ("KeyRelease", "q")])
        with self.assertRaises(TimeoutError):
            await desktop.wait_for_key("z", timeout=0.1)
        await _rfb_close(rfb)

        wrong, _, result, reason = await _rfb_connect(desktop.port, "nope")
        self.assertEqual(result, 1, reason)
        await _rfb_close(wrong)

    async def test_no_password_size_colour_and_stop(self) -> None:
        """password=None offers no auth; stop() removes processes, port and X socket."""
        desktop = await start_vnc_desktop(
            self, reactor, width=200, height=100, password=None, colour=(200, 10, 0)
        )
        rfb, types, result, _ = await _rfb_connect(desktop.port, None)
        self.assertEqual((types, result), ([1], 0))
        self.assertEqual((await _rfb_server_init(rfb))[:2], (200, 100))
        await _rfb_close(rfb)
        self.assertEqual(await desktop.screenshot_rgb(199, 99), (200, 10, 0))
        pids = desktop.processes()
        self.assertEqual(len(pids), 3)
        await desktop.stop()
        self.assertEqual([p for p in pids if os.path.exists(f"/proc/{p}")], [])
        self.assertTrue(await _refused(desktop.port))
        self.assertFalse(os.path.exists(f"/tmp/.X11-unix/X{desktop.display[1:]}"))
