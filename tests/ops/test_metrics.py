"""Prometheus metrics: what sessions, the web layer and the tunnel pool report; /metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from consoleproxy.ops.metrics import Metrics, MetricsResource, peer
from consoleproxy.relay.session_events import ISessionObserver, SessionEvents
from consoleproxy.tunnels.routes import Route, Tunnels, TunnelSettings
from consoleproxy.tunnels.ssh import SSHPool, SSHSettings
from tests.helpers.support import http_request, serve_resource
from tests.helpers.support import session_record as record


def samples(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics text, by (name, labels)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One sample's value as scraped, or None when it is absent."""
    return samples(generate_latest(metrics.registry)).get((name, frozenset(labels.items())))


class SessionMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics(process=False)

    def test_observer(self) -> None:
        self.assertTrue(verifyObject(ISessionObserver, self.metrics))

    def test_own_registry(self) -> None:
        """Two instances do not clash, and the global registry stays untouched."""
        other = Metrics()
        self.metrics.session_opened(record())
        self.assertEqual(
            value(self.metrics, "consoleproxy_sessions_open", relay="guacamole", type="vnc"), 1
        )
        self.assertEqual(
            value(other, "consoleproxy_sessions_open", relay="guacamole", type="vnc"), None
        )
        self.assertNotIn(b"consoleproxy_", generate_latest(REGISTRY))

    def test_open_and_close(self) -> None:
        """The gauge follows open sessions; closes count by relay, type and numeric status."""
        events = SessionEvents(self.metrics)
        first, second = record(), record(relay="rfb")
        third = record(console_type="ssh")
        for each in (first, second, third):
            events.session_opened(each)
        first.status, second.status = 0x0203, 0
        events.session_closed(first)
        events.session_closed(second)
        open_ = "consoleproxy_sessions_open"
        self.assertEqual(value(self.metrics, open_, relay="guacamole", type="vnc"), 0)
        self.assertEqual(value(self.metrics, open_, relay="rfb", type="vnc"), 0)
        self.assertEqual(value(self.metrics, open_, relay="guacamole", type="ssh"), 1)
        total = "consoleproxy_sessions_total"
        self.assertEqual(value(self.metrics, total, relay="guacamole", type="vnc", status="515"), 1)
        self.assertEqual(value(self.metrics, total, relay="rfb", type="vnc", status="0"), 1)
        self.assertEqual(
            value(self.metrics, total, relay="guacamole", type="ssh", status="0"), None
        )

    def test_bytes_are_live(self) -> None:
        """Each report adds to the counters at once; closing adds nothing more."""
        name = "consoleproxy_relayed_bytes_total"
        self.metrics.bytes_relayed("guacamole", 1000, 20)
        self.assertEqual(value(self.metrics, name, relay="guacamole", direction="to_browser"), 1000)
        self.assertEqual(value(self.metrics, name, relay="guacamole", direction="from_browser"), 20)
        self.metrics.bytes_relayed("guacamole", 500, 0)
        session = record(bytes_to_browser=1500, bytes_from_browser=20, status=0)
        self.metrics.session_opened(session)
        self.metrics.session_closed(session)
        self.assertEqual(value(self.metrics, name, relay="guacamole", direction="to_browser"), 1500)
        self.assertEqual(value(self.metrics, name, relay="guacamole", direction="from_browser"), 20)
        self.assertEqual(value(self.metrics, name, relay="rfb", direction="to_browser"), None)

    def test_handshake_histogram(self) -> None:
        """Latencies land in buckets from 1 ms to 30 s."""
        for seconds in (0.004, 0.2, 25.0):
            self.metrics.handshake_done("rfb", seconds)
        name = "consoleproxy_upstream_handshake_seconds_bucket"
        self.assertEqual(value(self.metrics, name, relay="rfb", le="0.001"), 0)
        self.assertEqual(value(self.metrics, name, relay="rfb", le="0.005"), 1)
        self.assertEqual(value(self.metrics, name, relay="rfb", le="0.25"), 2)
        self.assertEqual(value(self.metrics, name, relay="rfb", le="20.0"), 2)
        self.assertEqual(value(self.metrics, name, relay="rfb", le="30.0"), 3)
        self.assertEqual(value(self.metrics, name, relay="rfb", le="+Inf"), 3)
        count = "consoleproxy_upstream_handshake_seconds_count"
        self.assertEqual(value(self.metrics, count, relay="rfb"), 3)

    def test_refusals(self) -> None:
        self.metrics.session_refused("guacamole", 0x0301, "token expired", "tcp4:192.0.2.9:1")
        self.metrics.session_refused("guacamole", 0x0301, "token expired", "tcp4:192.0.2.9:2")
        self.metrics.token_refused("rfb", "expired")
        name = "consoleproxy_session_refusals_total"
        self.assertEqual(value(self.metrics, name, relay="guacamole", status="769"), 2)
        name = "consoleproxy_token_refusals_total"
        self.assertEqual(value(self.metrics, name, relay="rfb", reason="expired"), 1)

    def test_web_layer(self) -> None:
        self.metrics.api_request("/api/vm/<id>/guacamole/<type>", 200)
        self.metrics.api_request("/api/vm/<id>/guacamole/<type>", 200)
        self.metrics.api_request("/api/vm/<id>/guacamole/<type>", 429)
        self.metrics.rate_limited("token")
        requests = "consoleproxy_api_requests_total"
        route = "/api/vm/<id>/guacamole/<type>"
        self.assertEqual(value(self.metrics, requests, route=route, code="200"), 2)
        self.assertEqual(value(self.metrics, requests, route=route, code="429"), 1)
        self.assertEqual(value(self.metrics, "consoleproxy_rate_limited_total", what="token"), 1)
        self.assertEqual(value(self.metrics, "consoleproxy_draining"), 0)
        self.metrics.set_draining(True)
        self.assertEqual(value(self.metrics, "consoleproxy_draining"), 1)
        self.metrics.set_draining(False)
        self.assertEqual(value(self.metrics, "consoleproxy_draining"), 0)

    def test_process_metrics(self) -> None:
        """RSS, file descriptors and CPU of this process are exported (on Linux)."""
        metrics = Metrics()
        rss = value(metrics, "process_resident_memory_bytes")
        self.assertIsNotNone(rss)
        self.assertGreater(rss, 1_000_000)
        self.assertGreater(value(metrics, "process_open_fds") or 0, 2)
        self.assertIsNotNone(value(metrics, "process_cpu_seconds_total"))
        self.assertIsNone(value(self.metrics, "process_resident_memory_bytes"))


@dataclass
class _Pool:
    connections: int = 0
    channels: int = 0


@dataclass
class _Tunnels:
    active: int = 0
    pool: _Pool = field(default_factory=_Pool)


class TunnelMetricsTests(SynchronousTestCase):
    def test_live_values(self) -> None:
        """Each scrape reads the pool's counts as they are then."""
        metrics = Metrics(process=False)
        tunnels = _Tunnels()
        metrics.watch_tunnels(tunnels)
        self.assertEqual(value(metrics, "consoleproxy_ssh_tunnels_open"), 0)
        tunnels.active, tunnels.pool.connections, tunnels.pool.channels = 3, 2, 4
        self.assertEqual(value(metrics, "consoleproxy_ssh_tunnels_open"), 3)
        self.assertEqual(value(metrics, "consoleproxy_ssh_connections"), 2)
        self.assertEqual(value(metrics, "consoleproxy_ssh_channels_open"), 4)

    def test_watch_again(self) -> None:
        """Watching another pool replaces the first (no duplicate series)."""
        metrics = Metrics(process=False)
        metrics.watch_tunnels(_Tunnels(active=1))
        metrics.watch_tunnels(_Tunnels(active=5))
        self.assertEqual(value(metrics, "consoleproxy_ssh_tunnels_open"), 5)

    def test_real_tunnels(self) -> None:
        """The counts of L{Tunnels} and L{SSHPool}: routes in use, hosts, their channels."""
        clock = Clock()
        pool = SSHPool(clock, SSHSettings(known_hosts=self.mktemp()))
        tunnels = Tunnels(clock, TunnelSettings(), pool)
        metrics = Metrics(process=False)
        metrics.watch_tunnels(tunnels)
        host = pool.host("hv1", 22, "oneadmin")
        pool.host("hv2", 22, "oneadmin")
        host.channels.update({object(), object()})  # type: ignore[arg-type]
        route = Route({}, tunnelled=True)
        tunnels.routes.add(route)
        self.assertEqual(value(metrics, "consoleproxy_ssh_tunnels_open"), 1)
        self.assertEqual(value(metrics, "consoleproxy_ssh_connections"), 2)
        self.assertEqual(value(metrics, "consoleproxy_ssh_channels_open"), 2)
        tunnels.routes.discard(route)
        self.assertEqual(value(metrics, "consoleproxy_ssh_tunnels_open"), 0)


class PeerTests(SynchronousTestCase):
    def test_peer(self) -> None:
        """The default client is the peer's IP address; a UNIX socket's is never allowed."""
        request = DummyRequest([b"metrics"])
        request.client = IPv6Address("TCP", "2001:db8::5", 4000)
        self.assertEqual(peer(request), "2001:db8::5")
        request.client = IPv4Address("TCP", "192.0.2.5", 4000)
        self.assertEqual(peer(request), "192.0.2.5")
        resource = MetricsResource(Metrics(process=False).registry, [ip_network("0.0.0.0/0")])
        self.assertNotIn(b"403", resource.render(request))
        self.assertEqual(request.responseCode, None)
        request.client = UNIXAddress(b"/run/consoleproxy.sock")
        resource.render(request)
        self.assertEqual(request.responseCode, 403)


class MetricsResourceTests(TestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.metrics.session_opened(record())

    def serve(self, **kwargs: Any) -> Any:
        return serve_resource(self, MetricsResource(self.metrics.registry, **kwargs))

    async def test_get(self) -> None:
        """GET renders the registry in Prometheus' text format."""
        port = await self.serve()
        code, headers, body = await http_request(port, "/metrics")
        self.assertEqual(code, 200)
        content_type = headers.getRawHeaders(b"content-type")[0]
        self.assertEqual(content_type, b"text/plain; version=0.0.4; charset=utf-8")
        scraped = samples(body)
        key = ("consoleproxy_sessions_open", frozenset({("relay", "guacamole"), ("type", "vnc")}))
        self.assertEqual(scraped[key], 1)
        self.assertIn(("process_resident_memory_bytes", frozenset()), scraped)

    async def test_openmetrics(self) -> None:
        """A scraper that asks for OpenMetrics gets it."""
        port = await self.serve()
        accept = b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        code, headers, body = await http_request(port, "/metrics", headers={b"Accept": accept})
        self.assertEqual(code, 200)
        content_type = headers.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"application/openmetrics-text"), content_type)
        self.assertTrue(body.endswith(b"# EOF\n"))
        self.assertIn(b'consoleproxy_sessions_open{relay="guacamole",type="vnc"} 1.0', body)

    async def test_head(self) -> None:
        port = await self.serve()
        code, _, body = await http_request(port, "/metrics", b"HEAD")
        self.assertEqual((code, body), (200, b""))

    async def test_other_methods(self) -> None:
        port = await self.serve()
        code, headers, body = await http_request(port, "/metrics", b"POST")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual(json.loads(body)["id"], 405)

    async def test_allowed_network(self) -> None:
        port = await self.serve(allowed=[ip_network("127.0.0.0/8")])
        code, _, body = await http_request(port, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"consoleproxy_sessions_open", body)

    async def test_other_network(self) -> None:
        """A client outside the networks gets a JSON 403, and no metrics."""
        port = await self.serve(allowed=[ip_network("10.0.0.0/8")])
        code, _, body = await http_request(port, "/metrics")
        self.assertEqual(code, 403)
        self.assertEqual(json.loads(body)["id"], 403)
        self.assertNotIn(b"consoleproxy_sessions_open", body)

    async def test_real_client(self) -> None:
        """The real client's address (behind a trusted proxy) decides, not the peer's."""
        nets = [ip_network("10.0.0.0/8")]
        port = await self.serve(allowed=nets, client=lambda request: "10.9.8.7")
        code, _, _ = await http_request(port, "/metrics")
        self.assertEqual(code, 200)
        port = await self.serve(
            allowed=[ip_network("127.0.0.0/8")], client=lambda request: "192.0.2.1"
        )
        code, _, _ = await http_request(port, "/metrics")
        self.assertEqual(code, 403)
