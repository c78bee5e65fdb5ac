"""Bounded password checks: the pool, its queue and deadline, the failed-login budget."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.clouds.inventory import InventoryCloud
from consoleproxy.clouds.logins import CheckPool, FailureBudget, default_workers
from consoleproxy.clouds.passwords import PasswordVerifier
from consoleproxy.config import Config, ConfigError
from consoleproxy.errors import Overloaded, Unauthenticated
from consoleproxy.tap import build_cloud
from tests.helpers.support import basic, write_inventory


class FakeHasher:
    """Stands for Argon2 in threads: each check waits until the test answers it."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Deferred[bool]]] = []

    def __call__(self, f: Any, password_hash: str | None, password: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.pending.append((password, d))
        return d

    def answer(self, ok: bool | None = None) -> None:
        """Finish the oldest running check: right when the password is "right"."""
        password, d = self.pending.pop(0)
        d.callback(password == "right" if ok is None else ok)


class CheckPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = CheckPool(self.clock, workers=2, queue=3, queue_timeout=2.0)
        self.hasher = FakeHasher()

    def check(self, password: str = "wrong") -> Deferred[bool]:
        return self.pool.run(self.hasher, None, None, password)

    def test_workers_then_queue_then_refused_at_once(self) -> None:
        answers = [self.check(f"p{i}") for i in range(5)]
        self.assertEqual(len(self.hasher.pending), 2)  # two run, three wait
        self.assertEqual((self.pool.running, self.pool.waiting), (2, 3))
        refused = self.failureResultOf(self.check("p5"), Overloaded)
        self.assertEqual(refused.value.status, 503)
        self.assertEqual(refused.value.retry_after, 2.0)
        self.assertIn("busy checking other passwords", refused.value.message)
        self.assertEqual(len(self.hasher.pending), 2)  # no work for the refused one
        # A finished check lets the oldest waiting one run, in order.
        self.hasher.answer(False)
        self.assertFalse(self.successResultOf(answers[0]))
        self.assertEqual([p for p, _ in self.hasher.pending], ["p1", "p2"])
        self.assertEqual((self.pool.running, self.pool.waiting), (2, 2))
        self.assertNoResult(self.check("p6"))  # room in the queue again

    def test_queue_deadline(self) -> None:
        answers = [self.check(f"p{i}") for i in range(4)]
        self.clock.advance(1.9)
        self.assertNoResult(answers[2])
        self.hasher.answer(True)  # p0 done: p2 starts, its deadline no longer counts
        self.clock.advance(0.1)
        failure = self.failureResultOf(answers[3], Overloaded)  # waited 2 s: refused
        self.assertEqual(failure.value.retry_after, 2.0)
        self.assertIn("waited 2 s", failure.value.message)
        self.assertNoResult(answers[2])
        self.assertEqual(self.pool.waiting, 0)
        self.clock.advance(60)
        self.hasher.answer(False)
        self.hasher.answer(False)
        self.assertFalse(self.successResultOf(answers[2]))
        self.assertEqual((self.pool.running, self.pool.waiting), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_check_frees_its_worker(self) -> None:
        pool = CheckPool(self.clock, workers=1, queue=1, queue_timeout=1.0)
        first = pool.run(lambda: fail(RuntimeError("argon2 broke")))
        self.failureResultOf(first, RuntimeError)
        self.assertEqual(pool.running, 0)

    def test_no_queue(self) -> None:
        pool = CheckPool(self.clock, workers=1, queue=0, queue_timeout=1.0)
        self.assertNoResult(pool.run(self.hasher, None, None, "a"))
        self.failureResultOf(pool.run(self.hasher, None, None, "b"), Overloaded)

    def test_bad_bounds(self) -> None:
        for workers, queue, timeout in ((0, 1, 1.0), (1, -1, 1.0), (1, 1, 0)):
            self.assertRaises(ValueError, CheckPool, self.clock, workers, queue, timeout)

    def test_default_workers(self) -> None:
        self.assertTrue(1 <= default_workers() <= 4)


class FailureBudgetTests(SynchronousTestCase):
    def test_reserve_refill_give_back(self) -> None:
        clock = Clock()
        budget = FailureBudget(clock, rate=2.0, burst=3)
        self.assertEqual([budget.reserve() for _ in range(3)], [None, None, None])
        self.assertEqual(budget.reserve(), 0.5)  # one refills in half a second
        clock.advance(0.25)
        self.assertEqual(budget.reserve(), 0.25)
        clock.advance(0.25)
        self.assertIsNone(budget.reserve())
        budget.give_back()
        budget.give_back()
        self.assertAlmostEqual(budget.available(), 2.0)
        clock.advance(100)
        budget.give_back()
        self.assertEqual(budget.available(), 3.0)  # never above the burst
        error = budget.refusal(0.25)
        self.assertEqual((error.status, error.retry_after), (503, 0.25))
        self.assertIn("retry in 1 s", error.message)
        self.assertRaises(ValueError, FailureBudget, clock, 0, 1)
        self.assertRaises(ValueError, FailureBudget, clock, 1.0, 0)


class BoundedVerifierTests(SynchronousTestCase):
    """PasswordVerifier with the pool and the budget, and a fake Argon2."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.hasher = FakeHasher()
        self.budget = FailureBudget(self.clock, rate=1.0, burst=4)
        self.verifier = PasswordVerifier(
            self.clock,
            run_in_thread=self.hasher,
            cache_seconds=60,
            pool=CheckPool(self.clock, workers=2, queue=2, queue_timeout=5.0),
            budget=self.budget,
        )

    def verify(self, password: str, password_hash: str = "$argon2id$alice") -> Deferred[bool]:
        return self.verifier.verify(password_hash, password)

    def test_failures_spend_the_budget_successes_do_not(self) -> None:
        answers = [self.verify("right", f"$argon2id${i}") for i in range(4)]
        for _ in range(4):
            self.hasher.answer()
        self.assertEqual([self.successResultOf(a) for a in answers], [True] * 4)
        self.assertEqual(self.budget.available(), 4.0)
        wrong = [self.verify(f"wrong{i}") for i in range(4)]
        for _ in range(2):
            self.hasher.answer()
        self.hasher.answer()
        self.hasher.answer()
        self.assertEqual([self.successResultOf(a) for a in wrong], [False] * 4)
        self.assertEqual(self.budget.available(), 0.0)

    def test_spent_budget_refuses_uncached_but_not_remembered_logins(self) -> None:
        logged_in = self.verify("right")
        self.hasher.answer()
        self.assertTrue(self.successResultOf(logged_in))
        for i in range(4):
            d = self.verify(f"wrong{i}", None)  # type: ignore[arg-type]  # unknown user
            self.hasher.answer()
            self.assertFalse(self.successResultOf(d))
        refused = self.failureResultOf(self.verify("right", "$argon2id$bob"), Overloaded)
        self.assertEqual(refused.value.status, 503)
        self.assertEqual(refused.value.retry_after, 1.0)
        self.assertIn("too many failed logins", refused.value.message)
        self.assertEqual(self.hasher.pending, [])  # refused without any Argon2 work
        self.assertTrue(self.successResultOf(self.verify("right")))  # remembered: works
        self.clock.advance(1.0)
        bob = self.verify("right", "$argon2id$bob")  # the budget refilled one
        self.hasher.answer()
        self.assertTrue(self.successResultOf(bob))

    def test_refused_by_the_pool_costs_no_budget(self) -> None:
        self.budget.rate = 0.001  # no refill to speak of while the queue times out
        answers = [self.verify(f"wrong{i}") for i in range(4)]  # two run, two wait
        self.assertEqual(self.budget.available(), 0.0)
        self.failureResultOf(self.verify("more"), Overloaded)  # the budget says no
        self.clock.advance(5.0)  # the two waiting time out: their reservations come back
        for d in answers[2:]:
            self.failureResultOf(d, Overloaded)
        self.assertAlmostEqual(self.budget.available(), 4.0 - 2.0, places=1)
        self.hasher.answer(True)
        self.hasher.answer(True)
        self.assertAlmostEqual(self.budget.available(), 4.0)

    def test_shared_check_shares_the_refusal(self) -> None:
        for i in range(4):
            self.verify(f"wrong{i}", f"$argon2id${i}")
        self.assertEqual(self.budget.available(), 0.0)
        first, second = self.verify("right"), self.verify("right")
        self.failureResultOf(first, Overloaded)
        self.failureResultOf(second, Overloaded)
        self.assertEqual(len(self.verifier._checking), 4)  # the four wrong ones, still running


class UnboundedBeforeTests(SynchronousTestCase):
    """The verifier as tap and the tests built it before: bounded all the same."""

    def test_default_queue_is_bounded(self) -> None:
        hasher = FakeHasher()
        verifier = PasswordVerifier(Clock(), concurrency=2, run_in_thread=hasher)
        answers = [verifier.verify("$argon2id$x", f"wrong{i}") for i in range(100)]
        refused: list[Any] = []
        for d in answers:
            d.addErrback(lambda f: refused.append(f) or f)
        self.assertTrue(refused, "100 checks for 2 workers, and none refused: no bound")
        bound = 2 + PasswordVerifier.DEFAULT_QUEUE
        for d in answers[:bound]:
            self.assertNoResult(d)
        for d in answers[bound:]:
            failure = self.failureResultOf(d, Overloaded)
            self.assertIsNotNone(failure.value.retry_after)
        self.assertEqual(len(hasher.pending), 2)


class InventoryBusyTests(SynchronousTestCase):
    def test_overloaded_passes_through_authenticate(self) -> None:
        clock = Clock()
        verifier = PasswordVerifier(
            clock,
            run_in_thread=FakeHasher(),
            pool=CheckPool(clock, workers=1, queue=0, queue_timeout=1.0),
        )
        cloud = InventoryCloud(write_inventory(self.mktemp()), verifier)
        self.assertNoResult(cloud.authenticate(basic("alice", "x")))
        self.failureResultOf(cloud.authenticate(basic("alice", "y")), Overloaded)
        self.assertRaises(Unauthenticated, cloud.authenticate, None)  # no check at all


class ConfigurationTests(SynchronousTestCase):
    """The [inventory] keys of the bounds: defaults, checks, and what tap builds from them."""

    def test_defaults_and_wiring(self) -> None:
        config = Config.load()
        self.assertEqual(
            (
                config.password_workers,
                config.password_queue,
                config.password_queue_timeout,
                config.failed_login_rate,
                config.failed_login_burst,
            ),
            (0, 16, 2.0, 5.0, 30),
        )
        verifier = build_cloud(config, Clock())._verifier
        self.assertEqual(verifier.pool.workers, default_workers())
        self.assertEqual((verifier.pool.queue, verifier.pool.queue_timeout), (16, 2.0))
        assert verifier.budget is not None
        self.assertEqual((verifier.budget.rate, verifier.budget.burst), (5.0, 30))
        config = Config.load(
            overrides={
                "password_workers": 3,
                "password_queue": 0,
                "password_queue_timeout": 0.5,
                "failed_login_rate": 0.5,
                "failed_login_burst": 2,
            }
        )
        verifier = build_cloud(config, Clock())._verifier
        self.assertEqual(
            (verifier.pool.workers, verifier.pool.queue, verifier.pool.queue_timeout),
            (3, 0, 0.5),
        )
        self.assertEqual((verifier.budget.rate, verifier.budget.burst), (0.5, 2))

    def test_bad_values_name_the_key(self) -> None:
        for name, value in (
            ("password_workers", 9),
            ("password_workers", -1),
            ("password_workers", 1.5),
            ("password_queue", -1),
            ("password_queue", True),
            ("password_queue_timeout", 0),
            ("password_queue_timeout", "2"),
            ("failed_login_rate", 0),
            ("failed_login_burst", 0),
        ):
            error = self.assertRaises(ConfigError, Config.load, None, {name: value})
            self.assertEqual(error.key, f"inventory.{name}")
