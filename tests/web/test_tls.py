"""TLS on both sides: guacd over verified TLS (``tls:``), and TLS termination (``ssl:``)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from consoleproxy.consoles import Console, Identity
from consoleproxy.web.api import TokenApi
from consoleproxy.web.http_channel import HttpLimits
from consoleproxy.web.site import ConsoleProxyWeb, build_site
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import start_server, wait
from tests.helpers.testca import make_tls_files
from tests.helpers.wsclient import ClientFactory

VNC = Console(7, "vnc", {"hostname": "10.0.0.5", "port": "5907", "password": "vnc-secret"})


class GuacdOverTlsTests(TestCase):
    @inlineCallbacks
    def start(self, names=("localhost",), trusted=True):  # type: ignore[no-untyped-def]
        key, cert, _ = make_tls_files(FilePath(self.mktemp()), names)
        self.guacd = FakeGuacd(
            reactor, endpoint=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        )
        yield self.guacd.start()
        self.addCleanup(self.guacd.stop)
        roots = FilePath(cert).sibling("ca").path
        if not trusted:
            make_tls_files(FilePath(self.mktemp()))  # another CA: not ours
            roots = FilePath(self.mktemp()).path
            FilePath(roots).makedirs()
            FilePath(roots).child("other.pem").setContent(
                make_tls_files(FilePath(self.mktemp()))[2]
            )
        self.server = yield start_server(
            self, guacd=f"tls:localhost:{self.guacd.port}:trustRoots={roots}"
        )

    @inlineCallbacks
    def session(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(Identity("alice"), VNC)
        factory = ClientFactory(self.server.ws_url(), protocols=["guacamole"])
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port).connect(
            _with_url(factory, self.server.ws_url(f"/guacamole?token={token}"))
        )
        yield client.opened
        return client

    @inlineCallbacks
    def test_verified_guacd(self):  # type: ignore[no-untyped-def]
        yield self.start()
        client = yield self.session()
        conn = yield self.guacd.wait_for_connection()
        self.assertEqual(conn.connect["password"], "vnc-secret")
        conn.send("sync", "5")
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], "4.sync,1.5;")
        client.sendClose(1000)
        yield conn.closed
        yield client.closed

    @inlineCallbacks
    def test_wrong_host_name_refused(self):  # type: ignore[no-untyped-def]
        yield self.start(names=("guacd.example.com",))
        client = yield self.session()
        code, reason = yield client.closed
        self.assertEqual((code, reason), (1011, "512"))
        self.assertEqual([c.connect for c in self.guacd.connections if c.connect], [])

    @inlineCallbacks
    def test_untrusted_certificate_refused(self):  # type: ignore[no-untyped-def]
        yield self.start(trusted=False)
        client = yield self.session()
        code, reason = yield client.closed
        self.assertEqual((code, reason), (1011, "512"))
        self.assertEqual([c.connect for c in self.guacd.connections if c.connect], [])


def _with_url(factory: ClientFactory, url: str) -> ClientFactory:
    factory.setSessionParameters(url, protocols=["guacamole"])
    return factory


class TlsTerminationTests(TestCase):
    @inlineCallbacks
    def test_wss_session_and_https_token(self):  # type: ignore[no-untyped-def]
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        key, cert, ca = make_tls_files(FilePath(self.mktemp()))
        server = yield start_server(
            self,
            guacd_port=guacd.port,
            listen=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        token = server.tokens.seal(Identity("alice"), VNC)
        url = f"wss://localhost:{server.port}/guacamole?token={token}"
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca)),
            TCP4ClientEndpoint(reactor, "127.0.0.1", server.port),
        )
        client = yield endpoint.connect(ClientFactory(url, protocols=["guacamole"]))
        yield client.opened
        conn = yield guacd.wait_for_connection()
        conn.send("sync", "9")
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], "4.sync,1.9;")
        client.send("3.key,2.65,1.1;")
        while not conn.received:
            yield (
                client.wait_messages(len(client.messages) + 1)
                .addTimeout(0.05, reactor)
                .addErrback(lambda _: None)
            )
        self.assertEqual(conn.received, [["key", "65", "1"]])
        client.sendClose(1000)
        yield client.closed
        yield conn.closed


class _Watcher(Protocol):
    """Records what the server sends and when it closes."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[float] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(reactor.seconds())


class TlsSlowlorisTests(TestCase):
    """The request deadline runs from the TCP connection: TLS is no way around it."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        key, cert, ca = make_tls_files(FilePath(self.mktemp()))
        self.ca = Certificate.loadPEM(ca)
        server = yield start_server(self)
        site = build_site(
            ConsoleProxyWeb(TokenApi(server.cloud, server.cloud, server.tokens), Resource()),
            reactor,
            limits=HttpLimits(request_timeout=0.5),
        )
        listening = yield serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        ).listen(site)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    @inlineCallbacks
    def test_no_tls_handshake(self):  # type: ignore[no-untyped-def]
        watcher = _Watcher()
        started = reactor.seconds()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(
            Factory.forProtocol(lambda: watcher)
        )
        ended = yield watcher.lost
        self.assertLess(ended - started, 3)

    @inlineCallbacks
    def test_headers_trickled_over_tls(self):  # type: ignore[no-untyped-def]
        watcher = _Watcher()
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=self.ca),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        yield endpoint.connect(Factory.forProtocol(lambda: watcher))
        started = reactor.seconds()
        for byte in b"GET /api/vm/7/guacamole/vnc HTTP/1.1\r\nHost: x\r\n":
            if watcher.lost.called:
                break
            watcher.transport.write(bytes([byte]))
            yield wait(0.02)
        ended = yield watcher.lost
        self.assertLess(ended - started, 3)
        self.assertTrue(watcher.data.startswith(b"HTTP/1.1 408 "), watcher.data[:40])
        self.assertIn(b'"id": 408', watcher.data)
