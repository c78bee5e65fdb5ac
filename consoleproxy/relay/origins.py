"""
Which web pages may open a console WebSocket: the Origin allow-list.

Browsers let any page open a WebSocket to any server, with the user's
cookies and cached credentials; the only defence against cross-site
WebSocket hijacking is the ``Origin`` header, which browsers always send and
pages cannot forge.  So the relays accept only configured origins
(C{relay.allowed_origins}).  A request's own ``Host`` never widens the list
(nova's LP #2158919 did that).  A missing Origin means a client that is not
a browser (a script, another zone's proxy without a configured origin) and
is refused unless C{relay.allow_missing_origin} is set.  ``null`` (sandboxed
frames, file: pages) is never allowed.

Origins compare as scheme, host and port, with the scheme's default port
filled in, so ``https://console.example.com`` and
``https://console.example.com:443`` are the same origin.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(text: str) -> str:
    """
    ``scheme://host:port`` in lower case with the default port filled in.

    @raise ValueError: for anything that is not an http(s) origin (paths,
        queries, user names and fragments are not part of an origin).
    """
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// origin")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{text!r} is not an origin (scheme://host[:port] only)")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class OriginPolicy:
    """The configured allow-list of WebSocket origins."""

    def __init__(self, allowed: Iterable[str], *, allow_missing: bool = False) -> None:
        """
        @raise ValueError: when an entry is not an origin.
        """
        self.allowed = frozenset(normalize_origin(origin) for origin in allowed)
        self.allow_missing = allow_missing

    def allows(self, origin: str | None) -> bool:
        """Whether a WebSocket with this ``Origin`` header (or none) may open."""
        if origin is None or origin == "":
            return self.allow_missing
        try:
            return normalize_origin(origin) in self.allowed
        except ValueError:
            return False  # "null" and anything else that is not an origin
