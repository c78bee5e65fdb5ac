"""
The per-client rate limit (ratelimit.py): token-bucket arithmetic on a Clock,
then over a real socket the token API and the console page answering 429.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.net.clients import ClientAddresses, networks
from consoleproxy.net.ratelimit import LineThrottle, RateLimiter, retry_after
from consoleproxy.web.console_page import ConsolePage
from consoleproxy.web.site import Operations
from tests.helpers.support import basic, http_request, serve_web, start_server


class BucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = RateLimiter(self.clock, rate=2.0, burst=3)

    def test_burst_then_refused_with_the_wait(self) -> None:
        self.assertEqual([self.limiter.take("a") for _ in range(3)], [None, None, None])
        self.assertAlmostEqual(self.limiter.take("a"), 0.5)
        self.clock.advance(0.25)
        self.assertAlmostEqual(self.limiter.take("a"), 0.25)  # a refusal takes nothing
        self.clock.advance(0.25)
        self.assertIsNone(self.limiter.take("a"))
        self.assertAlmostEqual(self.limiter.take("a"), 0.5)

    def test_refill_rate(self) -> None:
        for _ in range(3):
            self.limiter.take("a")
        self.clock.advance(1.0)  # two tokens at 2 per second
        self.assertEqual([self.limiter.take("a") for _ in range(2)], [None, None])
        self.assertIsNotNone(self.limiter.take("a"))

    def test_refill_capped_at_burst(self) -> None:
        self.limiter.take("a")
        self.clock.advance(3600)
        self.assertEqual([self.limiter.take("a") for _ in range(3)], [None, None, None])
        self.assertAlmostEqual(self.limiter.take("a"), 0.5)

    def test_slow_rate(self) -> None:
        limiter = RateLimiter(self.clock, rate=0.1, burst=1)
        self.assertIsNone(limiter.take("a"))
        self.assertAlmostEqual(limiter.take("a"), 10.0)
        self.clock.advance(4)
        self.assertAlmostEqual(limiter.take("a"), 6.0)
        self.assertEqual(retry_after(6.0), 6)
        self.clock.advance(6)
        self.assertIsNone(limiter.take("a"))

    def test_keys_are_independent(self) -> None:
        for _ in range(3):
            self.limiter.take("a")
        self.assertIsNotNone(self.limiter.take("a"))
        self.assertEqual([self.limiter.take("b") for _ in range(3)], [None, None, None])
        self.assertIsNotNone(self.limiter.take("b"))
        self.assertEqual(len(self.limiter), 2)

    def test_table_forgets_the_least_recently_seen(self) -> None:
        limiter = RateLimiter(self.clock, rate=0.001, burst=1, max_clients=2)
        limiter.take("a")
        limiter.take("b")
        self.assertIsNotNone(limiter.take("a"))  # refused, but seen: now the most recent
        limiter.take("c")  # "b" is forgotten
        self.assertEqual(len(limiter), 2)
        self.assertIsNotNone(limiter.take("a"))
        self.assertIsNotNone(limiter.take("c"))
        self.assertIsNone(limiter.take("b"))  # a full bucket again ("a" is forgotten now)
        self.assertEqual(len(limiter), 2)
        self.assertIsNone(limiter.take("a"))

    def test_retry_after_whole_seconds_at_least_one(self) -> None:
        for seconds, expected in ((0, 1), (0.001, 1), (1.0, 1), (1.01, 2), (9.5, 10), (60, 60)):
            self.assertEqual(retry_after(seconds), expected, seconds)


class HttpRateLimitTests(TestCase):
    """Two requests per client, then 429 (the bucket refills in 1000 s)."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        server = yield start_server(self)
        operations = Operations(limiter=RateLimiter(reactor, rate=0.001, burst=2))
        self.port = yield serve_web(
            self,
            server,
            operations=operations,
            page=ConsolePage(server.cloud, None),  # type: ignore[arg-type]
            clients=ClientAddresses(networks(["127.0.0.1"])),
        )

    @inlineCallbacks
    def get(self, path: str, client: str = "203.0.113.9"):  # type: ignore[no-untyped-def]
        """GET C{path} as alice from C{client} (behind the trusted frontend 127.0.0.1)."""
        code, headers, body = yield http_request(
            self.port,
            path,
            headers={
                b"Authorization": basic("alice", "wonderland"),
                b"X-Forwarded-For": client.encode(),
            },
        )
        return code, headers, body

    @inlineCallbacks
    def spend(self, path: str, code: int, client: str = "203.0.113.9"):  # type: ignore[no-untyped-def]
        """Spend the client's burst (two requests) on C{path}, answered C{code}."""
        for _ in range(2):
            answer, _, _ = yield self.get(path, client)
            self.assertEqual(answer, code)

    @inlineCallbacks
    def assertLimited(self, path: str, client: str = "203.0.113.9"):  # type: ignore[no-untyped-def]
        code, headers, body = yield self.get(path, client)
        self.assertEqual(code, 429)
        self.assertEqual(json.loads(body)["id"], 429)
        self.assertIn(headers.getRawHeaders(b"retry-after"), ([b"1000"], [b"999"]))
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"]
        )

    @inlineCallbacks
    def test_token_api_429_after_burst(self):  # type: ignore[no-untyped-def]
        yield self.spend("/api/vm/7/guacamole/vnc", 200)
        yield self.assertLimited("/api/vm/7/guacamole/vnc")
        yield self.assertLimited("/fireedge/api/vm/7/guacamole/ssh")
        # Another client (another address named by the frontend) has its own bucket.
        code, _, _ = yield self.get("/api/vm/7/guacamole/vnc", "198.51.100.4")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_console_page_limited_too(self):  # type: ignore[no-untyped-def]
        yield self.spend("/console/nope/vnc", 404)
        yield self.assertLimited("/console/7/vnc")
        yield self.assertLimited("/fireedge/console/7/vnc")
        yield self.assertLimited("/api/vm/7/guacamole/vnc")  # one bucket per client

    @inlineCallbacks
    def test_operator_routes_not_limited(self):  # type: ignore[no-untyped-def]
        yield self.spend("/api/vm/7/guacamole/vnc", 200)
        for path in ("/healthz", "/readyz", "/metrics", "/api/console-modes") * 2:
            code, _, body = yield self.get(path)
            self.assertEqual(code, 404, path)  # not configured here; never 429
            self.assertEqual(json.loads(body)["id"], 404)
        yield self.assertLimited("/api/vm/7/guacamole/vnc")


class LineThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = LineThrottle(self.clock, rate=0.2, burst=3, max_clients=2)

    def test_burst_then_held_back_and_counted(self) -> None:
        self.assertEqual([self.throttle.allow("a") for _ in range(3)], [0, 0, 0])
        self.assertEqual([self.throttle.allow("a") for _ in range(10)], [None] * 10)
        self.assertEqual(self.throttle.allow("b"), 0)  # another client has its own
        self.clock.advance(5)  # one line's worth
        self.assertEqual(self.throttle.allow("a"), 10)  # "10 refusals ... suppressed"
        self.assertIsNone(self.throttle.allow("a"))
        self.clock.advance(5)
        self.assertEqual(self.throttle.allow("a"), 1)

    def test_bounded(self) -> None:
        for key in ("a", "b", "c", "d"):
            for _ in range(5):
                self.throttle.allow(key)
        self.assertEqual(len(self.throttle), 2)
