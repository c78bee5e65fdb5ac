"""
The guacd side of a console: connect, handshake, then a pipe of instructions.

Handshake (consoleproxy is the client)::

    -> select,<protocol>
    <- args,VERSION_x_y_z,<name>,...        (no VERSION element before 1.1.0)
    -> size,<w>,<h>,<dpi>  audio,...  video,...  image,...
    -> timezone,<IANA>     (1.1.0 and later)
    -> name,<user>         (1.5.0 and later)
    -> connect,<version>,<one value per name, in order>
    <- ready,$<connection id>

We answer with guacd's version, capped at the newest we speak (1.5.0), and
send exactly one ``connect`` value per ``args`` name: guacd closes the
connection when the count is off.  After ``ready`` the protocol does not
interpret guacd's output beyond finding instruction boundaries and noticing
``error`` and ``disconnect``: guacd drops the user then but leaves the socket
open, so the connection is closed here, and the error's status decides how
the browser's side closes.

Two closes are given their real meaning here:

  - guacd 1.6 often ends with a bare ``disconnect`` (no ``error``) when it
    cannot reach the console's VM.  A bare ``disconnect`` before guacd sent
    any ``sync`` (no frame was ever drawn, so the console never came up) is
    read as UPSTREAM_NOT_FOUND: an ``error`` with that status goes to the
    browser just before the ``disconnect``, and the session closes with it.
  - guacd itself unreachable is UPSTREAM_NOT_FOUND too (as Apache's
    guacamole-common reports it), not an internal error.

And when the browser leaves, L{GuacdProtocol.disconnect} tells guacd before
the socket closes: guacd 1.6 notices a closed socket only when it next
writes, which for an idle console is its 15 s user timeout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoleproxy.guacamole.instructions import (
    InstructionError,
    InstructionStream,
    elements,
    encode,
)
from consoleproxy.guacamole.status import GuacamoleError, Status
from consoleproxy.net.factories import SingleProtocolFactory
from consoleproxy.net.fastwrite import write_now

#: The newest protocol version this client speaks.
SUPPORTED_VERSION = (1, 5, 0)
_ERROR_PREFIX = "5.error,"
_DISCONNECT_PREFIX = "10.disconnect"
_SYNC_PREFIX = "4.sync,"
#: Why a bare ``disconnect`` before any frame ends a session (see the module docstring).
UNREACHABLE_CONSOLE = (
    "guacd disconnected before the console showed anything: the VM's console could not be reached"
)


def _version_tuple(element: str) -> tuple[int, int, int] | None:
    """``VERSION_1_5_0`` -> (1, 5, 0); anything else -> None."""
    if not element.startswith("VERSION_"):
        return None
    parts = element[len("VERSION_") :].split("_")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    major, minor, patch = (int(p) for p in parts)
    return major, minor, patch


def default_timezone() -> str:
    """
    The host's IANA time zone name, for guacd's ``timezone``.

    From ``TZ``, ``/etc/timezone`` or the ``/etc/localtime`` link; else UTC.
    """
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and "/" in tz and not tz.startswith("/"):
        return tz
    try:
        name = Path("/etc/timezone").read_text().strip()
        if name:
            return name
    except OSError:
        pass
    try:
        target = os.readlink("/etc/localtime")
        marker = "zoneinfo/"
        if marker in target:
            return target.split(marker, 1)[1]
    except OSError:
        pass
    return "UTC"


@dataclass(frozen=True)
class HandshakeRequest:
    """
    Everything the handshake sends.

    @ivar protocol: guacd protocol (``vnc``, ``ssh``, ``rdp``), or
        ``$<connection id>`` to join a running connection.
    @ivar parameters: ``connect`` values by argument name; names guacd does
        not ask for are not sent, names it asks for and we lack go empty.
    """

    protocol: str
    parameters: Mapping[str, str] = field(repr=False)
    width: int = 1024
    height: int = 768
    dpi: int = 96
    audio: tuple[str, ...] = ("audio/L8", "audio/L16")
    video: tuple[str, ...] = ()
    image: tuple[str, ...] = ("image/jpeg", "image/png", "image/webp")
    timezone: str = "UTC"
    name: str | None = None


class GuacdProtocol(Protocol):
    """
    One connection to guacd.

    Until ``ready``, it runs the handshake and fires (or fails) L{ready}.
    Then it buffers what guacd sends, with reading paused, until L{attach}
    names where whole instructions go; from then on each read becomes one
    batch of whole instructions.
    """

    log = Logger()

    def __init__(self, request: HandshakeRequest) -> None:
        self.request = request
        self.ready: Deferred[str] = Deferred()
        #: Fires with None once the TCP connection is gone.
        self.closed: Deferred[None] = Deferred()
        self.connection_id: str | None = None
        self.version: tuple[int, int, int] | None = None
        self.bytes_from_guacd = 0
        self.bytes_to_guacd = 0
        self._stream = InstructionStream()
        self._handshaking = True
        self._held: list[str] = []
        self._sink: Callable[[str], None] | None = None
        self._on_close: Callable[[Status, str], None] | None = None
        self._error: tuple[Status, str] | None = None
        self._closing_reason: tuple[Status, str] | None = None
        #: guacd sent a ``sync``: a frame was drawn, the console came up.
        self.drew = False
        self._ended = False

    # -- handshake -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self._send(encode("select", self.request.protocol))

    def _on_args(self, names: list[str]) -> None:
        offered = _version_tuple(names[0]) if names else None
        r = self.request
        if offered is not None:
            version = min(offered, SUPPORTED_VERSION)
            names = names[1:]
        else:
            version = (1, 0, 0)
        self.version = version
        out = [
            encode("size", str(r.width), str(r.height), str(r.dpi)),
            encode("audio", *r.audio),
            encode("video", *r.video),
            encode("image", *r.image),
        ]
        if version >= (1, 1, 0):
            out.append(encode("timezone", r.timezone))
        if version >= (1, 5, 0) and r.name:
            out.append(encode("name", r.name))
        values = [r.parameters.get(name, "") for name in names]
        if offered is not None:
            values.insert(0, "VERSION_{}_{}_{}".format(*version))
        out.append(encode("connect", *values))
        self._send("".join(out))

    def _handshake_instruction(self, instruction: str) -> None:
        parts = elements(instruction)
        op = parts[0]
        if op == "error":
            message = parts[1] if len(parts) > 1 else ""
            status = Status.parse(parts[2]) if len(parts) > 2 else Status.SERVER_ERROR
            raise GuacamoleError(status, f"guacd refused the connection: {message}")
        if op == "args" and self.version is None:
            self._on_args(parts[1:])
        elif op == "ready" and self.version is not None:
            self.connection_id = parts[1] if len(parts) > 1 else ""
            self._handshaking = False
            # Hold what follows 'ready' until the browser's side is open.
            self.transport.pauseProducing()
            self.ready.callback(self.connection_id)
        else:
            raise GuacamoleError(Status.UPSTREAM_ERROR, f"guacd sent {op!r} during the handshake")

    # -- relay ---------------------------------------------------------------------

    def attach(self, sink: Callable[[str], None], on_close: Callable[[Status, str], None]) -> None:
        """
        Start delivering: C{sink} gets each batch of whole instructions,
        C{on_close} the status and a message once guacd's side is gone.
        """
        self._sink = sink
        self._on_close = on_close
        held, self._held = self._held, []
        if held:
            sink("".join(held))
        if self._closing_reason is not None:
            on_close(*self._closing_reason)
        elif self.transport is not None:
            self.transport.resumeProducing()

    def send(self, data: str) -> None:
        """Send whole instructions to guacd."""
        self._send(data)

    def disconnect(self) -> None:
        """
        The user leaves: send ``disconnect`` (once, and only to a guacd that
        still has the user), so that guacd ends the connection now rather
        than when it next writes to a closed socket.
        """
        if self._ended or self._handshaking or self.transport is None or self.closed.called:
            return
        self._ended = True
        self._send(encode("disconnect"))

    def _send(self, data: str) -> None:
        raw = data.encode("utf-8")
        self.bytes_to_guacd += len(raw)
        write_now(self.transport, (raw,))

    def dataReceived(self, data: bytes) -> None:
        self.bytes_from_guacd += len(data)
        try:
            instructions = self._stream.feed(data)
            if self._handshaking:
                for index, instruction in enumerate(instructions):
                    if not self._handshaking:
                        self._deliver(instructions[index:])
                        return
                    self._handshake_instruction(instruction)
                return
        except (InstructionError, GuacamoleError) as e:
            self._fail(e)
            return
        self._deliver(instructions)

    def _deliver(self, instructions: list[str]) -> None:
        if not instructions:
            return
        ended = False
        for index, instruction in enumerate(instructions):
            if instruction.startswith(_ERROR_PREFIX):
                parts = elements(instruction)
                status = Status.parse(parts[2]) if len(parts) > 2 else Status.SERVER_ERROR
                if self._error is None:
                    self._error = (status, parts[1] if len(parts) > 1 else "")
                ended = True
            elif instruction.startswith(_DISCONNECT_PREFIX):
                if self._error is None and not self.drew:
                    self._error = (Status.UPSTREAM_NOT_FOUND, UNREACHABLE_CONSOLE)
                    error = encode(
                        "error", UNREACHABLE_CONSOLE, str(int(Status.UPSTREAM_NOT_FOUND))
                    )
                    instructions = [*instructions[:index], error, *instructions[index:]]
                ended = True
                break
            elif not self.drew and instruction.startswith(_SYNC_PREFIX):
                self.drew = True
        if ended:
            self._ended = True
        if self._sink is None:
            self._held.extend(instructions)
        else:
            self._sink("".join(instructions))
        if ended and self.transport is not None:
            # guacd drops the user after 'error' or 'disconnect' but keeps the
            # socket open until the client writes or closes: close it here.
            self.transport.loseConnection()

    def _fail(self, error: Exception) -> None:
        """A protocol violation: end the handshake or the session."""
        if isinstance(error, InstructionError):
            error = GuacamoleError(Status.UPSTREAM_ERROR, f"guacd sent bad data: {error}")
        assert isinstance(error, GuacamoleError)
        self._closing_reason = (error.status, str(error))
        if self._handshaking and not self.ready.called:
            self.ready.errback(error)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.closed.callback(None)
        if self._handshaking:
            if not self.ready.called:
                if reason.check(SSL.Error, VerificationError):
                    error = GuacamoleError(
                        Status.SERVER_ERROR, f"TLS with guacd failed: {reason.getErrorMessage()}"
                    )
                else:
                    error = GuacamoleError(
                        Status.UPSTREAM_ERROR, "guacd closed the connection during the handshake"
                    )
                self.ready.errback(error)
            return
        if self._closing_reason is None:
            if self._error is not None:
                self._closing_reason = (self._error[0], f"guacd: {self._error[1]}")
            elif reason.check(ConnectionDone):
                self._closing_reason = (Status.SUCCESS, "guacd closed the connection")
            else:
                self._closing_reason = (
                    Status.UPSTREAM_ERROR,
                    f"guacd connection lost: {reason.getErrorMessage()}",
                )
        if self._on_close is not None:
            self._on_close(*self._closing_reason)


def connect_guacd(
    endpoint: IStreamClientEndpoint,
    request: HandshakeRequest,
    clock: IReactorTime,
    timeout: float = 15.0,
) -> Deferred[GuacdProtocol]:
    """
    Connect to guacd and complete the handshake within C{timeout} seconds.

    Fires with the protocol, reading paused, once guacd said ``ready``.
    Fails with a L{GuacamoleError}: guacd's own status when it sent an
    ``error``, L{Status.UPSTREAM_TIMEOUT} on timeout,
    L{Status.UPSTREAM_NOT_FOUND} when guacd cannot be reached (as Apache's
    guacamole-common reports it).  Cancelling the result closes whatever was
    opened.
    """
    protocol = GuacdProtocol(request)
    state: dict[str, object] = {"phase": "connecting"}
    timer: list[IDelayedCall] = []

    def cancel(_: Deferred[GuacdProtocol]) -> None:
        connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    result: Deferred[GuacdProtocol] = Deferred(cancel)

    def finish(outcome: GuacdProtocol | Failure) -> None:
        if timer and timer[0].active():
            timer[0].cancel()
        if not result.called:
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

    def connected(_: Protocol) -> Deferred[str]:
        state["phase"] = "handshake"
        return protocol.ready

    def unreachable(failure: Failure) -> Failure:
        if state["phase"] == "connecting" and not failure.check(GuacamoleError, CancelledError):
            return Failure(
                GuacamoleError(
                    Status.UPSTREAM_NOT_FOUND,
                    f"cannot connect to guacd: {failure.getErrorMessage()}",
                )
            )
        return failure

    def timed_out() -> None:
        error = GuacamoleError(
            Status.UPSTREAM_TIMEOUT,
            f"guacd did not complete the handshake within {timeout:g} s ({state['phase']})",
        )
        finish(Failure(error))
        connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    connecting = endpoint.connect(SingleProtocolFactory(protocol))
    connecting.addCallback(connected)
    connecting.addErrback(unreachable)
    connecting.addCallbacks(lambda _: finish(protocol), finish)
    if not result.called:
        timer.append(clock.callLater(timeout, timed_out))
    return result
