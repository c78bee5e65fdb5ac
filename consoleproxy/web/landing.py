"""
The landing page, ``GET /``: where a person who opens the server's address lands.

With a cloud that can list consoles (the embedded inventory), the page asks
for the user's name and password (HTTP Basic, as the console page does) and
links each console that user may open.  With one that cannot (OpenNebula,
whose consoles are opened from Sunstone or FireEdge), it says where consoles
come from and what the console page's address looks like; it names no VM.
"""

from __future__ import annotations

import html
from typing import Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.web.server import Request

from consoleproxy.errors import ApiError, Unauthenticated
from consoleproxy.interfaces import IAuthenticator, IConsoleDirectory
from consoleproxy.web.console_page import message_page, page_headers

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>consoleproxy</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/console.css">
</head>
<body class="message landing">
<main>
<h1>Consoles</h1>
{body}
</main>
</body>
</html>
"""

_NO_LISTING = (
    "<p>This server opens the consoles of the cloud's VMs in the browser: open them from "
    "the cloud's own interface (Sunstone or FireEdge), or at "
    "<code>/console/&lt;VM id&gt;/&lt;vnc|ssh|rdp&gt;</code>.</p>"
)


class LandingPage:
    """Renders ``/`` (see the module's docstring)."""

    def __init__(self, authenticator: IAuthenticator, directory: Any) -> None:
        """
        @param directory: the cloud, when it provides L{IConsoleDirectory};
            any other cloud gets the page without a listing.
        """
        self.authenticator = authenticator
        self.directory = directory if IConsoleDirectory.providedBy(directory) else None

    @property
    def checks_passwords(self) -> bool:
        """Whether rendering checks a password (then it is rate-limited as the page is)."""
        return self.directory is not None

    @inlineCallbacks
    def render(self, request: Request):  # type: ignore[no-untyped-def]
        """Answer one request (a Deferred of the HTML)."""
        if self.directory is None:
            page_headers(request)
            return _PAGE.format(body=_NO_LISTING).encode("utf-8")
        try:
            identity = yield maybeDeferred(
                self.authenticator.authenticate, request.getHeader(b"authorization")
            )
            listing = yield maybeDeferred(self.directory.listing, identity)
        except Unauthenticated as e:
            request.setHeader(b"WWW-Authenticate", b'Basic realm="consoleproxy", charset="UTF-8"')
            return message_page(
                request,
                401,
                "Sign-in needed",
                f"The consoles need your user name and password: {e.message}. "
                "Reload the page to enter them again.",
            )
        except ApiError as e:
            return message_page(request, e.status, e.title, e.message)
        page_headers(request)
        if not listing:
            body = f"<p>{html.escape(identity.name)} may open no console here.</p>"
        else:
            rows = "\n".join(
                f"<li><strong>{html.escape(entry.name)}</strong> (VM {entry.vm_id}): "
                + ", ".join(
                    f'<a href="/console/{entry.vm_id}/{kind}">{kind.upper()}</a>'
                    for kind in entry.types
                )
                + "</li>"
                for entry in listing
            )
            body = (
                f"<p>The consoles {html.escape(identity.name)} may open:</p>\n"
                f'<ul class="consoles">\n{rows}\n</ul>'
            )
        return _PAGE.format(body=body).encode("utf-8")
