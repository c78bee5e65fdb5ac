"""
The URL map and the HTTP site.

One port serves the token API and the WebSocket relays, each also under
``/fireedge`` so that FireEdge's browser code works unchanged, and the
console page with its static files::

    /api/vm/<id>/guacamole/<type>   token API (?mode=rfb: a raw VNC token)
    /api/console-modes              which relays the console page can use now
    /guacamole                      Guacamole WebSocket relay (subprotocol guacamole)
    /rfb                            raw VNC WebSocket relay (subprotocol binary)
    /console/<id>/<type>            the console page (HTTP Basic)
    /console/<id>/<type>/token      the token API, where the page's credentials go
    /static/...                     the page's script, style and npm libraries
    /metrics                        Prometheus metrics (allowed networks only)
    /healthz, /readyz               the process serves; guacd and the cloud answer

The token API and the console page check passwords: each client address
gets a rate limit there (429 with Retry-After).  While the server drains,
the token API answers 503: a new token could not open a session anyway.
The access log never records query strings (the relays' carry the token)
and names the real client behind a trusted frontend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from consoleproxy.net.clients import ClientAddresses
from consoleproxy.net.ratelimit import RateLimiter, retry_after
from consoleproxy.net.routing import Router, client_of, json_body
from consoleproxy.web.api import TokenApi
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.console_page import ConsoleModes, ConsolePage, not_enabled
from consoleproxy.web.http_channel import HttpLimits, LimitedChannel

_STATIC_PREFIXES = (b"/static/", b"/fireedge/static/")


@dataclass
class Operations:
    """
    The operator's endpoints and controls.

    @ivar metrics: the ``/metrics`` resource; C{None}: not served.
    @ivar health: ``/healthz``; @ivar readiness: ``/readyz``.
    @ivar observer: told of API answers and rate limiting (the metrics).
    @ivar limiter: the per-client rate limit of password checks.
    @ivar draining: whether the server is shutting down.
    """

    metrics: Resource | None = None
    health: Resource | None = None
    readiness: Resource | None = None
    observer: Any = None
    limiter: RateLimiter | None = None
    draining: Callable[[], bool] = lambda: False


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
        operations: Operations | None = None,
    ) -> None:
        self.operations = operations or Operations()
        self.api = api
        self.relay = relay
        self.rfb = rfb
        self.page = page
        self.modes = modes
        self.assets = assets

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
            request.setHeader(b"Retry-After", b"30")
            return json_body(request, 503, "Service Unavailable", "the server is shutting down")
        return self._limited(request, "token") or self.api.mint(request, vm_id, console_type)

    def _limited(self, request: Request, what: str) -> bytes | None:
        """A 429 answer when the client is over its rate, else C{None}."""
        limiter = self.operations.limiter
        if limiter is None:
            return None
        wait = limiter.take(client_of(request).rate_key())
        if wait is None:
            return None
        if self.operations.observer is not None:
            self.operations.observer.rate_limited(what)
        request.setHeader(b"Retry-After", str(retry_after(wait)).encode())
        return json_body(
            request, 429, "Too Many Requests", f"too many requests; retry in {retry_after(wait)} s"
        )

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
        return self._limited(request, "page") or self.page.render(
            request, vm_id, console_type, base
        )

    def resource(self) -> Resource:
        """The root resource."""
        routes = self.router.resource(self)
        if self.assets is None:
            return routes
        return _WithStatic(routes, self.assets)


class _WithStatic(Resource):
    """Sends ``/static/`` (and ``/fireedge/static/``) to the files, the rest to the routes."""

    isLeaf = True

    def __init__(self, routes: Resource, assets: StaticFiles) -> None:
        super().__init__()
        self._routes = routes
        self._assets = assets

    def render(self, request: Request) -> Any:
        client_of(request)  # found while the channel is there, for the access log
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
        text = (value or b"-").decode("ascii", "replace")
        return text.replace("\\", "\\\\").replace('"', '\\"')

    return (
        '"{ip}" - - "{method} {path} {proto}" {code} {length} "{referrer}" "{agent}"'.format(
            ip=client_of(request).host,
            method=quote(request.method),
            path=quote(request.path),
            proto=quote(request.clientproto),
            code=request.code,
            length=request.sentLength or "-",
            referrer=quote(request.getHeader(b"referer")).split("?", 1)[0],
            agent=quote(request.getHeader(b"user-agent")),
        )
    )


def build_site(
    web: ConsoleProxyWeb,
    reactor: Any,
    timeout: float = 60.0,
    *,
    limits: HttpLimits | None = None,
    clients: ClientAddresses | None = None,
) -> Site:
    """
    The twisted.web site: the safe access log, an idle timeout of
    C{timeout}, the bounded channel (L{HttpLimits}; its response deadline is
    C{timeout} too) and the real client addresses.
    """
    limits = limits or HttpLimits(response_timeout=timeout)
    site = Site(web.resource(), timeout=timeout, logFormatter=access_log_line, reactor=reactor)
    site.protocol = lambda: LimitedChannel(limits)
    site.clients = clients or ClientAddresses()  # type: ignore[attr-defined]
    site.displayTracebacks = False
    return site
