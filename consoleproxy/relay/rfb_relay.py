"""
Raw VNC for noVNC: a WebSocket (subprotocol ``binary``) carrying RFB bytes.

The token API mints these tokens with a separate purpose (``rfb``), so a
Guacamole token never opens a raw VNC session and the other way round.  The
VNC password stays on the server: consoleproxy performs the VNC
authentication itself and offers the browser security type None.

Life of a session:

 1. ``onConnect``: refuse a client that does not offer ``binary``; open and
    spend the token; connect to the VM's VNC port and complete the RFB
    handshake as a client (protocol version, then security type None or VNC
    authentication with the token's password, then the SecurityResult), all
    before the WebSocket is accepted.  The browser's socket is paused
    meanwhile.
 2. A refused token or a failed VNC handshake still accepts the WebSocket,
    then closes it at once with the Guacamole relay's close rules: the
    WebSocket code of the Guacamole status, and the decimal status as the
    reason, so that the console page can say what went wrong in words (a
    refused HTTP upgrade would only show as "cannot connect").
 3. ``onOpen``: consoleproxy plays the RFB server for the browser: version
    3.8 (3.3 and 3.7 browsers are served too), security type None, a
    successful SecurityResult.  From the browser's ClientInit on, bytes are
    relayed opaquely both ways: each VNC read becomes one binary message (cut
    at the message size limit), each browser message goes to the VNC server
    as it is.
 4. Backpressure both ways: each side's transport is the other's streaming
    producer, so memory per session stays bounded.
 5. Whichever side closes first, the other follows at once.

The VNC server is reached the way guacd would reach it: the tunnel policy
(L{consoleproxy.interfaces.ITunnels}) gives a route, direct or through an SSH
tunnel's one-shot listener, and consoleproxy connects to the route's
``hostname``/``port`` itself.  (A tunnel listener restricted to guacd's
address, ``tunnels.guacd_address``, must then admit this host too.)
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from consoleproxy.consoles import Console
from consoleproxy.guacamole.status import GuacamoleError, Status
from consoleproxy.interfaces import ITunnels
from consoleproxy.net.factories import SingleProtocolFactory
from consoleproxy.net.fastwrite import write_now
from consoleproxy.relay.rfb_input import RfbInputWatch
from consoleproxy.relay.websocket import (
    MAX_OUTGOING_MESSAGE,
    RelayFactory,
    RelayPolicy,
    RelayResource,
    RelaySession,
    token_value,
)
from consoleproxy.tokens import Claims, TokenAuthority, TokenError
from consoleproxy.tunnels.routes import Route

SUBPROTOCOL = "binary"
#: The token purpose of raw VNC tokens (a key of their own, derived from the key file).
PURPOSE = "rfb"

SECURITY_INVALID = 0
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2

_VERSION = re.compile(rb"RFB ([0-9]{3})\.([0-9]{3})\n")
_VERSION_BYTES = 12
_CHALLENGE_BYTES = 16
#: Longest failure reason read from a VNC server; longer ones end the handshake.
MAX_REASON_BYTES = 4096
_MAX_HANDSHAKE_BYTES = MAX_REASON_BYTES + 1024
_SECURITY_NAMES = {
    0: "invalid",
    1: "None",
    2: "VNC authentication",
    5: "RA2",
    6: "RA2ne",
    16: "Tight",
    18: "TLS",
    19: "VeNCrypt",
    22: "XVP",
    30: "Apple Remote Desktop",
    113: "MSLogonII",
    129: "Unix Logon",
}


def vnc_auth_response(password: str | bytes, challenge: bytes) -> bytes:
    """
    The answer to a VNC authentication challenge (RFB security type 2).

    The key is the password's first 8 bytes (UTF-8, zero-padded) with the bits
    of each byte mirrored, as every VNC implementation does; the answer is the
    16-byte challenge encrypted with single DES in ECB mode.  Single DES is
    TripleDES with the key repeated three times (encrypt, decrypt, encrypt with
    one key is one encryption).
    """
    if len(challenge) != _CHALLENGE_BYTES:
        raise ValueError("a VNC challenge is 16 bytes")
    raw = password.encode("utf-8") if isinstance(password, str) else password
    key = raw[:8].ljust(8, b"\0")
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in key)
    # DES-ECB is what RFB's VNC authentication is; nothing else is encrypted with it.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(challenge) + encryptor.finalize()


def _security_name(number: int) -> str:
    return f"{number} ({_SECURITY_NAMES.get(number, 'unknown')})"


def _version_of(line: bytes) -> tuple[int, int] | None:
    match = _VERSION.fullmatch(line)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def _negotiated(major: int, minor: int) -> tuple[int, int] | None:
    """
    The version to speak with a peer that announced C{major.minor}.

    RFC 6143: 3.3, 3.7 and 3.8 exist; 3.4-3.6 mean 3.3; a newer version
    (Apple's 3.889, RealVNC's 4.x) is answered with 3.8.
    """
    if major < 3 or (major == 3 and minor < 3):
        return None
    if major == 3 and minor < 7:
        return (3, 3)
    if major == 3 and minor == 7:
        return (3, 7)
    return (3, 8)


def _version_line(version: tuple[int, int]) -> bytes:
    return b"RFB %03d.%03d\n" % version


class VncUpstream(Protocol):
    """
    The VM's VNC server, seen from consoleproxy: the RFB handshake as a client
    (up to and including the SecurityResult), then opaque bytes.

    @ivar ready: fires with this protocol once authenticated (reading
        paused), or fails with a L{GuacamoleError}.
    @ivar closed: fires (with None) once the connection is gone.
    @ivar lost_reason: why it went, once it has.
    @ivar version: the negotiated RFB version.
    @ivar security_type: the security type used.
    """

    def __init__(self, password: str | None) -> None:
        self._password = password
        self.ready: Deferred[VncUpstream] = Deferred()
        self.closed: Deferred[None] = Deferred()
        self.lost_reason: Failure | None = None
        self.version: tuple[int, int] | None = None
        self.security_type: int | None = None
        self._state = "version"
        self._buffer = bytearray()
        self._deliver: Callable[[bytes], None] | None = None
        self._lost: Callable[[Failure], None] | None = None

    # -- handshake -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Handshake bytes until authenticated, then the relay's."""
        if self._deliver is not None:
            self._deliver(data)
            return
        if self._state == "failed":
            return
        self._buffer += data
        if self._state == "done":
            return  # the server spoke before ClientInit: kept for the browser (reading paused)
        try:
            while self._state != "done" and self._step():
                pass
            if self._state != "done" and len(self._buffer) > _MAX_HANDSHAKE_BYTES:
                raise GuacamoleError(Status.UPSTREAM_ERROR, "the VNC server sent too much")
        except GuacamoleError as e:
            self._fail(e)

    def _take(self, count: int) -> bytes | None:
        if len(self._buffer) < count:
            return None
        taken = bytes(self._buffer[:count])
        del self._buffer[:count]
        return taken

    def _peek_reason(self) -> str | None:
        """A length-prefixed reason string, or None until it has arrived."""
        if len(self._buffer) < 4:
            return None
        (length,) = struct.unpack("!I", self._buffer[:4])
        if length > MAX_REASON_BYTES:
            return "(a reason longer than consoleproxy reads)"
        if len(self._buffer) < 4 + length:
            return None
        text = bytes(self._buffer[4 : 4 + length]).decode("utf-8", "replace")
        del self._buffer[: 4 + length]
        return "".join(c if c.isprintable() else "?" for c in text)[:200]

    def _step(self) -> bool:
        """Advance the handshake by one step; False when more bytes are needed."""
        if self._state in ("refused", "auth-failed"):
            return self._read_reason()
        step = {
            "version": self._read_version,
            "type": self._read_type,
            "types": self._read_types,
            "challenge": self._read_challenge,
            "result": self._read_result,
        }[self._state]
        return step()

    def _read_version(self) -> bool:
        line = self._take(_VERSION_BYTES)
        if line is None:
            return False
        announced = _version_of(line)
        if announced is None:
            raise GuacamoleError(Status.UPSTREAM_ERROR, "the VNC server does not speak RFB")
        version = _negotiated(*announced)
        if version is None:
            raise GuacamoleError(
                Status.UPSTREAM_ERROR, f"unsupported RFB version {announced[0]}.{announced[1]}"
            )
        self.version = version
        self._write(_version_line(version))
        self._state = "types" if version >= (3, 7) else "type"
        return True

    def _read_type(self) -> bool:
        """RFB 3.3: the server decides the security type."""
        raw = self._take(4)
        if raw is None:
            return False
        (chosen,) = struct.unpack("!I", raw)
        if chosen == SECURITY_INVALID:
            self._state = "refused"
        else:
            self._use(chosen)
        return True

    def _read_types(self) -> bool:
        """RFB 3.7 and 3.8: the server offers, consoleproxy chooses."""
        if not self._buffer:
            return False
        count = self._buffer[0]
        if count == 0:
            del self._buffer[:1]
            self._state = "refused"
            return True
        raw = self._take(1 + count)
        if raw is None:
            return False
        offered = list(raw[1:])
        if SECURITY_NONE in offered:
            chosen = SECURITY_NONE
        elif SECURITY_VNC_AUTH in offered:
            chosen = SECURITY_VNC_AUTH
        else:
            names = ", ".join(_security_name(n) for n in offered)
            raise GuacamoleError(
                Status.UPSTREAM_ERROR,
                f"the VNC server offers no security type consoleproxy supports ({names})",
            )
        self._write(bytes([chosen]))
        self._use(chosen)
        return True

    def _read_challenge(self) -> bool:
        challenge = self._take(_CHALLENGE_BYTES)
        if challenge is None:
            return False
        assert self._password is not None
        self._write(vnc_auth_response(self._password, challenge))
        self._state = "result"
        return True

    def _read_result(self) -> bool:
        raw = self._take(4)
        if raw is None:
            return False
        (result,) = struct.unpack("!I", raw)
        if result == 0:
            self._authenticated()
        elif self.version == (3, 8):
            self._state = "auth-failed"
        else:
            raise GuacamoleError(Status.UPSTREAM_ERROR, "the VNC server refused the authentication")
        return True

    def _read_reason(self) -> bool:
        reason = self._peek_reason()
        if reason is None:
            return False
        if self._state == "refused":
            what = "refused the connection"
        else:
            what = "refused the authentication"
        raise GuacamoleError(Status.UPSTREAM_ERROR, f"the VNC server {what}: {reason}")

    def _use(self, chosen: int) -> None:
        self.security_type = chosen
        if chosen == SECURITY_NONE:
            # 3.8 sends a SecurityResult for None too; 3.3 and 3.7 do not.
            if self.version == (3, 8):
                self._state = "result"
            else:
                self._authenticated()
        elif chosen == SECURITY_VNC_AUTH:
            if not self._password:
                raise GuacamoleError(
                    Status.UPSTREAM_ERROR,
                    "the VNC server asks for a password and the console has none",
                )
            self._state = "challenge"
        else:
            raise GuacamoleError(
                Status.UPSTREAM_ERROR,
                f"the VNC server demands security type {_security_name(chosen)}, "
                "which consoleproxy does not support",
            )

    def _authenticated(self) -> None:
        self._state = "done"
        if self.transport is not None:
            self.transport.pauseProducing()
        if not self.ready.called:
            self.ready.callback(self)

    def _fail(self, error: GuacamoleError) -> None:
        self._state = "failed"
        if self.transport is not None:
            self.transport.abortConnection()
        if not self.ready.called:
            self.ready.errback(Failure(error))

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    # -- relaying ------------------------------------------------------------------

    def attach(self, deliver: Callable[[bytes], None], lost: Callable[[Failure], None]) -> None:
        """Hand every byte from now on (and any kept) to C{deliver}; resume reading."""
        self._deliver, self._lost = deliver, lost
        kept, self._buffer = bytes(self._buffer), bytearray()
        if kept:
            deliver(kept)
        if self.transport is not None:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fail the handshake, or tell the relay."""
        self.lost_reason = reason
        if not self.ready.called:
            state = self._state
            self._state = "failed"
            self.ready.errback(
                Failure(
                    GuacamoleError(
                        Status.UPSTREAM_ERROR,
                        f"the VNC server closed the connection during the handshake ({state})",
                    )
                )
            )
        lost, self._lost = self._lost, None
        if lost is not None:
            lost(reason)
        if not self.closed.called:
            self.closed.callback(None)


def connect_vnc(
    endpoint: IStreamClientEndpoint,
    password: str | None,
    clock: IReactorTime,
    timeout: float = 15.0,
) -> Deferred[VncUpstream]:
    """
    Connect to a VNC server and authenticate within C{timeout} seconds.

    Fires with the protocol, reading paused, once the SecurityResult said OK.
    Fails with a L{GuacamoleError}: L{Status.UPSTREAM_NOT_FOUND} when the
    server cannot be reached, L{Status.UPSTREAM_TIMEOUT} on timeout,
    L{Status.UPSTREAM_ERROR} for a refusal or a protocol error.  Cancelling
    the result closes whatever was opened.
    """
    protocol = VncUpstream(password)
    timer: list[IDelayedCall] = []

    def cancel(_: Deferred[VncUpstream]) -> None:
        connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    result: Deferred[VncUpstream] = Deferred(cancel)

    def finish(outcome: VncUpstream | Failure) -> None:
        if timer and timer[0].active():
            timer[0].cancel()
        if result.called:
            return
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    def unreachable(failure: Failure) -> Failure:
        if failure.check(GuacamoleError, CancelledError):
            return failure
        return Failure(
            GuacamoleError(
                Status.UPSTREAM_NOT_FOUND,
                f"cannot connect to the VNC server: {failure.getErrorMessage()}",
            )
        )

    def timed_out() -> None:
        finish(
            Failure(
                GuacamoleError(
                    Status.UPSTREAM_TIMEOUT,
                    f"the VNC server did not complete the handshake within {timeout:g} s",
                )
            )
        )
        connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    connecting = endpoint.connect(SingleProtocolFactory(protocol))
    connecting.addCallback(lambda _: protocol.ready)
    connecting.addErrback(unreachable)
    connecting.addBoth(finish)
    if not result.called:
        timer.append(clock.callLater(timeout, timed_out))
    return result


def vnc_endpoint(
    reactor: Any, parameters: Mapping[str, str], timeout: float = 10.0
) -> IStreamClientEndpoint:
    """
    A TCP client endpoint to C{hostname}:C{port} of a route's parameters.

    @raise GuacamoleError: when they hold no usable host and port.
    """
    host = parameters.get("hostname", "")
    try:
        port = int(parameters.get("port", "5900"))
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise GuacamoleError(Status.SERVER_ERROR, "the console has no usable hostname/port")
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


@dataclass(frozen=True)
class RfbSettings:
    """
    How the raw VNC relay reaches VNC servers and how long it waits.

    @ivar reactor: makes the TCP connections.
    @ivar tunnels: decides direct or SSH per console (direct when None).
    @ivar handshake_timeout: seconds for the VNC server's handshake (the
        connection included), and again for the browser's.
    @ivar linger: seconds the VNC server gets to read what is left once the
        browser has gone.
    """

    reactor: Any
    tunnels: ITunnels | None = None
    handshake_timeout: float = 15.0
    linger: float = 5.0


class RfbRelayProtocol(RelaySession):
    """One raw VNC session: a browser's WebSocket and its VNC server."""

    subprotocol = SUBPROTOCOL
    upstream_name = "a VNC server"
    factory: RfbRelayFactory

    def __init__(self) -> None:
        super().__init__()
        self._upstream: VncUpstream | None = None
        self._phase = "connecting"  # version, security, relaying, closing
        self._browser_version: tuple[int, int] | None = None
        self._inbox = bytearray()
        self._greeting_timer: IDelayedCall | None = None
        #: Watches for user input when there is an idle timeout.
        self._input: RfbInputWatch | None = None

    # -- opening -------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Any:
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "subprotocol 'binary' required")
        try:
            self._admit(request)
            checked = self._checked(
                self.factory.tokens.open(token_value(request.params)), _vnc_console
            )
        except TokenError as e:
            self.factory.refused_token(e.reason)
            return self._refuse(Status.CLIENT_UNAUTHORIZED, f"token refused ({e.reason})")
        except GuacamoleError as e:
            return self._refuse(e.status, str(e))
        self.transport.pauseProducing()
        self._pending = True
        if isinstance(checked, Deferred):  # the cluster's answer (Redis)
            routing = checked.addCallback(self.factory.tunnels.route)
        else:
            routing = self.factory.tunnels.route(checked)
        return routing.addCallback(self._routed).addCallbacks(
            self._upstream_ready, self._setup_failed
        )

    def _routed(self, route: Route) -> Deferred[VncUpstream]:
        """The way to the VNC server is known (maybe a tunnel): connect."""
        claims = self._take_route(route)
        settings = self.factory.settings
        endpoint = vnc_endpoint(settings.reactor, route.parameters, settings.handshake_timeout)
        self._connecting = connect_vnc(
            endpoint,
            claims.console.parameters.get("password") or None,
            self.factory.clock,
            settings.handshake_timeout,
        )
        return self._connecting

    def _upstream_ready(self, upstream: VncUpstream) -> str:
        self._connecting = None
        self._pending = False
        self._upstream = upstream
        return SUBPROTOCOL

    def onOpen(self) -> None:
        if self._closed_if_refused("Raw VNC console"):
            return
        upstream, claims = self._upstream, self._claims
        assert upstream is not None and claims is not None
        self._mark_open()
        self._log.info(
            "Raw VNC console opened: user={user} vm={vm} rfb={major}.{minor} "
            "security={security} peer={peer}",
            user=claims.user,
            vm=claims.console.vm_id,
            major=upstream.version[0] if upstream.version else 0,
            minor=upstream.version[1] if upstream.version else 0,
            security=_security_name(upstream.security_type or 0),
            peer=self._peer,
        )
        # Watch the VNC server while the browser does its part of the handshake.
        upstream.closed.addCallback(self._upstream_gone_early)
        self._phase = "version"
        self._greeting_timer = self.factory.clock.callLater(
            self.factory.settings.handshake_timeout, self._greeting_timed_out
        )
        self._send(_version_line((3, 8)))

    # -- the browser's RFB handshake (consoleproxy plays the server) ----------------

    def _greet(self) -> None:
        """Advance the browser's handshake with what is in the inbox."""
        if self._phase == "version":
            if len(self._inbox) < _VERSION_BYTES:
                return
            announced = _version_of(bytes(self._inbox[:_VERSION_BYTES]))
            del self._inbox[:_VERSION_BYTES]
            version = None if announced is None else _negotiated(*announced)
            if version is None:
                self._end(Status.CLIENT_BAD_REQUEST, "browser sent no RFB 3.x version")
                return
            self._browser_version = version
            if version == (3, 3):
                self._send(struct.pack("!I", SECURITY_NONE))
                self._start_relaying()
                return
            self._send(bytes([1, SECURITY_NONE]))
            self._phase = "security"
        if self._phase == "security":
            if not self._inbox:
                return
            chosen = self._inbox[0]
            del self._inbox[:1]
            if chosen != SECURITY_NONE:
                self._end(Status.CLIENT_BAD_REQUEST, f"browser chose security type {chosen}")
                return
            if self._browser_version == (3, 8):
                self._send(struct.pack("!I", 0))
            self._start_relaying()

    def _greeting_timed_out(self) -> None:
        self._greeting_timer = None
        if self._phase in ("version", "security"):
            self._end(Status.CLIENT_TIMEOUT, "browser did not complete the RFB handshake")

    def _start_relaying(self) -> None:
        upstream = self._upstream
        assert upstream is not None
        self._phase = "relaying"
        if self._greeting_timer is not None and self._greeting_timer.active():
            self._greeting_timer.cancel()
        self._greeting_timer = None
        if upstream.transport is None or upstream.closed.called:
            return  # already gone: _upstream_gone_early closes the browser
        leftover, self._inbox = bytes(self._inbox), bytearray()
        if self.factory.policy.idle_timeout > 0:
            self._input = RfbInputWatch()
        if leftover:
            self._from_browser(leftover)
        upstream.attach(self._send, self._upstream_lost)
        self._couple(upstream.transport)

    # -- relaying ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Send bytes to the browser as binary messages within the size limit."""
        if self.state != self.STATE_OPEN or self._close_status is not None:
            return
        self.bytes_to_browser += len(data)
        for start in range(0, len(data), MAX_OUTGOING_MESSAGE):
            self._send_message(data[start : start + MAX_OUTGOING_MESSAGE], True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._upstream is None or self._close_status is not None:
            return
        self.bytes_from_browser += len(payload)
        if not isBinary:
            self._end(Status.CLIENT_BAD_TYPE, "browser sent a text message")
            return
        if self._phase == "relaying":
            self._from_browser(payload)
            return
        self._inbox += payload
        if len(self._inbox) > 64:
            self._end(Status.CLIENT_BAD_REQUEST, "browser sent too much during the handshake")
            return
        self._greet()

    def _from_browser(self, data: bytes) -> None:
        """Relay the browser's RFB bytes, noting user input for the idle timeout."""
        if self._input is not None and self._input.feed(data):
            self._touch()
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            write_now(upstream.transport, (data,))

    # -- closing -------------------------------------------------------------------

    def _upstream_gone_early(self, _: None) -> None:
        upstream = self._upstream
        if self._phase != "relaying" and upstream is not None:
            self._upstream_lost(upstream.lost_reason or Failure(ConnectionDone()))

    def _upstream_lost(self, reason: Failure) -> None:
        """The VNC server's side is gone: close the browser's."""
        if reason.check(ConnectionDone):
            status, message = Status.SUCCESS, "VNC server closed the connection"
        else:
            status, message = Status.UPSTREAM_ERROR, f"VNC connection lost: {reason.value}"
        if self._close_status is None:
            self._close_status = (status, message)
        self._close(status)

    def _drop_upstream(self) -> None:
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None and not upstream.closed.called:
            self._linger_close(upstream.transport, upstream.closed)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._greeting_timer is not None and self._greeting_timer.active():
            self._greeting_timer.cancel()
        self._greeting_timer = None
        self._phase = "closing"
        self._finish(wasClean, code, "Raw VNC console", "rfb")


class RfbRelayFactory(RelayFactory):
    """Builds raw VNC sessions; holds what they share."""

    protocol = RfbRelayProtocol
    relay_name = "rfb"

    def __init__(
        self,
        tokens: TokenAuthority,
        settings: RfbSettings,
        clock: IReactorTime,
        max_message_size: int = 65536,
        policy: RelayPolicy | None = None,
    ) -> None:
        super().__init__(
            tokens,
            clock,
            handshake_timeout=settings.handshake_timeout,
            linger=settings.linger,
            max_message_size=max_message_size,
            tunnels=settings.tunnels,
            policy=policy,
        )
        self.settings = settings


def RfbRelayResource(factory: RfbRelayFactory) -> RelayResource:
    """The raw VNC relay in twisted.web (see L{RelayResource})."""
    return RelayResource(factory, SUBPROTOCOL)


def _vnc_console(claims: Claims) -> Console:
    """A raw VNC token's console, if it is one this relay serves."""
    console = claims.console
    if console.console_type != "vnc":
        raise GuacamoleError(Status.CLIENT_FORBIDDEN, "raw VNC tokens are for VNC only")
    if console.zone is not None:
        raise GuacamoleError(
            Status.CLIENT_FORBIDDEN, f"token is for zone {console.zone}, not this one"
        )
    return console
