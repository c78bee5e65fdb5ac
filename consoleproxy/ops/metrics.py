"""
Prometheus metrics, and the ``/metrics`` resource that exposes them.

L{Metrics} is an L{ISessionObserver}: the relays report sessions to it
through L{consoleproxy.relay.session_events.SessionEvents}; the web layer calls
L{Metrics.api_request}, L{Metrics.rate_limited} and L{Metrics.set_draining};
L{Metrics.watch_tunnels} exports the SSH tunnel pool's live counts.  Every
metric lives on the instance's own C{CollectorRegistry}, never on
prometheus_client's global one, so several servers (and tests) in one process
do not clash.  Process metrics (RSS, open file descriptors, CPU seconds) and
the Python platform are exported on that registry too.

Label values come from small sets only (relay, console type, numeric
Guacamole status, token error reason words, route patterns): never a user,
a VM id, an address or a raw path, which would grow the series without bound.

L{MetricsResource} renders the registry for Prometheus, optionally only to
clients in given networks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from consoleproxy.net.clients import Network, in_networks, peer_host
from consoleproxy.net.routing import json_body
from consoleproxy.relay.session_events import ISessionObserver, SessionRecord

#: Upstream handshake latency buckets, in seconds: 1 ms to 30 s.
HANDSHAKE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
)


class TunnelCounts(Protocol):
    """What L{Metrics.watch_tunnels} reads: L{consoleproxy.tunnels.routes.Tunnels} has it."""

    @property
    def active(self) -> int:
        """SSH tunnels in use now."""

    @property
    def pool(self) -> Any:
        """The SSH pool, with C{connections} and C{channels} counts."""


class _TunnelCollector(Collector):
    """Reads the tunnel pool's counts at each scrape."""

    def __init__(self, tunnels: TunnelCounts) -> None:
        self.tunnels = tunnels

    def collect(self) -> Iterable[Metric]:
        """The current counts, as gauges."""
        yield GaugeMetricFamily(
            "consoleproxy_ssh_tunnels_open",
            "SSH tunnels in use (one listener and channel per tunnelled console)",
            value=self.tunnels.active,
        )
        yield GaugeMetricFamily(
            "consoleproxy_ssh_connections",
            "SSH connections in the pool (connected, connecting or closing)",
            value=self.tunnels.pool.connections,
        )
        yield GaugeMetricFamily(
            "consoleproxy_ssh_channels_open",
            "direct-tcpip channels open or opening over all SSH connections",
            value=self.tunnels.pool.channels,
        )


@implementer(ISessionObserver)
class Metrics:
    """
    consoleproxy's metrics, on a registry of their own.

    @ivar registry: what L{MetricsResource} renders.
    @param process: export process and platform metrics too (RSS, file
        descriptors, CPU; Linux only for the process ones).
    """

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_open = Gauge(
            "consoleproxy_sessions_open",
            "Console sessions open now",
            ["relay", "type"],
            registry=r,
            # With several workers (prometheus_client's multiprocess mode): the host's sum
            # over the living workers; ignored in one process.
            multiprocess_mode="livesum",
        )
        self.sessions = Counter(
            "consoleproxy_sessions",
            "Console sessions closed, by the Guacamole status they closed with",
            ["relay", "type", "status"],
            registry=r,
        )
        self.relayed_bytes = Counter(
            "consoleproxy_relayed_bytes",
            "Bytes relayed by console sessions",
            ["relay", "direction"],
            registry=r,
        )
        self.handshake_seconds = Histogram(
            "consoleproxy_upstream_handshake_seconds",
            "Seconds from the WebSocket request to a ready upstream (guacd or VNC)",
            ["relay"],
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.session_refusals = Counter(
            "consoleproxy_session_refusals",
            "WebSockets refused before a session opened, by Guacamole status",
            ["relay", "status"],
            registry=r,
        )
        self.token_refusals = Counter(
            "consoleproxy_token_refusals",
            "Tokens refused, by reason",
            ["relay", "reason"],
            registry=r,
        )
        self.api_requests = Counter(
            "consoleproxy_api_requests",
            "HTTP API requests answered, by route pattern and status code",
            ["route", "code"],
            registry=r,
        )
        self.rate_limits = Counter(
            "consoleproxy_rate_limited",
            "Requests refused by a rate limit, by what was limited",
            ["what"],
            registry=r,
        )
        self.draining = Gauge(
            "consoleproxy_draining",
            "1 while the server drains before stopping",
            registry=r,
            multiprocess_mode="livemax",
        )
        #: Exported once there is a cluster (L{watch_cluster}).
        self.cluster_redis_available: Gauge | None = None
        self._tunnels: _TunnelCollector | None = None
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def share(self, path: str) -> None:
        """
        Render every worker's series, not only this process's: the metrics
        above (written to C{path} by prometheus_client's multiprocess mode,
        which C{PROMETHEUS_MULTIPROC_DIR} turned on before it was imported)
        are read back from all the workers' files at each scrape, summed
        (counters, histograms, C{livesum} gauges) or the largest (C{livemax}).
        The process, platform and tunnel collectors stay this worker's own.
        """
        from prometheus_client import multiprocess  # noqa: PLC0415 - only with workers

        for metric in (
            self.sessions_open,
            self.sessions,
            self.relayed_bytes,
            self.handshake_seconds,
            self.session_refusals,
            self.token_refusals,
            self.api_requests,
            self.rate_limits,
            self.draining,
            *([self.cluster_redis_available] if self.cluster_redis_available else []),
        ):
            self.registry.unregister(metric)
        multiprocess.MultiProcessCollector(self.registry, path=path)

    # -- ISessionObserver -----------------------------------------------------------

    def session_opened(self, record: SessionRecord) -> None:
        """Count an open session."""
        self.sessions_open.labels(record.relay, record.console_type).inc()

    def session_closed(self, record: SessionRecord) -> None:
        """
        Count a closed session by its status.

        Its bytes are not counted here: sessions report them with
        L{bytes_relayed} (periodically, and a last time when they close).
        """
        self.sessions_open.labels(record.relay, record.console_type).dec()
        status = "unknown" if record.status is None else str(record.status)
        self.sessions.labels(record.relay, record.console_type, status).inc()

    def session_refused(self, relay: str, status: int, reason: str, client: str) -> None:
        """Count a refused WebSocket by its status (the reason and client are not labels)."""
        self.session_refusals.labels(relay, str(status)).inc()

    def token_refused(self, relay: str, reason: str) -> None:
        """Count a refused token by its reason word."""
        self.token_refusals.labels(relay, reason).inc()

    def handshake_done(self, relay: str, seconds: float) -> None:
        """Observe the upstream handshake's latency."""
        self.handshake_seconds.labels(relay).observe(seconds)

    def bytes_relayed(self, relay: str, to_browser: int, from_browser: int) -> None:
        """Add the bytes a session relayed since its last report."""
        if to_browser > 0:
            self.relayed_bytes.labels(relay, "to_browser").inc(to_browser)
        if from_browser > 0:
            self.relayed_bytes.labels(relay, "from_browser").inc(from_browser)

    # -- the web layer --------------------------------------------------------------

    def api_request(self, route: str, code: int) -> None:
        """Count an answered API request: C{route} is the pattern (``/api/vm/<id>/...``)."""
        self.api_requests.labels(route, str(code)).inc()

    def rate_limited(self, what: str) -> None:
        """Count a request refused by the rate limit named C{what}."""
        self.rate_limits.labels(what).inc()

    def set_draining(self, draining: bool) -> None:
        """Say whether the server is draining (1) or serving (0)."""
        self.draining.set(1 if draining else 0)

    def watch_cluster(self, client: Any) -> None:
        """
        Export C{consoleproxy_cluster_redis_available}: 1 while the cluster's
        Redis (C{cluster.redis}) answers, 0 while it does not (new consoles
        are refused with status 512 then); absent without C{cluster.redis}.
        """
        gauge = self.cluster_redis_available
        if gauge is None:
            gauge = self.cluster_redis_available = Gauge(
                "consoleproxy_cluster_redis_available",
                "1 while the cluster's Redis answers, 0 while it does not",
                registry=self.registry,
                # Across workers: 0 as soon as one worker cannot reach Redis.
                multiprocess_mode="livemin",
            )
        gauge.set(1 if client.available else 0)
        client.add_observer(lambda available: gauge.set(1 if available else 0))

    def watch_tunnels(self, tunnels: TunnelCounts) -> None:
        """Export C{tunnels}' live counts at each scrape (replaces an earlier one)."""
        if self._tunnels is not None:
            self.registry.unregister(self._tunnels)
        self._tunnels = _TunnelCollector(tunnels)
        self.registry.register(self._tunnels)


def peer(request: Request) -> str:
    """The socket peer's IP address (C{"-"} for a UNIX socket): the default client."""
    return peer_host(request.getClientAddress())


class MetricsResource(Resource):
    """
    ``GET /metrics``: the registry in Prometheus' text format (0.0.4 unless the
    ``Accept`` header asks for a newer one, or for OpenMetrics).

    @param registry: what to render (L{Metrics.registry}).
    @param allowed: when given, only clients in these networks may read; the
        others get a JSON 403.
    @param client: the request's real client address (behind a trusted
        frontend, e.g. C{ClientAddresses.of_request(request).host}); by
        default the peer's address.
    """

    isLeaf = True

    def __init__(
        self,
        registry: CollectorRegistry,
        allowed: Sequence[Network] | None = None,
        client: Callable[[Request], str] = peer,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.allowed = None if allowed is None else tuple(allowed)
        self.client = client

    def render(self, request: Request) -> bytes:
        """Answer GET and HEAD; 403 to clients outside C{allowed}, 405 to other methods."""
        if self.allowed is not None and not in_networks(self.client(request), self.allowed):
            return json_body(request, 403, "Forbidden", "metrics are not served to this address")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return json_body(request, 405, "Method Not Allowed", "method not allowed here")
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Vary", b"Accept")
        request.setHeader(b"Cache-Control", b"no-store")
        return encoder(self.registry)
