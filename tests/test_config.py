"""The configuration checks added for start-up: each names the key and says what to fix."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.config import Config, ConfigError


class StartupCheckTests(SynchronousTestCase):
    def assertRefused(self, key: str, message: str, **overrides) -> None:  # type: ignore[no-untyped-def]
        error = self.assertRaises(ConfigError, Config.load, None, overrides)
        self.assertEqual(str(error), f"{key}: {message}")

    def test_numbers_say_what_they_count(self) -> None:
        self.assertRefused(
            "api.rate", "a number of requests per second, not 'fast'", api_rate="fast"
        )
        self.assertRefused(
            "api.rate", "must be between 0.001 and 1e+06 requests per second", api_rate=0
        )
        self.assertRefused("api.burst", "a whole number of requests from 1 to 1000000", api_burst=0)
        self.assertRefused(
            "relay.max_sessions",
            "a whole number of sessions from 1 to 1000000, not 'many'",
            max_sessions="many",
        )
        self.assertRefused(
            "server.max_header_bytes",
            "a whole number of bytes from 1024 to 1048576",
            max_header_bytes=10,
        )
        self.assertRefused(
            "tunnels.ssh_port", "a whole number from 1 to 65535 (a TCP port)", tunnel_ssh_port=0
        )
        self.assertRefused("tokens.lifetime", "a number of seconds, not '60'", token_lifetime="60")

    def test_unknown_timezone(self) -> None:
        self.assertRefused(
            "guacd.timezone",
            "unknown time zone 'Mars/Olympus' (an IANA name, e.g. Europe/Paris or UTC)",
            timezone="Mars/Olympus",
        )
        self.assertRefused(
            "guacd.timezone",
            "unknown time zone '../../etc/passwd' (an IANA name, e.g. Europe/Paris or UTC)",
            timezone="../../etc/passwd",
        )
        self.assertEqual(
            Config.load(overrides={"timezone": "Europe/Paris"}).timezone, "Europe/Paris"
        )

    def test_audit_log_directory(self) -> None:
        self.assertRefused(
            "operations.audit_log",
            "directory /nonexistent/logs does not exist",
            audit_log="/nonexistent/logs/audit.jsonl",
        )
        directory = self.mktemp()
        os.makedirs(directory)
        self.assertRefused(
            "operations.audit_log", f"{directory} is a directory", audit_log=directory
        )
        a_file = os.path.join(directory, "file")
        open(a_file, "w").close()
        self.assertRefused(
            "operations.audit_log",
            f"directory {a_file} does not exist",
            audit_log=os.path.join(a_file, "audit.jsonl"),
        )
        fine = os.path.join(directory, "audit.jsonl")
        self.assertEqual(Config.load(overrides={"audit_log": fine}).audit_log, fine)
        self.assertEqual(Config.load(overrides={"audit_log": "-"}).audit_log, "-")

    def test_audit_log_not_writable(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "audit.jsonl")
        # As root every directory is writable: ask os.access the way a daemon user would.
        self.patch(os, "access", lambda p, mode: str(p) != directory)
        self.assertRefused("operations.audit_log", f"{path} is not writable", audit_log=path)
        open(path, "w").close()
        self.patch(os, "access", lambda p, mode: str(p) != path)
        self.assertRefused("operations.audit_log", f"{path} is not writable", audit_log=path)

    def test_tls_guacd_trust_roots(self) -> None:
        config = Config.load(overrides={"guacd": "tls:g.example:4822:trustRoots=/nonexistent"})
        error = self.assertRaises(ConfigError, config.guacd_endpoint, reactor)
        self.assertEqual(
            str(error), "guacd.endpoint: trustRoots directory /nonexistent does not exist"
        )
        directory = self.mktemp()
        os.makedirs(directory)
        config = Config.load(overrides={"guacd": f"tls:g.example:4822:trustRoots={directory}"})
        error = self.assertRaises(ConfigError, config.guacd_endpoint, reactor)
        self.assertIn("holds no certificate", str(error))

    def test_spent_file_defaults_beside_the_key_file(self) -> None:
        config = Config.load(overrides={"key_file": "/var/lib/consoleproxy/token.keys"})
        self.assertEqual(config.spent_path(), "/var/lib/consoleproxy/token.keys.spent")
        config = Config.load(overrides={"spent_file": "/run/cp/spent"})
        self.assertEqual(config.spent_path(), "/run/cp/spent")
