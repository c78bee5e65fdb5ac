"""Tunnel policy, host keys and configuration (no SSH server needed here)."""

from __future__ import annotations

import os
import stat

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.config import Config, ConfigError
from consoleproxy.consoles import Console
from consoleproxy.guacamole.status import Status
from consoleproxy.tunnels.routes import DirectRoutes, TunnelRule, Tunnels, TunnelSettings
from consoleproxy.tunnels.ssh import (
    SSHPool,
    SSHSettings,
    TunnelError,
    _KnownHosts,
    known_hosts_name,
)


def new_key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate()).public()


def vnc(host: str, port: int = 5900, cluster: str | None = None) -> Console:
    return Console(
        7, "vnc", {"hostname": host, "port": str(port), "password": "pw"}, cluster=cluster
    )


class RuleTests(SynchronousTestCase):
    def tunnels(self, *rules: TunnelRule, default: str = "direct") -> Tunnels:
        pool = SSHPool(reactor, SSHSettings(known_hosts=self.mktemp()))
        return Tunnels(reactor, TunnelSettings(default_mode=default, rules=rules), pool)

    def test_first_matching_rule(self) -> None:
        tunnels = self.tunnels(
            TunnelRule("ssh", hosts=("KVM-*",), user="root", port=2222),
            TunnelRule("auto", clusters=frozenset({"100"})),
            TunnelRule("direct", hosts=("*",)),
        )
        rule = tunnels.rule_for("kvm-7.example.com", None)
        self.assertEqual((rule.mode, rule.user, rule.port), ("ssh", "root", 2222))
        self.assertEqual(tunnels.rule_for("edge-1", "100").mode, "auto")
        self.assertEqual(tunnels.rule_for("edge-1", "101").mode, "direct")

    def test_default(self) -> None:
        self.assertEqual(self.tunnels(default="ssh").rule_for("h", None).mode, "ssh")

    def test_direct_routes(self) -> None:
        route = self.successResultOf(DirectRoutes().route(vnc("kvm-1")))
        self.assertEqual(route.parameters["hostname"], "kvm-1")
        self.assertFalse(route.tunnelled)
        route.close()

    def test_only_vnc_is_tunnelled(self) -> None:
        tunnels = self.tunnels(default="ssh")
        ssh = Console(7, "ssh", {"hostname": "10.0.0.7", "port": "22"})
        route = self.successResultOf(tunnels.route(ssh))
        self.assertEqual(route.parameters, {"hostname": "10.0.0.7", "port": "22"})


class ProbeTests(TestCase):
    @inlineCallbacks
    def test_auto_probes_once_and_caches(self):  # type: ignore[no-untyped-def]
        accepted: list[Protocol] = []

        class Count(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Count)
        )
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        pool = SSHPool(reactor, SSHSettings(known_hosts=self.mktemp()))
        tunnels = Tunnels(reactor, TunnelSettings(default_mode="auto"), pool)
        for _ in range(3):
            route = yield tunnels.route(vnc("127.0.0.1", number))
            self.assertFalse(route.tunnelled)
        self.assertEqual(len(accepted), 1)

    @inlineCallbacks
    def test_auto_unreachable_uses_ssh(self):  # type: ignore[no-untyped-def]
        pool = SSHPool(reactor, SSHSettings(known_hosts=self.mktemp(), connect_timeout=2))
        tunnels = Tunnels(
            reactor, TunnelSettings(default_mode="auto", ssh_port=1, probe_timeout=1), pool
        )
        error = yield self.assertFailure(tunnels.route(vnc("127.0.0.1", 1)), TunnelError)
        self.assertEqual(error.status, Status.UPSTREAM_NOT_FOUND)
        self.assertIn("cannot connect SSH oneadmin@127.0.0.1:1", str(error))
        self.assertEqual(pool.connections, 0)


class KnownHostsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "known_hosts")
        self.key = new_key()

    def test_names(self) -> None:
        self.assertEqual(known_hosts_name("kvm1", 22), b"kvm1")
        self.assertEqual(known_hosts_name("127.0.0.1", 2222), b"[127.0.0.1]:2222")

    def test_unknown_refused_with_advice(self) -> None:
        error = self.assertRaises(
            TunnelError, _KnownHosts(self.path, False).verify, "kvm1", 22, self.key
        )
        self.assertIn("ssh-keyscan -p 22 kvm1", str(error))
        self.assertIn("SHA256:", str(error))
        self.assertFalse(os.path.exists(self.path))

    def test_accept_new_appends_safely(self) -> None:
        hosts = _KnownHosts(self.path, True)
        hosts.verify("127.0.0.1", 2222, self.key)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"[127.0.0.1]:2222 " + self.key.toString("openssh") + b"\n")
        _KnownHosts(self.path, False).verify("127.0.0.1", 2222, self.key)  # now known
        hosts.verify("other", 22, new_key())
        with open(self.path, "rb") as f:
            self.assertEqual(len(f.read().splitlines()), 2)

    def test_changed_refused_even_with_accept_new(self) -> None:
        _KnownHosts(self.path, True).verify("kvm1", 22, self.key)
        error = self.assertRaises(
            TunnelError, _KnownHosts(self.path, True).verify, "kvm1", 22, new_key()
        )
        self.assertIn("CHANGED", str(error))
        self.assertIn("line 1", str(error))


class ConfigTests(SynchronousTestCase):
    def test_rules_and_ranges(self) -> None:
        config = Config.load(
            overrides={
                "tunnel_rules": [
                    {"hosts": ["kvm-*"], "mode": "ssh"},
                    {"clusters": [1], "mode": "auto"},
                ],
                "tunnel_port_range": "20000-20099",
            }
        )
        self.assertEqual(config.port_range(), (20000, 20099))
        for overrides, key in (
            ({"tunnel_default": "maybe"}, "tunnels.default"),
            ({"tunnel_rules": [{"hosts": ["x"], "mode": "tcp"}]}, "tunnels.rule[0].mode"),
            ({"tunnel_rules": [{"mode": "ssh"}]}, "tunnels.rule[0]"),
            (
                {"tunnel_rules": [{"hosts": ["x"], "mode": "ssh", "port": 0}]},
                "tunnels.rule[0].port",
            ),
            ({"tunnel_rules": [{"hosts": "x", "mode": "ssh"}]}, "tunnels.rule[0].hosts"),
            ({"tunnel_port_range": "20000"}, "tunnels.port_range"),
            ({"tunnel_port_range": "3-2"}, "tunnels.port_range"),
            ({"tunnel_keys": [""]}, "tunnels.keys"),
            ({"tunnel_agent": "yes"}, "tunnels.agent"),
        ):
            error = self.assertRaises(ConfigError, Config.load, None, overrides)
            self.assertEqual(error.key, key)

    def test_ssh_needs_credentials(self) -> None:
        from consoleproxy import tap  # noqa: PLC0415

        config = Config.load(overrides={"tunnel_default": "ssh"})
        error = self.assertRaises(ConfigError, tap.build_tunnels, config, reactor)
        self.assertEqual(error.key, "tunnels.keys")
        config = Config.load(overrides={"tunnel_keys": ["/nonexistent/id_ed25519"]})
        error = self.assertRaises(ConfigError, tap.build_tunnels, config, reactor)
        self.assertIn("/nonexistent/id_ed25519", str(error))
