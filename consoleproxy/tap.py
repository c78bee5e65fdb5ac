"""
``twistd consoleproxy``: options and the service tree.

Options parse and check everything (configuration, endpoints, key file,
inventory) in L{Options.postOptions}, so that a bad value ends start-up with
one message before anything listens.  L{makeService} only wires the checked
parts together.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage

from consoleproxy.clouds.inventory import InventoryCloud, InventoryError
from consoleproxy.clouds.logins import CheckPool, FailureBudget, default_workers
from consoleproxy.clouds.opennebula.cloud import OpenNebulaCloud, is_loopback
from consoleproxy.clouds.opennebula.console_settings import StatePolicy
from consoleproxy.clouds.opennebula.oned import Oned, ServerAdmin
from consoleproxy.clouds.opennebula.xmlrpc import XmlRpcClient, load_trust_roots
from consoleproxy.clouds.opennebula.zones import ZoneDirectory
from consoleproxy.clouds.passwords import PasswordVerifier
from consoleproxy.config import Config, ConfigError, example_path
from consoleproxy.net.clients import ClientAddresses, networks
from consoleproxy.net.ratelimit import RateLimiter
from consoleproxy.net.routing import client_of
from consoleproxy.ops.audit import AuditLog
from consoleproxy.ops.health import (
    Check,
    HealthResource,
    ReadinessResource,
    guacd_check,
    inventory_check,
    oned_check,
)
from consoleproxy.ops.metrics import Metrics, MetricsResource
from consoleproxy.relay.guacamole_relay import (
    FederationSettings,
    GuacamoleRelayFactory,
    RelaySettings,
)
from consoleproxy.relay.rfb_relay import PURPOSE as RFB_PURPOSE
from consoleproxy.relay.rfb_relay import RfbRelayFactory, RfbRelayResource, RfbSettings
from consoleproxy.relay.session_events import SessionEvents
from consoleproxy.relay.sessions import SessionTable
from consoleproxy.relay.websocket import RelayPolicy, RelayResource
from consoleproxy.tokens import KeyFileError, KeyRing, TokenAuthority
from consoleproxy.tunnels.routes import TunnelRule, Tunnels, TunnelSettings
from consoleproxy.tunnels.ssh import SSHPool, SSHSettings, load_private_key
from consoleproxy.web.api import TokenApi
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.console_page import ConsoleModes, ConsolePage, GuacdProbe
from consoleproxy.web.http_channel import HttpLimits
from consoleproxy.web.site import ConsoleProxyWeb, Operations, build_site

log = Logger()


class Options(usage.Options):
    """Command-line options; each overrides the same key of the --config file."""

    synopsis = "[options]"
    longdesc = (
        "Web console proxy: issues console tokens at GET /api/vm/<id>/guacamole/<vnc|ssh|rdp> "
        "(?mode=rfb: raw VNC), relays WebSockets at /guacamole to guacd and at /rfb to VNC "
        "servers, and serves a console page at /console/<id>/<type>.  Settings come from "
        "--config (TOML; sections [server], [guacd], [tokens], [relay], [rfb], [console], "
        "[cloud], [inventory], [opennebula], [tunnels]) and "
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
    tunnels = build_tunnels(config, reactor)
    tokens = TokenAuthority(keyring, reactor, lifetime=config.token_lifetime)
    clients = ClientAddresses(networks(config.trusted_proxies))
    table = SessionTable(
        reactor, max_total=config.max_sessions, max_per_user=config.max_sessions_per_user
    )
    metrics = Metrics()
    events = SessionEvents(metrics)
    metrics.watch_tunnels(tunnels)
    audit = build_audit(config, reactor)
    if audit is not None:
        events.add(audit)
    policy = RelayPolicy(
        origins=config.origin_policy(),
        clients=clients,
        table=table,
        idle_timeout=config.idle_timeout,
        session_timeout=config.session_timeout,
        ping_interval=config.ping_interval,
        events=events,
    )
    relay = GuacamoleRelayFactory(
        tokens,
        RelaySettings(
            guacd=guacd_endpoint,
            handshake_timeout=config.handshake_timeout,
            timezone=config.timezone,
        ),
        clock=reactor,
        max_message_size=config.max_message_size,
        tunnels=tunnels,
        local_zone=str(config.one_zone),
        zones=build_zones(config, cloud, reactor),
        federation=build_federation(config),
        policy=policy,
    )
    rfb_tokens = rfb = None
    if config.rfb_enabled:
        rfb_tokens = TokenAuthority(
            keyring, reactor, lifetime=config.token_lifetime, purpose=RFB_PURPOSE
        )
        rfb = RfbRelayFactory(
            rfb_tokens,
            RfbSettings(
                reactor=reactor,
                tunnels=tunnels,
                handshake_timeout=config.rfb_handshake_timeout,
            ),
            clock=reactor,
            max_message_size=config.max_message_size,
            policy=policy,
        )
    assets = StaticFiles(config.node_modules or None)
    probe = GuacdProbe(guacd_endpoint if config.has_guacd else None, reactor)
    web = ConsoleProxyWeb(
        TokenApi(cloud, cloud, tokens, rfb_tokens, clock=reactor),
        RelayResource(relay),
        rfb=RfbRelayResource(rfb) if rfb is not None else None,
        page=ConsolePage(cloud, assets),
        modes=ConsoleModes(probe.reachable, rfb=rfb is not None),
        assets=assets,
        operations=Operations(
            metrics=MetricsResource(
                metrics.registry,
                allowed=networks(config.metrics_allow),
                client=lambda request: client_of(request).host,
            ),
            health=HealthResource(),
            readiness=ReadinessResource(
                readiness_checks(config, guacd_endpoint, cloud),
                reactor,
                timeout=config.ready_timeout,
                draining=lambda: table.draining,
            ),
            observer=metrics,
            limiter=RateLimiter(reactor, config.api_rate, config.api_burst),
            draining=lambda: table.draining,
        ),
    )
    return {
        "config": config,
        "reactor": reactor,
        "endpoints": server_endpoints,
        "site": build_site(
            web,
            reactor,
            timeout=config.http_timeout,
            limits=HttpLimits(
                request_timeout=config.request_timeout,
                response_timeout=config.http_timeout,
                max_header_bytes=config.max_header_bytes,
                max_body_bytes=config.max_body_bytes,
            ),
            clients=clients,
        ),
        "table": table,
        "metrics": metrics,
        "audit": audit,
        "relay": relay,
        "rfb": rfb,
        "assets": assets,
        "cloud": cloud,
        "tunnels": tunnels,
    }


def build_audit(config: Config, reactor: Any) -> AuditLog | None:
    """The JSON audit log of C{operations.audit_log}, if any ("-": standard output)."""
    if not config.audit_log:
        return None
    return AuditLog(sys.stdout if config.audit_log == "-" else config.audit_log, reactor)


def readiness_checks(config: Config, guacd: Any, cloud: Any) -> dict[str, Check]:
    """What ``/readyz`` asks: guacd (when configured) and the cloud backend."""
    checks: dict[str, Check] = {}
    if config.has_guacd:
        checks["guacd"] = guacd_check(guacd)
    if isinstance(cloud, InventoryCloud):
        checks["cloud"] = inventory_check(cloud)
    else:
        checks["cloud"] = oned_check(cloud.oned)
    return checks


def build_cloud(config: Config, reactor: Any) -> Any:
    """
    The configured cloud backend (both authenticator and cloud).

    @raise ConfigError: for an unusable inventory, credential file or trust roots.
    """
    if config.cloud == "inventory":
        try:
            return InventoryCloud(
                config.inventory,
                PasswordVerifier(
                    reactor,
                    cache_seconds=config.password_cache,
                    pool=CheckPool(
                        reactor,
                        config.password_workers or default_workers(),
                        config.password_queue,
                        config.password_queue_timeout,
                    ),
                    budget=FailureBudget(
                        reactor, config.failed_login_rate, config.failed_login_burst
                    ),
                ),
                clock=reactor,
            )
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


def build_zones(config: Config, cloud: Any, reactor: Any) -> ZoneDirectory:
    """
    Other zones: the configured relay URLs, and oned's zone pool when the
    OpenNebula backend has the server-admin credential to read it.
    """
    fetch_pool = None
    if isinstance(cloud, OpenNebulaCloud) and cloud.server_admin is not None:
        admin = cloud.server_admin

        def fetch_pool() -> Any:
            return cloud.oned.zonepool_info(admin.session(admin.user, reactor.seconds()))

    return ZoneDirectory(reactor, config.zone_urls(), fetch_pool, refresh=config.zone_refresh)


def build_federation(config: Config) -> FederationSettings:
    """How to reach other zones' proxies (Origin, trust roots, timeout)."""
    trust_roots = None
    if config.federation_trust_roots:
        try:
            trust_roots = load_trust_roots(config.federation_trust_roots)
        except (OSError, ValueError) as e:
            raise ConfigError(Config.key_of("federation_trust_roots"), str(e)) from e
    return FederationSettings(
        origin=config.federation_origin or None,
        trust_roots=trust_roots,
        timeout=config.federation_timeout,
    )


def build_tunnels(config: Config, reactor: Any) -> Tunnels:
    """
    The tunnel policy and SSH pool; keys are loaded (and decrypted) now.

    @raise ConfigError: for an unreadable key, passphrase or agent socket.
    """
    passphrase = None
    if config.tunnel_passphrase_file:
        try:
            passphrase = Path(config.tunnel_passphrase_file).read_bytes().strip()
        except OSError as e:
            raise ConfigError(Config.key_of("tunnel_passphrase_file"), e.strerror or "") from e
    loaded = []
    for path in config.tunnel_keys:
        try:
            loaded.append(load_private_key(os.path.expanduser(path), passphrase))
        except ValueError as e:
            raise ConfigError(Config.key_of("tunnel_keys"), str(e)) from e
    agent_socket = None
    if config.tunnel_agent:
        agent_socket = os.environ.get("SSH_AUTH_SOCK")
        if not agent_socket:
            raise ConfigError(Config.key_of("tunnel_agent"), "SSH_AUTH_SOCK is not set")
    uses_ssh = config.tunnel_default != "direct" or any(
        r["mode"] != "direct" for r in config.tunnel_rules
    )
    if uses_ssh and not loaded and agent_socket is None:
        raise ConfigError(Config.key_of("tunnel_keys"), "SSH tunnels need keys or agent = true")
    pool = SSHPool(
        reactor,
        SSHSettings(
            known_hosts=os.path.expanduser(config.tunnel_known_hosts),
            keys=tuple(loaded),
            agent_socket=agent_socket,
            accept_new=config.tunnel_accept_new,
            keepalive_interval=config.tunnel_keepalive_interval,
            keepalive_count=config.tunnel_keepalive_count,
            idle_grace=config.tunnel_idle_grace,
        ),
    )
    rules = tuple(
        TunnelRule(
            mode=r["mode"],
            hosts=tuple(r.get("hosts", ())),
            clusters=frozenset(str(c) for c in r.get("clusters", ())),
            user=r.get("user"),
            port=r.get("port"),
        )
        for r in config.tunnel_rules
    )
    return Tunnels(
        reactor,
        TunnelSettings(
            default_mode=config.tunnel_default,
            rules=rules,
            user=config.tunnel_user,
            ssh_port=config.tunnel_ssh_port,
            target=config.tunnel_target,
            listen_address=config.tunnel_listen_address,
            port_range=config.port_range(),
            guacd_address=config.tunnel_guacd_address or None,
            accept_timeout=config.tunnel_accept_timeout,
            setup_timeout=config.handshake_timeout,
            probe_timeout=config.tunnel_probe_timeout,
            probe_cache=config.tunnel_probe_cache,
        ),
        pool,
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


class ShutdownService(Service):
    """
    At shutdown: drain the sessions (L{SessionTable.drain}), then close the
    long-lived client connections (oned's pool, SSH).

    The listening ports stop at the same time (their services stop beside
    this one), so nothing new arrives.  While draining, a second SIGTERM or
    SIGINT closes the sessions at once.
    """

    def __init__(
        self,
        table: SessionTable,
        grace: float,
        reactor: Any,
        *closers: Any,
        announce: Any = None,
        reopen: Any = None,
    ) -> None:
        """
        @param announce: called with C{True} when draining starts (metrics).
        @param reopen: called on SIGHUP (the audit log's rotation).
        """
        self.table = table
        self.grace = grace
        self.reactor = reactor
        self.closers = closers
        self.announce = announce
        self.reopen = reopen

    def startService(self) -> None:
        super().startService()
        # Everything built so far lives as long as the process: keep it out of
        # the collector's way, so that its pauses scale with the sessions only.
        gc.freeze()
        if self.reopen is not None and _main_thread():
            reopen = self.reopen
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(reopen))

    def stopService(self) -> Any:
        super().stopService()
        self._second_signal_closes_all()
        if self.announce is not None:
            self.announce(True)
        drained = self.table.drain(self.grace)
        return drained.addCallback(
            lambda _: gatherResults([maybeDeferred(close) for close in self.closers])
        )

    def _second_signal_closes_all(self) -> None:
        if not _main_thread():
            return

        def again(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.table.close_all)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, again)


def _main_thread() -> bool:
    """Signal handlers can only be set from the main thread (not in tests' threads)."""
    return threading.current_thread() is threading.main_thread()


def makeService(options: Options) -> IService:
    """The service tree: one listening service per ``--listen`` endpoint."""
    parts = options.parts
    service = MultiService()
    closers = [parts["tunnels"].pool.close]
    if hasattr(parts["cloud"], "close"):
        closers.append(parts["cloud"].close)
    audit = parts["audit"]
    if audit is not None:
        closers.append(audit.close)
    ShutdownService(
        parts["table"],
        parts["config"].drain_grace,
        parts["reactor"],
        *closers,
        announce=parts["metrics"].set_draining,
        reopen=audit.reopen if audit is not None else None,
    ).setServiceParent(service)
    for endpoint in parts["endpoints"]:
        StreamServerEndpointService(endpoint, parts["site"]).setServiceParent(service)
    config = parts["config"]
    if parts["assets"].missing:
        log.warn(
            "The console page's libraries are not installed in {path} ({missing}): run "
            "scripts/setup (npm ci); the page will say so until then.",
            path=str(parts["assets"].node_modules),
            missing=", ".join(parts["assets"].missing),
        )
    if config.cloud == "inventory" and config.inventory == example_path("inventory.toml"):
        log.warn(
            "Serving the EXAMPLE inventory (user demo, password demo): fine for a first "
            "look on 127.0.0.1, never for anything reachable by others."
        )
    return service
