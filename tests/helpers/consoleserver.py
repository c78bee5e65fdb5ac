"""A consoleproxy with every part (relays, raw VNC, page, static files) on loopback."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import clientFromString, serverFromString

from consoleproxy.clouds.inventory import InventoryCloud
from consoleproxy.config import NoGuacd
from consoleproxy.relay.guacamole_relay import GuacamoleRelayFactory, RelaySettings
from consoleproxy.relay.origins import OriginPolicy
from consoleproxy.relay.rfb_relay import PURPOSE, RfbRelayFactory, RfbRelayResource, RfbSettings
from consoleproxy.relay.websocket import RelayResource
from consoleproxy.tokens import KeyRing, TokenAuthority
from consoleproxy.web.api import TokenApi
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.console_page import ConsoleModes, ConsolePage, GuacdProbe
from consoleproxy.web.landing import LandingPage
from consoleproxy.web.site import ConsoleProxyWeb, build_site
from tests.helpers.support import quick_hash, synchronous_verifier, write_inventory

#: alice/wonderland may open VM 7 (VNC at the port given) and VM 8 (SSH); bob/builder none.
CONSOLE_INVENTORY = """
[users.alice]
password_hash = "{alice}"
[users.bob]
password_hash = "{bob}"

[[vm]]
id = 7
users = ["alice"]
[vm.vnc]
hostname = "127.0.0.1"
port = {vnc_port}
password = "{vnc_password}"
[vm.ssh]
hostname = "127.0.0.1"
port = 1
username = "root"
password = "x"
"""


def console_inventory(vnc_port: int = 1, vnc_password: str = "vncpw") -> str:
    """The inventory text of L{CONSOLE_INVENTORY}."""
    return CONSOLE_INVENTORY.format(
        alice=quick_hash("wonderland"),
        bob=quick_hash("builder"),
        vnc_port=vnc_port,
        vnc_password=vnc_password,
    )


@dataclass
class ConsoleServer:
    """A listening consoleproxy and its parts."""

    port: int
    tokens: TokenAuthority
    rfb_tokens: TokenAuthority
    relay: GuacamoleRelayFactory
    rfb: RfbRelayFactory
    assets: StaticFiles

    def url(self, path: str) -> str:
        """An http URL on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str) -> str:
        """A ws URL on this server."""
        return f"ws://127.0.0.1:{self.port}{path}"


@inlineCallbacks
def start_console_server(
    testcase: Any,
    *,
    guacd: str | None = "tcp:127.0.0.1:1",
    vnc_port: int = 1,
    vnc_password: str = "vncpw",
    lifetime: float = 60,
    handshake_timeout: float = 15,
    rfb: bool = True,
    node_modules: str | None = None,
):  # type: ignore[no-untyped-def]
    """Start it on 127.0.0.1:<free port>; C{guacd=None} means none configured."""
    path = write_inventory(testcase.mktemp(), console_inventory(vnc_port, vnc_password))
    cloud = InventoryCloud(path, synchronous_verifier())
    keyring = KeyRing([os.urandom(32)])
    tokens = TokenAuthority(keyring, reactor, lifetime=lifetime)
    rfb_tokens = TokenAuthority(keyring, reactor, lifetime=lifetime, purpose=PURPOSE)
    endpoint = clientFromString(reactor, guacd) if guacd else NoGuacd()
    relay = GuacamoleRelayFactory(
        tokens,
        RelaySettings(guacd=endpoint, handshake_timeout=handshake_timeout, timezone="UTC"),
        clock=reactor,
    )
    rfb_relay = RfbRelayFactory(
        rfb_tokens,
        RfbSettings(reactor=reactor, handshake_timeout=handshake_timeout, linger=1.0),
        clock=reactor,
    )
    assets = StaticFiles(node_modules)
    web = ConsoleProxyWeb(
        TokenApi(cloud, cloud, tokens, rfb_tokens if rfb else None),
        RelayResource(relay),
        rfb=RfbRelayResource(rfb_relay) if rfb else None,
        page=ConsolePage(cloud, assets),
        landing=LandingPage(cloud, cloud),
        modes=ConsoleModes(GuacdProbe(endpoint if guacd else None, reactor, ttl=0).reachable, rfb),
        assets=assets,
    )
    listening = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        build_site(web, reactor)
    )
    testcase.addCleanup(listening.stopListening)
    # Browsers send the page's Origin: allow this server's own, as an operator would.
    origins = OriginPolicy([f"http://127.0.0.1:{listening.getHost().port}"], allow_missing=True)
    relay.policy.origins = rfb_relay.policy.origins = origins
    return ConsoleServer(listening.getHost().port, tokens, rfb_tokens, relay, rfb_relay, assets)
