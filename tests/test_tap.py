"""Configuration, the twistd options, and the plugin as twistd really runs it."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from consoleproxy import tap
from consoleproxy.config import Config, ConfigError, example_path, with_backlog
from tests.helpers.support import basic, get_json, wait, write_inventory
from tests.helpers.twistd import ROOT, Twistd, fake_guacd, free_port, run_twistd, serve
from tests.helpers.wsclient import connect


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        config = Config.load()
        self.assertEqual(config.listen, ["tcp:2616:interface=127.0.0.1"])
        self.assertEqual(config.guacd, "tcp:127.0.0.1:4822")
        self.assertEqual((config.token_lifetime, config.handshake_timeout), (60, 15))
        self.assertEqual(config.inventory, example_path("inventory.toml"))

    def test_example_configuration_is_the_defaults(self) -> None:
        config = Config.load(example_path("consoleproxy.toml"))
        defaults = Config.load()
        self.assertEqual(config, defaults)

    def test_file_and_overrides(self) -> None:
        path = self.write(
            '[server]\nlisten = ["tcp:1"]\n[guacd]\nendpoint = "tcp:g:1"\ntimezone = "UTC"\n'
            "[tokens]\nlifetime = 30\n"
        )
        config = Config.load(path, {"guacd": "tcp:h:2"})
        self.assertEqual((config.listen, config.guacd), (["tcp:1"], "tcp:h:2"))
        self.assertEqual((config.token_lifetime, config.timezone), (30, "UTC"))

    def assertConfigError(self, key: str, words: str, text: str = "", **overrides) -> None:  # type: ignore[no-untyped-def]
        path = self.write(text) if text else None
        error = self.assertRaises(ConfigError, Config.load, path, overrides)
        self.assertEqual(error.key, key)
        self.assertIn(words, str(error))
        self.assertTrue(str(error).startswith(f"{key}: "))

    def test_bad_values_name_the_key(self) -> None:
        self.assertConfigError("server.nope", "unknown setting", "[server]\nnope = 1\n")
        self.assertConfigError("server", "must be a [section]", "server = 1\n")
        self.assertConfigError("--config", "not valid TOML", "[server\n")
        self.assertConfigError("tokens.lifetime", "a number", '[tokens]\nlifetime = "60"\n')
        self.assertConfigError("tokens.lifetime", "between", token_lifetime=0)
        self.assertConfigError("guacd.handshake_timeout", "between", handshake_timeout=1000)
        self.assertConfigError("relay.max_message_size", "bytes", max_message_size=True)
        self.assertConfigError("server.listen", "non-empty list", listen=[])
        self.assertConfigError("inventory.path", "non-empty string", inventory=3)
        error = self.assertRaises(ConfigError, Config.load, "/nonexistent/c.toml")
        self.assertIn("cannot read /nonexistent/c.toml", str(error))

    def test_connection_limits_checked(self) -> None:
        config = Config.load()
        self.assertEqual(
            (
                config.max_connections_per_client,
                config.max_connections_per_frontend,
                config.descriptor_reserve,
                config.stall_timeout,
                config.upgrade_rate,
                config.upgrade_burst,
            ),
            (256, 4096, 128, 10.0, 5.0, 60),
        )
        self.assertConfigError(
            "server.max_connections_per_client", "whole number", max_connections_per_client=0
        )
        self.assertConfigError("server.descriptor_reserve", "from 16", descriptor_reserve=8)
        self.assertConfigError("server.stall_timeout", "between", stall_timeout=0)
        self.assertConfigError("relay.upgrade_rate", "between", upgrade_rate=0)
        self.assertConfigError("relay.upgrade_burst", "whole number", upgrade_burst=1.5)
        self.assertConfigError("relay.stall_timeout", "between", relay_stall_timeout=-1)

    def test_relay_stall_timeout_reaches_both_relays(self) -> None:
        directory = self.mktemp()
        config = Config.load(
            None,
            {
                "relay_stall_timeout": 7.0,
                "key_file": os.path.join(directory, "keys"),
                "inventory": write_inventory(directory),
            },
        )
        self.assertEqual(Config.load().relay_stall_timeout, 30.0)
        parts = tap.build_parts(config, MemoryReactorClock())
        self.assertEqual(parts["relay"].policy.stall_timeout, 7.0)
        self.assertEqual(parts["rfb"].policy.stall_timeout, 7.0)

    def test_bad_endpoints(self) -> None:
        for listen, words in (
            ("tcp:notaport", "bad endpoint 'tcp:notaport'"),
            ("ssl:0:privateKey=/nonexistent.pem", "bad endpoint"),
            ("bogus:1", "bad endpoint"),
        ):
            config = Config.load(overrides={"listen": [listen]})
            error = self.assertRaises(ConfigError, config.server_endpoints, reactor)
            self.assertEqual(error.key, "server.listen")
            self.assertIn(words, str(error))
        for guacd in ("http://x", "tcp:host", "tls:host:4822:trustRoots=/nonexistent"):
            config = Config.load(overrides={"guacd": guacd})
            error = self.assertRaises(ConfigError, config.guacd_endpoint, reactor)
            self.assertEqual(error.key, "guacd.endpoint")


class OptionsTests(SynchronousTestCase):
    def test_every_option_documented(self) -> None:
        text = str(tap.Options())
        for option in (
            "--config",
            "--listen",
            "--guacd",
            "--inventory",
            "--key-file",
            "--token-lifetime",
            "--handshake-timeout",
            "--drain-grace",
        ):
            self.assertIn(option, text)

    def test_plugin_is_found(self) -> None:
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("consoleproxy", names)
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "plugins", "__init__.py")))

    def test_service_tree(self) -> None:
        directory = self.mktemp()
        key_file = os.path.join(directory, "keys", "token.keys")
        options = tap.Options()
        options.parseOptions(
            [
                "--listen=tcp:0:interface=127.0.0.1",
                "--listen=tcp:0:interface=\\:\\:1",
                f"--key-file={key_file}",
                f"--inventory={write_inventory(directory)}",
                "--guacd=tcp:guacd.example:4822",
            ]
        )
        self.assertEqual(stat.S_IMODE(os.stat(key_file).st_mode), 0o600)
        service = tap.makeService(options)
        [serving] = [c for c in service if isinstance(c, tap.ShutdownService)]
        # The ports live under the drain, which closes them when its grace is over.
        listeners = [c for c in serving if isinstance(c, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 2)
        self.assertFalse(service.running)

    def test_bad_value_is_one_line_and_exit_2(self) -> None:
        options = tap.Options()
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(
            SystemExit,
            options.parseOptions,
            ["--guacd=udp:1", f"--key-file={self.mktemp()}"],
        )
        self.assertEqual(error.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            "consoleproxy: configuration error: guacd.endpoint: use a tcp:, tls: or unix: "
            "endpoint\n",
        )

    def test_bad_option_type_is_still_a_usage_error(self) -> None:
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--token-lifetime=soon"])


class TwistdTests(TestCase):
    """The plugin as an operator runs it: ``twistd -n consoleproxy``."""

    def twistd(self, *args: str) -> Twistd:
        return run_twistd(self, *args)

    @inlineCallbacks
    def test_bad_configuration_stops_startup(self):  # type: ignore[no-untyped-def]
        process = self.twistd(f"--listen=tcp:{free_port()}", "--token-lifetime=-5")
        code = yield process.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"configuration error: tokens.lifetime: must be between", process.output)
        self.assertNotIn(b"Traceback", process.output)

    @inlineCallbacks
    def test_serves_tokens(self):  # type: ignore[no-untyped-def]
        port = free_port()
        directory = os.path.abspath(self.mktemp())
        process = self.twistd(
            f"--listen=tcp:{port}:interface=127.0.0.1",
            f"--key-file={directory}/k",
            f"--inventory={write_inventory(directory)}",
        )
        url = f"http://127.0.0.1:{port}/api/vm/8/guacamole/rdp".encode()
        for _ in range(150):
            try:
                code, _, body = yield get_json(url, basic("bob", "builder"))
                break
            except ConnectError:
                self.assertFalse(process.ended.called, process.output)
                yield wait(0.1)
        self.assertEqual((code, body["message"]), (200, "OK"))
        self.assertEqual(stat.S_IMODE(os.stat(f"{directory}/k").st_mode), 0o600)


class TwistdOperationsTests(TestCase):
    """Metrics, health, the audit log and the drain, in a real twistd process."""

    @inlineCallbacks
    def start(self, grace: float):  # type: ignore[no-untyped-def]
        self.guacd = yield fake_guacd(self)
        served = yield serve(self, self.guacd, grace=grace)
        self.port, self.process, self.audit = served.port, served.process, served.audit

    def url(self, path: str) -> bytes:
        return f"http://127.0.0.1:{self.port}{path}".encode()

    @inlineCallbacks
    def open_session(self):  # type: ignore[no-untyped-def]
        code, _, body = yield get_json(self.url("/api/vm/8/guacamole/rdp"), basic("bob", "builder"))
        self.assertEqual(code, 200)
        client = yield connect(f"ws://127.0.0.1:{self.port}/guacamole?token={body['data']}")
        yield client.opened
        conn = yield self.guacd.wait_for_connection()
        return client, conn

    @inlineCallbacks
    def assert_stopped_by_sigterm(self):  # type: ignore[no-untyped-def]
        """twistd shuts down cleanly, then exits by the signal it got (its way)."""
        yield self.process.ended
        self.assertIn(b"Server Shut Down.", self.process.output)
        self.assertEqual(self.process.signal, 15)

    def audit_events(self) -> list[dict[str, Any]]:
        with open(self.audit) as f:
            return [json.loads(line) for line in f]

    @inlineCallbacks
    def test_operations_then_drain(self):  # type: ignore[no-untyped-def]
        yield self.start(grace=1.5)
        client, conn = yield self.open_session()
        code, _, body = yield get_json(self.url("/readyz"))
        self.assertEqual(
            (code, body["status"], body["checks"]), (200, "ready", {"guacd": "ok", "cloud": "ok"})
        )
        response = yield Agent(reactor).request(b"GET", self.url("/metrics"))
        text = (yield readBody(response)).decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        self.assertEqual(
            samples[("consoleproxy_sessions_open", (("relay", "guacamole"), ("type", "rdp")))], 1
        )
        opened = self.audit_events()
        self.assertEqual(
            [(e["event"], e["user"], e["vm"], e["client"]) for e in opened],
            [("session_opened", "bob", 8, "127.0.0.1")],
        )
        self.process.transport.signalProcess("TERM")
        yield wait(0.5)
        conn.send("sync", "42")  # the session still relays during the grace
        yield client.wait_messages(2)
        self.assertIn("4.sync,2.42;", client.text())
        self.assertFalse(client.closed.called)
        closed = yield client.closed
        self.assertEqual(closed, (1001, "523"))
        yield self.assert_stopped_by_sigterm()
        last = self.audit_events()[-1]
        self.assertEqual((last["event"], last["status"]), ("session_closed", 523))
        self.assertNotIn(b"Traceback", self.process.output)

    @inlineCallbacks
    def test_second_signal_closes_at_once(self):  # type: ignore[no-untyped-def]
        yield self.start(grace=60)
        client, _ = yield self.open_session()
        self.process.transport.signalProcess("TERM")
        yield wait(0.3)
        self.assertFalse(client.closed.called)
        self.process.transport.signalProcess("TERM")
        started = reactor.seconds()
        closed = yield client.closed
        self.assertEqual(closed, (1001, "523"))
        self.assertLess(reactor.seconds() - started, 5)
        yield self.assert_stopped_by_sigterm()


class BacklogTests(SynchronousTestCase):
    def test_listen_strings_get_a_deep_queue(self) -> None:
        self.assertEqual(with_backlog("tcp:2616"), "tcp:2616:backlog=1024")
        self.assertEqual(
            with_backlog("ssl:443:privateKey=k.pem"), "ssl:443:privateKey=k.pem:backlog=1024"
        )
        self.assertEqual(with_backlog("tcp:2616:backlog=10"), "tcp:2616:backlog=10")
        self.assertEqual(with_backlog("unix:/run/cp.sock"), "unix:/run/cp.sock")
        endpoint = Config.load(
            overrides={"listen": ["tcp:0:interface=127.0.0.1"]}
        ).server_endpoints(reactor)[0]
        self.assertEqual(endpoint._backlog, 1024)
