"""
The console page, ``GET /console/<vm id>/<type>``, and what it asks first.

The page is behind HTTP Basic: without (or with wrong) credentials it answers
401 with ``WWW-Authenticate`` so that the browser asks for them, and a body
that says so in words.  Authenticated, it is a small HTML document; its
script (``/static/console.js``) then:

 1. asks ``GET /api/console-modes`` which relays can work now (below);
 2. asks the token API with the same credentials, at the page's own URL plus
    ``/token`` (``GET /console/<vm id>/<type>/token``, ``?mode=rfb`` for
    noVNC): that URL is in the protection space the browser authenticated for
    the page (RFC 7617, 2.2: the page's directory and below), so the browser
    sends the credentials with the first request.  ``/api/vm/...`` is not:
    there the first request went out without them, drew a 401 and its
    "Token refused" log line, and only the browser's retry carried them;
 3. opens ``/guacamole`` with guacamole-common-js, or ``/rfb`` with noVNC.

``GET /api/console-modes`` answers, in FireEdge's JSON shape,
``{"guacamole": <guacd reachable>, "rfb": <raw VNC enabled>}``.  Whether
guacd is reachable is a TCP connect to it, at most one every few seconds
(the answer is cached and shared), and never when no guacd is configured.
The page uses noVNC for a VNC console when the page's URL says ``?mode=rfb``
or when guacd is not reachable; ``?mode=guacamole`` forces Guacamole.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.web.server import Request

from consoleproxy.consoles import CONSOLE_TYPES
from consoleproxy.errors import ApiError, Unauthenticated
from consoleproxy.interfaces import IAuthenticator
from consoleproxy.net.factories import quiet_factory
from consoleproxy.net.routing import json_body
from consoleproxy.web.api import refusal_headers
from consoleproxy.web.assets import StaticFiles

#: The page's Content-Security-Policy: its own scripts and styles only, no
#: inline code, connections to this origin only (WebSockets included).
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    b"connect-src 'self'; font-src 'self'; media-src 'self' blob:; base-uri 'none'; "
    b"form-action 'none'; frame-ancestors 'self'"
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{base}/static/console.css">
</head>
<body data-base="{base}" data-vm="{vm}" data-type="{type}" data-user="{user}"
      data-guacamole-js="{guacamole_js}" data-novnc-js="{novnc_js}"
      data-missing="{missing}" data-state="loading">
<header id="bar">
  <span id="title">{title}</span>
  <span id="state" role="status" aria-live="polite">Loading the console&hellip;</span>
  <span id="tools">
    <button type="button" id="cad" disabled title="Send Ctrl-Alt-Del">Ctrl-Alt-Del</button>
    <button type="button" id="clipboard-toggle" aria-expanded="false"
            aria-controls="clipboard-panel">Clipboard</button>
    <button type="button" id="fullscreen">Fullscreen</button>
    <button type="button" id="reconnect">Reconnect</button>
  </span>
</header>
<section id="clipboard-panel" hidden>
  <label for="clipboard">Clipboard: what the remote copies appears here; type or paste
    here and press Send to give it to the remote.</label>
  <textarea id="clipboard" rows="4" spellcheck="false"></textarea>
  <button type="button" id="clipboard-send">Send to the remote</button>
</section>
<div id="error" role="alert" hidden></div>
<main id="screen" tabindex="0" aria-label="Remote screen"></main>
<noscript><p class="noscript">This console needs JavaScript.</p></noscript>
<script type="module" src="{base}/static/console.js"></script>
</body>
</html>
"""

_MESSAGE_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{base}/static/console.css">
</head>
<body class="message" data-state="error">
<main>
<h1>{title}</h1>
<p id="error">{text}</p>
</main>
</body>
</html>
"""


def page_headers(request: Request) -> None:
    """The headers of every HTML page: its type, no caching, the CSP, no sniffing."""
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"no-referrer")


def message_page(request: Request, status: int, title: str, text: str, base: str = "") -> bytes:
    """A small HTML page that says what is wrong, in words."""
    request.setResponseCode(status)
    page_headers(request)
    return _MESSAGE_PAGE.format(
        title=html.escape(title), text=html.escape(text), base=html.escape(base)
    ).encode("utf-8")


class ConsolePage:
    """Renders the console page for an authenticated user."""

    def __init__(self, authenticator: IAuthenticator, assets: StaticFiles) -> None:
        self.authenticator = authenticator
        self.assets = assets

    @inlineCallbacks
    def render(self, request: Request, vm_id: str, console_type: str, base: str = ""):  # type: ignore[no-untyped-def]
        """Answer one page request (a Deferred of the HTML)."""
        if not (vm_id.isascii() and vm_id.isdigit() and len(vm_id) <= 10):
            return message_page(
                request, 404, "No such console", f"A VM id is a whole number, not {vm_id[:32]!r}."
            )
        if console_type not in CONSOLE_TYPES:
            return message_page(
                request,
                404,
                "No such console",
                f"Console types are {', '.join(CONSOLE_TYPES)}; {console_type[:16]!r} is none.",
            )
        try:
            identity = yield maybeDeferred(
                self.authenticator.authenticate, request.getHeader(b"authorization")
            )
        except Unauthenticated as e:
            refusal_headers(request, e)
            return message_page(
                request,
                401,
                "Sign-in needed",
                "The console needs your user name and password: "
                f"{e.message}. Reload the page to enter them again.",
                base,
            )
        except ApiError as e:
            refusal_headers(request, e)
            return message_page(request, e.status, e.title, e.message, base)
        page_headers(request)
        title = f"VM {vm_id} · {console_type.upper()} console"
        return _PAGE.format(
            title=html.escape(title),
            base=html.escape(base),
            vm=vm_id,
            type=console_type,
            user=html.escape(identity.name),
            guacamole_js=html.escape(self.assets.entry_url("guacamole-common-js", base) or ""),
            novnc_js=html.escape(self.assets.entry_url("novnc", base) or ""),
            missing=html.escape(" ".join(self.assets.missing)),
        ).encode("utf-8")


class _Probe(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class GuacdProbe:
    """
    Whether guacd accepts TCP connections now, asked at most every C{ttl} s.

    Concurrent questions share one connection attempt; the answer is cached.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint | None,
        clock: IReactorTime,
        ttl: float = 5.0,
        timeout: float = 2.0,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.ttl = ttl
        self.timeout = timeout
        self._answer: tuple[float, bool] | None = None
        self._waiting: list[Deferred[bool]] | None = None

    def reachable(self) -> Deferred[bool]:
        """Fire with True when guacd accepted a connection (recently)."""
        if self.endpoint is None:
            return succeed(False)
        now = self.clock.seconds()
        if self._answer is not None and now - self._answer[0] < self.ttl:
            return succeed(self._answer[1])
        result: Deferred[bool] = Deferred()
        if self._waiting is not None:
            self._waiting.append(result)
            return result
        self._waiting = [result]
        attempt = self.endpoint.connect(quiet_factory(_Probe))
        attempt.addTimeout(self.timeout, self.clock)
        attempt.addCallbacks(lambda _: True, lambda _: False)
        attempt.addCallback(self._answered)
        return result

    def _answered(self, answer: bool) -> None:
        self._answer = (self.clock.seconds(), answer)
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(answer)


class ConsoleModes:
    """``GET /api/console-modes``: which relays a console page can use now."""

    def __init__(self, guacd: Callable[[], Deferred[bool]], rfb: bool) -> None:
        self.guacd = guacd
        self.rfb = rfb

    @inlineCallbacks
    def render(self, request: Request):  # type: ignore[no-untyped-def]
        """Answer with C{{"guacamole": bool, "rfb": bool}}."""
        guacamole = yield self.guacd()
        return json_body(request, 200, "OK", {"guacamole": bool(guacamole), "rfb": self.rfb})


def not_enabled(request: Request, what: str) -> Any:
    """The JSON 404 of a part that is switched off."""
    return json_body(request, 404, "Not Found", f"{what} is not enabled on this server")
