"""Configuration, the twistd options, and the plugin as twistd really runs it."""

from __future__ import annotations

import os
import socket
import stat
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy import tap
from consoleproxy.config import Config, ConfigError, example_path
from tests.support import basic, get_json, wait, write_inventory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        listeners = [c for c in service if isinstance(c, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 2)
        self.assertEqual(len([c for c in service if isinstance(c, tap.ShutdownService)]), 1)
        self.assertFalse(service.running)

    def test_bad_value_is_one_usage_error(self) -> None:
        options = tap.Options()
        error = self.assertRaises(
            usage.UsageError,
            options.parseOptions,
            ["--guacd=udp:1", f"--key-file={self.mktemp()}"],
        )
        self.assertEqual(
            str(error), "configuration error: guacd.endpoint: use a tcp:, tls: or unix: endpoint"
        )


class _Twistd(ProcessProtocol):
    """A twistd child process: collects output, fires C{ended} with the exit code."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value.exitCode)


class TwistdTests(TestCase):
    """The plugin as an operator runs it: ``twistd -n consoleproxy``."""

    def twistd(self, *args: str) -> _Twistd:
        directory = self.mktemp()
        os.makedirs(directory)
        code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
        process = _Twistd()
        transport = reactor.spawnProcess(
            process,
            sys.executable,
            [sys.executable, "-c", code, "-n", "--pidfile=", "consoleproxy", *args],
            env={**os.environ, "PYTHONPATH": ROOT},
            path=directory,
        )

        def stop() -> Deferred[int]:
            if not process.ended.called:
                transport.signalProcess("TERM")
            return process.ended

        self.addCleanup(stop)
        return process

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
