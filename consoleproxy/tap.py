"""
``twistd consoleproxy``: options and the service tree.

Options parse and check everything (configuration, endpoints, key file,
inventory) in L{Options.postOptions}, so that a bad value ends start-up with
one message (no usage text, exit status 2) before anything listens.
L{makeService} only wires the checked parts together; an endpoint that cannot
listen ends start-up with one line too (L{ListenFailed}, exit status 1).
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from consoleproxy.clouds.inventory import InventoryCloud, InventoryError
from consoleproxy.clouds.logins import CheckPool, FailureBudget, default_workers
from consoleproxy.clouds.opennebula.cloud import OpenNebulaCloud, is_loopback
from consoleproxy.clouds.opennebula.console_settings import StatePolicy
from consoleproxy.clouds.opennebula.oned import SERVER_ADMIN_KEY, Oned, ServerAdmin
from consoleproxy.clouds.opennebula.xmlrpc import XmlRpcClient, load_trust_roots
from consoleproxy.clouds.opennebula.zones import ZoneDirectory
from consoleproxy.clouds.passwords import PasswordVerifier
from consoleproxy.cluster.ratelimit import ClusterRateLimiter
from consoleproxy.cluster.state import ClusterState
from consoleproxy.cluster.state import build as build_cluster_state
from consoleproxy.config import Config, ConfigError, example_path
from consoleproxy.interfaces import ISpentTokens
from consoleproxy.net.clients import ClientAddresses, networks
from consoleproxy.net.connlimit import ConnectionGate, DescriptorBudget, raise_descriptor_limit
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
    redis_check,
    server_admin_check,
)
from consoleproxy.ops.metrics import Metrics, MetricsResource
from consoleproxy.ops.systemd import SystemdNotifier
from consoleproxy.relay.cluster_sessions import ClusterSessions
from consoleproxy.relay.guacamole_relay import (
    FederationSettings,
    GuacamoleRelayFactory,
    RelaySettings,
)
from consoleproxy.relay.live_sessions import LiveSessions
from consoleproxy.relay.rfb_relay import PURPOSE as RFB_PURPOSE
from consoleproxy.relay.rfb_relay import RfbRelayFactory, RfbRelayResource, RfbSettings
from consoleproxy.relay.session_events import SessionEvents
from consoleproxy.relay.sessions import SessionTable
from consoleproxy.relay.websocket import RelayPolicy, RelayResource
from consoleproxy.tokens import KeyFileError, KeyRing, SpentTokensFile, TokenAuthority
from consoleproxy.tunnels.routes import TunnelRule, Tunnels, TunnelSettings
from consoleproxy.tunnels.ssh import SSHPool, SSHSettings, load_private_key
from consoleproxy.web.api import TokenApi
from consoleproxy.web.assets import StaticFiles
from consoleproxy.web.console_page import ConsoleModes, ConsolePage, GuacdProbe
from consoleproxy.web.http_channel import HttpLimits
from consoleproxy.web.landing import LandingPage
from consoleproxy.web.sessions_api import SessionsApi
from consoleproxy.web.site import ConsoleProxyWeb, Operations, build_site
from consoleproxy.workers import (
    WorkerControl,
    WorkerRole,
    WorkerSupervisor,
    WorkerTagged,
    adopted_endpoints,
    tag_log_lines,
    twistd_logger,
)

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
        [
            "drain-grace",
            None,
            None,
            "Seconds after SIGTERM during which the port keeps listening (503s, new sessions "
            "refused) and open sessions run on [server.drain_grace], default 30; 0: stop at once.",
            float,
        ],
        [
            "workers",
            None,
            None,
            'Worker processes sharing the listening sockets [server.workers], default 1; "auto": '
            "one per core.  More than 1 needs cluster.redis.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.argv: list[str] = []

    def parseOptions(self, options: Any = None) -> None:
        """Parse, keeping the arguments: workers are started with the same ones."""
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

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
            ("drain-grace", "drain_grace"),
            ("workers", "workers"),
            ("cloud", "cloud"),
            ("one-xmlrpc", "one_xmlrpc"),
            ("server-admin-auth", "one_server_admin_auth"),
        ):
            if self[option] is not None:
                overrides[name] = self[option]
        try:
            self.parts = build_parts(Config.load(self["config"], overrides), reactor)
        except (ConfigError, KeyFileError, InventoryError) as e:
            message = f"configuration error: {e}"
            sys.stderr.write(f"consoleproxy: {message}\n")
            sys.stderr.flush()
            raise ConfigExit(message) from e


class ConfigExit(SystemExit):
    """
    A configuration error ends start-up: one line on standard error, exit
    status 2 (a usage error's).

    twistd answers a L{usage.UsageError} with the whole options text above
    the message, which buries the one line that matters; a L{SystemExit}
    passes through twistd untouched, as C{--help}'s does.
    """

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


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
    spent = build_spent(config, reactor)
    cluster = build_cluster(config, reactor)
    # With Redis, a token opens once in the whole cluster (the file stays for
    # nothing but its own close); without, once in this process, across restarts.
    spending: ISpentTokens = cluster.spent if cluster is not None else spent
    cloud = build_cloud(config, reactor)
    tunnels = build_tunnels(config, reactor)
    tokens = TokenAuthority(keyring, reactor, lifetime=config.token_lifetime, spent=spending)
    clients = ClientAddresses(networks(config.trusted_proxies))
    table = SessionTable(
        reactor, max_total=config.max_sessions, max_per_user=config.max_sessions_per_user
    )
    metrics = Metrics()
    events = SessionEvents(metrics)
    metrics.watch_tunnels(tunnels)
    if cluster is not None:
        metrics.watch_cluster(cluster.client)
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
        stall_timeout=config.relay_stall_timeout,
        events=events,
        upgrade_limiter=(
            ClusterRateLimiter(
                cluster.client,
                reactor,
                config.upgrade_rate,
                config.upgrade_burst,
                name="upgrade",
                prefix=config.cluster_key_prefix,
            )
            if cluster is not None
            else RateLimiter(reactor, config.upgrade_rate, config.upgrade_burst)
        ),
        cluster=(
            ClusterSessions(cluster.leases, cluster.registry) if cluster is not None else None
        ),
    )
    live_sessions = LiveSessions(table, policy.cluster, limit=config.max_sessions)
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
            keyring, reactor, lifetime=config.token_lifetime, purpose=RFB_PURPOSE, spent=spending
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
    assets = StaticFiles(config.node_modules or None, stall_timeout=config.stall_timeout)
    probe = GuacdProbe(guacd_endpoint if config.has_guacd else None, reactor)
    web = ConsoleProxyWeb(
        TokenApi(cloud, cloud, tokens, rfb_tokens, clock=reactor),
        RelayResource(relay),
        rfb=RfbRelayResource(rfb) if rfb is not None else None,
        page=ConsolePage(cloud, assets),
        landing=LandingPage(cloud, cloud),
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
                readiness_checks(config, guacd_endpoint, cloud, cluster),
                reactor,
                timeout=config.ready_timeout,
                draining=lambda: table.draining,
            ),
            observer=metrics,
            limiter=(
                cluster.api_rate
                if cluster is not None
                else RateLimiter(reactor, config.api_rate, config.api_burst)
            ),
            draining=lambda: table.draining,
            retry_after=max(1, math.ceil(config.drain_grace)),
        ),
        sessions=SessionsApi(
            cloud,
            cloud,
            live_sessions,
            on_kill=audit.session_killed if audit is not None else None,
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
            gate=ConnectionGate(
                config.max_connections_per_client,
                per_frontend=config.max_connections_per_frontend,
                frontends=networks(config.trusted_proxies),
                budget=DescriptorBudget(reactor, config.descriptor_reserve),
            ),
        ),
        "table": table,
        "metrics": metrics,
        "audit": audit,
        "relay": relay,
        "rfb": rfb,
        "assets": assets,
        "cloud": cloud,
        "tunnels": tunnels,
        "spent": spent,
        "cluster": cluster,
    }


def build_cluster(config: Config, reactor: Any) -> ClusterState | None:
    """
    The state shared with the other processes through C{cluster.redis}
    (spent tokens, session caps, rate limits, live sessions), not started;
    C{None} without Redis: everything stays in this process.

    @raise ConfigError: the password file or trust roots became unusable
        since the configuration was checked.
    """
    if not config.cluster_redis:
        return None
    try:
        return build_cluster_state(
            reactor,
            url=config.cluster_redis,
            password_file=config.cluster_redis_password_file,
            trust_roots=config.cluster_trust_roots,
            prefix=config.cluster_key_prefix,
            max_sessions=config.max_sessions,
            max_sessions_per_user=config.max_sessions_per_user,
            api_rate=config.api_rate,
            api_burst=config.api_burst,
        )
    except ValueError as e:
        raise ConfigError(Config.key_of("cluster_redis"), str(e)) from e


def build_spent(config: Config, reactor: Any) -> SpentTokensFile:
    """
    Where opened token ids are remembered, so that single use survives a
    restart: C{tokens.spent_file} (default: beside the key file).

    @raise ConfigError: when the file or its directory is unusable.
    """
    path = config.spent_path()
    try:
        return SpentTokensFile(path, reactor)
    except OSError as e:
        raise ConfigError(
            Config.key_of("spent_file"), f"cannot use {path}: {e.strerror or e}"
        ) from e


def build_audit(config: Config, reactor: Any) -> AuditLog | None:
    """The JSON audit log of C{operations.audit_log}, if any ("-": standard output)."""
    if not config.audit_log:
        return None
    return AuditLog(sys.stdout if config.audit_log == "-" else config.audit_log, reactor)


def readiness_checks(
    config: Config, guacd: Any, cloud: Any, cluster: ClusterState | None = None
) -> dict[str, Check]:
    """
    What ``/readyz`` asks: guacd (when configured), the cloud backend, and
    the cluster's Redis (C{cluster.redis}; without it no token opens).
    """
    checks: dict[str, Check] = {}
    if cluster is not None:
        checks["cluster.redis"] = redis_check(cluster.client)
    if config.has_guacd:
        checks["guacd"] = guacd_check(guacd)
    if isinstance(cloud, InventoryCloud):
        checks["cloud"] = inventory_check(cloud)
    else:
        checks["cloud"] = oned_check(cloud.oned)
        if cloud.server_admin is not None:
            checks[SERVER_ADMIN_KEY] = server_admin_check(cloud)
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
        admin_groups=config.one_admin_groups,
    )


def build_zones(config: Config, cloud: Any, reactor: Any) -> ZoneDirectory:
    """
    Other zones: the configured relay URLs, and oned's zone pool when the
    OpenNebula backend has the server-admin credential to read it.
    """
    reads_pool = isinstance(cloud, OpenNebulaCloud) and cloud.server_admin is not None
    fetch_pool = cloud.zone_pool if reads_pool else None

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


class ListenFailed(Exception):
    """
    An endpoint could not listen: start-up stops with one line naming it and
    the reason, and exit status 1.

    Twisted's L{StreamServerEndpointService} logs such a failure and carries
    on, leaving a server that listens nowhere.  Raised from
    C{privilegedStartService}, this passes through twistd's start-up (which
    removes its pid file and tells a daemon's parent) to the interpreter,
    whose hook (L{_one_line_hook}) prints the line without a traceback.
    """

    def __init__(self, description: str, error: BaseException) -> None:
        if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
            reason = error.socketError.strerror or str(error.socketError)
        elif isinstance(error, OSError):
            reason = error.strerror or str(error)
        else:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        super().__init__(f"consoleproxy: cannot listen on {description}: {reason}")


def _stderr_is_discarded() -> bool:
    """Whether standard error is /dev/null (twistd without -n has daemonized)."""
    try:
        err, null = os.fstat(2), os.stat(os.devnull)
    except OSError:
        return True
    return (err.st_dev, err.st_ino) == (null.st_dev, null.st_ino)


def listen_failed(description: str, error: BaseException) -> ListenFailed:
    """The L{ListenFailed} to raise, its line logged (daemon) and printed alone (hook)."""
    failed = ListenFailed(description, error)
    if _stderr_is_discarded():
        # A daemon: its parent prints only 100 bytes; the log has it all.
        log.critical("{line}", line=str(failed))
    sys.excepthook = _one_line_hook(sys.excepthook)
    return failed


def _one_line_hook(previous: Any) -> Any:
    """An interpreter exception hook printing L{ListenFailed} as its one line."""

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if isinstance(value, ListenFailed):
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"{value}\n")
            stream.flush()
            return
        previous(kind, value, tb)

    return hook


class _ClusterStart(Service):
    """Connects the cluster's state (Redis) when the server starts; L{ShutdownService}
    disconnects it after the drain (its closers)."""

    def __init__(self, cluster: ClusterState) -> None:
        self.cluster = cluster

    def startService(self) -> None:
        super().startService()
        self.cluster.start()


class ShutdownService(MultiService):
    """
    The listening ports (its children) and the graceful stop.

    Start: listen on every endpoint, or stop start-up (L{ListenFailed}).

    Stop (SIGTERM): the drain, as a load balancer needs it.  For
    C{grace} seconds the ports keep listening while C{/readyz} and the token
    API answer 503 and new sessions are refused (SERVER_BUSY, 1008 "513"),
    so that probes see the drain and late requests get an answer instead of
    a refused connection; open sessions keep relaying.  Then the ports
    close, the remaining sessions close (1001 "523", L{SessionTable.close_all}),
    and once they are gone the long-lived client connections (oned's pool,
    SSH) and the audit log close.  A second SIGTERM or SIGINT ends the grace
    at once.

    SIGINT (Ctrl-C: a person at a terminal, not a load balancer or service
    manager) closes the ports at once; the open sessions still get the grace.
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
        super().__init__()
        self.table = table
        self.grace = grace
        self.reactor = reactor
        self.closers = closers
        self.announce = announce
        self.reopen = reopen
        self._descriptions: dict[Any, str] = {}
        self._listening = False
        self._grace_call: Any = None
        self._ports_call: Any = None
        self._grace_over: Deferred[None] | None = None
        #: The stop signals received (SIGINT, SIGTERM), even before the stop began.
        self.received: list[int] = []
        #: False in a worker: its main process says when to stop (workers.WorkerControl).
        self.handle_signals = True

    def listen(self, description: str, endpoint: Any, factory: Any) -> StreamServerEndpointService:
        """
        Serve C{factory} on C{endpoint} (C{description}: its string, for the
        message); the listening service.
        """
        service = StreamServerEndpointService(endpoint, factory)
        self._descriptions[service] = description
        service.setServiceParent(self)
        return service

    def privilegedStartService(self) -> None:
        """Listen now (before twistd drops privileges); any failure stops start-up."""
        Service.privilegedStartService(self)
        self._listening = True
        for child in self:
            # Raise a synchronous failure instead of logging it and going on.
            child._raiseSynchronously = True
            try:
                child.privilegedStartService()
            except Exception as e:
                raise listen_failed(self._descriptions.get(child, "an endpoint"), e) from e

    def startService(self) -> None:
        if not self._listening:
            self.privilegedStartService()
        super().startService()
        # Everything built so far lives as long as the process: keep it out of
        # the collector's way, so that its pauses scale with the sessions only.
        gc.freeze()
        if self.reopen is not None and _main_thread():
            reopen = self.reopen
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(reopen))
        when_running = getattr(self.reactor, "callWhenRunning", None)
        if when_running is not None and _main_thread() and self.handle_signals:
            # After the reactor has set its own handlers, which it does once running.
            when_running(self._note_stop_signals)

    def _note_stop_signals(self) -> None:
        """
        Note SIGINT and SIGTERM, then let the reactor's handlers stop it: two
        signals that come together (a terminal's Ctrl-C to a process group and
        a script's kill) count as two even when both precede L{stopService}.
        """
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(signum)

            def noted(number: int, frame: Any, previous: Any = previous) -> None:
                self.received.append(number)
                if callable(previous):
                    previous(number, frame)

            signal.signal(signum, noted)

    def stopService(self) -> Any:
        Service.stopService(self)
        self._second_signal_closes_all()
        if self.announce is not None:
            self.announce(True)
        drained = self.table.drain(None)
        self._grace_over = Deferred()
        ports_closed = self._grace_over.addCallback(lambda _: self._stop_listening())
        self._grace_call = self.reactor.callLater(self.grace, self.end_grace)
        hold = 0.0 if signal.SIGINT in self.received else self.grace
        self._ports_call = self.reactor.callLater(hold, self._release_ports)
        if len(self.received) > 1:
            self.end_grace()
        stopped = gatherResults([ports_closed, drained], consumeErrors=True)
        stopped.addCallback(lambda _: self._cancel_grace())
        return stopped.addCallback(
            lambda _: gatherResults([maybeDeferred(close) for close in self.closers])
        )

    def _cancel_grace(self) -> None:
        """Ports closed and no session left: the grace has nothing more to wait for."""
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None

    def end_grace(self) -> None:
        """The grace is over (or a second signal came): stop listening, close the sessions."""
        self._cancel_grace()
        self._release_ports()
        self.table.close_all()

    def _release_ports(self) -> None:
        if self._ports_call is not None and self._ports_call.active():
            self._ports_call.cancel()
        self._ports_call = None
        over, self._grace_over = self._grace_over, None
        if over is not None:
            over.callback(None)

    def _stop_listening(self) -> Deferred[Any]:
        self._listening = False
        return gatherResults([maybeDeferred(child.stopService) for child in list(self)])

    def _second_signal_closes_all(self) -> None:
        if not _main_thread() or not self.handle_signals:
            return

        def again(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.end_grace)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, again)


def _main_thread() -> bool:
    """Signal handlers can only be set from the main thread (not in tests' threads)."""
    return threading.current_thread() is threading.main_thread()


def makeService(options: Options) -> IService:
    """
    The service tree: the L{ShutdownService}, with one listening service per
    ``--listen`` endpoint under it (they stop when its drain says so).
    """
    parts = options.parts
    before, soft, hard = raise_descriptor_limit()
    log.info(
        "Descriptor limit (RLIMIT_NOFILE): soft {soft} (was {before}), hard {hard}; "
        "{reserve} kept in reserve",
        soft=soft,
        before=before,
        hard=hard,
        reserve=parts["config"].descriptor_reserve,
    )
    service = MultiService()
    config = parts["config"]
    role = WorkerRole.from_environment()
    if role is None and config.workers > 1:
        # The main process of several workers: it binds and supervises, never serves.
        WorkerSupervisor(
            parts["reactor"],
            config.workers,
            parts["endpoints"],
            config.listen,
            options.argv,
            config.drain_grace,
            listen_failed,
            logger=twistd_logger(sys.argv, options.argv),
        ).setServiceParent(service)
        return service
    endpoints = parts["endpoints"]
    on_ready = None
    if role is not None:
        tag_log_lines(role.index)
        endpoints = adopted_endpoints(parts["reactor"], role, endpoints)
        parts["site"].resource = WorkerTagged(parts["site"].resource, role.index)
        if role.metrics_dir:
            parts["metrics"].share(role.metrics_dir)
        on_ready = role.tell_ready
        log.info("Worker {index} (pid {pid}) serving", index=role.index, pid=os.getpid())
    closers = [parts["tunnels"].pool.close]
    if hasattr(parts["cloud"], "close"):
        closers.append(parts["cloud"].close)
    audit = parts["audit"]
    if audit is not None:
        closers.append(audit.close)
    closers.append(parts["spent"].close)
    cluster = parts.get("cluster")
    if cluster is not None:
        # Connected with the service, disconnected after the drain (and after
        # the sessions gave their leases back).
        _ClusterStart(cluster).setServiceParent(service)
        closers.append(cluster.stop)
    serving = ShutdownService(
        parts["table"],
        config.drain_grace,
        parts["reactor"],
        *closers,
        announce=parts["metrics"].set_draining,
        reopen=audit.reopen if audit is not None else None,
    )
    serving.setServiceParent(service)
    if role is not None:
        serving.handle_signals = False
        WorkerControl(parts["reactor"], role.control_fd, serving).setServiceParent(service)
    listening = [
        serving.listen(description, endpoint, parts["site"])
        for description, endpoint in zip(config.listen, endpoints, strict=True)
    ]
    # After the ports, so that it stops first: systemd hears STOPPING=1 as the drain begins.
    SystemdNotifier(parts["reactor"], listening, on_ready=on_ready).setServiceParent(service)
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
