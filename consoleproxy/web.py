"""
The URL map and the HTTP site.

One port serves the token API and the WebSocket relay, each also under
``/fireedge`` so that FireEdge's browser code works unchanged.  The access
log never records query strings: the relay's carries the token.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import datetimeToLogString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from consoleproxy.api import TokenApi
from consoleproxy.routing import Router


class ConsoleProxyWeb:
    """Routes requests to the token API and the relay."""

    router = Router()

    def __init__(self, api: TokenApi, relay: Resource) -> None:
        self.api = api
        self.relay = relay

    @router.route("/api/vm/<vm_id>/guacamole/<console_type>")
    @router.route("/fireedge/api/vm/<vm_id>/guacamole/<console_type>")
    def token(self, request: Request, vm_id: str, console_type: str) -> Any:
        """Mint a console token."""
        return self.api.mint(request, vm_id, console_type)

    @router.route("/guacamole")
    @router.route("/fireedge/guacamole")
    def guacamole(self, request: Request) -> Resource:
        """The Guacamole WebSocket relay."""
        return self.relay

    def resource(self) -> Resource:
        """The root resource."""
        return self.router.resource(self)


def access_log_line(timestamp: str, request: Request) -> str:
    """A combined-log-format line with the path only: never the query string."""

    def quote(value: bytes | None) -> str:
        text = (value or b"-").decode("ascii", "replace")
        return text.replace("\\", "\\\\").replace('"', '\\"')

    return (
        '"{ip}" - - {time} "{method} {path} {proto}" {code} {length} "{referrer}" "{agent}"'.format(
            ip=request.getClientAddress().host
            if hasattr(request.getClientAddress(), "host")
            else "-",
            time=timestamp or datetimeToLogString(),
            method=quote(request.method),
            path=quote(request.path),
            proto=quote(request.clientproto),
            code=request.code,
            length=request.sentLength or "-",
            referrer=quote(request.getHeader(b"referer")).split("?", 1)[0],
            agent=quote(request.getHeader(b"user-agent")),
        )
    )


def build_site(web: ConsoleProxyWeb, reactor: Any, timeout: float = 60.0) -> Site:
    """The twisted.web site, with the safe access log and an idle timeout."""
    site = Site(web.resource(), timeout=timeout, logFormatter=access_log_line, reactor=reactor)
    site.displayTracebacks = False
    return site
