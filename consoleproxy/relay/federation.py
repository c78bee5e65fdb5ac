"""
The hop to another zone's console proxy.

The browser's WebSocket names another zone (``?zone=N``): the token is opened
here for that zone (proving it was sealed for zone N, and spending it here
too), then a WebSocket client connects to zone N's relay with the same token
and display values, subprotocol ``guacamole``, verifying TLS, and presenting
this proxy's configured Origin (the remote lists it among its allowed origins
for proxies, without widening what it allows browsers).  Messages pass
unchanged both ways; each side's transport pauses the other; a close on
either side closes the other with the same code and reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure

from consoleproxy.guacamole.status import GuacamoleError, Status
from consoleproxy.relay.websocket import CancelTimersOnLoss, ClockTimer

SUBPROTOCOL = "guacamole"


class ZoneHop(CancelTimersOnLoss, WebSocketClientProtocol):
    """This proxy as a client of another zone's relay."""

    factory: _HopFactory

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[ZoneHop] = Deferred()
        self._held: list[tuple[bytes, bool]] = []
        self._deliver: Callable[[bytes, bool], None] | None = None
        self._on_close: Callable[[int | None, str | None], None] | None = None
        self._closed: tuple[int | None, str | None] | None = None

    def onConnect(self, response: Any) -> None:
        if response.protocol != SUBPROTOCOL:
            raise ValueError("the remote relay did not accept subprotocol guacamole")

    def onOpen(self) -> None:
        # Hold what comes until the browser's side is open.
        self.transport.pauseProducing()
        self.opened.callback(self)

    def attach(
        self,
        deliver: Callable[[bytes, bool], None],
        on_close: Callable[[int | None, str | None], None],
    ) -> None:
        """Start delivering messages, and tell C{on_close} how the remote closed."""
        self._deliver, self._on_close = deliver, on_close
        held, self._held = self._held, []
        for payload, binary in held:
            deliver(payload, binary)
        if self._closed is not None:
            on_close(*self._closed)
        else:
            self.transport.resumeProducing()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._deliver is None:
            self._held.append((payload, isBinary))
        else:
            self._deliver(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(
                GuacamoleError(
                    Status.UPSTREAM_ERROR,
                    f"the zone's console proxy refused the connection: {reason or code}",
                )
            )
            return
        self._closed = (code, reason) if wasClean else (1011, str(int(Status.UPSTREAM_ERROR)))
        if self._on_close is not None:
            self._on_close(*self._closed)


class _HopFactory(WebSocketClientFactory):
    noisy = False  # no "Starting factory" log lines per hop
    protocol = ZoneHop


def connect_zone(
    reactor: Any,
    url: str,
    query: Mapping[str, str],
    *,
    origin: str | None,
    trust_roots: Any,
    timeout: float,
    max_message_size: int,
) -> Deferred[ZoneHop]:
    """
    Open the WebSocket to a zone's relay; fire once the remote accepted it.

    Fails with L{GuacamoleError}: UPSTREAM_NOT_FOUND when the remote cannot
    be reached (TLS verification included), UPSTREAM_ERROR when it refuses,
    UPSTREAM_TIMEOUT when it does not answer in time.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    full = f"{url}?{urlencode(dict(query))}"
    factory = _HopFactory(full, protocols=[SUBPROTOCOL], origin=origin)
    factory._batched_timer = ClockTimer(reactor)
    factory.setProtocolOptions(
        openHandshakeTimeout=timeout,
        closeHandshakeTimeout=2,
        maxFramePayloadSize=max_message_size,
        maxMessagePayloadSize=max_message_size,
    )
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust_roots), endpoint)

    def unreachable(failure: Failure) -> Failure:
        if failure.check(GuacamoleError):
            return failure
        return Failure(
            GuacamoleError(
                Status.UPSTREAM_NOT_FOUND,
                f"the console proxy at {parts.netloc} is unreachable: {failure.getErrorMessage()}",
            )
        )

    def slow(result: Any, after: float) -> Failure:
        return Failure(
            GuacamoleError(
                Status.UPSTREAM_TIMEOUT, f"the console proxy at {parts.netloc} did not answer"
            )
        )

    d = endpoint.connect(factory).addCallback(lambda hop: hop.opened)
    d.addTimeout(timeout + 1, reactor, onTimeoutCancel=slow)
    return d.addErrback(unreachable)
