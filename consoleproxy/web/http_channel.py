"""
The HTTP connection, with limits and deadlines at every stage.

twisted.web's channel has an idle timeout only: a client that sends one byte
every few seconds (slowloris) keeps a connection, and a request body may be
any size.  Here each stage has its own bound:

  - request line + headers + body must arrive within C{request_timeout} of
    the connection being ready for a request (408; a connection that never
    sent a byte, e.g. a TLS handshake never finished, is just aborted),
    headers within
    C{max_header_bytes} (431, also for one overlong line), a body within
    C{max_body_bytes} (413; our API takes no bodies);
  - once a request is in, its response must be done within
    C{response_timeout}, or the connection is aborted (a client that never
    reads a static file keeps nothing);
  - a WebSocket upgrade hands the connection over (L{handed_over}); from
    then on the relay's own deadlines apply (Autobahn's opening handshake
    timeout, then the session's);
  - a connection admitted only for health checks (the process is near its
    descriptor limit, see L{consoleproxy.net.connlimit}) gets
    C{HEALTH_ONLY_TIMEOUT} for its request.

Whatever must be given back when the connection is gone (its place in the
per-client count) is registered with L{when_closed}: it runs when the
connection closes, also after a WebSocket took it over.

Refusals are JSON in FireEdge's shape, then the connection is closed, and
aborted if the client does not read even that within a few seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

#: Seconds a refused client gets to read the refusal before it is aborted.
_ABORT_AFTER_REFUSAL = 5.0
#: Seconds a health-only connection gets for its request.
HEALTH_ONLY_TIMEOUT = 2.0


@dataclass(frozen=True)
class HttpLimits:
    """The bounds of one HTTP connection (see the module docstring)."""

    request_timeout: float = 10.0
    response_timeout: float = 60.0
    max_header_bytes: int = 16384
    max_body_bytes: int = 65536
    max_headers: int = 100


class LimitedChannel(HTTPChannel):
    """An L{HTTPChannel} that enforces L{HttpLimits}."""

    _log = Logger()

    def __init__(self, limits: HttpLimits) -> None:
        super().__init__()
        self.limits = limits
        self.totalHeadersSize = limits.max_header_bytes
        self.maxHeaders = limits.max_headers
        self.MAX_LENGTH = limits.max_header_bytes
        self._deadline: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None
        self._body_bytes = 0
        self._refused = False
        #: Whether any byte arrived on this connection (over TLS: after the handshake).
        self._heard = False
        #: Only /healthz and /readyz are served (the descriptor reserve is in use).
        self.health_only = False
        self._on_close: dict[int, Callable[[], object]] = {}
        self._next_on_close = 0

    # -- what is given back at the end -----------------------------------------------

    def when_closed(self, callback: Callable[[], object]) -> Callable[[], None]:
        """
        Call C{callback} once when the connection is gone (even after a hand-over).

        @return: forgets C{callback} (what one request of a keep-alive
            connection registered must not pile up with every request).
        """
        key = self._next_on_close
        self._next_on_close += 1
        self._on_close[key] = callback
        return lambda: self._on_close.pop(key, None) and None

    def _closed(self, _: object = None) -> None:
        callbacks, self._on_close = self._on_close, {}
        for callback in callbacks.values():
            try:
                callback()
            except Exception:
                self._log.failure("Releasing a closed connection failed")

    # -- deadlines -------------------------------------------------------------------

    def _set_deadline(self, seconds: float, expired: Any) -> None:
        self._cancel_deadline()
        self._deadline = self.callLater(seconds, expired)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionMade(self) -> None:
        super().connectionMade()
        timeout = self.limits.request_timeout
        if self.health_only:
            timeout = min(timeout, HEALTH_ONLY_TIMEOUT)
        self._set_deadline(timeout, self._request_too_slow)

    def _request_too_slow(self) -> None:
        self._deadline = None
        if not self._heard:
            # Not a byte in all this time (or a TLS handshake never finished):
            # nobody to answer, and a 408 could not even be encrypted.
            self._log.info("Aborting an HTTP connection that sent nothing")
            if self.transport is not None:
                self.transport.abortConnection()
            return
        self._refuse(408, f"the request did not arrive within {self.limits.request_timeout:g} s")

    def _response_too_slow(self) -> None:
        self._deadline = None
        self._log.info(
            "Aborting an HTTP connection: its response took over {seconds:g} s",
            seconds=self.limits.response_timeout,
        )
        if self.transport is not None:
            self.transport.abortConnection()

    def handed_over(self) -> None:
        """
        The connection now belongs to a WebSocket: its deadlines apply instead.

        Its closing is no longer this channel's to see: once the WebSocket
        protocol has the transport (right after this call), its C{is_closed}
        (Autobahn's) runs the L{when_closed} callbacks.
        """
        self._cancel_deadline()
        if self._on_close and self.transport is not None:
            self.callLater(0, self._follow, self.transport)

    def _follow(self, transport: Any) -> None:
        protocol = getattr(transport, "wrappedProtocol", None) or getattr(
            transport, "protocol", None
        )
        closed = getattr(protocol, "is_closed", None)
        if isinstance(closed, Deferred) and protocol is not self:
            closed.addBoth(lambda result: (self._closed(), result)[1])
        else:
            self._closed()  # not a protocol we know: nothing to wait for

    # -- limits ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        if not self._refused:
            super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse(431, f"request headers over {self.totalHeadersSize} bytes")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(431, f"a request line or header over {self.MAX_LENGTH} bytes")

    def allHeadersReceived(self) -> None:
        self._body_bytes = 0
        if self.length is not None and self.length > self.limits.max_body_bytes:
            # Before Twisted's own handling, which would invite the body (100 Continue).
            self._refuse(413, f"request bodies are limited to {self.limits.max_body_bytes} bytes")
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._handlingRequest:
            # Body bytes as sent (chunked framing included): a coarse, safe bound.
            self._body_bytes += len(data)
            if self._body_bytes > self.limits.max_body_bytes + 1024:
                self._refuse(
                    413, f"request bodies are limited to {self.limits.max_body_bytes} bytes"
                )
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._set_deadline(self.limits.response_timeout, self._response_too_slow)
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent and self.transport is not None and not self._refused:
            # Before Twisted parses the pipelined bytes it buffered: a request
            # complete among them sets its own response deadline in place of this.
            self._set_deadline(self.limits.request_timeout, self._request_too_slow)
        # Otherwise the connection closes now, and the response deadline stays
        # until it is gone: a client that does not read the end keeps nothing.
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_deadline()
        self._closed()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        super().connectionLost(reason)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's bare 400 (malformed request line or header, too many
        # headers, bad chunking), with our JSON, closing and abort.
        self._refuse(400, "a malformed request, or too many headers")

    def _refuse(self, code: int, detail: str) -> None:
        """Answer C{code} with a JSON body, close, and abort if it is not read."""
        if self._refused or self.transport is None:
            return
        self._refused = True
        self._cancel_deadline()
        message = HTTPStatus(code).phrase
        body = json.dumps({"id": code, "message": message, "data": detail}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, message.encode(), len(body), body)
        )
        self.loseConnection()
        self._abort = self.callLater(_ABORT_AFTER_REFUSAL, self._abort_now)

    def _abort_now(self) -> None:
        self._abort = None
        if self.transport is not None:
            self.transport.abortConnection()
