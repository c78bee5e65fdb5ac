"""
Klein-style routes on plain twisted.web.

Handlers are methods decorated with C{@router.route("/a/<name>/b")}; the
router turns an object into a leaf resource that matches C{request.path}
against the patterns, in order.  A handler receives the request and the
path's named segments (URL-decoded text, never containing ``/``) and
returns bytes, a Deferred of bytes, or another resource to render (the
WebSocket relay).  Unknown paths get 404 and known paths with another
method 405, both as JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from consoleproxy.net.clients import Client, ClientAddresses

_SEGMENT = re.compile(r"<([a-z_][a-z0-9_]*)>")


_DIRECT = ClientAddresses()


def client_of(request: Request) -> Client:
    """
    The real client of a request (behind a trusted frontend: the one it
    names), as the site's L{ClientAddresses} finds it; kept on the request.
    """
    client = getattr(request, "_consoleproxy_client", None)
    if client is None:
        site = getattr(request.channel, "site", None) if request.channel is not None else None
        clients = getattr(site, "clients", None) or _DIRECT
        client = clients.of_request(request)
        request._consoleproxy_client = client  # type: ignore[attr-defined]
    return client


def json_body(request: Request, status: int, message: str, data: Any) -> bytes:
    """Set C{status} and answer in FireEdge's shape C{{"id", "message", "data"}}."""
    request.setResponseCode(status, message.encode("ascii", "replace"))
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    body = {"id": status, "message": message, "data": data}
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class _Route:
    pattern: re.Pattern[str]
    methods: frozenset[bytes]
    handler: Callable[..., Any]


class Router:
    """A list of routes, declared on a class and bound to an instance."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def route(
        self, path: str, methods: tuple[str, ...] = ("GET", "HEAD")
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Declare that C{path} (with C{<name>} segments) goes to the method."""
        regex = "".join(
            f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
            for i, part in enumerate(_SEGMENT.split(path))
        )
        compiled = re.compile(regex)
        allowed = frozenset(m.encode("ascii") for m in methods)

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self._routes.append(_Route(compiled, allowed, handler))
            return handler

        return register

    def resource(self, instance: object) -> Resource:
        """A twisted.web resource serving the routes with C{instance}'s methods."""
        return _RouterResource(self._routes, instance)


class _RouterResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, routes: list[_Route], instance: object) -> None:
        super().__init__()
        self._routes = routes
        self._instance = instance

    def render(self, request: Request) -> Any:
        try:
            path = request.path.decode("utf-8")
        except UnicodeDecodeError:
            return json_body(request, 400, "Bad Request", "the path is not UTF-8")
        allowed: set[bytes] = set()
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            if request.method not in route.methods:
                allowed |= route.methods
                continue
            arguments = {name: unquote(value) for name, value in match.groupdict().items()}
            result = maybeDeferred(route.handler, self._instance, request, **arguments)
            return self._respond(request, result)
        if allowed:
            request.setHeader(b"Allow", b", ".join(sorted(allowed)))
            return json_body(request, 405, "Method Not Allowed", "method not allowed here")
        return json_body(request, 404, "Not Found", "no such resource")

    def _respond(self, request: Request, result: Deferred[Any]) -> Any:
        """Render the handler's result now if it is ready, else when it is."""
        state: dict[str, Any] = {"synchronous": True, "value": NOT_DONE_YET, "gone": False}
        request.notifyFinish().addErrback(lambda _: state.update(gone=True))

        def done(value: Any) -> None:
            if IResource.providedBy(value):
                value = value.render(request)
            if state["synchronous"]:
                state["value"] = value
            elif value is not NOT_DONE_YET and not state["gone"]:
                request.write(value)
                request.finish()

        def failed(failure: Failure) -> None:
            self.log.failure("Unhandled error in {path}", failure, path=request.path)
            done(json_body(request, 500, "Internal Server Error", "internal error"))

        result.addCallback(done).addErrback(failed)
        state["synchronous"] = False
        return state["value"]
