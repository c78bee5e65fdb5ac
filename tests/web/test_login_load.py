"""
Many addresses hammering wrong passwords, over real sockets, with real Argon2
in threads: the queue of checks stays bounded (503 with Retry-After beyond it,
at once), the failed-login budget refuses new logins cheaply, and a logged-in
user's token requests stay fast and keep working throughout.

The addresses come through a trusted frontend (``X-Forwarded-For`` from
127.0.0.1), so the per-address rate limit is the real one and does not help:
every attacking address stays under it.
"""

from __future__ import annotations

import statistics
from typing import Any

from argon2 import PasswordHasher
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from consoleproxy.clouds.inventory import InventoryCloud
from consoleproxy.clouds.logins import CheckPool, FailureBudget
from consoleproxy.clouds.passwords import PasswordVerifier
from consoleproxy.net.clients import ClientAddresses, networks
from consoleproxy.net.ratelimit import RateLimiter
from consoleproxy.web.site import Operations
from tests.helpers.support import basic, http_request, serve_web, start_server, write_inventory

#: Argon2 dear enough (about 25 ms here) that checks queue, cheap enough for a test.
_HASHER = PasswordHasher(time_cost=1, memory_cost=32768, parallelism=1)
QUEUE_TIMEOUT = 0.5
#: How long any answer may take: the queue's deadline, a check, and a loaded machine.
ANSWER_BOUND = QUEUE_TIMEOUT + 1.5
TOKEN = "/api/vm/7/guacamole/vnc"


def inventory() -> str:
    """alice/wonderland and bob/builder, both may open VM 7."""
    return (
        f'[users.alice]\npassword_hash = "{_HASHER.hash("wonderland")}"\n'
        f'[users.bob]\npassword_hash = "{_HASHER.hash("builder")}"\n'
        '[[vm]]\nid = 7\nusers = ["*"]\n[vm.vnc]\nhostname = "10.0.0.5"\nport = 5907\n'
    )


class LoginLoadTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def start(self, budget: FailureBudget | None):  # type: ignore[no-untyped-def]
        """The server: real Argon2 in the reactor's threads, one worker, a queue of 4."""
        verifier = PasswordVerifier(
            reactor,
            cache_seconds=60,
            pool=CheckPool(reactor, workers=1, queue=4, queue_timeout=QUEUE_TIMEOUT),
            budget=budget,
        )
        cloud = InventoryCloud(write_inventory(self.mktemp(), inventory()), verifier)
        server = yield start_server(self, cloud=cloud)
        self.port = yield serve_web(
            self,
            server,
            operations=Operations(limiter=RateLimiter(reactor, rate=2.0, burst=20)),
            clients=ClientAddresses(networks(["127.0.0.1/32"])),
        )

    @inlineCallbacks
    def ask(self, user: str, password: str, address: str):  # type: ignore[no-untyped-def]
        """One token request from C{address}; (status, headers, body, seconds taken)."""
        began = reactor.seconds()
        code, headers, body = yield http_request(
            self.port,
            TOKEN,
            headers={b"Authorization": basic(user, password), b"X-Forwarded-For": address.encode()},
        )
        return code, headers, body, reactor.seconds() - began

    @inlineCallbacks
    def test_queue_bounded_and_logged_in_user_fast(self):  # type: ignore[no-untyped-def]
        yield self.start(budget=None)
        code, _, _, _ = yield self.ask("alice", "wonderland", "192.0.2.1")
        self.assertEqual(code, 200)  # alice is logged in: remembered from now on

        answers: list[Any] = []

        @inlineCallbacks
        def hammer(address: int):  # type: ignore[no-untyped-def]
            for n in range(12):  # one request after the other, as fast as answered
                answer = yield self.ask("alice", f"guess-{address}-{n}", f"10.0.{address}.1")
                answers.append(answer)

        attack = gatherResults([hammer(address) for address in range(15)])
        timings: list[float] = []
        for _ in range(15):
            code, _, _, seconds = yield self.ask("alice", "wonderland", "192.0.2.1")
            self.assertEqual(code, 200)
            timings.append(seconds)
        yield attack

        codes = [a[0] for a in answers]
        self.assertEqual(set(codes) - {401, 503}, set(), codes)
        busy = [a for a in answers if a[0] == 503]
        self.assertGreater(len(busy), 0, "the queue never refused: it is unbounded")
        self.assertGreater(codes.count(401), 0)
        for _, headers, body, _ in busy:
            self.assertIn(headers.getRawHeaders(b"retry-after"), ([b"1"], [b"2"]))
            self.assertIn(b'"id": 503', body)
            self.assertIn(b"busy checking", body)
        slowest = max(a[3] for a in answers)
        self.assertLess(slowest, ANSWER_BOUND, "a password check waited too long")
        # The logged-in user: no Argon2 for her, and the reactor kept answering.
        self.assertLess(statistics.median(timings), 0.1, timings)
        self.assertLess(max(timings), 0.5, timings)  # one slow turn of a busy machine at most

    @inlineCallbacks
    def test_budget_spent_logged_in_user_still_served(self):  # type: ignore[no-untyped-def]
        clock = Clock()
        yield self.start(budget=FailureBudget(clock, rate=1.0, burst=5))
        code, _, _, _ = yield self.ask("alice", "wonderland", "192.0.2.1")
        self.assertEqual(code, 200)
        answers = []
        for address in range(20):
            answer = yield self.ask("alice", f"guess{address}", f"10.1.{address}.1")
            answers.append(answer)
        self.assertEqual([a[0] for a in answers], [401] * 5 + [503] * 15)
        for _, headers, body, seconds in answers[5:]:
            self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
            self.assertIn(b"too many failed logins", body)
            self.assertLess(seconds, 0.5)  # refused at once
        # A new login (bob, right password) waits for the budget; alice, remembered, works.
        code, headers, _, _ = yield self.ask("bob", "builder", "192.0.2.2")
        self.assertEqual((code, headers.getRawHeaders(b"retry-after")), (503, [b"1"]))
        code, _, _, _ = yield self.ask("alice", "wonderland", "192.0.2.1")
        self.assertEqual(code, 200)
        clock.advance(1.0)
        code, _, _, _ = yield self.ask("bob", "builder", "192.0.2.2")
        self.assertEqual(code, 200)
        # bob's success gave its reservation back: one more failure may be checked.
        code, _, _, _ = yield self.ask("bob", "wrong", "192.0.2.2")
        self.assertEqual(code, 401)
