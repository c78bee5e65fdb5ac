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
from twisted.application.service import IService, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

from consoleproxy.api import TokenApi
from consoleproxy.config import Config, ConfigError, example_path
from consoleproxy.inventory import InventoryCloud, InventoryError
from consoleproxy.oned import Oned, ServerAdmin
from consoleproxy.opennebula import OpenNebulaCloud, is_loopback
from consoleproxy.opennebula_consoles import StatePolicy
from consoleproxy.passwords import PasswordVerifier
from consoleproxy.relay import GuacamoleRelayFactory, RelayResource, RelaySettings
from consoleproxy.tokens import KeyFileError, KeyRing, TokenAuthority
from consoleproxy.web import ConsoleProxyWeb, build_site
from consoleproxy.xmlrpc import XmlRpcClient

log = Logger()


class Options(usage.Options):
    """Command-line options; each overrides the same key of the --config file."""

    synopsis = "[options]"
    longdesc = (
        "Web console proxy: issues console tokens at GET /api/vm/<id>/guacamole/<vnc|ssh|rdp> "
        "and relays WebSockets at /guacamole to guacd.  Settings come from --config (TOML; "
        "sections [server], [guacd], [tokens], [relay], [cloud], [inventory], [opennebula]) and "
        "the options below, "
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
            "cloud",
            None,
            None,
            "Cloud backend [cloud.backend]: inventory (default) or opennebula.",
        ],
        [
            "one-xmlrpc",
            None,
            None,
            "oned's XML-RPC URL [opennebula.xmlrpc], default http://localhost:2633/RPC2 "
            "(https is verified).",
        ],
        [
            "server-admin-auth",
            None,
            None,
            "File with serveradmin:<password> [opennebula.server_admin_auth], e.g. "
            "/var/lib/one/.one/sunstone_auth: reads encrypted VM and user attributes.",
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
            ("cloud", "cloud"),
            ("one-xmlrpc", "one_xmlrpc"),
            ("server-admin-auth", "one_server_admin_auth"),
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
    cloud = build_cloud(config, reactor)
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


def build_cloud(config: Config, reactor: Any) -> Any:
    """
    The configured cloud backend (both authenticator and cloud).

    @raise ConfigError: for an unusable inventory, credential file or trust roots.
    """
    if config.cloud == "inventory":
        try:
            return InventoryCloud(config.inventory, PasswordVerifier(reactor))
        except InventoryError as e:
            raise ConfigError(Config.key_of("inventory"), str(e)) from e
    server_admin = None
    if config.one_server_admin_auth:
        try:
            server_admin = ServerAdmin.from_file(config.one_server_admin_auth)
        except ValueError as e:
            raise ConfigError(Config.key_of("one_server_admin_auth"), str(e)) from e

    def oned_for(url: str) -> Oned:
        return Oned(
            XmlRpcClient(
                reactor,
                url,
                timeout=config.one_timeout,
                max_concurrent=config.one_max_concurrent,
                trust_roots=config.one_trust_roots or None,
            )
        )

    try:
        local = oned_for(config.one_xmlrpc)
    except (OSError, ValueError) as e:
        raise ConfigError(Config.key_of("one_trust_roots"), f"unusable: {e}") from e
    return OpenNebulaCloud(
        local,
        oned_for,
        reactor,
        local_zone=str(config.one_zone),
        server_admin=server_admin,
        policy=StatePolicy(
            vnc=frozenset(config.one_vnc_states),
            ssh=frozenset(config.one_ssh_states),
            rdp=frozenset(config.one_rdp_states),
        ),
        loopback_address=config.one_loopback_address or None,
        guacd_is_local=endpoint_is_local(config.guacd),
    )


def endpoint_is_local(description: str) -> bool:
    """Whether a client endpoint string (``tcp:HOST:PORT``, ``tls:``, ``unix:``) is this host."""
    kind, _, rest = description.partition(":")
    if kind == "unix":
        return True
    host = rest.split(":", 1)[0]
    for part in rest.split(":"):
        if part.startswith("host="):
            host = part[len("host=") :]
    return is_loopback(host.replace("\\", ""))


class CloudService(Service):
    """Closes the cloud's connections (oned's keep-alive pool) at shutdown."""

    def __init__(self, cloud: Any) -> None:
        self.cloud = cloud

    def stopService(self) -> Any:
        super().stopService()
        close = getattr(self.cloud, "close", None)
        return close() if close is not None else None


def makeService(options: Options) -> IService:
    """The service tree: one listening service per ``--listen`` endpoint."""
    parts = options.parts
    service = MultiService()
    CloudService(parts["cloud"]).setServiceParent(service)
    for endpoint in parts["endpoints"]:
        StreamServerEndpointService(endpoint, parts["site"]).setServiceParent(service)
    config = parts["config"]
    if config.cloud == "inventory" and config.inventory == example_path("inventory.toml"):
        log.warn(
            "Serving the EXAMPLE inventory (user demo, password demo): fine for a first "
            "look on 127.0.0.1, never for anything reachable by others."
        )
    return service
