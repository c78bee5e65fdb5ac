"""A real WebSocket client (Autobahn) for end-to-end tests over loopback."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint

from consoleproxy.relay.websocket import CancelTimersOnLoss, ClockTimer


class GuacamoleClient(CancelTimersOnLoss, WebSocketClientProtocol):
    """Records every message and how the connection closed."""

    factory: ClientFactory

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.opened: Deferred[GuacamoleClient] = Deferred()
        self.closed: Deferred[tuple[int | None, str | None]] = Deferred()
        self._waiting: list[tuple[int, Deferred[list[str]]]] = []
        self.subprotocol: str | None = None

    def onConnect(self, response: Any) -> None:
        self.subprotocol = response.protocol

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert not isBinary, "the relay sends text frames only"
        self.messages.append(payload.decode("utf-8"))
        still = []
        for count, d in self._waiting:
            if len(self.messages) >= count:
                d.callback(self.messages[:count])
            else:
                still.append((count, d))
        self._waiting = still

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"WebSocket refused: {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def send(self, text: str) -> None:
        """Send one text message."""
        self.sendMessage(text.encode("utf-8"), isBinary=False)

    def wait_messages(self, count: int) -> Deferred[list[str]]:
        """Fire with the first C{count} messages once they have arrived."""
        d: Deferred[list[str]] = Deferred()
        if len(self.messages) >= count:
            d.callback(self.messages[:count])
        else:
            self._waiting.append((count, d))
        return d

    def text(self) -> str:
        """Everything received so far, concatenated."""
        return "".join(self.messages)


class ClientFactory(WebSocketClientFactory):
    protocol = GuacamoleClient

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batched_timer = ClockTimer(reactor)  # no txaio buckets left in the reactor


def connect(
    url: str,
    protocols: list[str] | None = None,
    origin: str | None = None,
    headers: dict[str, str] | None = None,
) -> Deferred[GuacamoleClient]:
    """
    Open a WebSocket to C{url} on 127.0.0.1; fire with the client once the
    TCP connection exists (wait on C{.opened} / C{.closed} for the rest).
    """
    factory = ClientFactory(
        url,
        protocols=["guacamole"] if protocols is None else protocols,
        origin=origin,
        headers=headers,
    )
    factory.setProtocolOptions(openHandshakeTimeout=30, closeHandshakeTimeout=2)
    port = int(url.split(":")[2].split("/", maxsplit=1)[0])
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
