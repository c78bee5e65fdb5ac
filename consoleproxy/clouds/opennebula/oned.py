"""
OpenNebula's XML-RPC API (oned), as much as consoles need.

Every call's first parameter is the session string: ``user:password``,
``user:<login token>``, or the server_cipher form
``serveradmin:<target user>:<token>`` that lets a trusted server act for a
user (L{server_admin_session}).  oned answers ``[true, value, ...]`` or
``[false, message, code, ...]`` (4 elements before 5.x, 5 since); the codes
become the API's errors here, so the rest of consoleproxy never sees oned's
numbers.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoleproxy.clouds.opennebula.xmlrpc import (
    RpcFault,
    RpcProtocolError,
    RpcUnavailable,
    XmlRpcClient,
    parse_xml,
)
from consoleproxy.errors import (
    ApiError,
    BadGateway,
    CloudUnavailable,
    Forbidden,
    NotFound,
    Unauthenticated,
)

AUTHENTICATION = 0x0100
AUTHORIZATION = 0x0200
NO_EXISTS = 0x0400

_ERRORS: dict[int, type[ApiError]] = {
    AUTHENTICATION: Unauthenticated,
    AUTHORIZATION: Forbidden,
    NO_EXISTS: NotFound,
}


#: The configuration key of the server-admin credential, named in its errors.
SERVER_ADMIN_KEY = "opennebula.server_admin_auth"


class ServerAdminRefused(CloudUnavailable):
    """
    oned refused the server-admin credential (503): the server's own
    credential failed, not the user's, so no 401 and no Basic challenge (the
    browser would ask the user for a password that is right).
    """


class ServerAdminStatus:
    """
    Whether oned accepts the server-admin credential, as the last call made
    with it found; a refusal is logged at most once per C{log_interval}, and
    once more when a call succeeds again.

    @param clock: when refusals were logged.
    """

    log = Logger()

    def __init__(self, clock: Any, log_interval: float = 60.0) -> None:
        self._clock = clock
        self.log_interval = log_interval
        #: Why the last call failed authentication, or None.
        self.problem: str | None = None
        self._logged_at: float | None = None

    def watch(self, calling: Deferred[Any]) -> Deferred[Any]:
        """
        Follow a call made with the server-admin session: its success clears
        the problem; oned's AUTHENTICATION error becomes L{ServerAdminRefused}.
        """
        return calling.addCallbacks(self._accepted, self._failed)

    def _accepted(self, value: Any) -> Any:
        if self.problem is not None:
            self.problem = None
            self._logged_at = None
            self.log.info(
                "oned accepts the server-admin credential ({key}) again", key=SERVER_ADMIN_KEY
            )
        return value

    def _failed(self, failure: Failure) -> Failure:
        if not failure.check(Unauthenticated):
            return failure
        self.problem = f"oned refused {SERVER_ADMIN_KEY}: {failure.value.message}"
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= self.log_interval:
            self._logged_at = now
            self.log.error(
                "{problem} (SSH and RDP consoles fail until that file holds serveradmin's "
                "password in oned)",
                problem=self.problem,
            )
        return Failure(
            ServerAdminRefused(
                f"the console server's OpenNebula credential ({SERVER_ADMIN_KEY}) was "
                "refused by oned: SSH and RDP consoles need it; tell the administrator"
            )
        )


@dataclass(frozen=True)
class ServerAdmin:
    """
    The server-admin credential (``/var/lib/one/.one/sunstone_auth``).

    @ivar user: usually ``serveradmin``.
    """

    user: str
    password: str = field(repr=False)

    @classmethod
    def from_file(cls, path: str) -> ServerAdmin:
        """
        Read ``user:password`` from the first line of C{path}.

        @raise ValueError: naming the file and the problem, never its content.
        """
        try:
            line = Path(path).read_text("utf-8").strip().splitlines()[0]
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise ValueError(f"cannot read {path}: {e.__class__.__name__}") from e
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ValueError(f"{path} does not hold user:password")
        return cls(user, password.strip())

    def session(self, target: str, now: float, lifetime: float = 300.0) -> str:
        """
        A server_cipher session acting as C{target}.

        Token: base64(AES-256-CBC(key, iv, "<user>:<target>:<expiry>")), with
        key = the first 32 characters of the hex SHA-256 of the password and
        iv = the first 16 characters of the key, as oned's server_cipher
        driver expects.
        """
        key = hashlib.sha256(self.password.encode("utf-8")).hexdigest()[:32].encode("ascii")
        padder = padding.PKCS7(128).padder()
        data = f"{self.user}:{target}:{int(now + lifetime)}".encode()
        data = padder.update(data) + padder.finalize()
        encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
        token = base64.b64encode(encryptor.update(data) + encryptor.finalize()).decode("ascii")
        return f"{self.user}:{target}:{token}"


class Oned:
    """The calls consoleproxy makes, with oned's answers mapped to API errors."""

    def __init__(self, rpc: XmlRpcClient) -> None:
        self.rpc = rpc

    def vm_info(self, session: str, vm_id: int, decrypt: bool = False) -> Deferred[Element]:
        """The VM document (``/VM``)."""
        return self._document("one.vm.info", session, vm_id, decrypt)

    def user_info(
        self, session: str, user_id: int = -1, decrypt: bool = False
    ) -> Deferred[Element]:
        """A user document (``/USER``); -1 is the caller."""
        return self._document("one.user.info", session, user_id, decrypt)

    def zone_info(self, session: str, zone_id: int) -> Deferred[Element]:
        """A zone document (``/ZONE``)."""
        return self._document("one.zone.info", session, zone_id)

    def zonepool_info(self, session: str) -> Deferred[Element]:
        """The zone pool (``/ZONE_POOL``)."""
        return self._document("one.zonepool.info", session)

    def version(self, session: str) -> Deferred[str]:
        """oned's version (``one.system.version``); oned authenticates even this call."""
        return self.call("one.system.version", session)

    def _document(self, method: str, session: str, *args: Any) -> Deferred[Element]:
        return self.call(method, session, *args).addCallback(_parse_document, method)

    def call(self, method: str, session: str, *args: Any) -> Deferred[Any]:
        """Call C{method}; fire with its value or fail with an L{ApiError}."""
        d = self.rpc.call(method, session, *args)
        d.addErrback(_transport_error, method)
        d.addCallback(_unwrap, method)
        return d

    def close(self) -> Deferred[None]:
        """Close idle connections."""
        return self.rpc.close()


def _transport_error(failure: Failure, method: str) -> Failure:
    if failure.check(RpcUnavailable):
        return Failure(CloudUnavailable(f"OpenNebula is unreachable: {failure.getErrorMessage()}"))
    if failure.check(RpcFault):
        return Failure(BadGateway(f"OpenNebula refused {method}: {failure.value.message}"))
    if failure.check(RpcProtocolError):
        return Failure(BadGateway(f"OpenNebula's answer to {method} is unusable: {failure.value}"))
    return failure


def _unwrap(answer: Any, method: str) -> Any:
    if not isinstance(answer, list) or len(answer) < 2 or not isinstance(answer[0], bool):
        raise BadGateway(f"OpenNebula's answer to {method} is not a result array")
    if answer[0]:
        return answer[1]
    message = str(answer[1])
    code = answer[2] if len(answer) > 2 and isinstance(answer[2], int) else 0
    raise _ERRORS.get(code, BadGateway)(f"OpenNebula: {message}")


def _parse_document(text: Any, method: str) -> Element:
    if not isinstance(text, str):
        raise BadGateway(f"OpenNebula's answer to {method} is not a document")
    try:
        return parse_xml(text.encode("utf-8"))
    except RpcProtocolError as e:
        raise BadGateway(f"OpenNebula's answer to {method} is unusable: {e}") from e
