"""
Token attacks over real loopback sockets: altered, foreign, expired, replayed,
misdirected, oversized and garbage tokens.  Each is refused with 1008 "769"
(or a JSON HTTP refusal when the request itself is too large) before guacd or
a VNC server hears of it, while an honest session keeps relaying.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.consoles import Console
from consoleproxy.tokens import KeyRing, TokenAuthority, TokenError
from tests.helpers.adversary import AdversaryTestCase, until
from tests.helpers.consoleserver import start_console_server
from tests.helpers.rawws import raw_open
from tests.relay.test_guacamole_relay import ALICE, VNC

REFUSED = (1008, "769")
_VERSION, _KEY_ID, _NONCE, _TAG = range(1), range(1, 5), range(5, 17), 16


def decode(token: str) -> bytearray:
    """A token's bytes."""
    return bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def encode_token(raw: bytes) -> str:
    """Bytes as a token (URL-safe base64, no padding)."""
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode("ascii")


def flipped(token: str, index: int, bit: int) -> str:
    """C{token} with one bit of byte C{index} flipped."""
    raw = decode(token)
    raw[index] ^= 1 << bit
    return encode_token(raw)


def refusal_reason(index: int) -> str:
    """Why a token changed in byte C{index} is refused (version, key id, the rest)."""
    if index in _VERSION:
        return "unknown-version"
    if index in _KEY_ID:
        return "unknown-key"
    return "tampered"


class BitFlipInProcessTests(SynchronousTestCase):
    """Every bit of every byte, against the same authority a relay uses."""

    def test_every_bit_of_every_part(self) -> None:
        clock = Clock()
        clock.advance(1_800_000_000)
        authority = TokenAuthority(KeyRing([os.urandom(32)]), clock)
        console = Console(7, "ssh", {"hostname": "10.0.0.5", "private-key": "k" * 3000})
        token = authority.seal(ALICE, console)
        size = len(decode(token))
        parts = {"tampered": 0, "unknown-version": 0, "unknown-key": 0}
        for index in range(size):
            for bit in range(8):
                error = self.assertRaises(TokenError, authority.open, flipped(token, index, bit))
                self.assertEqual(error.reason, refusal_reason(index), (index, bit))
                parts[error.reason] += 1
        self.assertEqual(
            parts, {"unknown-version": 8, "unknown-key": 32, "tampered": 8 * size - 40}
        )
        self.assertEqual(authority.open(token).console, console)  # the original, once


class TokenAttackTests(AdversaryTestCase):
    """Refused tokens on a server with a running honest session."""

    @inlineCallbacks
    def test_bit_flips_over_sockets(self):  # type: ignore[no-untyped-def]
        """Flips in the version, key id, nonce, ciphertext and tag, several sessions at a time."""
        token = self.server.tokens.seal(ALICE, VNC)
        size = len(decode(token))
        ciphertext = range(17, size - _TAG)
        positions = [*_VERSION, *_KEY_ID, *_NONCE]
        positions += list(ciphertext)[:: max(1, len(ciphertext) // 12)]
        positions += range(size - _TAG, size)
        flips = [flipped(token, i, n % 8) for n, i in enumerate(positions)]
        for start in range(0, len(flips), 12):
            yield gatherResults(
                [
                    self.refused_before_guacd(f"/guacamole?token={changed}")
                    for changed in flips[start : start + 12]
                ]
            )
        expected: dict[str, int] = {}
        for index in positions:
            expected[refusal_reason(index)] = expected.get(refusal_reason(index), 0) + 1
        self.assertEqual(self.server.relay.token_refusals, expected)
        self.assertEqual(len(self.guacd.connections), 1)
        yield self.assert_undisturbed()
        # The untouched token still opens, once.
        client, _ = yield self.attack_session_with(token)
        self.assertFalse(client.closed.called)

    @inlineCallbacks
    def attack_session_with(self, token: str):  # type: ignore[no-untyped-def]
        client = yield self.raw(f"/guacamole?token={token}")
        yield client.wait_messages(1)
        return client, self.guacd.connections[-1]

    @inlineCallbacks
    def test_foreign_expired_and_other_zone(self):  # type: ignore[no-untyped-def]
        stranger = TokenAuthority(KeyRing([os.urandom(32)]), reactor)
        past = Clock()
        past.advance(reactor.seconds() - 61)  # sealed 61 s ago: expired 1 s ago
        ours_then = TokenAuthority(self.keyring, past)
        other_zone = Console(7, "vnc", dict(VNC.parameters), zone="1")
        for token in (
            stranger.seal(ALICE, VNC),
            ours_then.seal(ALICE, VNC),
            self.server.tokens.seal(ALICE, other_zone),
            TokenAuthority(self.keyring, reactor, purpose="rfb").seal(ALICE, VNC),
        ):
            yield self.refused_before_guacd(f"/guacamole?token={token}")
        self.assertEqual(
            self.server.relay.token_refusals, {"unknown-key": 1, "expired": 1, "tampered": 2}
        )
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_replay_race(self):  # type: ignore[no-untyped-def]
        """Two WebSockets with one token at the same moment: exactly one opens."""
        races = 10
        for race in range(races):
            token = self.server.tokens.seal(ALICE, VNC)
            url = f"/guacamole?token={token}"
            clients = yield gatherResults([self.raw(url), self.raw(url)])
            yield until(lambda c=clients: all(x.messages() or x.closed.called for x in c), "both")
            opened = [c for c in clients if c.messages()]
            refused = [c for c in clients if not c.messages()]
            self.assertEqual((len(opened), len(refused)), (1, 1))
            yield self.closed_with(refused[0], REFUSED)
            self.assertFalse(opened[0].closed.called)
            self.assertEqual(len(self.guacd.connections), 2 + race)
        self.assertEqual(self.server.relay.token_refusals, {"replayed": races})
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_replay_after_the_session(self):  # type: ignore[no-untyped-def]
        token = self.server.tokens.seal(ALICE, VNC)
        client, conn = yield self.attack_session_with(token)
        client.transport.abortConnection()
        yield conn.closed
        yield self.refused_before_guacd(f"/guacamole?token={token}")
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_oversized(self):  # type: ignore[no-untyped-def]
        """A token over the limit is refused; a URL over the header limit gets a JSON 431."""
        yield self.refused_before_guacd("/guacamole?token=" + "A" * 15000)
        for size in (100_000, 400_000):
            client = yield self.raw("/guacamole?token=" + "A" * size)
            yield client.lost
            self.assertEqual(client.status, 431)
            self.assertEqual(json.loads(client.body)["id"], 431)
        self.assertEqual(len(self.guacd.connections), 1)
        yield self.assert_undisturbed()

    @inlineCallbacks
    def test_garbage(self):  # type: ignore[no-untyped-def]
        """Beyond test_relay's cases: odd encodings, padding, alphabets, names."""
        good = self.server.tokens.seal(ALICE, VNC)
        for query in (
            "?token",
            "?token=%00",
            "?token=!!!!",
            "?token=" + "%C3%A9" * 40,
            "?token=%FF%FE%FD",
            "?token=AAA",
            "?token=====",
            "?token=" + "=" * 64,
            f"?token=%20{good}",
            f"?token={good}%0A",
            f"?token=%2B{good[1:]}",  # '+': standard base64, not URL-safe
            f"?token={good}A",
            f"?TOKEN={good}",
        ):
            yield self.refused_before_guacd(f"/guacamole{query}")
        yield self.assert_undisturbed()


class _Listener(Factory):
    """Counts the connections a (would-be) VNC server gets."""

    noisy = False

    def __init__(self) -> None:
        self.count = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.count += 1
        return Protocol()


class CrossRelayTests(AdversaryTestCase):
    """A token for one relay on the other: /guacamole and /rfb each refuse the other's."""

    @inlineCallbacks
    def start_proxy(self):  # type: ignore[no-untyped-def]
        self.vnc = _Listener()
        port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.vnc)
        self.addCleanup(port.stopListening)
        return (
            yield start_console_server(
                self, guacd=f"tcp:127.0.0.1:{self.guacd.port}", vnc_port=port.getHost().port
            )
        )

    @inlineCallbacks
    def rfb_refused(self, token: str, expected: tuple[int, str] = REFUSED):  # type: ignore[no-untyped-def]
        client = yield raw_open(self.server.port, f"/rfb?token={token}", ("binary",))
        self.addCleanup(self._abort, client)
        self.assertEqual(client.status, 101)
        yield self.closed_with(client, expected)
        self.assertEqual(self.vnc.count, 0)

    @inlineCallbacks
    def test_tokens_for_the_other_relay(self):  # type: ignore[no-untyped-def]
        server = self.server
        yield self.rfb_refused(server.tokens.seal(ALICE, VNC))
        yield self.refused_before_guacd(f"/guacamole?token={server.rfb_tokens.seal(ALICE, VNC)}")
        # A raw VNC token names a VNC console of this zone, or opens nothing.
        ssh = Console(7, "ssh", {"hostname": "127.0.0.1", "port": "22"})
        yield self.rfb_refused(server.rfb_tokens.seal(ALICE, ssh), (1008, "771"))
        other_zone = Console(7, "vnc", dict(VNC.parameters), zone="1")
        yield self.rfb_refused(server.rfb_tokens.seal(ALICE, other_zone))
        self.assertEqual(server.rfb.token_refusals, {"tampered": 2})
        self.assertEqual(server.relay.token_refusals, {"tampered": 1})
        self.assertEqual(len(self.guacd.connections), 1)
        yield self.assert_undisturbed()
