"""
The URL map and the HTTP site.

One port serves the token API and the WebSocket relays, each also under
``/fireedge`` so that FireEdge's browser code works unchanged, and the
console page with its static files::

    /api/vm/<id>/guacamole/<type>   token API (?mode=rfb: a raw VNC token)
    /api/console-modes              which relays the console page can use now
    /guacamole                      Guacamole WebSocket relay (subprotocol guacamole)
    /rfb                            raw VNC WebSocket relay (subprotocol binary)
    /                               the landing page: the user's consoles (HTTP Basic)
    /console/<id>/<type>            the console page (HTTP Basic)
    /console/<id>/<type>/token      the token API, where the page's credentials go
    /static/...                     the page's script, style and npm libraries
    /api/sessions[/<id>]            live sessions: GET lists, DELETE ends (web/sessions_api)
    /metrics                        Prometheus metrics (allowed networks only)
    /healthz, /readyz               the process serves; guacd and the cloud answer

The token API and the console page check passwords: each client address
gets a rate limit there (429 with Retry-After).  While the server drains,
the token API answers 503: a new token could not open a session anyway.
The access log never records query strings (the relays' carry the token)
and names the real client behind a trusted frontend.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from consoleproxy.cluster.ratelimit import ClusterRateLimiter
from consoleproxy.net.clients import ClientAddresses, peer_host
from consoleproxy.net.connlimit import Admission, ConnectionGate, Refused
from consoleproxy.net.logsafe import log_safe
from consoleproxy.net.ratelimit import LineThrottle, RateLimiter, retry_after
from consoleproxy.net.routing import Router, client_of, json_body
from consoleproxy.web.api import TokenApi
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.console_page import ConsoleModes, ConsolePage, not_enabled
from consoleproxy.web.http_channel import HttpLimits, LimitedChannel
from consoleproxy.web.landing import LandingPage
from consoleproxy.web.sessions_api import SessionsApi

_STATIC_PREFIXES = (b"/static/", b"/fireedge/static/")
#: What a health-only connection (near the descriptor limit) may ask.
_HEALTH_PATHS = (b"/healthz", b"/readyz")


@dataclass
class Operations:
    """
    The operator's endpoints and controls.

    @ivar metrics: the ``/metrics`` resource; C{None}: not served.
    @ivar health: ``/healthz``; @ivar readiness: ``/readyz``.
    @ivar observer: told of API answers and rate limiting (the metrics).
    @ivar limiter: the per-client rate limit of password checks (the
        cluster's, counted in Redis, when C{cluster.redis} is set).
    @ivar draining: whether the server is shutting down.
    @ivar retry_after: the token API's C{Retry-After} while draining: seconds
        until the port closes (C{server.drain_grace}), when a load balancer
        has sent the retry elsewhere.
    """

    metrics: Resource | None = None
    health: Resource | None = None
    readiness: Resource | None = None
    observer: Any = None
    limiter: RateLimiter | ClusterRateLimiter | None = None
    draining: Callable[[], bool] = lambda: False
    retry_after: int = 30


class ConsoleProxyWeb:
    """
    Routes requests to the token API, the relays and the console page.

    The parts after C{relay} are optional: a part that is not given answers
    404 (JSON) to its routes.
    """

    router = Router()

    def __init__(
        self,
        api: TokenApi,
        relay: Resource,
        *,
        rfb: Resource | None = None,
        page: ConsolePage | None = None,
        modes: ConsoleModes | None = None,
        assets: StaticFiles | None = None,
        landing: LandingPage | None = None,
        operations: Operations | None = None,
        sessions: SessionsApi | None = None,
    ) -> None:
        self.operations = operations or Operations()
        self.api = api
        self.relay = relay
        self.rfb = rfb
        self.page = page
        self.modes = modes
        self.assets = assets
        self.landing = landing
        self.sessions = sessions

    @router.route("/api/vm/<vm_id>/guacamole/<console_type>")
    @router.route("/fireedge/api/vm/<vm_id>/guacamole/<console_type>")
    @router.route("/console/<vm_id>/<console_type>/token")
    @router.route("/fireedge/console/<vm_id>/<console_type>/token")
    def token(self, request: Request, vm_id: str, console_type: str) -> Any:
        """Mint a console token (under the console page's URL too: see console_page)."""
        observer = self.operations.observer
        if observer is not None:
            request.notifyFinish().addBoth(lambda _: observer.api_request("token", request.code))
        if self.operations.draining():
            request.setHeader(b"Retry-After", str(self.operations.retry_after).encode())
            return json_body(request, 503, "Service Unavailable", "the server is shutting down")
        return self._unless_limited(
            request, "token", lambda: self.api.mint(request, vm_id, console_type)
        )

    def _unless_limited(self, request: Request, what: str, proceed: Callable[[], Any]) -> Any:
        """
        C{proceed()}'s answer, or a 429 when the client is over its rate.

        The cluster's limiter (Redis) answers a Deferred: then so does this
        (an already-fired one while Redis is away: the process's own limit).
        """
        limiter = self.operations.limiter
        if limiter is None:
            return proceed()
        wait = limiter.take(client_of(request).rate_key())
        if isinstance(wait, Deferred):
            return wait.addCallback(lambda w: self._too_many(request, what, w) or proceed())
        return self._too_many(request, what, wait) or proceed()

    def _too_many(self, request: Request, what: str, wait: float | None) -> bytes | None:
        """A 429 answer when the client must wait, else C{None}."""
        if wait is None:
            return None
        if self.operations.observer is not None:
            self.operations.observer.rate_limited(what)
        request.setHeader(b"Retry-After", str(retry_after(wait)).encode())
        return json_body(
            request, 429, "Too Many Requests", f"too many requests; retry in {retry_after(wait)} s"
        )

    @router.route("/api/sessions")
    def sessions_listing(self, request: Request) -> Any:
        """The live sessions the caller may see (rate-limited like the token API)."""
        return self._sessions(request, lambda api: api.listing(request))

    @router.route("/api/sessions/<session_id>", methods=("DELETE",))
    def sessions_end(self, request: Request, session_id: str) -> Any:
        """End a live session (administrators)."""
        return self._sessions(request, lambda api: api.end(request, session_id))

    def _sessions(self, request: Request, proceed: Callable[[SessionsApi], Any]) -> Any:
        api = self.sessions
        if api is None:
            return not_enabled(request, "the sessions API")
        observer = self.operations.observer
        if observer is not None:
            request.notifyFinish().addBoth(lambda _: observer.api_request("sessions", request.code))
        return self._unless_limited(request, "sessions", lambda: proceed(api))

    @router.route("/metrics")
    def metrics(self, request: Request) -> Any:
        """Prometheus metrics."""
        return self.operations.metrics or not_enabled(request, "/metrics")

    @router.route("/healthz")
    def healthz(self, request: Request) -> Any:
        """Whether the process serves."""
        return self.operations.health or not_enabled(request, "/healthz")

    @router.route("/readyz")
    def readyz(self, request: Request) -> Any:
        """Whether guacd and the cloud answer (and the server is not draining)."""
        return self.operations.readiness or not_enabled(request, "/readyz")

    @router.route("/guacamole")
    @router.route("/fireedge/guacamole")
    @router.route("/fireedge/external-guacamole")
    def guacamole(self, request: Request) -> Resource:
        """The Guacamole WebSocket relay."""
        return self.relay

    @router.route("/rfb")
    @router.route("/fireedge/rfb")
    def raw_vnc(self, request: Request) -> Any:
        """The raw VNC (RFB) WebSocket relay, for noVNC."""
        return self.rfb if self.rfb is not None else not_enabled(request, "raw VNC")

    @router.route("/api/console-modes")
    @router.route("/fireedge/api/console-modes")
    def console_modes(self, request: Request) -> Any:
        """Which relays a console page can use now."""
        if self.modes is None:
            return not_enabled(request, "the console page")
        return self.modes.render(request)

    @router.route("/")
    def landing_page(self, request: Request) -> Any:
        """Where a person who opens the server's address lands."""
        if self.landing is None:
            return not_enabled(request, "the landing page")
        if self.landing.checks_passwords:
            return self._unless_limited(request, "page", lambda: self.landing.render(request))
        return self.landing.render(request)

    @router.route("/console/<vm_id>/<console_type>")
    def console_page(self, request: Request, vm_id: str, console_type: str) -> Any:
        """The console page."""
        return self._page(request, vm_id, console_type, "")

    @router.route("/fireedge/console/<vm_id>/<console_type>")
    def fireedge_console_page(self, request: Request, vm_id: str, console_type: str) -> Any:
        """The console page, using the ``/fireedge`` routes."""
        return self._page(request, vm_id, console_type, "/fireedge")

    def _page(self, request: Request, vm_id: str, console_type: str, base: str) -> Any:
        if self.page is None:
            return not_enabled(request, "the console page")
        page = self.page
        return self._unless_limited(
            request, "page", lambda: page.render(request, vm_id, console_type, base)
        )

    def resource(self) -> Resource:
        """The root resource."""
        return _Root(self.router.resource(self), self.assets)


class _Root(Resource):
    """
    What every request meets first: the connection limits that need the
    request (health-only connections, clients behind a frontend), then
    ``/static/`` (and ``/fireedge/static/``) to the files, the rest to the routes.
    """

    isLeaf = True

    def __init__(self, routes: Resource, assets: StaticFiles | None) -> None:
        super().__init__()
        self._routes = routes
        self._assets = assets

    def render(self, request: Request) -> Any:
        client = client_of(request)  # found while the channel is there, for the access log
        channel = request.channel
        if getattr(channel, "health_only", False) and request.path not in _HEALTH_PATHS:
            channel.persistent = False
            request.setHeader(b"Retry-After", b"5")
            return json_body(
                request, 503, "Service Unavailable", "the server is at its connection limit"
            )
        gate = getattr(getattr(channel, "site", None), "gate", None)
        if client.via is not None and gate is not None:
            # The frontend's connection was not counted for this client: its
            # requests in flight (a static file, a WebSocket) are, here.
            lease = gate.acquire_client(client)
            if lease is None:
                channel.persistent = False
                return json_body(
                    request,
                    429,
                    "Too Many Requests",
                    f"over the cap of {gate.per_client} connections per client",
                )
            forget = channel.when_closed(lease.release)  # a WebSocket never finishes

            def finished(_: object) -> None:
                lease.release()
                forget()

            request.notifyFinish().addBoth(finished)
        if self._assets is None:
            return self._routes.render(request)
        for prefix in _STATIC_PREFIXES:
            if request.path.startswith(prefix):
                if request.method not in (b"GET", b"HEAD"):
                    request.setHeader(b"Allow", b"GET, HEAD")
                    request.setResponseCode(405)
                    return b""
                return self._assets.render(request, request.path[len(prefix) :])
        return self._routes.render(request)


def access_log_line(timestamp: str, request: Request) -> str:
    """
    A combined-log-format line with the path only (never the query string), and
    without the format's own timestamp: every log line is stamped already (by
    twistd, in the JSON record, or by the journal).
    """

    def quote(value: bytes | None) -> str:
        # Control characters escaped (log_safe), then the quotes of the format.
        return log_safe(value or b"-").replace('"', '\\"')

    return '"{ip}" - - "{method} {path} {proto}" {code} {length} "{referrer}" "{agent}"'.format(
        ip=log_safe(client_of(request).host),
        method=quote(request.method),
        path=quote(request.path),
        proto=quote(request.clientproto),
        code=request.code,
        length=request.sentLength or "-",
        referrer=quote(request.getHeader(b"referer")).split("?", 1)[0],
        agent=quote(request.getHeader(b"user-agent")),
    )


class _Closed(Protocol):
    """
    A refused connection: reset as soon as it is made, nothing read or sent.

    (C{buildProtocol} may answer C{None} to a plain TCP port, but an C{ssl:}
    endpoint's TLS wrapper would then wrap nothing and fail.)  The socket is
    closed at once rather than on the reactor's next turn: a burst of
    connections accepted in one go at the descriptor limit must not hold a
    descriptor each until then.
    """

    def makeConnection(self, transport: Any) -> None:
        transport.abortConnection()  # unregistered now; Twisted's cleanup on the next turn
        raw = transport
        while not hasattr(raw, "socket") and getattr(raw, "transport", None) is not None:
            raw = raw.transport  # under TLS: the TCP transport
        sock = getattr(raw, "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # Twisted's own close, later, finds it closed (and ignores that)


class ConsoleProxySite(Site):
    """
    The site, with the per-client connection cap and the descriptor reserve
    (L{ConnectionGate}) applied at accept time, and refusals logged sparingly.

    A connection over its cap is closed before anything is read from it (no
    TLS handshake, no HTTP parsing): C{buildProtocol} answers L{_Closed}.  Its
    log line, like the access log's line of a 429, goes through a
    L{LineThrottle}: one client cannot flood the log.
    """

    _log = Logger()

    def __init__(
        self,
        resource: Resource,
        *,
        gate: ConnectionGate | None,
        refusal_lines: LineThrottle,
        clients: ClientAddresses,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.gate = gate
        self.refusal_lines = refusal_lines
        self.clients = clients

    def buildProtocol(self, addr: Any) -> Any:
        lease = None
        if self.gate is not None:
            host = peer_host(addr)
            try:
                lease = self.gate.admit(host)
            except Refused as refused:
                self._refused(refused.key, host, str(refused))
                return _Closed()
        channel = super().buildProtocol(addr)
        if lease is not None:
            channel.health_only = lease.admission is Admission.HEALTH_ONLY
            channel.when_closed(lease.release)
        return channel

    def _refused(self, key: str, peer: str, why: str) -> None:
        suppressed = self.refusal_lines.allow(key)
        if suppressed:
            self._log.info(
                "{count} refusals from {peer} suppressed", count=suppressed, peer=log_safe(peer)
            )
        if suppressed is not None:
            self._log.info("Connection from {peer} refused: {why}", peer=log_safe(peer), why=why)

    def log(self, request: Request) -> None:
        """The access log; a client's 429 and 503 answers are rate-limited like refusals."""
        if request.code in (429, 503):
            client = client_of(request)
            suppressed = self.refusal_lines.allow(client.rate_key())
            if suppressed is None:
                return
            if suppressed:
                self._log.info(
                    "{count} refusals from {peer} suppressed",
                    count=suppressed,
                    peer=log_safe(str(client)),
                )
        super().log(request)


def build_site(
    web: ConsoleProxyWeb,
    reactor: Any,
    timeout: float = 60.0,
    *,
    limits: HttpLimits | None = None,
    clients: ClientAddresses | None = None,
    gate: ConnectionGate | None = None,
) -> ConsoleProxySite:
    """
    The twisted.web site: the safe access log, an idle timeout of
    C{timeout}, the bounded channel (L{HttpLimits}; its response deadline is
    C{timeout} too), the real client addresses and the connection caps
    (C{gate}; C{None}: none).
    """
    limits = limits or HttpLimits(response_timeout=timeout)
    site = ConsoleProxySite(
        web.resource(),
        gate=gate,
        refusal_lines=LineThrottle(reactor),
        clients=clients or ClientAddresses(),
        timeout=timeout,
        logFormatter=access_log_line,
        reactor=reactor,
    )
    site.protocol = lambda: LimitedChannel(limits)
    site.displayTracebacks = False
    return site
