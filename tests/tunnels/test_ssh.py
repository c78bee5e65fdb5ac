"""
SSH tunnels against a real OpenSSH sshd on loopback (started by the tests):
forwarding, sharing one connection, host keys, keys, failures, cleanup, and a
real x11vnc on Xvfb reached through the whole relay.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from consoleproxy.consoles import Console, Identity
from consoleproxy.guacamole.status import Status
from consoleproxy.tunnels.routes import Tunnels, TunnelSettings
from consoleproxy.tunnels.ssh import SSHPool, SSHSettings, TunnelError, load_private_key
from tests.helpers.fakeguacd import Behaviour, FakeGuacd
from tests.helpers.realservers import make_client_key, start_sshd, start_tcp_echo, start_vnc_desktop
from tests.helpers.support import start_server, wait
from tests.helpers.wsclient import connect


class _Client(Protocol):
    """Connects to a tunnel listener as guacd would; collects what comes back."""

    keep = True

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.count = 0
        self.closed: Deferred[None] = Deferred()
        self._want: tuple[int, Deferred[bytes]] | None = None

    @property
    def received(self) -> bytes:
        return bytes(self.buffer)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.buffer += data
        if self._want is not None and self.count >= self._want[0]:
            _, d = self._want
            self._want = None
            d.callback(self.received)

    def expect(self, count: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if self.count >= count:
            d.callback(self.received)
        else:
            self._want = (count, d)
        return d

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


def dial(port: int) -> Deferred[_Client]:
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(_Client))


class TunnelTestCase(TestCase):
    """A real sshd, a TCP echo service behind it, and Tunnels that always use SSH."""

    accept_new = False

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.sshd = yield start_sshd(self, reactor)
        self.echo_port = yield start_tcp_echo(self, reactor)
        self.known_hosts = os.path.join(self.mktemp(), "known_hosts")
        os.makedirs(os.path.dirname(self.known_hosts))
        with open(self.known_hosts, "w") as f:
            f.write(self.sshd.known_hosts_line() + "\n")
        self.tunnels = self.make_tunnels()

    def make_tunnels(self, key_path: str | None = None, **settings) -> Tunnels:  # type: ignore[no-untyped-def]
        pool = SSHPool(
            reactor,
            SSHSettings(
                known_hosts=self.known_hosts,
                keys=(load_private_key(key_path or self.sshd.client_key_path),),
                accept_new=self.accept_new,
                keepalive_interval=settings.pop("keepalive_interval", 15),
                idle_grace=settings.pop("idle_grace", 0.2),
            ),
        )
        self.addCleanup(pool.close)
        tunnel_settings = TunnelSettings(
            default_mode="ssh", user=self.sshd.user, ssh_port=self.sshd.port, **settings
        )
        return Tunnels(reactor, tunnel_settings, pool)

    def console(self, port: int | None = None) -> Console:
        return Console(
            7,
            "vnc",
            {"hostname": "127.0.0.1", "port": str(port or self.echo_port), "password": "x"},
        )

    @inlineCallbacks
    def open_route(self, tunnels: Tunnels | None = None, port: int | None = None):  # type: ignore[no-untyped-def]
        route = yield (tunnels or self.tunnels).route(self.console(port))
        self.addCleanup(route.close)
        return route


class ForwardingTests(TunnelTestCase):
    @inlineCallbacks
    def test_forwards_both_ways_and_cleans_up(self):  # type: ignore[no-untyped-def]
        route = yield self.open_route()
        self.assertTrue(route.tunnelled)
        self.assertEqual(route.parameters["hostname"], "127.0.0.1")
        self.assertEqual(route.parameters["password"], "x")
        port = int(route.parameters["port"])
        self.assertNotEqual(port, self.echo_port)
        client = yield dial(port)
        payload = os.urandom(300_000)  # more than one channel window
        client.transport.write(payload)
        received = yield client.expect(len(payload))
        self.assertEqual(received, payload)
        self.assertEqual(self.tunnels.pool.connections, 1)
        route.close()
        yield client.closed
        yield self.assertFailure(dial(port), ConnectionRefusedError)
        yield wait(0.5)  # the idle grace (0.2 s) passes: the SSH connection closes
        self.assertEqual(self.tunnels.pool.connections, 0)
        self.assertEqual(self.tunnels.routes, set())

    @inlineCallbacks
    def test_fifty_channels_share_one_connection(self):  # type: ignore[no-untyped-def]
        routes = yield gatherResults([self.tunnels.route(self.console()) for _ in range(50)])
        for route in routes:
            self.addCleanup(route.close)
        self.assertEqual(self.tunnels.pool.connections, 1)
        self.assertEqual(self.sshd.log.count("Accepted publickey"), 1)
        clients = yield gatherResults([dial(int(r.parameters["port"])) for r in routes])
        for index, client in enumerate(clients):
            client.transport.write(b"console %d\n" % index)
        received = yield gatherResults(
            [c.expect(len(b"console %d\n" % i)) for i, c in enumerate(clients)]
        )
        self.assertEqual(received, [b"console %d\n" % i for i in range(50)])
        for route in routes:
            route.close()
        yield gatherResults([c.closed for c in clients])

    @inlineCallbacks
    def test_listener_accepts_one_connection(self):  # type: ignore[no-untyped-def]
        route = yield self.open_route()
        port = int(route.parameters["port"])
        first = yield dial(port)
        yield self.assertFailure(dial(port), ConnectionRefusedError)
        first.transport.write(b"still here")
        self.assertEqual((yield first.expect(10)), b"still here")

    @inlineCallbacks
    def test_only_guacds_address(self):  # type: ignore[no-untyped-def]
        tunnels = self.make_tunnels(guacd_address="127.0.0.2", accept_timeout=2)
        route = yield self.open_route(tunnels)
        stranger = yield dial(int(route.parameters["port"]))
        yield stranger.closed  # dropped at once; the listener keeps waiting for guacd

    @inlineCallbacks
    def test_guacd_never_connects(self):  # type: ignore[no-untyped-def]
        tunnels = self.make_tunnels(accept_timeout=0.3)
        route = yield self.open_route(tunnels)
        yield wait(0.6)
        yield self.assertFailure(dial(int(route.parameters["port"])), ConnectionRefusedError)
        yield wait(0.4)
        self.assertEqual(tunnels.pool.connections, 0)

    @inlineCallbacks
    def test_closed_target_port(self):  # type: ignore[no-untyped-def]
        closed_port = self.echo_port + 1 if self.echo_port < 65535 else 1
        error = yield self.assertFailure(self.tunnels.route(self.console(closed_port)), TunnelError)
        self.assertEqual(error.status, Status.UPSTREAM_NOT_FOUND)
        self.assertIn(f"cannot reach 127.0.0.1:{closed_port}", str(error))
        route = yield self.open_route()  # the connection is still good
        self.assertTrue(route.tunnelled)

    @inlineCallbacks
    def test_port_range(self):  # type: ignore[no-untyped-def]
        from tests.helpers.realservers import free_port  # noqa: PLC0415

        low = free_port()
        tunnels = self.make_tunnels(port_range=(low, low))
        route = yield self.open_route(tunnels)
        self.assertEqual(int(route.parameters["port"]), low)
        error = yield self.assertFailure(tunnels.route(self.console()), TunnelError)
        self.assertEqual(error.status, Status.SERVER_BUSY)


class _Flood(Protocol):
    """A service behind the tunnel that writes as fast as its socket takes it."""

    def connectionMade(self) -> None:
        self.chunk = os.urandom(65536)
        self.paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.transport.connected:
            self.transport.write(self.chunk)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class _Source(Protocol):
    """Sends SOURCE_BYTES, then closes: a console server that ends the session."""

    def connectionMade(self) -> None:
        self.transport.write(b"s" * SOURCE_BYTES)
        self.transport.loseConnection()


SOURCE_BYTES = 8 << 20


class FlowControlTests(TunnelTestCase):
    @inlineCallbacks
    def test_hypervisor_end_delivers_everything(self):  # type: ignore[no-untyped-def]
        port = yield self.service(_Source)
        route = yield self.open_route(port=port)
        lost: list[TunnelError] = []
        route.on_lost = lost.append
        client = yield dial(int(route.parameters["port"]))
        client.keep = False
        client.transport.pauseProducing()  # guacd is slow: data waits in buffers
        yield wait(0.5)
        client.transport.resumeProducing()
        yield client.closed
        self.assertEqual(client.count, SOURCE_BYTES)  # all of it, then a clean close
        self.assertEqual(len(lost), 1)

    @inlineCallbacks
    def service(self, protocol: type[Protocol]):  # type: ignore[no-untyped-def]
        from twisted.internet.endpoints import TCP4ServerEndpoint  # noqa: PLC0415

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(protocol)
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def channel(self):  # type: ignore[no-untyped-def]
        host = next(iter(self.tunnels.pool._hosts.values()))
        return next(iter(host.channels))

    @inlineCallbacks
    def test_slow_guacd_bounds_the_channel(self):  # type: ignore[no-untyped-def]
        port = yield self.service(_Flood)
        route = yield self.open_route(port=port)
        client = yield dial(int(route.parameters["port"]))
        client.keep = False
        client.transport.pauseProducing()  # guacd stops reading
        yield wait(1.5)
        chan = self.channel()
        received = chan.bytes_received
        yield wait(0.5)
        # The window is withheld: nothing more arrives, and little is held.
        self.assertEqual(chan.bytes_received, received)
        self.assertTrue(chan.paused)
        self.assertLess(received, 16 << 20)
        client.transport.resumeProducing()
        yield wait(0.5)
        self.assertGreater(chan.bytes_received, received)  # flowing again
        route.close()
        yield client.closed

    @inlineCallbacks
    def test_slow_hypervisor_pauses_guacd(self):  # type: ignore[no-untyped-def]
        deaf = socket.socket()  # listens, never accepts: nothing ever reads
        self.addCleanup(deaf.close)
        deaf.bind(("127.0.0.1", 0))
        deaf.listen(8)
        port = deaf.getsockname()[1]
        route = yield self.open_route(port=port)
        client = yield dial(int(route.parameters["port"]))
        chunk = b"x" * 65536
        for _ in range(1024):  # 64 MiB offered by "guacd"
            client.transport.write(chunk)
        yield wait(2.0)
        chan = self.channel()
        self.assertLess(len(chan.buf), 4 << 20)  # queued in consoleproxy for the hypervisor
        route.close()
        yield client.closed


class HostKeyTests(TunnelTestCase):
    @inlineCallbacks
    def test_unknown_host_key_refused(self):  # type: ignore[no-untyped-def]
        with open(self.known_hosts, "w") as f:
            f.write("")
        error = yield self.assertFailure(self.tunnels.route(self.console()), TunnelError)
        self.assertIn("is not in", str(error))
        self.assertIn(f"ssh-keyscan -p {self.sshd.port} 127.0.0.1", str(error))
        self.assertEqual(self.tunnels.pool.connections, 0)

    @inlineCallbacks
    def test_changed_host_key_refused(self):  # type: ignore[no-untyped-def]
        _, other = make_client_key(self.mktemp_dir())
        with open(self.known_hosts, "w") as f:
            f.write(f"[127.0.0.1]:{self.sshd.port} {other}\n")
        error = yield self.assertFailure(self.tunnels.route(self.console()), TunnelError)
        self.assertIn("CHANGED", str(error))

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path


class AcceptNewTests(TunnelTestCase):
    accept_new = True

    @inlineCallbacks
    def test_accept_new_records_the_key(self):  # type: ignore[no-untyped-def]
        with open(self.known_hosts, "w") as f:
            f.write("")
        route = yield self.open_route()
        self.assertTrue(route.tunnelled)
        with open(self.known_hosts) as f:
            self.assertEqual(f.read().strip(), self.sshd.known_hosts_line())


class ClientKeyTests(TunnelTestCase):
    @inlineCallbacks
    def test_wrong_client_key_refused(self):  # type: ignore[no-untyped-def]
        directory = self.mktemp()
        os.makedirs(directory)
        stranger, _ = make_client_key(directory)
        tunnels = self.make_tunnels(key_path=stranger)
        error = yield self.assertFailure(tunnels.route(self.console()), TunnelError)
        self.assertIn("authorized_keys", str(error))
        self.assertEqual(tunnels.pool.connections, 0)

    @inlineCallbacks
    def test_encrypted_client_key(self):  # type: ignore[no-untyped-def]
        directory = self.mktemp()
        os.makedirs(directory)
        path, public = make_client_key(directory, passphrase=b"open sesame")
        self.sshd.add_authorized_key(public)
        self.assertRaises(ValueError, load_private_key, path)
        pool = SSHPool(
            reactor,
            SSHSettings(
                known_hosts=self.known_hosts, keys=(load_private_key(path, b"open sesame"),)
            ),
        )
        self.addCleanup(pool.close)
        tunnels = Tunnels(
            reactor,
            TunnelSettings(default_mode="ssh", user=self.sshd.user, ssh_port=self.sshd.port),
            pool,
        )
        route = yield self.open_route(tunnels)
        self.assertTrue(route.tunnelled)


class SshdDiesTests(TunnelTestCase):
    @inlineCallbacks
    def test_sshd_killed_mid_session(self):  # type: ignore[no-untyped-def]
        route = yield self.open_route()
        lost: list[TunnelError] = []
        route.on_lost = lost.append
        client = yield dial(int(route.parameters["port"]))
        client.transport.write(b"ping")
        yield client.expect(4)
        yield self.sshd.kill()
        yield client.closed  # guacd's side of the tunnel closes
        self.assertEqual(len(lost), 1)
        self.assertEqual(lost[0].status, Status.UPSTREAM_UNAVAILABLE)
        self.assertEqual(self.tunnels.pool.connections, 0)
        self.assertEqual(self.tunnels.routes, set())
        # The next console connects afresh (and finds the server gone).
        error = yield self.assertFailure(self.tunnels.route(self.console()), TunnelError)
        self.assertIn("cannot connect", str(error))


class KeepaliveTests(TunnelTestCase):
    @inlineCallbacks
    def test_keepalives_answered(self):  # type: ignore[no-untyped-def]
        tunnels = self.make_tunnels(keepalive_interval=0.1)
        route = yield self.open_route(tunnels)
        yield wait(0.6)  # several keepalives, all answered
        self.assertEqual(tunnels.pool.connections, 1)
        client = yield dial(int(route.parameters["port"]))
        client.transport.write(b"alive")
        self.assertEqual((yield client.expect(5)), b"alive")


class DeadPeerTests(TunnelTestCase):
    @inlineCallbacks
    def test_unanswered_keepalives_close_the_connection(self):  # type: ignore[no-untyped-def]
        tunnels = self.make_tunnels(keepalive_interval=0.2)
        route = yield self.open_route(tunnels)
        lost: list[TunnelError] = []
        route.on_lost = lost.append
        frozen = self.sshd.processes()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)  # alive for TCP, silent for SSH
        self.addCleanup(lambda: [os.kill(p, signal.SIGCONT) for p in frozen])
        for _ in range(50):
            if lost:
                break
            yield wait(0.1)
        self.assertEqual([e.status for e in lost], [Status.UPSTREAM_UNAVAILABLE])
        self.assertEqual(tunnels.pool.connections, 0)


class AgentTests(TunnelTestCase):
    @inlineCallbacks
    def test_agent_keys(self):  # type: ignore[no-untyped-def]
        directory = tempfile.mkdtemp(prefix="agent-")  # a short path for the socket
        self.addCleanup(shutil.rmtree, directory, True)
        socket_path = os.path.join(directory, "agent.sock")
        agent = subprocess.Popen(["ssh-agent", "-D", "-a", socket_path])
        self.addCleanup(agent.wait)
        self.addCleanup(agent.terminate)
        for _ in range(50):
            if os.path.exists(socket_path):
                break
            yield wait(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": socket_path}
        subprocess.run(
            ["ssh-add", "-q", self.sshd.client_key_path],
            env=env,
            check=True,
        )
        pool = SSHPool(reactor, SSHSettings(known_hosts=self.known_hosts, agent_socket=socket_path))
        self.addCleanup(pool.close)
        tunnels = Tunnels(
            reactor,
            TunnelSettings(default_mode="ssh", user=self.sshd.user, ssh_port=self.sshd.port),
            pool,
        )
        route = yield self.open_route(tunnels)  # no key file: the agent signs
        client = yield dial(int(route.parameters["port"]))
        client.transport.write(b"via agent")
        self.assertEqual((yield client.expect(9)), b"via agent")


class RelayThroughTunnelTests(TunnelTestCase):
    """Browser -> relay -> fake guacd -> SSH tunnel -> a real x11vnc on Xvfb."""

    @inlineCallbacks
    def test_vnc_through_the_whole_relay(self):  # type: ignore[no-untyped-def]
        desktop = yield start_vnc_desktop(self, reactor)
        guacd = FakeGuacd(reactor, behaviour=Behaviour(upstream=True))
        yield guacd.start()
        self.addCleanup(guacd.stop)
        server = yield start_server(self, guacd_port=guacd.port)
        server.relay.tunnels = self.tunnels
        console = Console(
            0, "vnc", {"hostname": "127.0.0.1", "port": str(desktop.port), "password": "x"}
        )
        token = server.tokens.seal(Identity("alice"), console)
        client = yield connect(server.ws_url(f"/guacamole?token={token}"))
        yield client.opened
        conn = yield guacd.wait_for_connection()
        self.assertNotEqual(conn.connect["port"], str(desktop.port))  # the tunnel's listener
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], "4.name,11.RFB 003.008;")
        self.assertEqual(self.tunnels.pool.connections, 1)
        client.sendClose(1000)
        yield client.closed
        yield conn.closed
        yield wait(0.5)
        self.assertEqual(self.tunnels.routes, set())
        self.assertEqual(self.tunnels.pool.connections, 0)
