"""
Who the client is: the socket's peer, or behind a trusted frontend the
address that frontend names in ``X-Forwarded-For``.

A TLS-terminating frontend (nginx, HAProxy, a cloud load balancer) connects
to us from its own address; it tells the browser's address in
``X-Forwarded-For`` and the scheme in ``X-Forwarded-Proto``.  Anybody can
send those headers, so they are believed only when the socket's peer is one
of the configured frontends (C{server.trusted_proxies}).  The list is then
read from the right, skipping addresses that are themselves trusted
frontends: the first other address is the client (what it claims further
left is its own business).

Everything that needs a client address uses this one answer: the access
log, the relays' log lines and audit records, the token API's rate limit and
the ``/metrics`` allow-list.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.server import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(texts: Iterable[str]) -> list[Network]:
    """
    Parse addresses and networks (``10.0.0.0/8``, ``::1``, ``192.0.2.7``).

    @raise ValueError: naming the text that is neither.
    """
    result = []
    for text in texts:
        try:
            result.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network") from None
    return result


def in_networks(host: str, nets: Sequence[Network]) -> bool:
    """Whether C{host} (an IP address as text) is in one of C{nets}."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in net for net in nets)


@dataclass(frozen=True)
class Client:
    """
    A client as far as we can tell.

    @ivar host: its IP address (text), or C{"-"} when unknown (a UNIX socket).
    @ivar proto: ``http`` or ``https`` as it reached the first frontend.
    @ivar via: the frontend's address when the client was behind one.
    """

    host: str
    proto: str
    via: str | None = None

    def __str__(self) -> str:
        return self.host if self.via is None else f"{self.host} (via {self.via})"

    def rate_key(self) -> str:
        """
        The key to count this client's requests under: its address, or for
        IPv6 its /64 (one host usually owns a whole /64).
        """
        if ":" not in self.host:
            return self.host  # IPv4 (or "-"): already the key, no parsing needed
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            return self.host
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)


class ClientAddresses:
    """Finds the real client of a request, trusting only configured frontends."""

    def __init__(self, trusted_proxies: Sequence[Network] = ()) -> None:
        self.trusted = list(trusted_proxies)

    def resolve(self, peer: str, headers: Mapping[str, str], secure: bool) -> Client:
        """
        The client of a request from C{peer} (an IP address as text).

        @param headers: the request's headers, names in lower case, repeated
            headers joined with commas.
        @param secure: whether the connection to us is TLS.
        """
        proto = "https" if secure else "http"
        if not self.trusted or not in_networks(peer, self.trusted):
            return Client(peer, proto)
        forwarded = [part.strip() for part in headers.get("x-forwarded-for", "").split(",")]
        forwarded = [part for part in forwarded if part]
        client = peer
        for hop in reversed(forwarded):
            # An IPv6 scope (fe80::1%eth0) means nothing outside the frontend's
            # host, and would make one client many keys (and log any text).
            host = _strip_port(hop).split("%", 1)[0]
            try:
                ipaddress.ip_address(host)
            except ValueError:
                break  # garbage: stop believing the chain here
            client = host
            if not in_networks(host, self.trusted):
                break
        claimed = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        if claimed in ("http", "https"):
            proto = claimed
        return Client(client, proto, via=peer if client != peer else None)

    def of_request(self, request: Request) -> Client:
        """The client of a twisted.web request."""
        headers = {
            name.decode("latin-1").lower(): ",".join(v.decode("latin-1") for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower() in (b"x-forwarded-for", b"x-forwarded-proto")
        }
        return self.resolve(peer_host(request.getClientAddress()), headers, request.isSecure())

    def of_websocket(self, peer: str, headers: Mapping[str, str], secure: bool) -> Client:
        """The client of an Autobahn connection request (C{request.peer} is ``tcp4:H:P``)."""
        return self.resolve(autobahn_peer_host(peer), headers, secure)


def peer_host(address: object) -> str:
    """The IP address of a Twisted address, or C{"-"}."""
    if isinstance(address, IPv4Address | IPv6Address):
        return address.host
    return "-"


def autobahn_peer_host(peer: str) -> str:
    """The host of an Autobahn peer string: ``tcp4:1.2.3.4:5``, ``tcp6:::1:5``."""
    kind, _, rest = peer.partition(":")
    if kind in ("tcp4", "tcp6"):
        return rest.rpartition(":")[0]
    return "-"


def _strip_port(hop: str) -> str:
    """``1.2.3.4:5`` -> ``1.2.3.4``; ``[::1]:5`` -> ``::1``; a bare IPv6 stays."""
    if hop.startswith("["):
        return hop[1:].partition("]")[0]
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop
