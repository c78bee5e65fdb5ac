"""
The browser side of a console: a WebSocket speaking subprotocol ``guacamole``.

Life of a session (Apache's Java tunnel is the model):

 1. ``onConnect``: refuse a client that does not offer ``guacamole``; open
    and spend the token; read the display from the query; connect to guacd
    and complete its handshake, all before the WebSocket is accepted.  The
    browser's socket is paused meanwhile (Autobahn would otherwise parse a
    second handshake out of whatever else arrives).
 2. A refused token or a failed handshake still accepts the WebSocket, then
    closes it at once with the mapped close code and the decimal Guacamole
    status as the reason: guacamole-common-js reads the status from there,
    and a refused HTTP upgrade would show as "server unreachable".
 3. ``onOpen``: the tunnel UUID goes out first (``0.,36.<uuid>;``), then
    everything guacd sent after ``ready``.  Each guacd read becomes one text
    message of whole instructions.  Each browser message must hold whole
    instructions; the internal opcode is handled here (``ping`` echoed,
    the rest dropped) and never reaches guacd.
 4. Backpressure both ways: each side's transport is the other's streaming
    producer, so a browser that stops reading pauses reading from guacd and
    a guacd that stops reading pauses the browser.
 5. Whichever side closes first, the other follows at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from consoleproxy.consoles import Display
from consoleproxy.guacd import GuacdProtocol, HandshakeRequest, connect_guacd
from consoleproxy.instructions import INTERNAL_OPCODE, InstructionError, elements, encode, split
from consoleproxy.interfaces import ITunnels
from consoleproxy.routing import json_body
from consoleproxy.ssh import TunnelError
from consoleproxy.status import GuacamoleError, Status
from consoleproxy.tokens import Claims, TokenAuthority, TokenError
from consoleproxy.tunnels import DirectRoutes, Route

SUBPROTOCOL = "guacamole"
_INTERNAL_PREFIX = f"{len(INTERNAL_OPCODE)}.{INTERNAL_OPCODE}"

# Autobahn's own failures (protocol violations, size limits) carry text
# reasons; the browser needs the Guacamole status there.
_STATUS_OF_CLOSE_CODE = {
    1002: Status.CLIENT_BAD_REQUEST,
    1003: Status.CLIENT_BAD_TYPE,
    1007: Status.CLIENT_BAD_REQUEST,
    1008: Status.CLIENT_FORBIDDEN,
    1009: Status.CLIENT_OVERRUN,
    1011: Status.SERVER_ERROR,
}


@dataclass(frozen=True)
class RelaySettings:
    """How the relay reaches guacd and how long it waits."""

    guacd: IStreamClientEndpoint
    handshake_timeout: float = 15.0
    timezone: str = "UTC"
    #: How long guacd gets to read what is left once the browser has gone.
    linger: float = 5.0


class CancelTimersOnLoss:
    """
    Mixin for Autobahn protocols: cancel the close-handshake timers when the
    connection is gone.  Autobahn leaves them to fire on a closed protocol,
    which with one DelayedCall per timer (L{ClockTimer}) would keep every
    closed session referenced until then.
    """

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)  # type: ignore[misc]
        for name in ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall"):
            call = getattr(self, name, None)
            if call is not None:
                call.cancel()
                setattr(self, name, None)


class GuacamoleRelayProtocol(CancelTimersOnLoss, WebSocketServerProtocol):
    """One console session: a browser's WebSocket and its guacd connection."""

    factory: GuacamoleRelayFactory
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self._claims: Claims | None = None
        self._guacd: GuacdProtocol | None = None
        self._connecting: Deferred[GuacdProtocol] | None = None
        self._refusal: tuple[Status, str] | None = None
        self._close_status: tuple[Status, str] | None = None
        self._peer = "?"
        self._opened_at: float | None = None
        self._tunnel_id = ""
        self._dropping = False
        self._pending = False
        self._gone = False
        self._route: Route | None = None
        self.bytes_to_browser = 0
        self.bytes_from_browser = 0

    # -- opening -------------------------------------------------------------------

    def processHandshake(self) -> None:
        # Autobahn re-runs the handshake parser on every read while onConnect's
        # Deferred is pending; the transport is paused then, but be certain.
        if not self._pending and self._refusal is None:
            super().processHandshake()

    def onConnect(self, request: ConnectionRequest) -> Any:
        self._peer = request.peer
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "subprotocol 'guacamole' required")
        try:
            self._claims = self.factory.tokens.open(_single(request.params, "token"))
            display = Display.from_query(request.params, self._claims.console.console_type)
            if self._claims.console.zone is not None:
                raise GuacamoleError(
                    Status.CLIENT_FORBIDDEN,
                    f"token is for zone {self._claims.console.zone}, not this one",
                )
        except TokenError as e:
            self.factory.token_refusals[e.reason] = self.factory.token_refusals.get(e.reason, 0) + 1
            return self._refuse(Status.CLIENT_UNAUTHORIZED, f"token refused ({e.reason})")
        except GuacamoleError as e:
            return self._refuse(e.status, str(e))
        self.transport.pauseProducing()
        self._pending = True
        routing = self.factory.tunnels.route(self._claims.console)
        return routing.addCallback(self._routed, display).addCallbacks(
            self._guacd_ready, self._setup_failed
        )

    def _routed(self, route: Route, display: Display) -> Deferred[GuacdProtocol]:
        """The way to the console is known (maybe a tunnel): now guacd."""
        self._route = route
        if self._gone:
            route.close()
            raise CancelledError()
        route.on_lost = self._tunnel_lost
        claims = self._claims
        assert claims is not None
        handshake = HandshakeRequest(
            protocol=claims.console.console_type,
            parameters={**route.parameters, **display.parameters},
            width=display.width,
            height=display.height,
            dpi=display.dpi,
            timezone=self.factory.settings.timezone,
            name=claims.user,
        )
        self._connecting = connect_guacd(
            self.factory.settings.guacd,
            handshake,
            self.factory.clock,
            self.factory.settings.handshake_timeout,
        )
        return self._connecting

    def _refuse(self, status: Status, message: str) -> str:
        self._refusal = (status, message)
        return SUBPROTOCOL

    def _guacd_ready(self, guacd: GuacdProtocol) -> str:
        self._connecting = None
        self._guacd = guacd
        return SUBPROTOCOL

    def _setup_failed(self, failure: Failure) -> str | Failure:
        self._connecting = None
        if self._route is not None:
            self._route.close()
        if failure.check(CancelledError):
            # The browser left while guacd was connecting: nobody to answer.
            return Failure(ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "client gone"))
        if failure.check(GuacamoleError):
            return self._refuse(failure.value.status, str(failure.value))
        self._log.failure("Unexpected error while connecting to guacd", failure)
        return self._refuse(Status.SERVER_ERROR, "internal error")

    def onOpen(self) -> None:
        self.transport.resumeProducing()
        if self._refusal is not None:
            status, message = self._refusal
            self._log.info(
                "Console refused: peer={peer} status={status} ({why})",
                peer=self._peer,
                status=int(status),
                why=message,
            )
            self._close_status = self._refusal
            self._close(status)
            return
        guacd, claims = self._guacd, self._claims
        assert guacd is not None and claims is not None
        self._opened_at = self.factory.clock.seconds()
        self._tunnel_id = str(uuid.uuid4())
        self.factory.sessions.add(self)
        self._log.info(
            "Console opened: user={user} vm={vm} type={type} guacd={conn} peer={peer}",
            user=claims.user,
            vm=claims.console.vm_id,
            type=claims.console.console_type,
            conn=guacd.connection_id,
            peer=self._peer,
        )
        self._send(encode(INTERNAL_OPCODE, self._tunnel_id))
        guacd.attach(self._send, self._guacd_closed)
        if self._guacd is not None and guacd.transport is not None:
            # Each side's transport pauses the other: bounded memory per session.
            self.transport.registerProducer(guacd.transport, True)
            guacd.transport.registerProducer(self.transport, True)

    # -- relaying ------------------------------------------------------------------

    def _send(self, instructions: str) -> None:
        """Send whole instructions, in as few messages as the size limit allows."""
        if self.state != self.STATE_OPEN:
            return  # closing: guacd's side is being closed too
        payload = instructions.encode("utf-8")
        self.bytes_to_browser += len(payload)
        limit = self.factory.max_message_size
        if len(payload) <= limit:
            self.sendMessage(payload, isBinary=False)
            return
        # Rare (a read larger than the limit): cut at instruction boundaries.
        batch: list[bytes] = []
        size = 0
        for instruction in split(instructions):
            raw = instruction.encode("utf-8")
            if batch and size + len(raw) > limit:
                self.sendMessage(b"".join(batch), isBinary=False)
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)
        self.sendMessage(b"".join(batch), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        guacd = self._guacd
        if guacd is None or self._close_status is not None:
            return
        self.bytes_from_browser += len(payload)
        if isBinary:
            self._end(Status.CLIENT_BAD_TYPE, "browser sent a binary message")
            return
        try:
            # Autobahn has validated the UTF-8 already.
            instructions = split(payload.decode("utf-8"))
        except InstructionError as e:
            self._end(e.status, f"browser sent bad data: {e}")
            return
        forward = []
        for instruction in instructions:
            if instruction.startswith(_INTERNAL_PREFIX):
                parts = elements(instruction)
                if len(parts) > 1 and parts[1] == "ping":
                    self._send(instruction)
                continue
            forward.append(instruction)
        if forward:
            guacd.send("".join(forward))

    # -- closing -------------------------------------------------------------------

    def _guacd_closed(self, status: Status, message: str) -> None:
        """guacd's side is gone: close the browser's with guacd's status."""
        if self._close_status is None:
            self._close_status = (status, message)
        self._close(status)

    def _tunnel_lost(self, error: TunnelError) -> None:
        """The SSH tunnel broke under the console: end it with the tunnel's status."""
        self._log.warn("{why}", why=str(error))
        self._end(error.status, str(error))

    def _end(self, status: Status, message: str) -> None:
        """The browser misbehaved: close both sides."""
        if self._close_status is None:
            self._close_status = (status, message)
        self._close(status)
        self._drop_guacd()

    def _close(self, status: Status) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()
        if self.state == self.STATE_OPEN:
            # sendClose only allows 1000 and 3000-4999; Guacamole needs 1002-1011.
            self.sendCloseFrame(
                code=status.websocket_code, reasonUtf8=str(int(status)).encode(), isReply=False
            )

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        status = _STATUS_OF_CLOSE_CODE.get(code, Status.SUCCESS)
        if self._close_status is None:
            self._close_status = (status, reason)
        super()._fail_connection(code, str(int(status)))

    def _drop_guacd(self) -> None:
        guacd = self._guacd
        if guacd is None or guacd.transport is None or guacd.closed.called or self._dropping:
            return
        self._dropping = True
        transport = guacd.transport
        transport.unregisterProducer()
        transport.loseConnection()
        # A guacd that stops reading would keep the socket forever.
        linger = self.factory.clock.callLater(
            self.factory.settings.linger, transport.abortConnection
        )
        self.factory.lingering.add(linger)

        def gone(_: object) -> None:
            if linger.active():
                linger.cancel()
            self.factory.lingering.discard(linger)

        guacd.closed.addBoth(gone)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._gone = True
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        self._drop_guacd()
        if self._route is not None:
            self._route.close()
        if self._opened_at is None:
            return
        self.factory.sessions.discard(self)
        status, message = self._close_status or (
            Status.SUCCESS if wasClean else Status.CLIENT_TIMEOUT,
            f"browser closed (code {code})" if wasClean else "browser connection lost",
        )
        claims, guacd = self._claims, self._guacd
        assert claims is not None and guacd is not None
        self._log.info(
            "Console closed: user={user} vm={vm} type={type} guacd={conn} peer={peer} "
            "to_browser={down} from_browser={up} duration={duration:.1f}s "
            "status={status} ({why})",
            user=claims.user,
            vm=claims.console.vm_id,
            type=claims.console.console_type,
            conn=guacd.connection_id,
            peer=self._peer,
            down=self.bytes_to_browser,
            up=self.bytes_from_browser,
            duration=self.factory.clock.seconds() - self._opened_at,
            status=int(status),
            why=message,
        )


def _single(query: Mapping[str, list[str]], name: str) -> str:
    values = query.get(name) or []
    if len(values) != 1:
        raise TokenError("malformed")
    return values[0]


class ClockTimer:
    """
    Autobahn's timers on an injected clock, one DelayedCall each.

    Autobahn's default batches timers in buckets on the global reactor via
    txaio: a cancelled timer's bucket stays scheduled, and tests cannot
    drive it with a L{twisted.internet.task.Clock}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> _Call:
        """Schedule C{func}; the result's C{cancel} is safe to call at any time."""
        return _Call(self._clock.callLater(delay, func, *args, **kwargs))


class _Call:
    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()


class GuacamoleRelayFactory(WebSocketServerFactory):
    """
    Builds relay sessions; holds what they share.

    @ivar sessions: the open sessions (for drain and metrics).
    @ivar token_refusals: refusals counted by reason.
    """

    protocol = GuacamoleRelayProtocol

    def __init__(
        self,
        tokens: TokenAuthority,
        settings: RelaySettings,
        clock: IReactorTime,
        max_message_size: int = 65536,
        tunnels: ITunnels | None = None,
    ) -> None:
        super().__init__(server="consoleproxy", reactor=clock)
        self.tokens = tokens
        self.tunnels: ITunnels = tunnels if tunnels is not None else DirectRoutes()
        self.settings = settings
        self.clock = clock
        self.sessions: set[GuacamoleRelayProtocol] = set()
        self.lingering: set[Any] = set()
        self.token_refusals: dict[str, int] = {}
        self._batched_timer = ClockTimer(clock)
        self.max_message_size = max_message_size
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            # guacd's handshake may take its full timeout before we answer.
            openHandshakeTimeout=settings.handshake_timeout + 5,
            closeHandshakeTimeout=2,
            failByDrop=False,
        )


class RelayResource(WebSocketResource):
    """
    Mounts the relay in twisted.web, handing the connection over cleanly.

    twisted.web's channel stays registered as the transport's producer after
    Autobahn takes the transport: it is unregistered here so the relay can
    register its own.  (The channel's idle timeout is already off while a
    request is in progress, and this request never finishes.)  A plain GET
    gets a JSON 426 instead of Autobahn's page.
    """

    def render(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setHeader(b"Upgrade", b"websocket")
            return json_body(
                request, 426, "Upgrade Required", "a WebSocket endpoint (subprotocol guacamole)"
            )
        channel = request.channel
        transport = channel.transport
        if transport is None:
            return super().render(request)
        transport.unregisterProducer()
        result = super().render(request)
        return NOT_DONE_YET if result is NOT_DONE_YET else result
