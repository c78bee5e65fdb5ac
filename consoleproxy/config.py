"""
Configuration: one TOML file, with the main settings also as options.

Every key has a default, so the server runs with no file at all (on the
example inventory).  Command-line options override the file.  Every value is
checked before anything listens; a bad one stops start-up with one
L{ConfigError} naming the key and the problem.

The keys, by section (see ``consoleproxy/examples/consoleproxy.toml``)::

    [server]    listen (list of endpoint strings), http_timeout, request_timeout,
                max_header_bytes, max_body_bytes, trusted_proxies, drain_grace,
                max_connections_per_client, max_connections_per_frontend,
                descriptor_reserve, stall_timeout, workers
    [guacd]     endpoint, handshake_timeout, timezone
    [tokens]    key_file, lifetime, spent_file
    [relay]     max_message_size, allowed_origins, allow_missing_origin,
                max_sessions, max_sessions_per_user, idle_timeout,
                session_timeout, ping_interval, stall_timeout, upgrade_rate,
                upgrade_burst
    [api]       rate, burst (per client address)
    [operations] metrics_allow, audit_log, ready_timeout
    [rfb]       enabled (the raw VNC relay for noVNC), handshake_timeout
    [console]   node_modules (where npm installed the page's libraries)
    [cloud]     backend ("inventory" or "opennebula")
    [inventory] path, password_cache, password_workers, password_queue,
                password_queue_timeout, failed_login_rate, failed_login_burst
    [federation] origin, trust_roots, timeout, zone_refresh
    [zones.<id>] url
    [cluster]   redis, redis_password_file, trust_roots, key_prefix (shared state)
    [tunnels]   default, user, ssh_port, keys, passphrase_file, agent,
                known_hosts, accept_new, target, listen_address, port_range,
                guacd_address, accept_timeout, keepalive_interval,
                keepalive_count, idle_grace, probe_timeout, probe_cache,
                [[tunnels.rule]] hosts, clusters, mode, user, port
    [opennebula] xmlrpc, trust_roots, timeout, max_concurrent,
                server_admin_auth, zone, vnc_states, ssh_states, rdp_states,
                loopback_address
"""

from __future__ import annotations

import os
import tomllib
import zoneinfo
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from zope.interface import implementer

from consoleproxy.clouds.opennebula.console_settings import RUNNING_ONLY, VNC_LCM_STATES
from consoleproxy.cluster.redis_client import load_trust_roots, parse_redis_url, read_password_file
from consoleproxy.cluster.state import workers_problem
from consoleproxy.consoles import ZoneIdError, zone_key
from consoleproxy.guacamole.guacd import default_timezone
from consoleproxy.net.clients import networks
from consoleproxy.relay.origins import OriginPolicy


class ConfigError(ValueError):
    """A configuration value is unusable: C{key} says which, the message why."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


def example_path(name: str) -> str:
    """The path of a file shipped in ``consoleproxy/examples``."""
    return str(resources.files("consoleproxy").joinpath("examples", name))


def _key(name: str) -> Any:
    """Metadata naming a field's dotted key in the TOML file."""
    return {"key": name}


@dataclass
class Config:
    """All settings, with their defaults."""

    listen: list[str] = field(
        default_factory=lambda: ["tcp:2616:interface=127.0.0.1"], metadata=_key("server.listen")
    )
    http_timeout: float = field(default=60.0, metadata=_key("server.http_timeout"))
    request_timeout: float = field(default=10.0, metadata=_key("server.request_timeout"))
    max_header_bytes: int = field(default=16384, metadata=_key("server.max_header_bytes"))
    max_body_bytes: int = field(default=65536, metadata=_key("server.max_body_bytes"))
    trusted_proxies: list[str] = field(
        default_factory=list, metadata=_key("server.trusted_proxies")
    )
    drain_grace: float = field(default=30.0, metadata=_key("server.drain_grace"))
    max_connections_per_client: int = field(
        default=256, metadata=_key("server.max_connections_per_client")
    )
    max_connections_per_frontend: int = field(
        default=4096, metadata=_key("server.max_connections_per_frontend")
    )
    descriptor_reserve: int = field(default=128, metadata=_key("server.descriptor_reserve"))
    stall_timeout: float = field(default=10.0, metadata=_key("server.stall_timeout"))
    # Worker processes sharing the listening sockets (consoleproxy/workers.py): a number
    # or "auto" (one per core); more than 1 needs cluster.redis.
    workers: int | str = field(default=1, metadata=_key("server.workers"))
    guacd: str = field(default="tcp:127.0.0.1:4822", metadata=_key("guacd.endpoint"))
    handshake_timeout: float = field(default=15.0, metadata=_key("guacd.handshake_timeout"))
    timezone: str = field(default_factory=default_timezone, metadata=_key("guacd.timezone"))
    key_file: str = field(default="consoleproxy.keys", metadata=_key("tokens.key_file"))
    token_lifetime: float = field(default=60.0, metadata=_key("tokens.lifetime"))
    spent_file: str = field(default="", metadata=_key("tokens.spent_file"))
    max_message_size: int = field(default=65536, metadata=_key("relay.max_message_size"))
    allowed_origins: list[str] = field(
        default_factory=lambda: ["http://127.0.0.1:2616", "http://localhost:2616"],
        metadata=_key("relay.allowed_origins"),
    )
    allow_missing_origin: bool = field(default=False, metadata=_key("relay.allow_missing_origin"))
    max_sessions: int = field(default=10000, metadata=_key("relay.max_sessions"))
    max_sessions_per_user: int = field(default=20, metadata=_key("relay.max_sessions_per_user"))
    idle_timeout: float = field(default=0.0, metadata=_key("relay.idle_timeout"))
    session_timeout: float = field(default=0.0, metadata=_key("relay.session_timeout"))
    ping_interval: float = field(default=30.0, metadata=_key("relay.ping_interval"))
    relay_stall_timeout: float = field(default=30.0, metadata=_key("relay.stall_timeout"))
    upgrade_rate: float = field(default=5.0, metadata=_key("relay.upgrade_rate"))
    upgrade_burst: int = field(default=60, metadata=_key("relay.upgrade_burst"))
    api_rate: float = field(default=2.0, metadata=_key("api.rate"))
    api_burst: int = field(default=20, metadata=_key("api.burst"))
    metrics_allow: list[str] = field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        metadata=_key("operations.metrics_allow"),
    )
    audit_log: str = field(default="", metadata=_key("operations.audit_log"))
    ready_timeout: float = field(default=2.0, metadata=_key("operations.ready_timeout"))
    rfb_enabled: bool = field(default=True, metadata=_key("rfb.enabled"))
    rfb_handshake_timeout: float = field(default=15.0, metadata=_key("rfb.handshake_timeout"))
    node_modules: str = field(default="", metadata=_key("console.node_modules"))
    inventory: str = field(
        default_factory=lambda: example_path("inventory.toml"), metadata=_key("inventory.path")
    )
    password_cache: float = field(default=60.0, metadata=_key("inventory.password_cache"))
    # Bounds on Argon2 work (clouds/logins.py): checks at once (0: half the cores, 1 to 4),
    # checks waiting and for how long, failed logins a second over all clients, and at once.
    password_workers: int = field(default=0, metadata=_key("inventory.password_workers"))
    password_queue: int = field(default=16, metadata=_key("inventory.password_queue"))
    password_queue_timeout: float = field(
        default=2.0, metadata=_key("inventory.password_queue_timeout")
    )
    failed_login_rate: float = field(default=5.0, metadata=_key("inventory.failed_login_rate"))
    failed_login_burst: int = field(default=30, metadata=_key("inventory.failed_login_burst"))
    cloud: str = field(default="inventory", metadata=_key("cloud.backend"))
    one_xmlrpc: str = field(
        default="http://localhost:2633/RPC2", metadata=_key("opennebula.xmlrpc")
    )
    one_trust_roots: str = field(default="", metadata=_key("opennebula.trust_roots"))
    one_timeout: float = field(default=10.0, metadata=_key("opennebula.timeout"))
    one_max_concurrent: int = field(default=8, metadata=_key("opennebula.max_concurrent"))
    one_server_admin_auth: str = field(default="", metadata=_key("opennebula.server_admin_auth"))
    one_zone: int = field(default=0, metadata=_key("opennebula.zone"))
    one_vnc_states: list[int] = field(
        default_factory=lambda: sorted(VNC_LCM_STATES), metadata=_key("opennebula.vnc_states")
    )
    one_ssh_states: list[int] = field(
        default_factory=lambda: sorted(RUNNING_ONLY), metadata=_key("opennebula.ssh_states")
    )
    one_rdp_states: list[int] = field(
        default_factory=lambda: sorted(RUNNING_ONLY), metadata=_key("opennebula.rdp_states")
    )
    one_loopback_address: str = field(default="", metadata=_key("opennebula.loopback_address"))
    one_admin_groups: list[str | int] = field(
        default_factory=lambda: ["oneadmin"], metadata=_key("opennebula.admin_groups")
    )
    zones: dict[str, Any] = field(default_factory=dict, metadata=_key("zones"))
    federation_origin: str = field(default="", metadata=_key("federation.origin"))
    federation_trust_roots: str = field(default="", metadata=_key("federation.trust_roots"))
    federation_timeout: float = field(default=15.0, metadata=_key("federation.timeout"))
    zone_refresh: float = field(default=60.0, metadata=_key("federation.zone_refresh"))
    tunnel_default: str = field(default="direct", metadata=_key("tunnels.default"))
    tunnel_rules: list[dict[str, Any]] = field(default_factory=list, metadata=_key("tunnels.rule"))
    tunnel_user: str = field(default="oneadmin", metadata=_key("tunnels.user"))
    tunnel_ssh_port: int = field(default=22, metadata=_key("tunnels.ssh_port"))
    tunnel_keys: list[str] = field(default_factory=list, metadata=_key("tunnels.keys"))
    tunnel_passphrase_file: str = field(default="", metadata=_key("tunnels.passphrase_file"))
    tunnel_agent: bool = field(default=False, metadata=_key("tunnels.agent"))
    tunnel_known_hosts: str = field(
        default="~/.ssh/known_hosts", metadata=_key("tunnels.known_hosts")
    )
    tunnel_accept_new: bool = field(default=False, metadata=_key("tunnels.accept_new"))
    tunnel_target: str = field(default="127.0.0.1", metadata=_key("tunnels.target"))
    tunnel_listen_address: str = field(default="127.0.0.1", metadata=_key("tunnels.listen_address"))
    tunnel_port_range: str = field(default="", metadata=_key("tunnels.port_range"))
    tunnel_guacd_address: str = field(default="", metadata=_key("tunnels.guacd_address"))
    tunnel_accept_timeout: float = field(default=20.0, metadata=_key("tunnels.accept_timeout"))
    tunnel_keepalive_interval: float = field(
        default=15.0, metadata=_key("tunnels.keepalive_interval")
    )
    tunnel_keepalive_count: int = field(default=3, metadata=_key("tunnels.keepalive_count"))
    tunnel_idle_grace: float = field(default=30.0, metadata=_key("tunnels.idle_grace"))
    tunnel_probe_timeout: float = field(default=2.0, metadata=_key("tunnels.probe_timeout"))
    tunnel_probe_cache: float = field(default=300.0, metadata=_key("tunnels.probe_cache"))
    cluster_redis: str = field(default="", metadata=_key("cluster.redis"))
    cluster_redis_password_file: str = field(
        default="", metadata=_key("cluster.redis_password_file")
    )
    cluster_trust_roots: str = field(default="", metadata=_key("cluster.trust_roots"))
    cluster_key_prefix: str = field(default="consoleproxy:", metadata=_key("cluster.key_prefix"))

    @classmethod
    def key_of(cls, name: str) -> str:
        """The dotted TOML key of an attribute."""
        return next(f.metadata["key"] for f in fields(cls) if f.name == name)

    @classmethod
    def load(cls, path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
        """
        Read C{path} (if given), apply C{overrides} (attribute -> value), check.

        @raise ConfigError: for an unreadable file, an unknown key or a bad value.
        """
        config = cls()
        if path is not None:
            config._read(path)
        for name, value in (overrides or {}).items():
            setattr(config, name, value)
        config.check()
        return config

    def _read(self, path: str) -> None:
        try:
            data = tomllib.loads(Path(path).read_text("utf-8"))
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("--config", f"{path} is not valid TOML: {e}") from e
        by_key = {f.metadata["key"]: f for f in fields(self)}
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(section, "must be a [section]")
            if section == "zones":
                self.zones = table
                continue
            for name, value in table.items():
                key = f"{section}.{name}"
                f = by_key.get(key)
                if f is None:
                    raise ConfigError(key, "unknown setting")
                setattr(self, f.name, value)

    def check(self) -> None:
        """Check types and ranges of every value."""
        if isinstance(self.listen, str):
            self.listen = [self.listen]
        if not self.listen or not all(isinstance(s, str) and s for s in self.listen):
            raise ConfigError(self.key_of("listen"), "a non-empty list of endpoint strings")
        _number(self, "http_timeout", 1, 86400)
        self._check_hardening()
        _number(self, "handshake_timeout", 1, 300)
        _number(self, "rfb_handshake_timeout", 1, 300)
        if not isinstance(self.rfb_enabled, bool):
            raise ConfigError(self.key_of("rfb_enabled"), "true or false")
        if not isinstance(self.node_modules, str):
            raise ConfigError(self.key_of("node_modules"), "a path (a string)")
        _number(self, "token_lifetime", 1, 86400)
        size = self.max_message_size
        if isinstance(size, bool) or not isinstance(size, int) or not 65536 <= size <= 16777216:
            raise ConfigError(
                self.key_of("max_message_size"), "a number of bytes between 65536 and 16777216"
            )
        for name in ("guacd", "timezone", "key_file", "inventory", "one_xmlrpc"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(self.key_of(name), "a non-empty string")
        for name in (
            "one_trust_roots",
            "one_server_admin_auth",
            "one_loopback_address",
            "spent_file",
        ):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(self.key_of(name), "a string")
        self._check_timezone()
        self._check_writable("audit_log", self.audit_log if self.audit_log != "-" else "")
        if self.cloud not in ("inventory", "opennebula"):
            raise ConfigError(self.key_of("cloud"), "one of: inventory, opennebula")
        if not self.one_xmlrpc.startswith(("http://", "https://")):
            raise ConfigError(self.key_of("one_xmlrpc"), "an http:// or https:// URL")
        _number(self, "one_timeout", 0.1, 300)
        _whole(self, "one_max_concurrent", 1, 1000, "concurrent calls")
        _whole(self, "one_zone", 0, 2**31 - 1, "(a zone id)")
        self._check_tunnels()
        self._check_federation()
        self._check_cluster()
        self._check_workers()
        for name in ("one_vnc_states", "one_ssh_states", "one_rdp_states"):
            states = getattr(self, name)
            if not isinstance(states, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1000 for s in states
            ):
                raise ConfigError(self.key_of(name), "a list of LCM_STATE numbers")
        groups = self.one_admin_groups
        if not isinstance(groups, list) or not all(
            (isinstance(g, int) and not isinstance(g, bool) and 0 <= g < 2**31)
            or (isinstance(g, str) and 0 < len(g) <= 128 and g.isprintable())
            for g in groups
        ):
            raise ConfigError(self.key_of("one_admin_groups"), "a list of group names or ids")

    def _check_hardening(self) -> None:
        _number(self, "request_timeout", 1, 3600)
        _number(self, "password_cache", 0, 86400)
        _whole(self, "password_workers", 0, 8, "threads")
        _whole(self, "password_queue", 0, 10000, "password checks")
        _number(self, "password_queue_timeout", 0.1, 300)
        _number(self, "failed_login_rate", 0.01, 1000000, "failed logins per second")
        _whole(self, "failed_login_burst", 1, 1000000, "failed logins")
        _whole(self, "max_header_bytes", 1024, 1048576, "bytes")
        _whole(self, "max_body_bytes", 0, 16777216, "bytes")
        _number(self, "drain_grace", 0, 86400)
        _whole(self, "max_sessions", 1, 1000000, "sessions")
        _whole(self, "max_sessions_per_user", 1, 1000000, "sessions")
        _number(self, "idle_timeout", 0, 30 * 86400)
        _number(self, "session_timeout", 0, 30 * 86400)
        _number(self, "ping_interval", 0, 3600)
        _number(self, "api_rate", 0.001, 1000000, "requests per second")
        _whole(self, "api_burst", 1, 1000000, "requests")
        _number(self, "ready_timeout", 0.1, 60)
        _whole(self, "max_connections_per_client", 1, 1000000, "connections")
        _whole(self, "max_connections_per_frontend", 1, 1000000, "connections")
        _whole(self, "descriptor_reserve", 16, 65536, "file descriptors")
        _number(self, "stall_timeout", 1, 3600)
        _number(self, "relay_stall_timeout", 0, 3600)
        _number(self, "upgrade_rate", 0.001, 1000000, "upgrades per second")
        _whole(self, "upgrade_burst", 1, 1000000, "upgrades")
        if not isinstance(self.allow_missing_origin, bool):
            raise ConfigError(self.key_of("allow_missing_origin"), "true or false")
        if not isinstance(self.audit_log, str):
            raise ConfigError(self.key_of("audit_log"), 'a path, "-" (standard output) or ""')
        for name in ("allowed_origins", "trusted_proxies", "metrics_allow"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(self.key_of(name), "a list of strings")
        try:
            self.origin_policy()
        except ValueError as e:
            raise ConfigError(self.key_of("allowed_origins"), str(e)) from e
        for name in ("trusted_proxies", "metrics_allow"):
            try:
                networks(getattr(self, name))
            except ValueError as e:
                raise ConfigError(self.key_of(name), str(e)) from e

    def _check_timezone(self) -> None:
        """guacd gets the zone by name: refuse a name no time zone database knows."""
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
            if not zoneinfo.available_timezones():
                return  # no database on this host: nothing to check against
            raise ConfigError(
                self.key_of("timezone"),
                f"unknown time zone {self.timezone!r} (an IANA name, e.g. Europe/Paris or UTC)",
            ) from e

    def _check_writable(self, name: str, path: str) -> None:
        """
        A file the server appends to (C{path}, "" for none): its directory
        must exist and be writable now, not at the first session.
        """
        if not path:
            return
        target = Path(path).expanduser()
        directory = target.parent
        if not directory.is_dir():
            raise ConfigError(self.key_of(name), f"directory {directory} does not exist")
        if target.is_dir():
            raise ConfigError(self.key_of(name), f"{target} is a directory")
        writable = (
            os.access(target, os.W_OK)
            if target.exists()
            else os.access(directory, os.W_OK | os.X_OK)
        )
        if not writable:
            raise ConfigError(self.key_of(name), f"{target} is not writable")

    def spent_path(self) -> str:
        """Where spent token ids are kept: C{tokens.spent_file}, else beside the key file."""
        return self.spent_file or f"{self.key_file}.spent"

    def origin_policy(self) -> OriginPolicy:
        """C{relay.allowed_origins} and C{relay.allow_missing_origin} as a policy."""
        return OriginPolicy(self.allowed_origins, allow_missing=self.allow_missing_origin)

    def _check_tunnels(self) -> None:
        modes = ("direct", "ssh", "auto")
        if self.tunnel_default not in modes:
            raise ConfigError(self.key_of("tunnel_default"), "one of: direct, ssh, auto")
        for name in ("tunnel_user", "tunnel_known_hosts", "tunnel_target", "tunnel_listen_address"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(self.key_of(name), "a non-empty string")
        for name in ("tunnel_passphrase_file", "tunnel_port_range", "tunnel_guacd_address"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(self.key_of(name), "a string")
        for name in ("tunnel_agent", "tunnel_accept_new"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(self.key_of(name), "true or false")
        if not isinstance(self.tunnel_keys, list) or not all(
            isinstance(k, str) and k for k in self.tunnel_keys
        ):
            raise ConfigError(self.key_of("tunnel_keys"), "a list of private key file paths")
        _whole(self, "tunnel_ssh_port", 1, 65535, "(a TCP port)")
        _whole(self, "tunnel_keepalive_count", 1, 100, "unanswered keepalives")
        _number(self, "tunnel_accept_timeout", 1, 300)
        _number(self, "tunnel_keepalive_interval", 1, 3600)
        _number(self, "tunnel_idle_grace", 0, 86400)
        _number(self, "tunnel_probe_timeout", 0.1, 60)
        _number(self, "tunnel_probe_cache", 0, 86400)
        self.port_range()
        if not isinstance(self.tunnel_rules, list):
            raise ConfigError(self.key_of("tunnel_rules"), "an array of tables [[tunnels.rule]]")
        for index, rule in enumerate(self.tunnel_rules):
            key = f"tunnels.rule[{index}]"
            if not isinstance(rule, dict):
                raise ConfigError(key, "must be a table")
            unknown = set(rule) - {"hosts", "clusters", "mode", "user", "port"}
            if unknown:
                raise ConfigError(key, f"unknown keys {sorted(unknown)}")
            if rule.get("mode") not in modes:
                raise ConfigError(f"{key}.mode", "one of: direct, ssh, auto")
            hosts, clusters = rule.get("hosts", []), rule.get("clusters", [])
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise ConfigError(f"{key}.hosts", "a list of host patterns")
            if not isinstance(clusters, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in clusters
            ):
                raise ConfigError(f"{key}.clusters", "a list of cluster ids")
            if not hosts and not clusters:
                raise ConfigError(key, "needs hosts or clusters")
            if "user" in rule and not (isinstance(rule["user"], str) and rule["user"]):
                raise ConfigError(f"{key}.user", "a user name")
            port = rule.get("port", 22)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"{key}.port", "a TCP port")

    def _check_federation(self) -> None:
        for name in ("federation_origin", "federation_trust_roots"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(self.key_of(name), "a string")
        origin = self.federation_origin
        if origin and not origin.startswith(("http://", "https://")):
            raise ConfigError(self.key_of("federation_origin"), "an http(s):// origin")
        _number(self, "federation_timeout", 1, 300)
        _number(self, "zone_refresh", 1, 86400)
        if not isinstance(self.zones, dict):
            raise ConfigError("zones", "tables [zones.<id>]")
        seen: set[str] = set()
        for zone_id, table in self.zones.items():
            key = f"zones.{zone_id}"
            try:
                number = zone_key(str(zone_id))
            except ZoneIdError as e:
                raise ConfigError(key, e.message) from e
            if number in seen:
                raise ConfigError(key, f"zone {number} is configured twice")
            seen.add(number)
            if not isinstance(table, dict) or set(table) - {"url"}:
                raise ConfigError(key, "a table with url")
            url = table.get("url", "")
            if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
                raise ConfigError(f"{key}.url", "a ws:// or wss:// URL of that zone's relay")

    def _check_workers(self) -> None:
        """C{server.workers}: 1 to 256 or "auto" (the cores); more than one needs Redis."""
        if self.workers == "auto":
            self.workers = os.cpu_count() or 1
        if isinstance(self.workers, str) and self.workers.isdigit():
            self.workers = int(self.workers)  # from --workers
        value = self.workers
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
            raise ConfigError(
                self.key_of("workers"),
                f'a number of processes from 1 to 256 or "auto", not {value!r}',
            )
        problem = workers_problem(self.workers, self.cluster_redis)
        if problem is not None:
            raise ConfigError(self.key_of("workers"), problem)

    def _check_cluster(self) -> None:
        """C{[cluster]}: the Redis URL, its password file (not world-readable), trust roots."""
        for name in ("cluster_redis", "cluster_redis_password_file", "cluster_trust_roots"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(self.key_of(name), "a string")
        prefix = self.cluster_key_prefix
        if not isinstance(prefix, str) or not 0 < len(prefix) <= 64 or not prefix.isprintable():
            raise ConfigError(self.key_of("cluster_key_prefix"), "1 to 64 printable characters")
        if not self.cluster_redis:
            for name in ("cluster_redis_password_file", "cluster_trust_roots"):
                if getattr(self, name):
                    raise ConfigError(self.key_of(name), "needs cluster.redis")
            return
        try:
            address = parse_redis_url(self.cluster_redis)
        except ValueError as e:
            raise ConfigError(self.key_of("cluster_redis"), str(e)) from e
        if self.cluster_redis_password_file:
            try:
                read_password_file(self.cluster_redis_password_file)
            except ValueError as e:
                raise ConfigError(self.key_of("cluster_redis_password_file"), str(e)) from e
        if self.cluster_trust_roots:
            if not address.tls:
                raise ConfigError(self.key_of("cluster_trust_roots"), "only for rediss:// URLs")
            try:
                load_trust_roots(self.cluster_trust_roots)
            except ValueError as e:
                raise ConfigError(self.key_of("cluster_trust_roots"), str(e)) from e

    def zone_urls(self) -> dict[str, str]:
        """Configured relay URLs by zone id (``01`` is ``1``)."""
        return {zone_key(str(k)): v["url"] for k, v in self.zones.items() if "url" in v}

    def port_range(self) -> tuple[int, int] | None:
        """C{tunnels.port_range} ("20000-20999") as a pair, or None."""
        text = self.tunnel_port_range.strip()
        if not text:
            return None
        low, dash, high = text.partition("-")
        if not (dash and low.strip().isdigit() and high.strip().isdigit()):
            raise ConfigError(self.key_of("tunnel_port_range"), "LOW-HIGH, e.g. 20000-20999")
        pair = (int(low), int(high))
        if not 0 < pair[0] <= pair[1] < 65536:
            raise ConfigError(
                self.key_of("tunnel_port_range"), "ports from 1 to 65535, LOW <= HIGH"
            )
        return pair

    def server_endpoints(self, reactor: Any) -> list[IStreamServerEndpoint]:
        """Parse C{listen}; C{ssl:} endpoints load their certificates now."""
        endpoints = []
        for description in self.listen:
            try:
                endpoints.append(serverFromString(reactor, with_backlog(description)))
            except Exception as e:
                raise ConfigError(
                    self.key_of("listen"), f"bad endpoint {description!r}: {_why(e)}"
                ) from e
        return endpoints

    @property
    def has_guacd(self) -> bool:
        """False when C{guacd.endpoint} is ``none``: only raw VNC consoles work."""
        return self.guacd != "none"

    def guacd_endpoint(self, reactor: Any) -> IStreamClientEndpoint:
        """
        Parse C{guacd}: ``tcp:host:port`` or ``tls:host:port[:trustRoots=dir]``.

        ``tls:`` verifies guacd's certificate and host name (service_identity).
        ``none`` gives an endpoint that always fails (no guacd configured).
        """
        if not self.has_guacd:
            return NoGuacd()
        if not self.guacd.startswith(("tcp:", "tls:", "unix:")):
            raise ConfigError(self.key_of("guacd"), "use a tcp:, tls: or unix: endpoint")
        self._check_trust_roots()
        try:
            return clientFromString(reactor, self.guacd)
        except Exception as e:
            raise ConfigError(self.key_of("guacd"), f"bad endpoint: {_why(e)}") from e

    def _check_trust_roots(self) -> None:
        """
        A ``tls:`` endpoint's C{trustRoots} directory, checked by name: Twisted
        only says "UnlistableError" when it is missing.
        """
        if not self.guacd.startswith("tls:"):
            return
        for part in self.guacd.split(":")[1:]:
            if not part.startswith("trustRoots="):
                continue
            directory = Path(part[len("trustRoots=") :]).expanduser()
            if not directory.is_dir():
                raise ConfigError(
                    self.key_of("guacd"), f"trustRoots directory {directory} does not exist"
                )
            if not os.access(directory, os.R_OK | os.X_OK):
                raise ConfigError(
                    self.key_of("guacd"), f"trustRoots directory {directory} is not readable"
                )
            if not any(p.suffix.lower() == ".pem" for p in directory.iterdir()):
                raise ConfigError(
                    self.key_of("guacd"),
                    f"trustRoots directory {directory} holds no certificate (*.pem)",
                )


@implementer(IStreamClientEndpoint)
class NoGuacd:
    """The guacd endpoint when none is configured: every connection fails."""

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """Fail at once: there is no guacd."""
        return fail(ConnectError(string="no guacd is configured (guacd.endpoint = none)"))


#: The listen queue of a tcp: or ssl: endpoint that does not set one.  Twisted's
#: default, 50, overflows when a page of consoles opens at once: the kernel
#: drops the SYNs and the clients retry a second later.
DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """C{description} with C{backlog=DEFAULT_BACKLOG} added to tcp:/ssl: endpoints."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "ssl") and ":backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def _number(config: Config, name: str, low: float, high: float, unit: str = "seconds") -> None:
    """Check a number; the message says what it counts (C{unit}), so the fix is obvious."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(config.key_of(name), f"a number of {unit}, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(config.key_of(name), f"must be between {low:g} and {high:g} {unit}")


def _whole(config: Config, name: str, low: int, high: int, what: str = "") -> None:
    """Check a whole number; C{what} says what it counts ("bytes"), or "(a TCP port)"."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        kind = (
            f"a whole number of {what}" if what and not what.startswith("(") else "a whole number"
        )
        suffix = f" {what}" if what.startswith("(") else ""
        shown = "" if isinstance(value, int) and not isinstance(value, bool) else f", not {value!r}"
        raise ConfigError(config.key_of(name), f"{kind} from {low} to {high}{suffix}{shown}")


def _why(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
