"""RedisClient against a real redis-server: URLs, password files, TLS, outages."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.cluster.redis_client import (
    RedisAddress,
    RedisClient,
    RedisUnavailable,
    load_trust_roots,
    parse_redis_url,
    read_password_file,
)
from consoleproxy.config import Config, ConfigError
from consoleproxy.guacamole.status import Status
from tests.helpers.redis_server import RedisServer, connected, start_redis, until


class UrlTests(SynchronousTestCase):
    def test_tcp(self) -> None:
        self.assertEqual(
            parse_redis_url("redis://10.0.0.5:6380/3"),
            RedisAddress("redis", "10.0.0.5", 6380, db=3),
        )
        self.assertEqual(parse_redis_url("redis://r"), RedisAddress("redis", "r", 6379, db=0))

    def test_tls_and_ipv6(self) -> None:
        address = parse_redis_url("rediss://[::1]:6390/1")
        self.assertEqual(address, RedisAddress("rediss", "::1", 6390, db=1))
        self.assertTrue(address.tls)
        self.assertEqual(str(address), "rediss://[::1]:6390/1")

    def test_unix(self) -> None:
        self.assertEqual(
            parse_redis_url("unix:///run/redis/redis.sock?db=2"),
            RedisAddress("unix", path="/run/redis/redis.sock", db=2),
        )

    def test_refused(self) -> None:
        for url, why in [
            ("http://x/0", "redis://"),
            ("redis://:secret@x/0", "password_file"),
            ("redis://user@x/0", "password_file"),
            ("redis://x/zero", "whole number"),
            ("redis://x:99999/0", "port"),
            ("unix://relative/sock", "absolute"),
            ("unix:///s?dbx=1", "unknown"),
            ("redis:///0", "host"),
            ("", "URL"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_redis_url(url)
            self.assertIn(why, str(caught.exception), url)
            self.assertNotIn("secret", str(caught.exception))


class PasswordFileTests(SynchronousTestCase):
    def write(self, text: str, mode: int) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_first_line(self) -> None:
        self.assertEqual(read_password_file(self.write("s3cret\nignored\n", 0o600)), "s3cret")

    def test_world_readable_refused(self) -> None:
        path = self.write("s3cret\n", 0o644)
        with self.assertRaises(ValueError) as caught:
            read_password_file(path)
        self.assertIn("readable by everyone", str(caught.exception))
        self.assertNotIn("s3cret", str(caught.exception))

    def test_missing_and_empty(self) -> None:
        with self.assertRaises(ValueError):
            read_password_file(self.mktemp())
        with self.assertRaises(ValueError):
            read_password_file(self.write("\n", 0o600))

    def test_trust_roots_need_a_certificate(self) -> None:
        with self.assertRaises(ValueError):
            load_trust_roots(self.write("not a certificate", 0o600))


class ConnectionTests(TestCase):
    timeout = 60

    def test_execute(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url)
            self.assertEqual(await client.execute("SET", "k", "v"), "OK")
            self.assertEqual(await client.execute("GET", "k"), "v")

        return ensureDeferred(go())

    def test_database_selected(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url.replace("/0", "/5"))
            await client.execute("SET", "in-five", "1")
            self.assertIn(b"db5:keys=1", server.command("INFO", "keyspace"))

        return ensureDeferred(go())

    def test_password_from_file(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor, password="pw-xyz")
            password = read_password_file(server.password_file)
            client = await connected(self, reactor, server.url, password=password)
            self.assertEqual(await client.execute("PING"), "PONG")

        return ensureDeferred(go())

    def test_wrong_password_unavailable(self) -> Deferred[None]:
        """Refused AUTH: unavailable, one clear log line, and the password in no log line."""

        async def go() -> None:
            server = await start_redis(self, reactor, password="pw-xyz")
            lines: list[str] = []
            observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
            globalLogPublisher.addObserver(observer)
            self.addCleanup(globalLogPublisher.removeObserver, observer)
            client = RedisClient(reactor, parse_redis_url(server.url), password="wrong-pw-123")
            client.start()
            self.addCleanup(client.stop)
            await until(reactor, lambda: any("refused the connection" in line for line in lines))
            self.assertFalse(client.available)
            with self.assertRaises(RedisUnavailable):
                await client.execute("PING")
            self.assertFalse([line for line in lines if "wrong-pw-123" in line or "pw-xyz" in line])
            errors = self.flushLoggedErrors()
            self.assertEqual(errors, [])

        return ensureDeferred(go())

    def test_tls_verified(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor, tls=True)
            roots = load_trust_roots(server.ca_file)
            client = await connected(self, reactor, server.url, trust_roots=roots)
            self.assertEqual(await client.execute("PING"), "PONG")

        return ensureDeferred(go())

    def test_tls_wrong_ca_refused(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor, tls=True)
            other = RedisServer(self, reactor, tls=True)  # another CA, never started
            client = RedisClient(
                reactor, parse_redis_url(server.url), trust_roots=load_trust_roots(other.ca_file)
            )
            client.start()
            self.addCleanup(client.stop)
            await deferLater(reactor, 1.0)
            self.assertFalse(client.available)
            with self.assertRaises(RedisUnavailable):
                await client.execute("PING")

        return ensureDeferred(go())

    def test_unix_socket(self) -> Deferred[None]:
        async def go() -> None:
            server = RedisServer(self, reactor)
            short = tempfile.mkdtemp(prefix="cp-redis-")  # sun_path is 108 bytes
            self.addCleanup(shutil.rmtree, short, True)
            sock = os.path.join(short, "redis.sock")
            argv = server.argv
            server.argv = lambda: [*argv(), "--unixsocket", sock]  # type: ignore[method-assign]
            await server.start()
            client = await connected(self, reactor, f"unix://{sock}?db=1")
            self.assertEqual(await client.execute("SET", "u", "1"), "OK")
            self.assertIn(b"db1:keys=1", server.command("INFO", "keyspace"))

        return ensureDeferred(go())


class PubSubTests(TestCase):
    timeout = 60

    def test_channels_added_to_a_live_subscription(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url)
            got: list[tuple[str, str]] = []
            client.subscribe("one", lambda m: got.append(("one", m)))

            def subscribers(channel: str) -> bytes:
                return server.command("PUBSUB", "NUMSUB", channel)

            await until(reactor, lambda: subscribers("one").endswith(b":1\r\n"))
            client.subscribe("two", lambda m: got.append(("two", m)))
            client.subscribe("two", lambda m: got.append(("two again", m)))
            await until(reactor, lambda: subscribers("two").endswith(b":1\r\n"))
            self.assertEqual(await client.publish("two", "hello"), 1)
            self.assertEqual(await client.publish("one", "hi"), 1)
            await until(reactor, lambda: len(got) == 3)
            self.assertEqual(got, [("two", "hello"), ("two again", "hello"), ("one", "hi")])

        return ensureDeferred(go())

    def test_a_failing_handler_does_not_stop_the_others(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url)
            got: list[str] = []
            client.subscribe("c", lambda m: 1 / 0)  # type: ignore[func-returns-value]
            client.subscribe("c", got.append)
            await until(
                reactor, lambda: server.command("PUBSUB", "NUMSUB", "c").endswith(b":1\r\n")
            )
            await client.publish("c", "m")
            await until(reactor, lambda: got)
            self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

        return ensureDeferred(go())


class OutageTests(TestCase):
    timeout = 60

    def test_stopped_redis_fails_fast_then_reconnects(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(self, reactor, server.url, initial_delay=0.2, max_delay=0.5)
            seen: list[bool] = []
            client.add_observer(seen.append)
            await server.stop()
            await until(reactor, lambda: not client.available)
            self.assertEqual(seen, [False])
            started = time.monotonic()
            with self.assertRaises(RedisUnavailable) as caught:
                await client.execute("PING")
            self.assertLess(time.monotonic() - started, client.deadline)
            self.assertEqual(caught.exception.status, Status.SERVER_ERROR)
            self.assertEqual(caught.exception.status.websocket_code, 1011)
            await server.restart()
            await until(reactor, lambda: client.available)
            self.assertEqual(seen, [False, True])
            self.assertEqual(await client.execute("PING"), "PONG")

        return ensureDeferred(go())

    def test_hung_redis_fails_within_deadline(self) -> Deferred[None]:
        async def go() -> None:
            server = await start_redis(self, reactor)
            client = await connected(
                self, reactor, server.url, deadline=0.3, initial_delay=0.2, max_delay=0.5
            )
            os.kill(server.child.pid, 19)  # SIGSTOP: connected, but no answers
            self.addCleanup(lambda: server.child.running and os.kill(server.child.pid, 18))
            started = time.monotonic()
            with self.assertRaises(RedisUnavailable):
                await client.execute("PING")
            self.assertLess(time.monotonic() - started, 0.3 + 0.2)
            await until(reactor, lambda: not client.available)
            seen: list[bool] = []
            client.add_observer(seen.append)
            await deferLater(reactor, 2.0)  # reconnections reach the frozen server
            self.assertEqual(seen, [])  # never "available" while it does not answer
            os.kill(server.child.pid, 18)  # SIGCONT
            await until(reactor, lambda: client.available, timeout=20)
            self.assertEqual(await client.execute("PING"), "PONG")

        return ensureDeferred(go())


class ClusterConfigTests(SynchronousTestCase):
    """The [cluster] keys of consoleproxy/config.py."""

    def load(self, table: str) -> Config:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[cluster]\n" + table)
        return Config.load(path)

    def refused(self, table: str) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            self.load(table)
        return caught.exception

    def test_default_is_no_redis(self) -> None:
        config = Config.load()
        self.assertEqual((config.cluster_redis, config.cluster_key_prefix), ("", "consoleproxy:"))

    def test_good(self) -> None:
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("pw\n")
        os.chmod(secret, 0o600)
        config = self.load(f'redis = "redis://r:6380/2"\nredis_password_file = "{secret}"\n')
        self.assertEqual(parse_redis_url(config.cluster_redis).db, 2)

    def test_bad_url(self) -> None:
        error = self.refused('redis = "http://r/0"\n')
        self.assertEqual(error.key, "cluster.redis")

    def test_world_readable_password_file(self) -> None:
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("pw\n")
        os.chmod(secret, 0o644)
        error = self.refused(f'redis = "redis://r/0"\nredis_password_file = "{secret}"\n')
        self.assertEqual(error.key, "cluster.redis_password_file")
        self.assertIn("readable by everyone", str(error))

    def test_missing_password_file(self) -> None:
        error = self.refused(f'redis = "redis://r/0"\nredis_password_file = "{self.mktemp()}"\n')
        self.assertEqual(error.key, "cluster.redis_password_file")

    def test_trust_roots_only_with_rediss(self) -> None:
        error = self.refused('redis = "redis://r/0"\ntrust_roots = "/etc/ssl/certs"\n')
        self.assertEqual(error.key, "cluster.trust_roots")

    def test_needs_redis(self) -> None:
        error = self.refused('redis_password_file = "/x"\n')
        self.assertIn("needs cluster.redis", str(error))

    def test_prefix(self) -> None:
        self.assertEqual(self.refused('key_prefix = ""\n').key, "cluster.key_prefix")
