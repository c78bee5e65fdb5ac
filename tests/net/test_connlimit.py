"""
Connection caps and the descriptor reserve (connlimit.py): the arithmetic on
a Clock with counted descriptors given by the test; the real sockets are in
tests/web/test_adversarial_http.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.net.clients import Client, networks
from consoleproxy.net.connlimit import (
    RESERVE_PER_CLIENT,
    Admission,
    ConnectionGate,
    DescriptorBudget,
    Refused,
    count_open_descriptors,
)


class GateTests(SynchronousTestCase):
    def test_cap_per_address(self) -> None:
        gate = ConnectionGate(3)
        leases = [gate.admit("192.0.2.1") for _ in range(3)]
        refused = self.assertRaises(Refused, gate.admit, "192.0.2.1")
        self.assertIn("over the cap of 3 connections per client", str(refused))
        self.assertEqual(refused.key, "192.0.2.1")
        gate.admit("192.0.2.2")  # another client is not affected
        leases[0].release()
        leases[0].release()  # once only
        self.assertEqual(gate.open_by("192.0.2.1"), 2)
        gate.admit("192.0.2.1")
        self.assertEqual(gate.total, 4)

    def test_ipv6_counted_by_64(self) -> None:
        gate = ConnectionGate(2)
        gate.admit("2001:db8::1")
        gate.admit("2001:db8::2")
        self.assertRaises(Refused, gate.admit, "2001:db8::ffff")
        gate.admit("2001:db8:0:1::1")

    def test_frontends_have_their_own_cap(self) -> None:
        gate = ConnectionGate(1, per_frontend=3, frontends=networks(["10.0.0.0/8"]))
        for _ in range(3):
            gate.admit("10.1.2.3")
        self.assertRaises(Refused, gate.admit, "10.1.2.3")
        self.assertEqual(gate.open_by("frontend 10.1.2.3"), 3)
        # Behind it, each real client's requests count against the client cap.
        client = Client("192.0.2.9", "https", via="10.1.2.3")
        lease = gate.acquire_client(client)
        self.assertIsNotNone(lease)
        self.assertIsNone(gate.acquire_client(client))
        assert lease is not None
        lease.release()
        self.assertEqual(gate.open_by("192.0.2.9"), 0)
        self.assertEqual(gate.total, 3)  # requests are not connections

    def test_unix_socket_peers_are_one_frontend(self) -> None:
        gate = ConnectionGate(1, per_frontend=2)
        gate.admit("-")
        gate.admit("-")
        self.assertRaises(Refused, gate.admit, "-")

    def test_table_holds_only_clients_with_connections(self) -> None:
        gate = ConnectionGate(5)
        leases = [gate.admit(f"192.0.2.{n}") for n in range(100)]
        self.assertEqual(len(gate), 100)
        for lease in leases:
            lease.release()
        self.assertEqual((len(gate), gate.total), (0, 0))


class BudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.open = 100
        self.counts = 0
        self.budget = DescriptorBudget(
            self.clock, 40, count=self.count, limit=lambda: 1000, interval=1.0
        )

    def count(self) -> int:
        self.counts += 1
        return self.open

    def test_states_by_descriptors_left(self) -> None:
        for open_now, expected in (
            (100, Admission.NORMAL),
            (959, Admission.NORMAL),
            (960, Admission.HEALTH_ONLY),
            (979, Admission.HEALTH_ONLY),
            (980, None),
        ):
            self.open = open_now
            self.clock.advance(1)
            self.assertEqual(self.budget.state(0), expected, open_now)

    def test_counts_at_most_once_an_interval_far_from_the_limit(self) -> None:
        self.budget.state(0)
        for admitted in range(1, 500):
            self.assertEqual(self.budget.state(admitted), Admission.NORMAL)
        self.assertEqual(self.counts, 1)
        self.clock.advance(1)
        self.budget.state(500)
        self.assertEqual(self.counts, 2)

    def test_admissions_since_the_count_are_added(self) -> None:
        self.open = 900
        self.budget.state(0)
        self.assertEqual(self.budget.state(59), Admission.NORMAL)
        # Close to the limit the count is redone, but at most every 50 ms.
        self.assertEqual(self.budget.state(60), Admission.HEALTH_ONLY)
        self.assertEqual(self.budget.state(80), None)
        self.assertEqual(self.counts, 1)
        self.clock.advance(0.05)
        self.assertEqual(self.budget.state(80), Admission.NORMAL)  # counted: still 900
        self.assertEqual(self.counts, 2)

    def test_reserve_at_most_a_quarter_of_a_small_limit(self) -> None:
        budget = DescriptorBudget(self.clock, 128, count=lambda: 10, limit=lambda: 200)
        budget.state(0)
        self.assertEqual(budget.effective_reserve, 50)

    def test_unknown_count_means_no_reserve(self) -> None:
        budget = DescriptorBudget(self.clock, 128, count=lambda: None, limit=lambda: 200)
        self.assertEqual(budget.state(10_000), Admission.NORMAL)

    def test_health_only_connections_capped_per_client(self) -> None:
        self.open = 965
        gate = ConnectionGate(100, budget=self.budget)
        leases = [gate.admit("192.0.2.1") for _ in range(RESERVE_PER_CLIENT)]
        self.assertEqual({lease.admission for lease in leases}, {Admission.HEALTH_ONLY})
        refused = self.assertRaises(Refused, gate.admit, "192.0.2.1")
        self.assertIn("descriptor limit", str(refused))
        self.assertEqual(gate.admit("192.0.2.2").admission, Admission.HEALTH_ONLY)
        leases[0].release()
        gate.admit("192.0.2.1")

    def test_refused_beyond_half_the_reserve(self) -> None:
        self.open = 990
        gate = ConnectionGate(100, budget=self.budget)
        refused = self.assertRaises(Refused, gate.admit, "192.0.2.1")
        self.assertEqual(refused.key, "descriptors")


class DescriptorTests(SynchronousTestCase):
    def test_count_open_descriptors(self) -> None:
        before = count_open_descriptors()
        assert before is not None
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        self.assertEqual(count_open_descriptors(), before + 2)

    def test_raise_descriptor_limit(self) -> None:
        """In a child whose soft limit is below its hard one: raised to the hard one."""
        script = (
            "import resource; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 256)); "
            "from consoleproxy.net.connlimit import raise_descriptor_limit; "
            "print(raise_descriptor_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))"
        )
        output = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        ).stdout
        self.assertEqual(output.strip(), "(64, 256, 256) (256, 256)")
