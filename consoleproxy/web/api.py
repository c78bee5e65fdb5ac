"""
The token API: ``GET /api/vm/<id>/guacamole/<vnc|ssh|rdp>[?mode=rfb]``.

Authenticate the caller, ask the cloud how to reach the console, seal that
into a short-lived token.  ``?mode=rfb`` (VNC only) mints a token for the raw
VNC relay (``/rfb``, for noVNC) instead, sealed for its own purpose so that
neither relay opens the other's tokens; the answer has the same shape and
never holds the VNC password (the relay authenticates to the VNC server).
Answers use FireEdge's shape so its clients work unchanged:
``{"id": 200, "message": "OK", "data": "<token>"}``, and errors
``{"id": <status>, "message": <status text>, "data": <what is wrong>}``.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from consoleproxy.consoles import CONSOLE_TYPES, Console, Identity, zone_key
from consoleproxy.errors import ApiError, BadRequest, NotFound, Overloaded, Unauthenticated
from consoleproxy.interfaces import IAuthenticator, ICloud
from consoleproxy.net.logsafe import log_safe
from consoleproxy.net.ratelimit import retry_after
from consoleproxy.net.routing import client_of, json_body
from consoleproxy.tokens import TokenAuthority

_MAX_VM_ID = 2**31 - 1  # oned's ids are C ints
#: The HTTP Basic challenge of a 401 (the token API's and the console page's).
CHALLENGE = b'Basic realm="consoleproxy", charset="UTF-8"'


class TokenApi:
    """
    Mints console tokens for authenticated users.

    @param clock: with one, refusals of a busy server (L{Overloaded}: the
        password checks' queue is full or the failed-login budget spent) are
        logged at most once every L{BUSY_LOG_INTERVAL} seconds, with a count
        of the others: under attack they come by the hundred a second, each
        is in the access log already, and one line each took a quarter of
        the server's time.  Without a clock every refusal is logged.
    """

    log = Logger()
    BUSY_LOG_INTERVAL = 10.0

    def __init__(
        self,
        authenticator: IAuthenticator,
        cloud: ICloud,
        tokens: TokenAuthority,
        rfb_tokens: TokenAuthority | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.cloud = cloud
        self.tokens = tokens
        #: Seals raw VNC tokens (purpose ``rfb``); None when that mode is off.
        self.rfb_tokens = rfb_tokens
        self.clock = clock
        self._busy_quiet_until = float("-inf")
        self._busy_unlogged = 0

    @inlineCallbacks
    def mint(self, request: Request, vm_id: str, console_type: str):  # type: ignore[no-untyped-def]
        """Answer one token request (a Deferred of the response body)."""
        try:
            number = _vm_number(vm_id)
            if console_type not in CONSOLE_TYPES:
                raise BadRequest(
                    f"unknown console type {console_type!r}: one of {', '.join(CONSOLE_TYPES)}"
                )
            zone = _zone(request)
            mode = _mode(request)
            if mode == "rfb" and console_type != "vnc":
                raise BadRequest("mode=rfb (raw VNC) is for vnc consoles only")
            if mode == "rfb" and self.rfb_tokens is None:
                raise NotFound("raw VNC (mode=rfb) is not enabled on this server")
            identity: Identity = yield maybeDeferred(
                self.authenticator.authenticate, request.getHeader(b"authorization")
            )
            console: Console = yield maybeDeferred(
                self.cloud.console, identity, number, console_type, zone
            )
        except ApiError as e:
            refusal_headers(request, e)
            self._log_refusal(request, e, vm_id, console_type)
            return json_body(request, e.status, e.title, e.message)
        authority = self.rfb_tokens if mode == "rfb" else self.tokens
        assert authority is not None
        token = authority.seal(identity, console)
        self.log.info(
            "Token issued: user={user} vm={vm} type={type} mode={mode} peer={peer}",
            user=identity.name,
            vm=number,
            type=console_type,
            mode=mode,
            peer=log_safe(str(client_of(request))),
        )
        return json_body(request, 200, "OK", token)

    def _log_refusal(self, request: Request, e: ApiError, vm_id: str, console_type: str) -> None:
        others = ""
        if isinstance(e, Overloaded) and self.clock is not None:
            now = self.clock.seconds()
            if now < self._busy_quiet_until:
                self._busy_unlogged += 1
                return
            self._busy_quiet_until = now + self.BUSY_LOG_INTERVAL
            if self._busy_unlogged:
                others = f"; {self._busy_unlogged} more refused as busy since the last such line"
            self._busy_unlogged = 0
        self.log.info(
            "Token refused: {status} {why} (vm={vm} type={type} peer={peer}){others}",
            status=e.status,
            why=log_safe(e.message),
            vm=log_safe(vm_id, 32),
            type=log_safe(console_type, 16),
            peer=log_safe(str(client_of(request))),
            others=others,
        )


def refusal_headers(request: Request, error: ApiError) -> None:
    """
    The headers a refusal carries: the Basic challenge of a 401, and
    ``Retry-After`` when the error says when asking again may work (a busy
    server: the password checks' queue is full or the failed-login budget spent).
    """
    if isinstance(error, Unauthenticated):
        request.setHeader(b"WWW-Authenticate", CHALLENGE)
    if error.retry_after is not None:
        request.setHeader(b"Retry-After", str(retry_after(error.retry_after)).encode())


def _vm_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10 or int(text) > _MAX_VM_ID:
        raise BadRequest(f"a VM id is a whole number, not {text[:32]!r}")
    return int(text)


def _mode(request: Request) -> str:
    """``?mode=``: ``guacamole`` (the default) or ``rfb``."""
    values = request.args.get(b"mode")
    if not values:
        return "guacamole"
    if len(values) > 1:
        raise BadRequest("mode given more than once")
    mode = values[0].decode("utf-8", "replace")
    if mode not in ("guacamole", "rfb"):
        raise BadRequest(f"mode is guacamole or rfb, not {mode[:16]!r}")
    return mode


def _zone(request: Request) -> str | None:
    """``?zone=``: a zone id in its one form (``00`` is ``0``), or 400."""
    values = request.args.get(b"zone")
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("zone given more than once")
    return zone_key(values[0].decode("utf-8", "replace"))
