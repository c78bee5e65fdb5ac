"""
Who the client is (clients.py): the socket's peer, or behind a trusted
frontend the address it names in X-Forwarded-For.  The rules first, then over
real sockets: the access log, the token API's and the relay's log lines.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from consoleproxy.net.clients import (
    Client,
    ClientAddresses,
    autobahn_peer_host,
    in_networks,
    networks,
    peer_host,
)
from consoleproxy.relay.websocket import RelayPolicy
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import basic, http_request, serve_web, start_server
from tests.helpers.wsclient import ClientFactory
from tests.relay.test_guacamole_relay import ALICE, VNC

FRONTENDS = ClientAddresses(networks(["127.0.0.1", "10.0.0.0/8", "2001:db8:f::/48"]))


def resolve(peer: str, forwarded: str | None = None, proto: str | None = None) -> Client:
    """What L{FRONTENDS} makes of a plain-HTTP request with these headers."""
    headers = {}
    if forwarded is not None:
        headers["x-forwarded-for"] = forwarded
    if proto is not None:
        headers["x-forwarded-proto"] = proto
    return FRONTENDS.resolve(peer, headers, secure=False)


class NetworkTests(SynchronousTestCase):
    def test_networks(self) -> None:
        parsed = networks(["10.1.2.3/8", " ::1 ", "192.0.2.7"])
        self.assertEqual([str(n) for n in parsed], ["10.0.0.0/8", "::1/128", "192.0.2.7/32"])
        with self.assertRaises(ValueError) as caught:
            networks(["10.0.0.0/8", "frontend.example"])
        self.assertIn("'frontend.example'", str(caught.exception))

    def test_in_networks(self) -> None:
        nets = networks(["10.0.0.0/8", "fe80::/10"])
        self.assertTrue(in_networks("10.9.9.9", nets))
        self.assertFalse(in_networks("11.0.0.1", nets))
        self.assertTrue(in_networks("::ffff:10.1.1.1", nets))  # IPv4-mapped
        self.assertTrue(in_networks("fe80::1%eth0", nets))  # with a zone
        for garbage in ("", "-", "unknown", "10.0.0", "[::1]"):
            self.assertFalse(in_networks(garbage, nets), garbage)

    def test_peer_host(self) -> None:
        self.assertEqual(peer_host(IPv4Address("TCP", "192.0.2.1", 5)), "192.0.2.1")
        self.assertEqual(peer_host(IPv6Address("TCP", "2001:db8::1", 5)), "2001:db8::1")
        self.assertEqual(peer_host(UNIXAddress(b"/run/sock")), "-")
        self.assertEqual(peer_host(None), "-")

    def test_autobahn_peer_host(self) -> None:
        self.assertEqual(autobahn_peer_host("tcp4:192.0.2.1:5555"), "192.0.2.1")
        self.assertEqual(autobahn_peer_host("tcp6:::1:5555"), "::1")
        self.assertEqual(autobahn_peer_host("tcp6:2001:db8::7:443"), "2001:db8::7")
        self.assertEqual(autobahn_peer_host("unix:/run/sock"), "-")
        self.assertEqual(autobahn_peer_host("garbage"), "-")


class ResolveTests(SynchronousTestCase):
    def test_untrusted_peer_headers_ignored(self) -> None:
        client = resolve("192.0.2.50", "203.0.113.9", "https")
        self.assertEqual(client, Client("192.0.2.50", "http"))
        self.assertEqual(str(client), "192.0.2.50")

    def test_nothing_trusted(self) -> None:
        client = ClientAddresses().resolve("127.0.0.1", {"x-forwarded-for": "203.0.113.9"}, True)
        self.assertEqual(client, Client("127.0.0.1", "https"))

    def test_trusted_peer_names_the_client(self) -> None:
        client = resolve("127.0.0.1", "203.0.113.9")
        self.assertEqual(client, Client("203.0.113.9", "http", via="127.0.0.1"))
        self.assertEqual(str(client), "203.0.113.9 (via 127.0.0.1)")

    def test_rightmost_untrusted_wins(self) -> None:
        # What the client claims further left is its own business.
        self.assertEqual(resolve("127.0.0.1", "198.51.100.1, 203.0.113.9").host, "203.0.113.9")

    def test_chain_of_trusted_frontends_skipped(self) -> None:
        client = resolve("127.0.0.1", "198.51.100.1,203.0.113.9 , 10.1.1.1,10.2.2.2")
        self.assertEqual((client.host, client.via), ("203.0.113.9", "127.0.0.1"))

    def test_only_frontends_named(self) -> None:
        self.assertEqual(resolve("127.0.0.1", "10.2.2.2, 10.1.1.1").host, "10.2.2.2")

    def test_garbage_stops_the_walk(self) -> None:
        self.assertEqual(resolve("127.0.0.1", "203.0.113.9, unknown").host, "127.0.0.1")
        self.assertIsNone(resolve("127.0.0.1", "203.0.113.9, unknown").via)
        # Beyond a trusted hop: that hop is the last one believed.
        self.assertEqual(resolve("127.0.0.1", "203.0.113.9, _hidden, 10.1.1.1").host, "10.1.1.1")

    def test_empty_entries_and_headers(self) -> None:
        self.assertEqual(resolve("127.0.0.1", " , ,203.0.113.9,, ").host, "203.0.113.9")
        self.assertEqual(resolve("127.0.0.1", "").host, "127.0.0.1")
        self.assertEqual(resolve("127.0.0.1"), Client("127.0.0.1", "http"))

    def test_ports_stripped(self) -> None:
        self.assertEqual(resolve("127.0.0.1", "203.0.113.9:4711").host, "203.0.113.9")
        self.assertEqual(resolve("127.0.0.1", "[2001:db8::1]:443").host, "2001:db8::1")
        self.assertEqual(resolve("127.0.0.1", "[2001:db8::1]").host, "2001:db8::1")
        self.assertEqual(resolve("127.0.0.1", "2001:db8::1").host, "2001:db8::1")
        # A trusted IPv6 frontend with a port is skipped too.
        self.assertEqual(
            resolve("127.0.0.1", "203.0.113.9, [2001:db8:f::2]:80").host, "203.0.113.9"
        )

    def test_forwarded_ipv6_scope_dropped(self) -> None:
        """A scope is the frontend's business: one key per client, no text of the client's."""
        self.assertEqual(resolve("127.0.0.1", "fe80::1%1").host, "fe80::1")
        self.assertEqual(resolve("127.0.0.1", "[fe80::1%\x1b[31m]:443").host, "fe80::1")
        self.assertEqual(resolve("127.0.0.1", "fe80::1%2").rate_key(), "fe80::/64")

    def test_ipv4_mapped_and_ipv6_peers(self) -> None:
        self.assertEqual(resolve("::ffff:127.0.0.1", "203.0.113.9").host, "203.0.113.9")
        self.assertEqual(resolve("::ffff:192.0.2.50", "203.0.113.9").host, "::ffff:192.0.2.50")
        self.assertEqual(resolve("2001:db8:f::9", "203.0.113.9").host, "203.0.113.9")
        self.assertEqual(resolve("2001:db8:e::9", "203.0.113.9").host, "2001:db8:e::9")

    def test_forwarded_proto(self) -> None:
        self.assertEqual(resolve("127.0.0.1", "203.0.113.9", "https").proto, "https")
        self.assertEqual(resolve("127.0.0.1", None, " HTTPS , http").proto, "https")
        self.assertEqual(resolve("127.0.0.1", None, "ftp").proto, "http")
        self.assertEqual(resolve("127.0.0.1", None, "http, https").proto, "http")
        secure = FRONTENDS.resolve("127.0.0.1", {"x-forwarded-proto": "gopher"}, secure=True)
        self.assertEqual(secure.proto, "https")
        plain = FRONTENDS.resolve("127.0.0.1", {"x-forwarded-proto": "http"}, secure=True)
        self.assertEqual(plain.proto, "http")  # TLS to us, plain HTTP to the frontend
        self.assertEqual(resolve("192.0.2.50", None, "https").proto, "http")

    def test_rate_key(self) -> None:
        self.assertEqual(Client("203.0.113.9", "http").rate_key(), "203.0.113.9")
        one = Client("2001:db8:1:2:aaaa::1", "http").rate_key()
        self.assertEqual(one, "2001:db8:1:2::/64")
        self.assertEqual(Client("2001:db8:1:2:bbbb:cccc:dddd:eeee", "http").rate_key(), one)
        self.assertNotEqual(Client("2001:db8:1:3::1", "http").rate_key(), one)
        self.assertEqual(Client("::ffff:192.0.2.1", "http").rate_key(), "::ffff:c000:201")
        self.assertEqual(Client("-", "http").rate_key(), "-")

    def test_of_request_joins_repeated_headers(self) -> None:
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", "127.0.0.1", 5)
        request.isSecure = lambda: False  # type: ignore[attr-defined]
        request.requestHeaders.setRawHeaders(b"X-Forwarded-For", [b"198.51.100.1", b"203.0.113.9"])
        request.requestHeaders.setRawHeaders(b"X-Forwarded-Proto", [b"https"])
        request.requestHeaders.setRawHeaders(b"X-Other", [b"10.9.9.9"])
        self.assertEqual(
            FRONTENDS.of_request(request), Client("203.0.113.9", "https", via="127.0.0.1")
        )

    def test_of_websocket(self) -> None:
        headers = {"x-forwarded-for": "203.0.113.9"}
        self.assertEqual(
            FRONTENDS.of_websocket("tcp4:127.0.0.1:5", headers, False).host, "203.0.113.9"
        )
        self.assertEqual(FRONTENDS.of_websocket("tcp6:::1:5", headers, False).host, "::1")
        self.assertEqual(FRONTENDS.of_websocket("unix", headers, False).host, "-")


_HOPS = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:{443}"),
    st.ip_addresses(v=4).map(lambda a: f"{a}:8080"),
    st.sampled_from(["10.1.1.1", "127.0.0.1", "unknown", "", "[", "::ffff:10.0.0.1", "a:b"]),
    st.text(max_size=12),
)


class ResolveProperties(SynchronousTestCase):
    @given(
        peer=st.one_of(st.sampled_from(["127.0.0.1", "10.3.3.3", "192.0.2.1"]), st.text()),
        forwarded=st.one_of(st.text(), st.lists(_HOPS, max_size=6).map(", ".join)),
        proto=st.text(max_size=8),
        secure=st.booleans(),
    )
    def test_never_raises_answers_peer_or_a_named_address(
        self, peer: str, forwarded: str, proto: str, secure: bool
    ) -> None:
        headers = {"x-forwarded-for": forwarded, "x-forwarded-proto": proto}
        client = FRONTENDS.resolve(peer, headers, secure)
        self.assertIn(client.proto, ("http", "https"))
        if client.host == peer:
            self.assertIsNone(client.via)
        else:
            self.assertIn(client.host, forwarded)
            self.assertEqual(client.via, peer)
            self.assertTrue(in_networks(peer, FRONTENDS.trusted))
        client.rate_key()  # never raises either


# -- over real sockets ---------------------------------------------------------------


def log_lines(testcase: Any) -> list[str]:
    """Every log line from now to the end of the test, formatted (filled in as they come)."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class LoggedClientTests(TestCase):
    @inlineCallbacks
    def token_logged_as(self, trusted: list[str]):  # type: ignore[no-untyped-def]
        """Ask a token through a frontend at 127.0.0.1 naming 203.0.113.9; return its log lines."""
        server = yield start_server(self)
        port = yield serve_web(self, server, clients=ClientAddresses(networks(trusted)))
        lines = log_lines(self)
        code, _, _ = yield http_request(
            port,
            "/api/vm/7/guacamole/vnc",
            headers={
                b"Authorization": basic("alice", "wonderland"),
                b"X-Forwarded-For": b"203.0.113.9",
            },
        )
        self.assertEqual(code, 200)
        issued = [line for line in lines if line.startswith("Token issued")]
        access = [line for line in lines if "GET /api/vm/7/guacamole/vnc HTTP/1.1" in line]
        self.assertEqual((len(issued), len(access)), (1, 1), lines)
        return issued[0], access[0]

    @inlineCallbacks
    def test_behind_a_trusted_frontend(self):  # type: ignore[no-untyped-def]
        issued, access = yield self.token_logged_as(["127.0.0.1"])
        self.assertTrue(issued.endswith("peer=203.0.113.9 (via 127.0.0.1)"), issued)
        self.assertTrue(access.startswith('"203.0.113.9" - - '), access)

    @inlineCallbacks
    def test_untrusted_frontend_is_the_client(self):  # type: ignore[no-untyped-def]
        issued, access = yield self.token_logged_as(["192.0.2.0/24"])
        self.assertTrue(issued.endswith("peer=127.0.0.1"), issued)
        self.assertTrue(access.startswith('"127.0.0.1" - - '), access)

    @inlineCallbacks
    def console_opened_as(self, trusted: list[str]):  # type: ignore[no-untyped-def]
        """Open a Guacamole session naming 203.0.113.9; return its "Console opened" line."""
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        server = yield start_server(self, guacd_port=guacd.port)
        server.relay.policy = RelayPolicy(clients=ClientAddresses(networks(trusted)))
        lines = log_lines(self)
        token = server.tokens.seal(ALICE, VNC)
        factory = ClientFactory(
            server.ws_url(f"/guacamole?token={token}"),
            protocols=["guacamole"],
            headers={"X-Forwarded-For": "203.0.113.9"},
        )
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", server.port).connect(factory)
        yield client.opened
        conn = yield guacd.wait_for_connection()
        client.sendClose(1000)
        yield client.closed
        yield conn.closed
        opened = [line for line in lines if line.startswith("Console opened")]
        self.assertEqual(len(opened), 1, lines)
        return opened[0]

    @inlineCallbacks
    def test_websocket_behind_a_trusted_frontend(self):  # type: ignore[no-untyped-def]
        opened = yield self.console_opened_as(["127.0.0.1"])
        self.assertTrue(opened.endswith("peer=203.0.113.9 (via 127.0.0.1)"), opened)

    @inlineCallbacks
    def test_websocket_untrusted(self):  # type: ignore[no-untyped-def]
        opened = yield self.console_opened_as([])
        self.assertTrue(opened.endswith("peer=127.0.0.1"), opened)
