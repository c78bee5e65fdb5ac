"""
What the two browser-facing relays share: the Guacamole relay (relay.py)
and the raw VNC relay (rfb.py).

  - A session is set up before the WebSocket is accepted; a refusal still
    accepts it, then closes it at once with the WebSocket code of a Guacamole
    status and the decimal status as the reason (guacamole-common-js and the
    console page read the status there).
  - Autobahn's own failures (protocol violations, size limits) get the same
    numeric reasons.
  - When the browser leaves, the upstream socket gets a short grace to read
    what is left, then is aborted: a peer that stops reading keeps nothing.
  - Autobahn's timers run on the injected clock, one DelayedCall each, and
    the close-handshake timers are cancelled with the connection.
  - twisted.web hands the connection over cleanly (L{RelayResource}).
  - The operator's policy (L{RelayPolicy}) applies to both: the Origin
    allow-list, the real client address behind a trusted frontend, the
    session caps and drain (L{SessionTable}), idle and absolute timeouts,
    WebSocket pings, and the observers (metrics, audit log) told of every
    session.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.task import LoopingCall
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from consoleproxy.cluster.leases import Lease
from consoleproxy.cluster.ratelimit import ClusterRateLimiter
from consoleproxy.cluster.redis_client import RedisUnavailable
from consoleproxy.guacamole.status import GuacamoleError, Status
from consoleproxy.interfaces import ITunnels
from consoleproxy.net.clients import Client, ClientAddresses, in_networks
from consoleproxy.net.fastwrite import write_now
from consoleproxy.net.logsafe import log_safe
from consoleproxy.net.ratelimit import LineThrottle, RateLimiter, retry_after
from consoleproxy.net.routing import client_of, json_body
from consoleproxy.relay.cluster_sessions import ClusterSessions
from consoleproxy.relay.origins import OriginPolicy
from consoleproxy.relay.session_events import SessionEvents, SessionRecord
from consoleproxy.relay.sessions import SessionTable
from consoleproxy.tokens import Claims, TokenAuthority, TokenError
from consoleproxy.tunnels.routes import DirectRoutes, Route

# Autobahn's own failures carry text reasons; the browser needs the status.
_T = TypeVar("_T")
_log = Logger()
#: The token refusal reason (metrics, audit) when Redis cannot say whether a
#: token was used: the session is refused with SERVER_ERROR (512, close 1011).
CLUSTER_UNAVAILABLE = "cluster-unavailable"

_STATUS_OF_CLOSE_CODE = {
    1002: Status.CLIENT_BAD_REQUEST,
    1003: Status.CLIENT_BAD_TYPE,
    1007: Status.CLIENT_BAD_REQUEST,
    1008: Status.CLIENT_FORBIDDEN,
    1009: Status.CLIENT_OVERRUN,
    1011: Status.SERVER_ERROR,
}


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


#: Most frames one message may come in.  Browsers never fragment what they
#: send; without a cap, empty continuation frames pile up without limit
#: (Autobahn's message size limit counts bytes, and they have none).
MAX_FRAGMENTS = 1024

#: Bytes read from a socket at once, and buffered for it before its peer is
#: paused (Twisted's default is 64 KiB): fewer, larger reads and messages.
RELAY_BUFFER = 256 * 1024
#: Largest message sent to a browser: one read plus an unfinished instruction
#: is far less.  (The browser's own messages are capped by max_message_size.)
MAX_OUTGOING_MESSAGE = 1 << 20

#: Seconds between reports of bytes relayed by open sessions (live counters).
BYTES_REPORT_INTERVAL = 10.0

#: Seconds a browser may keep its outgoing buffer over L{RELAY_BUFFER}
#: (reading nothing) before its session is closed with CLIENT_TIMEOUT.
#: guacd's own patience with a silent user is 15 s; a browser that has not
#: taken a quarter MiB in twice that is gone, or too slow to be a console.
STALL_TIMEOUT = 30.0


@implementer(IPushProducer)
class _Valve:
    """
    A transport's producer that only reports: its outgoing buffer went over
    the limit (C{pauseProducing}) or drained (C{resumeProducing}).
    """

    def __init__(self, changed: Callable[[bool], None]) -> None:
        self._changed = changed

    def pauseProducing(self) -> None:
        self._changed(True)

    def resumeProducing(self) -> None:
        self._changed(False)

    def stopProducing(self) -> None:
        """The transport is gone: nothing to stop here."""


class FlowControl:
    """
    One session's backpressure, both ways, whoever writes.

    Each side's transport reports its own outgoing buffer through a
    L{_Valve}.  Reading from the upstream stops while the browser's buffer
    is over the limit; reading from the browser stops while either buffer
    is: the browser's input produces writes both ways (relayed to the
    upstream, or answered here: Guacamole ``ping`` echoes, WebSocket
    pongs), so a browser that sends without reading is paused like an
    upstream that floods.  Twisted reports a drained buffer only once it is
    empty, so each side holds at most the limit plus what one read turns
    into.

    @ivar browser_full: the browser's outgoing buffer is over the limit.
    """

    def __init__(self, browser: Any, stalled: Callable[[], None], clock: IReactorTime) -> None:
        self._browser = browser
        self._upstream: Any = None
        self._stalled = stalled
        self._clock = clock
        self._stall: IDelayedCall | None = None
        self.stall_timeout = 0.0
        self.browser_full = False
        self._upstream_full = False
        self._reading = True
        self._released = False
        self.drained: Callable[[], None] | None = None
        browser.registerProducer(_Valve(self._browser_changed), True)

    def couple(self, upstream: Any) -> None:
        """The upstream's transport is open: pair its reading and its buffer with ours."""
        self._upstream = upstream
        upstream.registerProducer(_Valve(self._upstream_changed), True)
        if self.browser_full:
            upstream.pauseProducing()

    def _browser_changed(self, full: bool) -> None:
        if self._released:
            return
        self.browser_full = full
        upstream = self._upstream
        if upstream is not None:
            if full:
                upstream.pauseProducing()
            else:
                upstream.resumeProducing()
        if full:
            if self._stall is None and self.stall_timeout > 0:
                self._stall = self._clock.callLater(self.stall_timeout, self._stalled_now)
        else:
            self._cancel_stall()
        self._apply()
        if not full and self.drained is not None:
            self.drained()

    def _upstream_changed(self, full: bool) -> None:
        if self._released:
            return  # (an upstream lingering after the close)
        self._upstream_full = full
        self._apply()

    def _apply(self) -> None:
        reading = not (self.browser_full or self._upstream_full)
        if reading != self._reading:
            self._reading = reading
            if reading:
                self._browser.resumeProducing()
            else:
                self._browser.pauseProducing()

    def _stalled_now(self) -> None:
        self._stall = None
        self._stalled()

    def _cancel_stall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def release(self) -> None:
        """
        The session is closing: no more limits on reading the browser (what
        it sends is discarded now, and its close reply must be read), no
        more stall timer; the upstream is closed by its own path.
        """
        self._cancel_stall()
        self.drained = None
        self.browser_full = self._upstream_full = False
        self._browser.unregisterProducer()
        self._apply()
        self._released = True


def buffered(transport: Any) -> int:
    """Bytes written to C{transport} and not yet taken by the kernel (TCP only; else 0)."""
    if isinstance(transport, Connection):
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    inner = getattr(transport, "transport", None)
    return buffered(inner) if inner is not None and inner is not transport else 0


@dataclass
class RelayPolicy:
    """
    What the operator decides for both relays (see the module docstring).

    @ivar origins: which pages may open a WebSocket.  The default allows no
        browser at all (browsers always send an Origin), only other clients.
    @ivar clients: how to find the real client behind a trusted frontend.
    @ivar table: caps and drain, shared by both relays (C{None}: a table of
        its own with the default caps).
    @ivar idle_timeout: seconds without input from the user (keys, mouse,
        clipboard) before a session closes; 0: never.
    @ivar session_timeout: seconds a session may last at most; 0: no limit.
    @ivar ping_interval: seconds between WebSocket pings; a browser that has
        not answered by the next one is gone; 0: no pings.
    @ivar stall_timeout: seconds a browser may keep its outgoing buffer over
        the limit before its session closes (CLIENT_TIMEOUT); 0: never.
    @ivar events: the observers told of every session.
    @ivar upgrade_limiter: the per-client rate of WebSocket upgrades (429
        beyond it, before anything is set up); C{None}: no limit.  A trusted
        frontend that names no client (another zone's proxy) is not limited.
    @ivar refusal_lines: how often a client's refusals are logged (C{None}:
        each relay factory keeps its own default throttle).
    @ivar cluster: the sessions' shared state across processes (leases for
        the caps, the registry, kills; relay/cluster_sessions.py); C{None}:
        this process alone (no Redis configured).
    """

    origins: OriginPolicy = field(default_factory=lambda: OriginPolicy([], allow_missing=True))
    clients: ClientAddresses = field(default_factory=ClientAddresses)
    table: SessionTable | None = None
    idle_timeout: float = 0.0
    session_timeout: float = 0.0
    ping_interval: float = 0.0
    stall_timeout: float = STALL_TIMEOUT
    events: SessionEvents = field(default_factory=SessionEvents)
    upgrade_limiter: RateLimiter | ClusterRateLimiter | None = None
    refusal_lines: LineThrottle | None = None
    cluster: ClusterSessions | None = None


class RelayFactory(WebSocketServerFactory):
    """
    Builds sessions of one relay; holds what they share.

    @ivar sessions: the open sessions of this relay.
    @ivar table: the server's sessions (both relays), open or opening.
    @ivar token_refusals: refusals counted by reason.
    @ivar lingering: upstream sockets given a grace to finish.
    """

    relay_name: ClassVar[str]

    def __init__(
        self,
        tokens: TokenAuthority,
        clock: IReactorTime,
        *,
        handshake_timeout: float,
        linger: float,
        max_message_size: int,
        tunnels: ITunnels | None,
        policy: RelayPolicy | None = None,
    ) -> None:
        super().__init__(server="consoleproxy", reactor=clock)
        self.policy = policy if policy is not None else RelayPolicy()
        table = self.policy.table  # (an empty table is falsy: test for None)
        self.table = (
            table if table is not None else SessionTable(clock, max_total=10000, max_per_user=10000)
        )
        self.events = self.policy.events
        self._bytes_reports: LoopingCall | None = None
        self.tokens = tokens
        self.clock = clock
        self.linger = linger
        self.max_message_size = max_message_size
        self.tunnels: ITunnels = tunnels if tunnels is not None else DirectRoutes()
        self.sessions: set[Any] = set()
        self.lingering: set[IDelayedCall] = set()
        self.token_refusals: dict[str, int] = {}
        lines = self.policy.refusal_lines  # (an empty throttle is falsy: test for None)
        self.refusal_lines = lines if lines is not None else LineThrottle(clock)
        self._batched_timer = ClockTimer(clock)
        self.setProtocolOptions(
            webStatus=False,
            # The browser's frames and messages are capped in onMessageFrameBegin
            # (Autobahn's own caps would also cap what we send).
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            # The upstream's handshake may take its full timeout before we answer.
            openHandshakeTimeout=handshake_timeout + 5,
            closeHandshakeTimeout=2,
            failByDrop=False,
            autoPingInterval=self.policy.ping_interval,
            autoPingTimeout=self.policy.ping_interval,
        )

    def refused_token(self, reason: str) -> None:
        """Count a token refusal."""
        self.token_refusals[reason] = self.token_refusals.get(reason, 0) + 1
        self.events.token_refused(self.relay_name, reason)

    def session_opened(self, session: RelaySession) -> None:
        """C{session} is open: keep it, and report bytes while any is open."""
        self.sessions.add(session)
        if self._bytes_reports is None and self.events.observers:
            self._bytes_reports = LoopingCall(self.report_bytes)
            self._bytes_reports.clock = self.clock
            self._bytes_reports.start(BYTES_REPORT_INTERVAL, now=False)

    def session_closed(self, session: RelaySession) -> None:
        """C{session} is closed: forget it (and stop reporting when none is left)."""
        self.sessions.discard(session)
        if not self.sessions and self._bytes_reports is not None:
            self._bytes_reports.stop()
            self._bytes_reports = None

    def report_bytes(self) -> None:
        """Tell the observers what each open session relayed since the last report."""
        for session in list(self.sessions):
            session.report_bytes()


class RelaySession(CancelTimersOnLoss, WebSocketServerProtocol):
    """
    The common life of a relayed session; subclasses supply the upstream.

    @cvar subprotocol: the WebSocket subprotocol this relay speaks.
    @cvar upstream_name: what the upstream is, for log lines.
    """

    subprotocol: ClassVar[str]
    upstream_name: ClassVar[str]
    factory: RelayFactory
    _log = Logger()
    #: Words after the status in the close reason (L{end_by_request}); none by default.
    _close_words = ""

    def __init__(self) -> None:
        super().__init__()
        self._claims: Claims | None = None
        self._lease: Lease | None = None
        self._cluster_id: str | None = None
        self._session_id = ""
        self._route: Route | None = None
        self._connecting: Deferred[Any] | None = None
        self._refusal: tuple[Status, str] | None = None
        self._close_status: tuple[Status, str] | None = None
        self._pending = False
        self._gone = False
        self._peer = "?"
        self._opened_at: float | None = None
        self._linger: IDelayedCall | None = None
        self._client: Client | None = None
        self._requested_at = 0.0
        self._record: SessionRecord | None = None
        self._reported = (0, 0)
        self._deadline: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._last_input = 0.0
        self._fragments = 0
        self._flow: FlowControl | None = None
        self._pong: bytes | None = None
        self._reading_now = False
        self.bytes_to_browser = 0
        self.bytes_from_browser = 0

    # -- opening -------------------------------------------------------------------

    def _connectionMade(self) -> None:
        # Autobahn copies the factory's options onto the protocol here, and
        # pretty-prints all of them for a debug line it formats even when
        # debug is off: a tenth of the CPU of opening a session.  Copy them
        # first, so that its loop has nothing left to copy or print.
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            if not hasattr(self, name):
                setattr(self, name, getattr(self.factory, name))
        self.CONFIG_ATTRS = ()
        super()._connectionMade()

    def dataReceived(self, data: bytes) -> None:
        # WebSocket pings met in one read get one pong, after it (see onPing).
        self._reading_now = True
        try:
            self._read(data)
        finally:
            self._reading_now = False
        if self._pong is not None:
            self._answer_ping()

    def onPing(self, payload: bytes) -> None:
        """
        Note the ping; L{_answer_ping} answers the latest one after the read,
        or once the browser's buffer drained: one pong at most per read and
        none while the browser reads nothing (RFC 6455 5.5.3 allows answering
        only the latest ping).
        """
        if self.state == self.STATE_OPEN:
            self._pong = payload
            if not self._reading_now:
                self._answer_ping()

    def _answer_ping(self) -> None:
        flow = self._flow
        if flow is not None and flow.browser_full:
            return  # when it drains (FlowControl.drained)
        payload, self._pong = self._pong, None
        if payload is not None and self.state == self.STATE_OPEN:
            self.sendPong(payload)

    def _read(self, data: bytes) -> None:
        # The common case of an open session, a browser's message in one
        # whole masked frame, is read here; anything else (control frames,
        # fragments, partial or large frames, bad UTF-8, any protocol error)
        # goes to Autobahn, from the first byte it was not given before.
        if (
            self.state == self.STATE_OPEN
            and not self.data
            and self.current_frame is None
            and not self.inside_message
        ):
            data = self._whole_frames(data)
            if not data:
                return
        super().dataReceived(data)

    def _whole_frames(self, data: bytes) -> bytes:
        """Deliver the leading whole, simple frames of C{data}; return the rest."""
        limit = self.factory.max_message_size
        while len(data) >= 6 and self.state == self.STATE_OPEN:
            first, second = data[0], data[1]
            # FIN, no RSV bits, text or binary; masked (as browsers must).
            if first not in (0x81, 0x82) or not second & 0x80:
                break
            size = second & 0x7F
            start = 6
            if size == 126:
                if len(data) < 8:
                    break
                size = int.from_bytes(data[2:4], "big")
                start = 8
            elif size == 127:
                break  # 64 KiB or more: Autobahn checks and refuses it
            end = start + size
            if size > limit or len(data) < end:
                break
            mask = data[start - 4 : start]
            masked = int.from_bytes(data[start:end], "little")
            key = int.from_bytes(mask * (size // 4 + 1), "little")
            payload = (masked ^ key).to_bytes(size + 4, "little")[:size]
            binary = first == 0x82
            if not binary:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break  # Autobahn closes with 1007
            data = data[end:]
            self.onMessage(payload, binary)
        return data

    def processHandshake(self) -> None:
        # Autobahn re-runs the handshake parser on every read while onConnect's
        # Deferred is pending; the transport is paused then, but be certain.
        if not self._pending and self._refusal is None:
            super().processHandshake()

    def _admit(self, request: Any) -> None:
        """
        First in C{onConnect}: note who the client is, and check its Origin.

        @raise GuacamoleError: CLIENT_FORBIDDEN for an Origin not allowed.
        """
        self._requested_at = self.factory.clock.seconds()
        self._client = self.factory.policy.clients.of_websocket(
            request.peer, request.headers, ISSLTransport.providedBy(self.transport)
        )
        self._peer = log_safe(str(self._client))
        if not self.factory.policy.origins.allows(request.origin):
            raise GuacamoleError(
                Status.CLIENT_FORBIDDEN, f"Origin {request.origin or '(none)'!r} is not allowed"
            )

    def _reserve(self, user: str) -> Deferred[None] | None:
        """
        Take the session's place in the server's table (caps, drain), and
        with a cluster its lease (the caps across every process).

        @return: C{None} when done (no cluster), else a Deferred that fires
            once the lease is held (failing with L{SessionCapReached} at a
            cap, L{RedisUnavailable} without Redis).
        @raise GuacamoleError: SERVER_BUSY or CLIENT_TOO_MANY (this process).
        """
        self.factory.table.reserve(self, user)
        cluster = self.factory.policy.cluster
        if cluster is None:
            return None

        def held(lease: Lease) -> None:
            if self._gone:  # the browser left meanwhile: give it back now
                cluster.release(lease)
                raise CancelledError()
            self._lease = lease

        return cluster.acquire(user).addCallback(held)

    def _checked(
        self, opened: Claims | Deferred[Claims], check: Callable[[Claims], _T]
    ) -> _T | Deferred[_T]:
        """
        The token is open (or opening): keep its claims, C{check} them (it
        raises a GuacamoleError to refuse), take the session's place.

        Immediate when the token store and the caps are this process's
        (exceptions raised, no extra reactor turn); a Deferred when they are
        the cluster's (Redis), failing with the same exceptions.
        """
        if isinstance(opened, Deferred):
            return opened.addCallback(self._still_here).addCallback(self._checked, check)
        self._claims = opened
        result = check(opened)
        reserving = self._reserve(opened.user)
        if reserving is None:
            return result
        return reserving.addCallback(lambda _: result)

    def _still_here(self, claims: Claims) -> Claims:
        """After a wait: the claims, or CancelledError if the browser has gone."""
        if self._gone:
            raise CancelledError()
        return claims

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._fragments = 0

    def onMessageFrameBegin(self, length: int) -> None:
        # Called on a frame's header, before its payload is read: a frame that
        # announces too much is refused before anything is buffered.
        self._fragments += 1
        if self._fragments > MAX_FRAGMENTS:
            self._fail_connection(1009, f"a message in over {MAX_FRAGMENTS} frames")
            return
        limit = self.factory.max_message_size
        if self.message_data_total_length + length > limit:
            self.wasMaxMessagePayloadSizeExceeded = True
            self._fail_connection(1009, f"a message over {limit} bytes")
            return
        super().onMessageFrameBegin(length)

    def _send_message(self, payload: bytes, binary: bool) -> None:
        """
        Send one message as one frame, written straight to the transport.

        Autobahn's C{sendMessage} does the same with several layers of
        bookkeeping per message; a server's frames are not masked and no
        extension (compression) is ever negotiated here, so the frame is
        just a header and the payload.
        """
        if self.state != self.STATE_OPEN:
            return
        size = len(payload)
        first = 0x82 if binary else 0x81
        if size < 126:
            header = struct.pack("!BB", first, size)
        elif size < 65536:
            header = struct.pack("!BBH", first, 126, size)
        else:
            header = struct.pack("!BBQ", first, 127, size)
        write_now(self.transport, (header, payload))

    def _refuse(self, status: Status, message: str) -> str:
        """Accept the WebSocket only to close it with C{status} in onOpen."""
        self._refusal = (status, message)
        return self.subprotocol

    def _take_route(self, route: Route) -> Claims:
        """
        The way to the upstream is known (maybe a tunnel): keep it, or give
        it back at once if the browser left meanwhile.

        @return: the session's claims.
        @raise CancelledError: the browser is gone.
        """
        self._route = route
        if self._gone:
            route.close()
            raise CancelledError()
        route.on_lost = self._tunnel_lost
        assert self._claims is not None
        return self._claims

    def _setup_failed(self, failure: Failure) -> str | Failure:
        """The route or the upstream failed before the WebSocket was accepted."""
        self._connecting = None
        self._pending = False
        if self._route is not None:
            self._route.close()
        if failure.check(CancelledError):
            # The browser left meanwhile: nobody to answer.
            return Failure(ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "client gone"))
        if failure.check(TokenError):  # a shared store's answer: replayed
            reason = failure.value.reason
            self.factory.refused_token(reason)
            return self._refuse(Status.CLIENT_UNAUTHORIZED, f"token refused ({reason})")
        if failure.check(RedisUnavailable):
            # Fail closed: nothing is opened unchecked (the client logs the outage once).
            self.factory.refused_token(CLUSTER_UNAVAILABLE)
            return self._refuse(failure.value.status, f"cluster unavailable ({failure.value})")
        if failure.check(GuacamoleError):
            return self._refuse(failure.value.status, str(failure.value))
        self._log.failure(
            "Unexpected error while connecting to {what}", failure, what=self.upstream_name
        )
        return self._refuse(Status.SERVER_ERROR, "internal error")

    def _closed_if_refused(self, kind: str) -> bool:
        """In onOpen: close a refused session (and log it); whether it was refused."""
        self.transport.resumeProducing()
        if self._refusal is None:
            return False
        status, message = self._refusal
        key = self._client.rate_key() if self._client is not None else "-"
        suppressed = self.factory.refusal_lines.allow(key)
        if suppressed:
            self._log.info(
                "{count} refusals from {peer} suppressed", count=suppressed, peer=self._peer
            )
        if suppressed is not None:
            self._log.info(
                "{kind} refused: peer={peer} status={status} ({why})",
                kind=kind,
                peer=self._peer,
                status=int(status),
                why=log_safe(message),
            )
        self._close_status = self._refusal
        self._close(status)
        self.factory.events.session_refused(
            self.factory.relay_name, int(status), message, self._client_host()
        )
        return True

    def _client_host(self) -> str:
        return self._client.host if self._client is not None else "-"

    def _mark_open(self, *, connection_id: str | None = None, zone: str | None = None) -> None:
        """The session is open: count it, start its clocks, tell the observers."""
        clock = self.factory.clock
        now = self._opened_at = self._last_input = clock.seconds()
        self._control_flow()
        self.factory.session_opened(self)
        claims = self._claims
        assert claims is not None
        events = self.factory.events
        events.handshake_done(self.factory.relay_name, now - self._requested_at)
        cluster = self.factory.policy.cluster
        self._session_id = cluster.new_id() if cluster is not None else uuid.uuid4().hex
        self._record = SessionRecord(
            relay=self.factory.relay_name,
            user=claims.user,
            vm_id=claims.console.vm_id,
            console_type=claims.console.console_type,
            client=self._client_host(),
            opened_at=now,
            zone=zone,
            connection_id=connection_id,
            session_id=self._session_id,
        )
        events.session_opened(self._record)
        if cluster is not None:
            self._cluster_id = self._session_id
            cluster.opened(
                self._cluster_id,
                self,
                user=claims.user,
                vm=str(claims.console.vm_id),
                type=claims.console.console_type,
                zone=zone or str(claims.console.zone or ""),
                client=self._client_host(),
            )
        policy = self.factory.policy
        if policy.session_timeout > 0:
            self._deadline = clock.callLater(policy.session_timeout, self._session_expired)
        if policy.idle_timeout > 0:
            self._idle = clock.callLater(policy.idle_timeout, self._idle_check)

    def _control_flow(self) -> None:
        """From now on, every write toward the browser is bounded (L{FlowControl})."""
        if self._flow is not None or self.transport is None:
            return
        if isinstance(getattr(self.transport, "bufferSize", None), int):
            self.transport.bufferSize = RELAY_BUFFER
        flow = self._flow = FlowControl(self.transport, self._stalled, self.factory.clock)
        flow.stall_timeout = self.factory.policy.stall_timeout
        flow.drained = self._answer_ping

    def _stalled(self) -> None:
        """The browser kept its outgoing buffer over the limit too long: close."""
        timeout = self.factory.policy.stall_timeout
        self._end(
            Status.CLIENT_TIMEOUT,
            f"browser read nothing for {timeout:g} s with over {RELAY_BUFFER} bytes waiting",
        )

    def buffered_to_browser(self) -> int:
        """Bytes waiting to go to the browser (tests and diagnostics)."""
        return buffered(self.transport)

    def _touch(self) -> None:
        """The user did something (a key, the mouse, the clipboard): not idle."""
        self._last_input = self.factory.clock.seconds()

    def _idle_check(self) -> None:
        timeout = self.factory.policy.idle_timeout
        idle = self.factory.clock.seconds() - self._last_input
        if idle >= timeout:
            self._idle = None
            self._end(Status.SESSION_TIMEOUT, f"no input for {timeout:g} s")
        else:
            self._idle = self.factory.clock.callLater(timeout - idle, self._idle_check)

    def _session_expired(self) -> None:
        self._deadline = None
        limit = self.factory.policy.session_timeout
        self._end(Status.SESSION_CLOSED, f"session time limit of {limit:g} s reached")

    @property
    def session_id(self) -> str:
        """The session's id, unique in the cluster (empty until it is open)."""
        return self._session_id

    @property
    def record(self) -> SessionRecord | None:
        """What the observers know of the session (C{None} until it is open)."""
        return self._record

    @property
    def cluster_id(self) -> str | None:
        """The session's id in the cluster's registry (C{None}: no cluster, or not open)."""
        return self._cluster_id

    def end_by_request(self, status: Status, message: str, words: str = "") -> None:
        """
        Ended from elsewhere (the sessions API, a kill through the cluster):
        close both sides.  C{words} follow the decimal status in the close
        reason (``523 ended by an administrator``): guacamole-common-js and
        noVNC clients still read the status with C{parseInt}, and the console
        page shows the words.
        """
        self._close_words = words[:100]  # a close reason holds at most 123 bytes
        self._end(status, message)

    def shut_down(self) -> None:
        """The server is stopping: close now, with WebSocket code 1001."""
        if self.state == self.STATE_OPEN:
            if self._close_status is None:
                self._close_status = (Status.SESSION_CLOSED, "server shutting down")
            self._close(Status.SESSION_CLOSED, code=1001)
            self._drop_upstream()
        elif self.transport is not None:
            self.transport.abortConnection()

    def report_bytes(self) -> None:
        """Tell the observers what was relayed since the last report."""
        sent, received = self._reported
        if self.bytes_to_browser != sent or self.bytes_from_browser != received:
            self._reported = (self.bytes_to_browser, self.bytes_from_browser)
            self.factory.events.bytes_relayed(
                self.factory.relay_name,
                self.bytes_to_browser - sent,
                self.bytes_from_browser - received,
            )

    def _finish(self, wasClean: bool, code: int | None, kind: str, upstream: str) -> None:
        """
        In onClose: give everything up; for a session that had opened, tell
        the observers and log how it ended (C{upstream} names its other end).
        """
        self._release()
        if self._opened_at is None:
            return
        status, message = self._closing_summary(wasClean, code)
        self._report_closed(status, message)
        claims = self._claims
        assert claims is not None
        self._log.info(
            "{kind} closed: user={user} vm={vm} type={type} {upstream} peer={peer} "
            "to_browser={down} from_browser={up} duration={duration:.1f}s "
            "status={status} ({why})",
            kind=kind,
            user=claims.user,
            vm=claims.console.vm_id,
            type=claims.console.console_type,
            upstream=upstream,
            peer=self._peer,
            down=self.bytes_to_browser,
            up=self.bytes_from_browser,
            duration=self.factory.clock.seconds() - self._opened_at,
            status=int(status),
            why=log_safe(message),
        )

    def _report_closed(self, status: Status, message: str) -> None:
        """Forget an opened session and tell the observers how it ended."""
        self.factory.session_closed(self)
        record = self._record
        if record is None:
            return
        self.report_bytes()
        record.closed_at = self.factory.clock.seconds()
        record.bytes_to_browser = self.bytes_to_browser
        record.bytes_from_browser = self.bytes_from_browser
        record.status = int(status)
        record.reason = message
        self.factory.events.session_closed(record)

    def _couple(self, upstream: Any) -> None:
        """
        Each side's buffer pauses reading the other (L{FlowControl}): bounded
        memory per session (at most L{RELAY_BUFFER} or so each way).  The
        upstream also gets TCP_NODELAY: a console's small instructions must
        not wait for Nagle.
        """
        if upstream is not None:
            self._control_flow()
            if isinstance(getattr(upstream, "bufferSize", None), int):
                upstream.bufferSize = RELAY_BUFFER
            if hasattr(upstream, "setTcpNoDelay"):
                upstream.setTcpNoDelay(True)
            assert self._flow is not None
            self._flow.couple(upstream)

    # -- closing -------------------------------------------------------------------

    def _tunnel_lost(self, error: GuacamoleError) -> None:
        """The SSH tunnel broke under the console: end it with the tunnel's status."""
        self._log.warn("{why}", why=str(error))
        self._end(error.status, str(error))

    def _end(self, status: Status, message: str) -> None:
        """End the session from our side: close both sides."""
        if self._close_status is None:
            self._close_status = (status, message)
        self._close(status)
        self._drop_upstream()

    def _drop_upstream(self) -> None:
        """Close the upstream socket (see L{_linger_close})."""
        raise NotImplementedError

    def _stop_flow(self) -> None:
        """Closing: no more pongs, no more limits on reading (L{FlowControl.release})."""
        self._pong = None
        if self._flow is not None:
            self._flow.release()
        elif self.transport is not None:
            self.transport.unregisterProducer()

    def _close(self, status: Status, code: int | None = None) -> None:
        self._stop_flow()
        if self.state == self.STATE_OPEN:
            reason = f"{int(status)} {self._close_words}" if self._close_words else str(int(status))
            # sendClose only allows 1000 and 3000-4999; Guacamole needs 1001-1011.
            self.sendCloseFrame(
                code=code or status.websocket_code,
                reasonUtf8=reason.encode(),
                isReply=False,
            )

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        status = _STATUS_OF_CLOSE_CODE.get(code, Status.SUCCESS)
        if self._close_status is None:
            self._close_status = (status, reason)
        super()._fail_connection(code, str(int(status)))

    def _linger_close(self, transport: Any, closed: Deferred[Any]) -> None:
        """
        Close an upstream socket gracefully, but abort it if it has not gone
        within the factory's linger: a peer that stops reading keeps nothing.
        """
        if self._linger is not None:
            return
        transport.unregisterProducer()
        transport.loseConnection()
        linger = self.factory.clock.callLater(self.factory.linger, transport.abortConnection)
        self._linger = linger
        self.factory.lingering.add(linger)

        def gone(_: object) -> None:
            if linger.active():
                linger.cancel()
            self.factory.lingering.discard(linger)

        closed.addBoth(gone)

    def _closing_summary(self, wasClean: bool, code: int | None) -> tuple[Status, str]:
        """How the session ended, for its close log line."""
        return self._close_status or (
            Status.SUCCESS if wasClean else Status.CLIENT_TIMEOUT,
            f"browser closed (code {code})" if wasClean else "browser connection lost",
        )

    def _release(self) -> None:
        """In onClose: give up whatever the session still holds."""
        self._gone = True
        if self._flow is not None:
            self._flow.release()
        for name in ("_deadline", "_idle"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self.factory.table.release(self)
        cluster = self.factory.policy.cluster
        if cluster is not None:
            if self._lease is not None:
                lease, self._lease = self._lease, None
                cluster.release(lease)
            if self._cluster_id is not None:
                cluster.closed(self._cluster_id)
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        self._drop_upstream()
        if self._route is not None:
            self._route.close()


def query_value(query: Mapping[str, list[str]], name: str) -> str | None:
    """A query parameter given at most once.

    @raise GuacamoleError: CLIENT_BAD_REQUEST when it is repeated.
    """
    values = query.get(name) or []
    if len(values) > 1:
        raise GuacamoleError(Status.CLIENT_BAD_REQUEST, f"{name} given more than once")
    return values[0] if values else None


def token_value(query: Mapping[str, list[str]]) -> str:
    """The ``token`` parameter, exactly once.

    @raise TokenError: C{malformed} when missing or repeated.
    """
    values = query.get("token") or []
    if len(values) != 1:
        raise TokenError("malformed")
    return values[0]


class RelayResource(WebSocketResource):
    """
    Mounts a relay in twisted.web, handing the connection over cleanly.

    twisted.web's channel stays registered as the transport's producer after
    Autobahn takes the transport: it is unregistered here so the relay can
    register its own.  (The channel's idle timeout is already off while a
    request is in progress, and this request never finishes.)  A plain GET
    gets a JSON 426 instead of Autobahn's page.
    """

    def __init__(self, factory: RelayFactory, subprotocol: str = "guacamole") -> None:
        super().__init__(factory)
        self.subprotocol = subprotocol

    def render(self, request: Request) -> Any:
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setHeader(b"Upgrade", b"websocket")
            return json_body(
                request,
                426,
                "Upgrade Required",
                f"a WebSocket endpoint (subprotocol {self.subprotocol})",
            )
        limiter = self._factory.policy.upgrade_limiter
        client = client_of(request)
        # A trusted frontend that names no client is another zone's proxy hopping
        # here with its users' consoles: not limited as one client.
        if limiter is None or in_networks(client.host, self._factory.policy.clients.trusted):
            return self._upgrade(request)
        wait = limiter.take(client.rate_key())
        if not isinstance(wait, Deferred):
            return self._upgrade_unless_limited(request, wait)
        # The cluster's limiter (Redis): its answer may come later.
        state: dict[str, Any] = {"synchronous": True, "value": NOT_DONE_YET}

        def answered(wait: float | None) -> None:
            if state["synchronous"]:
                state["value"] = self._upgrade_unless_limited(request, wait)
                return
            if request.channel is None or request.channel.transport is None:
                return  # the client left meanwhile
            result = self._upgrade_unless_limited(request, wait)
            if result is not NOT_DONE_YET:
                request.write(result)
                request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("The WebSocket upgrade limit failed", failure)
            answered(None)

        wait.addCallbacks(answered, failed)
        state["synchronous"] = False
        return state["value"]

    def _upgrade_unless_limited(self, request: Request, wait: float | None) -> Any:
        """A 429 when the client must wait, else the upgrade."""
        if wait is not None:
            # Before anything is set up (no Autobahn, no token check, no log line).
            request.setHeader(b"Retry-After", str(retry_after(wait)).encode())
            return json_body(
                request,
                429,
                "Too Many Requests",
                f"too many WebSocket upgrades; retry in {retry_after(wait)} s",
            )
        return self._upgrade(request)

    def _upgrade(self, request: Request) -> Any:
        """Hand the connection over to Autobahn."""
        transport = request.channel.transport
        if transport is None:
            return super().render(request)
        handed_over = getattr(request.channel, "handed_over", None)
        if handed_over is not None:
            handed_over()  # the HTTP channel's deadlines no longer apply
        transport.unregisterProducer()
        result = super().render(request)
        return NOT_DONE_YET if result is NOT_DONE_YET else result
