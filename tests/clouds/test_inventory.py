"""The embedded inventory cloud: parsing, authentication, authorization, reload."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.clouds.inventory import Inventory, InventoryCloud, InventoryError, parse_basic
from consoleproxy.clouds.passwords import PasswordVerifier, verify_password
from consoleproxy.config import example_path
from consoleproxy.consoles import Identity
from consoleproxy.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from tests.helpers.support import (
    basic,
    inventory_text,
    quick_hash,
    synchronous_verifier,
    write_inventory,
)


class ParseTests(SynchronousTestCase):
    def test_example_inventory_is_valid(self) -> None:
        with open(example_path("inventory.toml")) as f:
            inventory = Inventory.parse(f.read())
        self.assertIn("demo", inventory.users)
        self.assertTrue(verify_password(inventory.users["demo"], "demo"))
        self.assertEqual(inventory.vms[0].consoles["vnc"]["port"], "5900")

    def test_errors_name_the_place(self) -> None:
        good_user = '[users.a]\npassword_hash = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA"\n'
        for text, words in (
            ("[users", "inventory: "),
            ('[users."a b"]\npassword_hash="$argon2id$x"', "users.a b"),
            ('[users.b]\npassword_hash="plain"', "users.b.password_hash"),
            ("[[vm]]\nid = -1", "vm[0].id"),
            ('[[vm]]\nid = "7"', "vm[0].id"),
            ("[[vm]]\nid = 1\n[[vm]]\nid = 1", "vm[1].id: VM 1 is listed twice"),
            ("[[vm]]\nid = 1\nusers = 'a'", "vm[0].users"),
            ("[[vm]]\nid = 1\ncolour = 1", "unknown keys ['colour']"),
            ("[[vm]]\nid = 1\n[vm.vnc]\nport = 5900", "vm[0].vnc.hostname is required"),
            ("[[vm]]\nid = 1\n[vm.vnc]\nhostname = 'h'\nport = 70000", "vm[0].vnc.port"),
            ("[[vm]]\nid = 1\n[vm.vnc]\nhostname = 'h'\nport = 1\nBad_Name = 1", "Bad_Name"),
            ("[[vm]]\nid = 1\n[vm.vnc]\nhostname = 'h'\nport = 1\nx = [1]", "vnc.x: must be"),
            ("vm = 3", "array of tables"),
            ("colour = 3", "unknown keys ['colour']"),
            ('[users.b]\npassword_hash="$argon2id$x"\nrole="admin"', "users.b: unknown keys"),
        ):
            error = self.assertRaises(InventoryError, Inventory.parse, text + "\n" + good_user)
            self.assertIn(words, str(error))


class CloudTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = write_inventory(self.mktemp())
        self.cloud = InventoryCloud(self.path, synchronous_verifier())

    def identity(self, authorization: bytes | None) -> Identity:
        return self.successResultOf(self.cloud.authenticate(authorization))

    def test_authenticate(self) -> None:
        self.assertEqual(self.identity(basic("alice", "wonderland")), Identity("alice"))
        self.assertEqual(self.identity(b"basic  " + basic("bob", "builder")[6:]).name, "bob")

    def test_wrong_credentials(self) -> None:
        for value in (basic("alice", "Wonderland"), basic("carol", "wonderland")):
            failure = self.failureResultOf(self.cloud.authenticate(value), Unauthenticated)
            self.assertEqual(failure.value.status, 401)

    def test_missing_or_malformed_credentials(self) -> None:
        for value in (None, b"", b"Basic", b"Basic %%%", b"Digest abc", basic("", "x")):
            self.assertRaises(Unauthenticated, self.cloud.authenticate, value)

    def test_console(self) -> None:
        console = self.successResultOf(self.cloud.console(Identity("alice"), 7, "ssh", None))
        self.assertEqual(console.parameters["username"], "root")
        self.assertEqual((console.vm_id, console.console_type, console.zone), (7, "ssh", None))

    def test_refusals(self) -> None:
        self.assertRaises(Forbidden, self.cloud.console, Identity("bob"), 7, "vnc", None)
        self.assertRaises(NotFound, self.cloud.console, Identity("alice"), 9, "vnc", None)
        self.assertRaises(BadRequest, self.cloud.console, Identity("alice"), 7, "rdp", None)
        self.assertRaises(NotFound, self.cloud.console, Identity("alice"), 7, "vnc", "1")

    def test_anyone(self) -> None:
        console = self.successResultOf(self.cloud.console(Identity("bob"), 8, "rdp", None))
        self.assertEqual(console.parameters["hostname"], "10.0.0.6")

    def test_reload_on_change_and_keep_on_error(self) -> None:
        self.assertRaises(Forbidden, self.cloud.console, Identity("bob"), 7, "vnc", None)
        with open(self.path, "w") as f:
            f.write(inventory_text().replace('users = ["alice"]', 'users = ["alice", "bob"]'))
        os.utime(self.path, ns=(1, 1))
        self.successResultOf(self.cloud.console(Identity("bob"), 7, "vnc", None))
        with open(self.path, "w") as f:
            f.write("[[vm]]\nid = broken")
        self.successResultOf(self.cloud.console(Identity("bob"), 7, "vnc", None))
        errors = self.flushLoggedErrors()
        self.assertEqual(errors, [])

    def test_with_a_clock_the_file_is_looked_at_once_a_second(self) -> None:
        clock = Clock()
        cloud = InventoryCloud(self.path, synchronous_verifier(), clock=clock)
        with open(self.path, "w") as f:
            f.write(inventory_text().replace('users = ["alice"]', 'users = ["alice", "bob"]'))
        os.utime(self.path, ns=(2, 2))
        self.successResultOf(cloud.console(Identity("bob"), 7, "vnc", None))  # first look
        with open(self.path, "w") as f:
            f.write(inventory_text())
        os.utime(self.path, ns=(3, 3))
        clock.advance(0.5)
        self.successResultOf(cloud.console(Identity("bob"), 7, "vnc", None))  # not yet
        clock.advance(0.5)
        self.assertRaises(Forbidden, cloud.console, Identity("bob"), 7, "vnc", None)

    def test_missing_file(self) -> None:
        self.assertRaises(
            InventoryError, InventoryCloud, self.path + ".nope", synchronous_verifier()
        )

    def test_admin_role(self) -> None:
        """``admin = true`` makes an administrator; entries without it (the old format) are not."""
        self.assertFalse(self.identity(basic("alice", "wonderland")).admin)
        with open(self.path, "w") as f:
            f.write(inventory_text().replace("[users.bob]\n", "[users.bob]\nadmin = true\n", 1))
        os.utime(self.path, ns=(4, 4))
        self.assertTrue(self.identity(basic("bob", "builder")).admin)
        self.assertFalse(self.identity(basic("alice", "wonderland")).admin)
        bob = self.successResultOf(self.cloud.with_role(Identity("bob")))
        self.assertEqual(bob, Identity("bob", admin=True))
        # An edit that takes the role away holds at the next request.
        with open(self.path, "w") as f:
            f.write(inventory_text())
        os.utime(self.path, ns=(5, 5))
        bob = self.successResultOf(self.cloud.with_role(Identity("bob", admin=True)))
        self.assertFalse(bob.admin)

    def test_admin_must_be_a_boolean(self) -> None:
        text = inventory_text().replace("[users.bob]\n", '[users.bob]\nadmin = "yes"\n', 1)
        with self.assertRaises(InventoryError) as raised:
            Inventory.parse(text, "inv")
        self.assertIn("users.bob.admin: true or false", str(raised.exception))


class BasicTests(SynchronousTestCase):
    def test_parse_basic(self) -> None:
        self.assertEqual(parse_basic(basic("a", "b:c")), ("a", "b:c"))
        self.assertEqual(parse_basic(basic("jörg", "pässwörd")), ("jörg", "pässwörd"))
        self.assertIsNone(parse_basic(b"Basic " + b"A" * 5000))
        self.assertIsNone(parse_basic(b"Basic " + b"\xff\xfe"))


class PasswordCacheTests(SynchronousTestCase):
    """A successful check is remembered for a while; nothing else is."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.checks: list[str] = []

        def run_in_thread(f, *args):  # type: ignore[no-untyped-def]
            self.checks.append(args[1])
            return succeed(f(*args))

        self.verifier = PasswordVerifier(self.clock, run_in_thread=run_in_thread, cache_seconds=60)
        self.hash = quick_hash("s3cret")

    def verify(self, password: str, password_hash: str | None = None) -> bool:
        return self.successResultOf(self.verifier.verify(password_hash or self.hash, password))

    def test_success_remembered_until_it_expires(self) -> None:
        self.assertTrue(self.verify("s3cret"))
        self.assertTrue(self.verify("s3cret"))
        self.assertEqual(self.checks, ["s3cret"])
        self.clock.advance(60)
        self.assertTrue(self.verify("s3cret"))
        self.assertEqual(len(self.checks), 2)

    def test_remembered_since_its_last_use(self) -> None:
        # A user who keeps working is not checked again (nor refused while the failed-login
        # budget is spent by others): the memory runs from the last use.
        self.assertTrue(self.verify("s3cret"))
        for _ in range(5):
            self.clock.advance(50)
            self.assertTrue(self.verify("s3cret"))
        self.assertEqual(self.checks, ["s3cret"])
        self.clock.advance(60)
        self.assertTrue(self.verify("s3cret"))
        self.assertEqual(len(self.checks), 2)

    def test_failures_and_other_passwords_always_checked(self) -> None:
        self.assertTrue(self.verify("s3cret"))
        self.assertFalse(self.verify("wrong"))
        self.assertFalse(self.verify("wrong"))
        self.assertFalse(self.verify("s3cret" + "\0"))
        self.assertEqual(self.checks, ["s3cret", "wrong", "wrong", "s3cret\0"])

    def test_a_changed_hash_is_checked_again(self) -> None:
        self.assertTrue(self.verify("s3cret"))
        self.assertFalse(self.verify("s3cret", quick_hash("n3w")))
        self.assertEqual(len(self.checks), 2)

    def test_unknown_users_and_no_cache(self) -> None:
        self.assertFalse(self.successResultOf(self.verifier.verify(None, "s3cret")))
        uncached = PasswordVerifier(
            self.clock, run_in_thread=lambda f, *a: succeed(f(*a)), cache_seconds=0
        )
        self.assertTrue(self.successResultOf(uncached.verify(self.hash, "s3cret")))
        self.assertEqual(len(uncached._remembered), 0)

    def test_bounded(self) -> None:
        self.verifier.MAX_REMEMBERED = 3
        hashes = [quick_hash(f"p{i}") for i in range(5)]
        for i, h in enumerate(hashes):
            self.assertTrue(self.verify(f"p{i}", h))
        self.assertEqual(len(self.verifier._remembered), 3)
        self.assertTrue(self.verify("p0", hashes[0]))  # forgotten: checked again
        self.assertEqual(len(self.checks), 6)

    def test_a_burst_of_the_same_check_costs_one(self) -> None:
        pending: list[Deferred[bool]] = []
        verifier = PasswordVerifier(
            self.clock,
            run_in_thread=lambda f, *a: pending.append(Deferred()) or pending[-1],
            cache_seconds=60,
        )
        answers = [verifier.verify(self.hash, "s3cret") for _ in range(5)]
        other = verifier.verify(self.hash, "wrong")
        self.assertEqual(len(pending), 2)  # one check each for the two passwords
        pending[0].callback(True)
        self.assertEqual([self.successResultOf(a) for a in answers], [True] * 5)
        pending[1].callback(False)
        self.assertFalse(self.successResultOf(other))
