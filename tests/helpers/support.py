"""Shared test helpers: quick password hashes, inventories, a server on loopback."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from consoleproxy.clouds.inventory import InventoryCloud
from consoleproxy.clouds.passwords import PasswordVerifier
from consoleproxy.relay.guacamole_relay import GuacamoleRelayFactory, RelaySettings
from consoleproxy.relay.session_events import SessionRecord
from consoleproxy.relay.websocket import RelayPolicy, RelayResource
from consoleproxy.tokens import KeyRing, TokenAuthority
from consoleproxy.web.api import TokenApi
from consoleproxy.web.site import ConsoleProxyWeb, build_site

# Cheap Argon2 parameters: the tests check logic, not cost.
_quick = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

INVENTORY = """
[users.alice]
password_hash = "{alice}"
[users.bob]
password_hash = "{bob}"

[[vm]]
id = 7
name = "web-1"
users = ["alice"]
[vm.vnc]
hostname = "10.0.0.5"
port = 5907
password = "vnc-secret"
[vm.ssh]
hostname = "10.0.0.5"
port = 22
username = "root"
password = "ssh-secret"

[[vm]]
id = 8
users = ["*"]
[vm.rdp]
hostname = "10.0.0.6"
port = 3389
ignore-cert = true
"""


def quick_hash(password: str) -> str:
    """An Argon2id hash made cheaply (tests check logic, not cost)."""
    return _quick.hash(password)


def inventory_text() -> str:
    """The test inventory: alice/wonderland may open VM 7, everyone VM 8."""
    return INVENTORY.format(alice=quick_hash("wonderland"), bob=quick_hash("builder"))


def write_inventory(directory: str, text: str | None = None) -> str:
    """Write an inventory file into C{directory}; return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "inventory.toml")
    with open(path, "w") as f:
        f.write(inventory_text() if text is None else text)
    return path


def admin_inventory() -> str:
    """The test inventory, plus root/toor with ``admin = true`` (an administrator)."""
    root = quick_hash("toor")
    return inventory_text() + f'\n[users.root]\npassword_hash = "{root}"\nadmin = true\n'


def synchronous_verifier() -> PasswordVerifier:
    """A verifier that checks on the calling thread (no thread pool in tests)."""
    return PasswordVerifier(reactor, run_in_thread=lambda f, *a: succeed(f(*a)))


def basic(user: str, password: str) -> bytes:
    """An HTTP Basic Authorization value."""
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@dataclass
class Server:
    """A consoleproxy listening on loopback, with its parts exposed."""

    port: int
    tokens: TokenAuthority
    relay: GuacamoleRelayFactory
    cloud: Any
    listening: Any

    def url(self, path: str) -> bytes:
        """An http URL on this server."""
        return f"http://127.0.0.1:{self.port}{path}".encode()

    def ws_url(self, path: str = "/guacamole") -> str:
        """A ws URL on this server."""
        return f"ws://127.0.0.1:{self.port}{path}"


@inlineCallbacks
def start_server(
    testcase: Any,
    *,
    guacd_port: int = 1,
    lifetime: float = 60,
    handshake_timeout: float = 15,
    clock: Any = reactor,
    guacd: str | None = None,
    listen: str = "tcp:0:interface=127.0.0.1",
    http_timeout: float = 60,
    cloud: Any = None,
    keyring: KeyRing | None = None,
    policy: RelayPolicy | None = None,
):  # type: ignore[no-untyped-def]
    """
    Start consoleproxy on C{listen} (a server endpoint string) against guacd on
    127.0.0.1:C{guacd_port} or the client endpoint string C{guacd}; stop on cleanup.
    """
    directory = testcase.mktemp()
    if cloud is None:
        cloud = InventoryCloud(write_inventory(directory), synchronous_verifier())
    tokens = TokenAuthority(keyring or KeyRing([os.urandom(32)]), clock, lifetime=lifetime)
    relay = GuacamoleRelayFactory(
        tokens,
        RelaySettings(
            guacd=clientFromString(reactor, guacd or f"tcp:127.0.0.1:{guacd_port}"),
            handshake_timeout=handshake_timeout,
            timezone="Europe/Madrid",
        ),
        clock=clock,
        policy=policy,
    )
    web = ConsoleProxyWeb(TokenApi(cloud, cloud, tokens), RelayResource(relay))
    site = build_site(web, reactor, timeout=http_timeout)
    listening = yield serverFromString(reactor, listen).listen(site)
    testcase.addCleanup(listening.stopListening)
    return Server(listening.getHost().port, tokens, relay, cloud, listening)


@inlineCallbacks
def get_json(url: bytes, authorization: bytes | None = None):  # type: ignore[no-untyped-def]
    """GET C{url}; return (status, headers, parsed JSON body)."""
    headers = Headers({b"Authorization": [authorization]} if authorization else {})
    response = yield Agent(reactor).request(b"GET", url, headers)
    body = yield readBody(response)
    return response.code, response.headers, json.loads(body)


def wait(seconds: float) -> Deferred[None]:
    """A Deferred that fires after C{seconds} of real time."""
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@inlineCallbacks
def serve_resource(testcase: Any, resource: Any):  # type: ignore[no-untyped-def]
    """Serve C{resource} as a whole site on loopback (stopped on cleanup); fire with its port."""
    listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Site(resource))
    testcase.addCleanup(listening.stopListening)
    return listening.getHost().port


@inlineCallbacks
def http_request(  # type: ignore[no-untyped-def]
    port: int, path: str = "/", method: bytes = b"GET", headers: dict[bytes, bytes] | None = None
):
    """Ask 127.0.0.1:C{port}; return (status, headers, body bytes)."""
    url = f"http://127.0.0.1:{port}{path}".encode()
    sent = Headers({name: [value] for name, value in (headers or {}).items()})
    response = yield Agent(reactor).request(method, url, sent)
    body = yield readBody(response)
    return response.code, response.headers, body


def session_record(**changes: Any) -> SessionRecord:
    """A session record of alice's VNC console of VM 7."""
    fields: dict[str, Any] = {
        "relay": "guacamole",
        "user": "alice",
        "vm_id": "7",
        "console_type": "vnc",
        "client": "192.0.2.1",
        "opened_at": 1000.0,
    }
    fields.update(changes)
    return SessionRecord(**fields)


@inlineCallbacks
def serve_web(  # type: ignore[no-untyped-def]
    testcase: Any,
    server: Server,
    *,
    operations: Any = None,
    page: Any = None,
    limits: Any = None,
    clients: Any = None,
    timeout: float = 60,
):
    """
    Serve C{server}'s token API and relay again through L{build_site} with
    these options (an L{Operations}, L{HttpLimits}, L{ClientAddresses}) on
    another loopback port (stopped on cleanup); fire with that port.
    """
    web = ConsoleProxyWeb(
        TokenApi(server.cloud, server.cloud, server.tokens),
        RelayResource(server.relay),
        page=page,
        operations=operations,
    )
    site = build_site(web, reactor, timeout, limits=limits, clients=clients)
    listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
    testcase.addCleanup(listening.stopListening)
    return listening.getHost().port
