"""
Password hashes for the embedded inventory's users (Argon2id, argon2-cffi).

Verification is slow on purpose, so it runs in the reactor's thread pool,
at most a few at a time (each Argon2 check takes tens of MiB of memory).
Unknown users are checked against a dummy hash so that a wrong user name
costs as much time as a wrong password.

``consoleproxy-passwd`` prints a hash for the inventory file.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("consoleproxy: no such user")


def hash_password(password: str) -> str:
    """Hash a password for the inventory (Argon2id, argon2-cffi's defaults)."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """
    Check a password in constant time for its hash; C{None} means no such user.

    A malformed hash counts as a mismatch (and costs a dummy check).
    """
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and (
            password_hash is not None
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class PasswordVerifier:
    """
    Runs L{verify_password} off the reactor thread, a bounded number at once.

    @param run_in_thread: C{f(callable, *args) -> Deferred}; by default the
        reactor's thread pool.
    """

    def __init__(
        self,
        reactor: Any,
        concurrency: int = 2,
        run_in_thread: Callable[..., Deferred[bool]] | None = None,
    ) -> None:
        if run_in_thread is None:

            def run_in_thread(f: Callable[..., bool], *args: Any) -> Deferred[bool]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self._run = run_in_thread
        self._semaphore = DeferredSemaphore(concurrency)

    def verify(self, password_hash: str | None, password: str) -> Deferred[bool]:
        """Fire with whether C{password} matches C{password_hash}."""
        return self._semaphore.run(self._run, verify_password, password_hash, password)


def main(argv: list[str] | None = None) -> int:
    """``consoleproxy-passwd``: read a password (twice on a terminal), print its hash."""
    del argv
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            print("consoleproxy-passwd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("consoleproxy-passwd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
