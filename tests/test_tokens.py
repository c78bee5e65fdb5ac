"""Tests for consoleproxy.tokens: every way a token can be refused, and key files."""

from __future__ import annotations

import base64
import os
import stat
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.consoles import Console, Identity
from consoleproxy.tokens import (
    COMPACT_AT,
    MAX_TOKEN_LENGTH,
    KeyFileError,
    KeyRing,
    SpentTokensFile,
    TokenAuthority,
    TokenError,
)

ALICE = Identity(name="alice")
CONSOLE = Console(
    vm_id=7,
    console_type="vnc",
    parameters={"hostname": "10.0.0.5", "port": "5907", "password": "s3cret"},
)


def _raw(token: str) -> bytearray:
    return bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


class TokenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.ring = KeyRing([os.urandom(32)])
        self.authority = TokenAuthority(self.ring, self.clock, lifetime=60)

    def refused(self, token: str, reason: str | None = None) -> TokenError:
        error = self.assertRaises(TokenError, self.authority.open, token)
        if reason is not None:
            self.assertEqual(error.reason, reason)
        return error

    def test_round_trip(self) -> None:
        claims = self.authority.open(self.authority.seal(ALICE, CONSOLE))
        self.assertEqual(claims.user, "alice")
        self.assertEqual(claims.console, CONSOLE)
        self.assertEqual(dict(claims.console.parameters), dict(CONSOLE.parameters))
        self.assertEqual(claims.expires, self.clock.seconds() + 60)

    def test_non_ascii_survives(self) -> None:
        """FireEdge mangles non-ASCII on decrypt; we must not."""
        console = Console(1, "ssh", {"username": "jörg", "password": "pä$$ 密码 😀"}, zone="2")
        claims = self.authority.open(self.authority.seal(Identity("zoë"), console), "2")
        self.assertEqual(claims.console, console)
        self.assertEqual(claims.user, "zoë")

    def test_url_safe_and_unique(self) -> None:
        first = self.authority.seal(ALICE, CONSOLE)
        second = self.authority.seal(ALICE, CONSOLE)
        self.assertNotEqual(first, second)
        for token in (first, second):
            self.assertRegex(token, r"^[A-Za-z0-9_-]+$")

    def test_secrets_not_visible(self) -> None:
        token = self.authority.seal(ALICE, CONSOLE)
        self.assertNotIn(b"s3cret", _raw(token))
        self.assertNotIn(b"10.0.0.5", _raw(token))

    def test_every_bit_flip_refused(self) -> None:
        token = self.authority.seal(ALICE, CONSOLE)
        raw = _raw(token)
        for index in range(len(raw)):
            for bit in (0x01, 0x80):
                changed = bytearray(raw)
                changed[index] ^= bit
                self.refused(_text(changed))
        self.authority.open(token)  # the original still opens once

    def test_truncated_and_extended_refused(self) -> None:
        token = self.authority.seal(ALICE, CONSOLE)
        raw = _raw(token)
        for length in range(len(raw)):
            self.refused(_text(raw[:length]))
        self.refused(_text(raw + b"\0"))
        self.refused(token[:-1])

    def test_expired(self) -> None:
        token = self.authority.seal(ALICE, CONSOLE)
        self.clock.advance(59.9)
        other = self.authority.seal(ALICE, CONSOLE)
        self.clock.advance(0.1)
        self.refused(token, "expired")
        self.authority.open(other)

    def test_replay_refused(self) -> None:
        token = self.authority.seal(ALICE, CONSOLE)
        self.authority.open(token)
        self.refused(token, "replayed")
        self.refused(token, "replayed")

    def test_replay_after_expiry_still_refused(self) -> None:
        """Forgetting spent ids at expiry is safe: the token is expired by then."""
        token = self.authority.seal(ALICE, CONSOLE)
        self.authority.open(token)
        self.assertEqual(self.authority.spent, 1)
        self.clock.advance(61)
        self.refused(token, "expired")
        self.assertEqual(self.authority.spent, 0)

    def test_spent_ids_are_forgotten(self) -> None:
        for _ in range(100):
            self.authority.open(self.authority.seal(ALICE, CONSOLE))
            self.clock.advance(1)
        # At 100 s, the tokens opened at 41..99 s are unexpired: one lifetime's worth.
        self.assertEqual(self.authority.spent, 59)

    def test_foreign_key_refused(self) -> None:
        stranger = TokenAuthority(KeyRing([os.urandom(32)]), self.clock)
        self.refused(stranger.seal(ALICE, CONSOLE), "unknown-key")

    def test_unknown_version_refused(self) -> None:
        raw = _raw(self.authority.seal(ALICE, CONSOLE))
        for version in (0, 2, 255):
            raw[0] = version
            self.refused(_text(raw), "unknown-version")

    def test_key_id_is_authenticated(self) -> None:
        """Swapping the key id to another key on the ring does not help."""
        old, new = os.urandom(32), os.urandom(32)
        ring = TokenAuthority(KeyRing([new, old]), self.clock)
        raw = _raw(TokenAuthority(KeyRing([old]), self.clock).seal(ALICE, CONSOLE))
        raw_new = _raw(ring.seal(ALICE, CONSOLE))
        raw[1:5] = raw_new[1:5]
        error = self.assertRaises(TokenError, ring.open, _text(raw))
        self.assertEqual(error.reason, "tampered")

    def test_rotation(self) -> None:
        old, new = os.urandom(32), os.urandom(32)
        before = TokenAuthority(KeyRing([old]), self.clock)
        after = TokenAuthority(KeyRing([new, old]), self.clock)
        self.assertEqual(after.open(before.seal(ALICE, CONSOLE)).user, "alice")
        token = after.seal(ALICE, CONSOLE)
        self.assertRaises(TokenError, before.open, token)
        self.assertEqual(TokenAuthority(KeyRing([new]), self.clock).open(token).user, "alice")

    def test_purpose_binds(self) -> None:
        key = os.urandom(32)
        guacamole = TokenAuthority(KeyRing([key]), self.clock, purpose="guacamole")
        rfb = TokenAuthority(KeyRing([key]), self.clock, purpose="rfb")
        self.assertRaises(TokenError, rfb.open, guacamole.seal(ALICE, CONSOLE))

    def test_zone_binds_even_with_a_shared_key(self) -> None:
        """A token for zone 1 opens only as a zone-1 token: not locally, not for zone 2."""
        key = os.urandom(32)
        minted_in_zone_0 = TokenAuthority(KeyRing([key]), self.clock)
        served_by_zone_1 = TokenAuthority(KeyRing([key]), self.clock)
        remote = Console(70, "vnc", {"hostname": "kvm-remote", "port": "5970"}, zone="1")
        token = minted_in_zone_0.seal(ALICE, remote)
        self.assertEqual(
            self.assertRaises(TokenError, served_by_zone_1.open, token).reason, "tampered"
        )
        self.assertRaises(TokenError, served_by_zone_1.open, token, "2")
        self.assertEqual(served_by_zone_1.open(token, "1").console, remote)
        local = minted_in_zone_0.seal(ALICE, CONSOLE)
        self.assertRaises(TokenError, served_by_zone_1.open, local, "1")

    def test_garbage_refused(self) -> None:
        for token in ("", "!!!!", "a", "=" * 40, "é" * 40, "A" * (MAX_TOKEN_LENGTH + 4)):
            self.refused(token)
        self.refused(None)  # type: ignore[arg-type]

    def test_oversized_refused_before_decoding(self) -> None:
        self.refused("A" * (MAX_TOKEN_LENGTH + 1), "malformed")

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=400) | st.binary(max_size=300).map(_text))
    def test_arbitrary_input_only_refused(self, token: str) -> None:
        self.assertRaises(TokenError, self.authority.open, token)


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "sub", "token.keys")

    def write(self, text: str, mode: int = 0o600) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            f.write(text)
        os.chmod(self.path, mode)

    def test_created_private_when_missing(self) -> None:
        ring = KeyRing.from_file(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(len(ring.keys), 1)
        self.assertEqual(KeyRing.from_file(self.path).keys, ring.keys)

    def test_not_created_when_told_not_to(self) -> None:
        self.assertRaises(KeyFileError, KeyRing.from_file, self.path, create=False)
        self.assertFalse(os.path.exists(self.path))

    def test_several_keys_first_seals(self) -> None:
        first, second = os.urandom(32), os.urandom(32)
        lines = [base64.urlsafe_b64encode(k).decode().rstrip("=") for k in (first, second)]
        self.write(f"# comment\n\n{lines[0]}\n  {lines[1]}  \n")
        ring = KeyRing.from_file(self.path)
        self.assertEqual(ring.keys, [first, second])
        self.assertEqual(ring.sealing_key, first)

    def test_readable_by_others_refused(self) -> None:
        self.write(KeyRing.generate_line() + "\n", 0o644)
        error = self.assertRaises(KeyFileError, KeyRing.from_file, self.path)
        self.assertIn("chmod 600", str(error))

    def test_bad_contents_refused(self) -> None:
        short = base64.urlsafe_b64encode(os.urandom(16)).decode()
        for text, words in (
            ("", "no key"),
            ("# only a comment\n", "no key"),
            ("not base64 at all!\n", "line 1: not base64"),
            (f"{KeyRing.generate_line()}\n{short}\n", "line 2: a key must be 32 bytes"),
        ):
            self.write(text)
            error = self.assertRaises(KeyFileError, KeyRing.from_file, self.path)
            self.assertIn(words, str(error))
            self.assertIn(self.path, str(error))

    def test_key_never_in_error(self) -> None:
        line = KeyRing.generate_line()
        self.write(line + "\n", 0o640)
        error = self.assertRaises(KeyFileError, KeyRing.from_file, self.path)
        self.assertNotIn(line, str(error))


class SpentTokensFileTests(SynchronousTestCase):
    """Single use across restarts: the spent ids in a file under the state directory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.ring = KeyRing([os.urandom(32)])
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "token.keys.spent")

    def authority(self) -> tuple[TokenAuthority, SpentTokensFile]:
        """A fresh process's authority: nothing in memory, the same file."""
        spent = SpentTokensFile(self.path, self.clock)
        self.addCleanup(spent.close)
        return TokenAuthority(self.ring, self.clock, lifetime=60, spent=spent), spent

    def lines(self) -> list[str]:
        with open(self.path) as f:
            return f.read().splitlines()

    def test_spent_before_a_restart_stays_spent(self) -> None:
        before, _ = self.authority()
        token = before.seal(ALICE, CONSOLE)
        unused = before.seal(ALICE, CONSOLE)
        before.open(token)
        after, _ = self.authority()
        error = self.assertRaises(TokenError, after.open, token)
        self.assertEqual(error.reason, "replayed")
        self.assertEqual(after.open(unused).user, "alice")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_file_holds_ids_and_expiries_only(self) -> None:
        authority, _ = self.authority()
        token = authority.seal(ALICE, CONSOLE)
        authority.open(token)
        [line] = self.lines()
        expires, token_id = line.split(" ")
        self.assertEqual(float(expires), self.clock.seconds() + 60)
        self.assertEqual(base64.urlsafe_b64decode(token_id + "=="), bytes(_raw(token)[5:17]))
        self.assertNotIn("s3cret", line)

    def test_expired_ids_are_pruned_at_start(self) -> None:
        authority, _ = self.authority()
        for _ in range(10):
            authority.open(authority.seal(ALICE, CONSOLE))
        self.clock.advance(30)
        authority.open(authority.seal(ALICE, CONSOLE))
        self.assertEqual(len(self.lines()), 11)
        self.clock.advance(40)  # the first ten have expired
        _, spent = self.authority()
        self.assertEqual((len(spent), len(self.lines())), (1, 1))

    def test_torn_and_foreign_lines_are_dropped(self) -> None:
        authority, _ = self.authority()
        token = authority.seal(ALICE, CONSOLE)
        authority.open(token)
        with open(self.path, "a") as f:
            f.write("garbage\n1e999 AAAAAAAAAAAAAAAA\nnan AAAAAAAAAAAAAAAA\n1900000000.0 AAAA")
        after, spent = self.authority()
        self.assertEqual(len(spent), 1)
        self.assertEqual(self.assertRaises(TokenError, after.open, token).reason, "replayed")

    def test_file_stays_bounded(self) -> None:
        """Compaction keeps the file near one lifetime's worth of ids."""
        authority, spent = self.authority()
        for _ in range(3 * COMPACT_AT):
            authority.open(authority.seal(ALICE, CONSOLE))
            self.clock.advance(0.01)
        # 60 s of ids at 100 per second: 6000 live, never more than the
        # larger of COMPACT_AT and twice the live ones in the file.
        self.assertEqual(len(spent), 6000)
        self.assertLessEqual(len(self.lines()), max(COMPACT_AT, 2 * 6000))
        self.clock.advance(120)
        for _ in range(COMPACT_AT):
            authority.open(authority.seal(ALICE, CONSOLE))
        self.assertLessEqual(len(self.lines()), COMPACT_AT)

    def test_write_failure_still_refuses_in_memory(self) -> None:
        authority, spent = self.authority()
        os.close(spent._fd)
        spent._fd = os.open(os.devnull, os.O_RDONLY)  # every write fails (EBADF)
        events: list[dict[str, Any]] = []
        self.patch(SpentTokensFile, "_log", Logger(observer=events.append))
        token = authority.seal(ALICE, CONSOLE)
        authority.open(token)
        authority.open(authority.seal(ALICE, CONSOLE))
        self.assertEqual(self.assertRaises(TokenError, authority.open, token).reason, "replayed")
        self.assertEqual(len(events), 1)  # once, not per session
        self.assertIn("Cannot record spent tokens", events[0]["log_format"])

    def test_unusable_directory_is_refused_at_start(self) -> None:
        self.assertRaises(OSError, SpentTokensFile, "/nonexistent/dir/spent", self.clock)
