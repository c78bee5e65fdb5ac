"""
Console tokens: sealed, short-lived, single-use capabilities.

FireEdge's tokens are AES-CBC without a MAC, never expire, can be replayed
forever and are identical for identical settings.  Ours are:

  - authenticated encryption (AES-256-GCM): any change to any byte is refused;
  - versioned: the first byte names the format, and the version and key id
    are bound into the ciphertext as associated data;
  - bound: they name the user, the VM, the console type, the zone and the
    guacd settings, so a token for one console never opens another;
  - short-lived (60 s by default) and single use: the relay remembers the
    ids it has opened until they expire (L{ISpentTokens}), across restarts
    too (L{SpentTokensFile});
  - rotatable: a key file holds several keys; the first seals, all open.

Layout, URL-safe base64 without padding::

    version (1) | key id (4) | nonce (12) | AES-GCM(JSON claims) + tag (16)

Every kind of refusal raises the same L{TokenError} to the caller's caller:
its C{reason} is for logs and metrics only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import math
import os
import stat
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from consoleproxy.consoles import Console, Identity, zone_key
from consoleproxy.interfaces import ISpentTokens

TOKEN_VERSION = 1
KEY_BYTES = 32
_NONCE_BYTES = 12
_KEY_ID_BYTES = 4
_HEADER_BYTES = 1 + _KEY_ID_BYTES + _NONCE_BYTES
_TAG_BYTES = 16
#: Longer tokens are refused before any decoding (an SSH key fits easily).
MAX_TOKEN_LENGTH = 16384
#: Ciphers kept per authority (one per key and zone): a browser names the
#: zone, so without a bound each distinct zone would stay in memory.
MAX_CIPHERS = 64


class TokenError(Exception):
    """
    A token was refused.

    @ivar reason: one of C{malformed}, C{unknown-version}, C{unknown-key},
        C{tampered}, C{expired}, C{replayed}, C{wrong-zone}: for logs and
        metrics, never for the browser, which sees one refusal for all.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"token refused: {reason}")
        self.reason = reason


class KeyFileError(ValueError):
    """The key file is unusable; the message says how to fix it."""


@dataclass(frozen=True)
class Claims:
    """What an opened token says."""

    user: str
    console: Console
    expires: float
    token_id: bytes


def _b64decode(text: str) -> bytes:
    """Strict URL-safe base64, padding optional: any other character is refused."""
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"consoleproxy token key id\0" + key).digest()[:_KEY_ID_BYTES]


def _purpose_key(key: bytes, purpose: str, zone: str | None) -> bytes:
    """
    One key per purpose and zone: a Guacamole token is no raw VNC token, and a
    token sealed for zone A does not open as one for zone B, even when the
    zones share their key file.
    """
    scope = f"{purpose}@{'local' if zone is None else 'zone:' + zone}"
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"consoleproxy token v1 " + scope.encode("ascii"),
    ).derive(key)


class KeyRing:
    """
    Token keys: the first seals, every one opens (rotation with overlap).

    To rotate: put a new key on the first line, keep the old one below it for
    at least one token lifetime, then remove it.
    """

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise KeyFileError("no token key")
        for key in keys:
            if len(key) != KEY_BYTES:
                raise KeyFileError(f"a token key must be {KEY_BYTES} bytes")
        self.keys = list(keys)

    @property
    def sealing_key(self) -> bytes:
        """The key new tokens are sealed with."""
        return self.keys[0]

    @staticmethod
    def generate_line() -> str:
        """A new random key as one key-file line."""
        return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], create: bool = True) -> KeyRing:
        """
        Read a key file: one URL-safe base64 key per line, ``#`` comments.

        A missing file is created with one new key and mode 0600 when
        C{create} is true.  A file readable by group or others is refused:
        whoever reads it can mint consoles.

        @raise KeyFileError: with a message that names the file and the fix.
        """
        path = Path(path)
        if create and not path.exists():
            _create_key_file(path)
        try:
            mode = path.stat().st_mode
            text = path.read_text("ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"cannot read key file {path}: {e}") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"key file {path} is accessible by group or others; run: chmod 600 {path}"
            )
        keys = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = _b64decode(line)
            except (binascii.Error, ValueError) as e:
                raise KeyFileError(f"key file {path} line {number}: not base64") from e
            if len(key) != KEY_BYTES:
                raise KeyFileError(
                    f"key file {path} line {number}: a key must be {KEY_BYTES} bytes"
                )
            keys.append(key)
        if not keys:
            raise KeyFileError(f"key file {path} holds no key")
        return cls(keys)


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    content = (
        "# consoleproxy token keys: the first line seals, every line opens.\n"
        "# Rotate by adding a new first line; drop old keys after a token lifetime.\n"
        f"{KeyRing.generate_line()}\n"
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # created meanwhile by another process: read that one
    except OSError as e:
        raise KeyFileError(f"cannot create key file {path}: {e}") from e
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(content)


class TokenAuthority:
    """
    Seals and opens console tokens for one purpose.

    @param keyring: the keys.
    @param clock: the time source (a reactor, or a L{twisted.internet.task.Clock}).
    @param lifetime: seconds a new token is valid.
    @param purpose: binds tokens to a use (C{"guacamole"}, C{"rfb"}).
    @param spent: where opened token ids are remembered (may be shared by
        several authorities: ids are random); default: in memory.
    """

    def __init__(
        self,
        keyring: KeyRing,
        clock: IReactorTime,
        lifetime: float = 60.0,
        purpose: str = "guacamole",
        spent: ISpentTokens | None = None,
    ) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self._keyring = keyring
        self._purpose = purpose
        # Least recently used first; at most MAX_CIPHERS (deriving again is cheap).
        self._aeads: OrderedDict[tuple[bytes, str | None], AESGCM] = OrderedDict()
        self._keys = {_key_id(k): k for k in reversed(keyring.keys)}
        self._spent = spent if spent is not None else SpentTokens(clock)

    def _aead(self, key_id: bytes, zone: str | None) -> AESGCM | None:
        """The cipher for a key (by id) and a zone, derived once while it is in use."""
        found = self._aeads.get((key_id, zone))
        if found is not None:
            self._aeads.move_to_end((key_id, zone))
            return found
        key = self._keys.get(key_id)
        if key is None:
            return None
        found = self._aeads[(key_id, zone)] = AESGCM(_purpose_key(key, self._purpose, zone))
        while len(self._aeads) > MAX_CIPHERS:
            self._aeads.popitem(last=False)
        return found

    @property
    def ciphers(self) -> int:
        """How many derived ciphers are kept (at most L{MAX_CIPHERS})."""
        return len(self._aeads)

    def seal(self, identity: Identity, console: Console) -> str:
        """Mint a token for this user and console (bound to the console's zone)."""
        claims = {
            "u": identity.name,
            "vm": console.vm_id,
            "t": console.console_type,
            "z": console.zone,
            "c": console.cluster,
            "p": dict(console.parameters),
            "exp": round(self._clock.seconds() + self.lifetime, 3),
        }
        plaintext = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode()
        key_id = _key_id(self._keyring.sealing_key)
        aead = self._aead(key_id, console.zone)
        assert aead is not None
        nonce = os.urandom(_NONCE_BYTES)
        header = bytes([TOKEN_VERSION]) + key_id + nonce
        sealed = header + aead.encrypt(nonce, plaintext, header[: 1 + _KEY_ID_BYTES])
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, token: str, zone: str | None = None) -> Claims | Deferred[Claims]:
        """
        Open a token and spend it.

        With an in-memory or file store the answer is immediate (the claims,
        or L{TokenError} raised); with a store that answers a Deferred
        (L{consoleproxy.cluster.spent_tokens.RedisSpentTokens}) it is a
        Deferred firing with the claims, failing with L{TokenError}
        (C{replayed}) or with the store's error (C{RedisUnavailable}).  Every
        check before spending still raises at once.

        @param zone: the zone the token must be for: C{None} for tokens of this
            zone's own consoles, else the id of the zone being served (``00``
            is zone 0).
        @raise TokenError: for any token that is not one this authority sealed
            for C{zone}, unmodified, unexpired and never opened before.
        @raise consoleproxy.consoles.ZoneIdError: C{zone} is no zone id.
        """
        if zone is not None:
            zone = zone_key(zone)
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            raise TokenError("malformed")
        try:
            raw = _b64decode(token)
        except (binascii.Error, ValueError) as e:
            raise TokenError("malformed") from e
        if len(raw) < _HEADER_BYTES + _TAG_BYTES:
            raise TokenError("malformed")
        if raw[0] != TOKEN_VERSION:
            raise TokenError("unknown-version")
        key_id = raw[1 : 1 + _KEY_ID_BYTES]
        aead = self._aead(key_id, zone)
        if aead is None:
            raise TokenError("unknown-key")
        nonce = raw[1 + _KEY_ID_BYTES : _HEADER_BYTES]
        try:
            plaintext = aead.decrypt(nonce, raw[_HEADER_BYTES:], raw[: 1 + _KEY_ID_BYTES])
        except InvalidTag as e:
            raise TokenError("tampered") from e
        claims = _parse_claims(plaintext, nonce)
        if claims.console.zone != zone:  # the key binds it already; be certain
            raise TokenError("wrong-zone")
        if claims.expires <= self._clock.seconds():
            raise TokenError("expired")
        answer = self._spent.spend(nonce, claims.expires)
        if isinstance(answer, Deferred):
            # A shared store (Redis): wait for it; a replay fails the Deferred
            # with TokenError, a store that cannot answer with its own error.
            return answer.addCallback(_first_use, claims)
        if not answer:
            raise TokenError("replayed")
        return claims

    @property
    def spent(self) -> int:
        """
        How many opened, unexpired token ids this process remembers (0 with
        a shared store such as Redis's, which keeps them there).
        """
        return len(self._spent) if hasattr(self._spent, "__len__") else 0


@implementer(ISpentTokens)
class SpentTokens:
    """
    Spent token ids in memory, each until its token expires: at most the
    tokens opened within one token lifetime.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._ids: set[bytes] = set()
        self._by_expiry: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        """How many unexpired ids are remembered."""
        self._forget_expired(self._clock.seconds())
        return len(self._ids)

    def spend(self, token_id: bytes, expires: float) -> bool:
        """See L{ISpentTokens.spend}."""
        self._forget_expired(self._clock.seconds())
        if token_id in self._ids:
            return False
        self._remember(token_id, expires)
        return True

    def _remember(self, token_id: bytes, expires: float) -> None:
        self._ids.add(token_id)
        heapq.heappush(self._by_expiry, (expires, token_id))

    def _forget_expired(self, now: float) -> None:
        heap = self._by_expiry
        while heap and heap[0][0] <= now:
            _, token_id = heapq.heappop(heap)
            self._ids.discard(token_id)

    def live(self) -> list[tuple[float, bytes]]:
        """The remembered (expiry, id) pairs, oldest first."""
        self._forget_expired(self._clock.seconds())
        return sorted(self._by_expiry)


#: A spent-token file is rewritten (with only unexpired ids) once it holds
#: this many lines and twice as many as are unexpired.
COMPACT_AT = 4096


class SpentTokensFile(SpentTokens):
    """
    Spent token ids in memory and in an append-only file, so that a token
    opened before a restart stays spent after it.

    Each first use appends one line, ``<expiry> <id>`` (about 30 bytes), with
    one C{write} on an C{O_APPEND} descriptor before the session opens: in
    the kernel then, it survives the process (a crash, a restart).  No
    C{fsync}: a host that loses power is down for longer than a token lives.
    At start the file is read, expired and torn lines are dropped and the
    rest rewritten; it is rewritten the same way whenever it holds more than
    L{COMPACT_AT} lines and twice the unexpired ones, so its size follows
    the tokens opened within one lifetime.  A failed write is logged once and
    the id is still refused in memory: a full disk never stops consoles.

    One process per file: several servers share a store instead (issue 14).

    @raise OSError: when the file or its directory is unusable (at start).
    """

    _log = Logger()

    def __init__(self, path: str | os.PathLike[str], clock: IReactorTime) -> None:
        super().__init__(clock)
        self.path = Path(path)
        self._fd = -1
        self._lines = 0
        self._write_failed = False
        now = clock.seconds()
        try:
            text = self.path.read_text("ascii", errors="replace")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            entry = _parse_spent_line(line)
            if entry is not None and entry[0] > now and entry[1] not in self._ids:
                self._remember(entry[1], entry[0])
        self._compact()

    def spend(self, token_id: bytes, expires: float) -> bool:
        """See L{ISpentTokens.spend}: the id is on disk before this returns C{True}."""
        if not super().spend(token_id, expires):
            return False
        line = f"{expires:.3f} {_b64encode(token_id)}\n".encode("ascii")
        try:
            os.write(self._fd, line)
            self._lines += 1
        except OSError as e:
            if not self._write_failed:
                self._write_failed = True
                self._log.error(
                    "Cannot record spent tokens in {path} ({why}): a restart would forget "
                    "the tokens opened until the file is writable again",
                    path=str(self.path),
                    why=e.strerror,
                )
            return True
        self._write_failed = False
        if self._lines >= COMPACT_AT and self._lines >= 2 * len(self._ids):
            try:
                self._compact()
            except OSError as e:
                self._log.error("Cannot compact {path}: {why}", path=str(self.path), why=e.strerror)
        return True

    def _compact(self) -> None:
        """Rewrite the file with the unexpired ids only, atomically, and append there."""
        live = self.live()
        content = "".join(f"{expires:.3f} {_b64encode(i)}\n" for expires, i in live)
        temporary = self.path.with_name(self.path.name + ".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("ascii"))
        os.replace(temporary, self.path)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lines = len(live)

    def close(self) -> None:
        """Stop writing (at shutdown)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _parse_spent_line(line: str) -> tuple[float, bytes] | None:
    """One line of a spent-token file; C{None} for a torn or foreign one."""
    expires, _, encoded = line.partition(" ")
    try:
        when = float(expires)
        token_id = _b64decode(encoded)
    except (ValueError, binascii.Error):
        return None
    if len(token_id) != _NONCE_BYTES or not math.isfinite(when):
        return None
    return when, token_id


def _first_use(first: bool, claims: Claims) -> Claims:
    """The shared store's answer: the claims for a first use, else C{replayed}."""
    if not first:
        raise TokenError("replayed")
    return claims


def _parse_claims(plaintext: bytes, token_id: bytes) -> Claims:
    """Authenticated bytes that do not parse mean a bug or a stolen key: refuse."""
    try:
        data = json.loads(plaintext)
        console = Console(
            vm_id=data["vm"],
            console_type=data["t"],
            parameters=data["p"],
            zone=data["z"],
            cluster=data.get("c"),
        )
        user = data["u"]
        expires = float(data["exp"])
        if not isinstance(user, str) or not isinstance(console.vm_id, int):
            raise TypeError("bad claim types")
    except (ValueError, KeyError, TypeError) as e:
        raise TokenError("malformed") from e
    return Claims(user=user, console=console, expires=expires, token_id=token_id)
