"""
``twistd consoleproxy``: options and the service tree.

Options parse and check everything (configuration, endpoints, key file,
inventory) in L{Options.postOptions}, so that a bad value ends start-up with
one message before anything listens.  L{makeService} only wires the checked
parts together.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from consoleproxy.api import TokenApi
from consoleproxy.config import Config, ConfigError, example_path
from consoleproxy.inventory import InventoryCloud, InventoryError
from consoleproxy.passwords import PasswordVerifier
from consoleproxy.relay import GuacamoleRelayFactory, RelayResource, RelaySettings
from consoleproxy.tokens import KeyFileError, KeyRing, TokenAuthority
from consoleproxy.web import ConsoleProxyWeb, build_site

log = Logger()


class Options(usage.Options):
    """Command-line options; each overrides the same key of the --config file."""

    synopsis = "[options]"
    longdesc = (
        "Web console proxy: issues console tokens at GET /api/vm/<id>/guacamole/<vnc|ssh|rdp> "
        "and relays WebSockets at /guacamole to guacd.  Settings come from --config (TOML; "
        "sections [server], [guacd], [tokens], [relay], [inventory]) and the options below, "
        "which win.  Without a configuration it serves the example inventory (user demo) on "
        "127.0.0.1:2616."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        [
            "guacd",
            None,
            None,
            "guacd client endpoint [guacd.endpoint], default tcp:127.0.0.1:4822; "
            "tls:HOST:PORT[:trustRoots=DIR] verifies guacd's certificate and host name.",
        ],
        [
            "inventory",
            None,
            None,
            "Inventory file of VMs and users [inventory.path], default: the example inventory "
            f"({example_path('inventory.toml')}).",
        ],
        [
            "key-file",
            None,
            None,
            "Token key file [tokens.key_file], default consoleproxy.keys; created with mode "
            "0600 when missing.  The first key seals, every key opens.",
        ],
        [
            "token-lifetime",
            None,
            None,
            "Seconds a console token stays valid [tokens.lifetime], default 60.",
            float,
        ],
        [
            "handshake-timeout",
            None,
            None,
            "Seconds guacd gets for its handshake [guacd.handshake_timeout], default 15.",
            float,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Server endpoint to listen on [server.listen]; repeat for several.  Default
        tcp:2616:interface=127.0.0.1; ssl:PORT:privateKey=KEY:certKey=CERT terminates TLS.
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        """Load and check everything; any problem is one usage error."""
        from twisted.internet import reactor  # noqa: PLC0415 - twistd installs it first

        overrides: dict[str, Any] = {}
        if self["listen"]:
            overrides["listen"] = list(self["listen"])
        for option, name in (
            ("guacd", "guacd"),
            ("inventory", "inventory"),
            ("key-file", "key_file"),
            ("token-lifetime", "token_lifetime"),
            ("handshake-timeout", "handshake_timeout"),
        ):
            if self[option] is not None:
                overrides[name] = self[option]
        try:
            self.parts = build_parts(Config.load(self["config"], overrides), reactor)
        except (ConfigError, KeyFileError, InventoryError) as e:
            raise usage.UsageError(f"configuration error: {e}") from e


def build_parts(config: Config, reactor: Any) -> dict[str, Any]:
    """
    Check and build everything that can fail, without listening.

    @raise ConfigError: or L{KeyFileError}, L{InventoryError}.
    """
    server_endpoints = config.server_endpoints(reactor)
    guacd_endpoint = config.guacd_endpoint(reactor)
    try:
        keyring = KeyRing.from_file(config.key_file)
    except KeyFileError as e:
        raise ConfigError(Config.key_of("key_file"), str(e)) from e
    try:
        cloud = InventoryCloud(config.inventory, PasswordVerifier(reactor))
    except InventoryError as e:
        raise ConfigError(Config.key_of("inventory"), str(e)) from e
    tokens = TokenAuthority(keyring, reactor, lifetime=config.token_lifetime)
    relay = GuacamoleRelayFactory(
        tokens,
        RelaySettings(
            guacd=guacd_endpoint,
            handshake_timeout=config.handshake_timeout,
            timezone=config.timezone,
        ),
        clock=reactor,
        max_message_size=config.max_message_size,
    )
    web = ConsoleProxyWeb(TokenApi(cloud, cloud, tokens), RelayResource(relay))
    return {
        "config": config,
        "endpoints": server_endpoints,
        "site": build_site(web, reactor, timeout=config.http_timeout),
        "relay": relay,
        "cloud": cloud,
    }


def makeService(options: Options) -> IService:
    """The service tree: one listening service per ``--listen`` endpoint."""
    parts = options.parts
    service = MultiService()
    for endpoint in parts["endpoints"]:
        StreamServerEndpointService(endpoint, parts["site"]).setServiceParent(service)
    if parts["config"].inventory == example_path("inventory.toml"):
        log.warn(
            "Serving the EXAMPLE inventory (user demo, password demo): fine for a first "
            "look on 127.0.0.1, never for anything reachable by others."
        )
    return service
