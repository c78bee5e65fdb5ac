"""
An asynchronous XML-RPC client on twisted.web's Agent.

twisted.web.xmlrpc.Proxy does not verify HTTPS certificates and the standard
library's parser expands internal entities, so this client is built from
parts that are safe by default:

  - requests are encoded by the standard library (encoding is harmless);
  - responses are read with a size cap and parsed by defusedxml, which
    refuses any DTD or entity declaration outright;
  - HTTPS verifies the certificate and host name (service_identity), against
    the platform's trust roots or configured ones;
  - every call has a deadline, and only a bounded number run at once (oned
    serves 15 connections by default).
"""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

#: Responses larger than this are refused (a VM pool of a big cloud is smaller).
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


class RpcUnavailable(Exception):
    """The server could not be reached, or did not answer in time."""


class RpcProtocolError(Exception):
    """The server answered something that is not a usable XML-RPC response."""


class RpcFault(Exception):
    """An XML-RPC fault (``<fault>``): the method does not exist, and the like."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"XML-RPC fault {code}: {message}")
        self.code = code
        self.message = message


def load_trust_roots(path: str) -> Any:
    """
    Trust roots from a PEM file or a directory of PEM files, for C{trustRoot=}.

    @raise ValueError: when nothing usable is there.
    """
    location = Path(path)
    files = sorted(location.iterdir()) if location.is_dir() else [location]
    certificates = []
    for file in files:
        if file.is_file():
            data = file.read_bytes()
            for block in data.split(b"-----END CERTIFICATE-----")[:-1]:
                certificates.append(Certificate.loadPEM(block + b"-----END CERTIFICATE-----\n"))
    if not certificates:
        raise ValueError(f"no PEM certificate in {path}")
    return trustRootFromCertificates(certificates)


class XmlRpcClient:
    """
    Calls methods of one XML-RPC server.

    @param url: e.g. C{http://localhost:2633/RPC2} (C{https:} is verified).
    @param timeout: seconds a call may take, connection included.
    @param max_concurrent: calls in flight at once; the rest wait their turn
        (the wait counts against their timeout).
    @param trust_roots: for C{https:}: a PEM file or directory; None for the
        platform's.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        *,
        timeout: float = 10.0,
        max_concurrent: int = 8,
        trust_roots: str | None = None,
    ) -> None:
        self.url = url
        self._reactor = reactor
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_concurrent
        self._pool.retryAutomatically = False
        policy = BrowserLikePolicyForHTTPS(
            load_trust_roots(trust_roots) if trust_roots is not None else None
        )
        self._agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout, pool=self._pool)
        self._semaphore = DeferredSemaphore(max_concurrent)

    def call(self, method: str, *params: Any) -> Deferred[Any]:
        """
        Call C{method}; fire with its return value.

        Fails with L{RpcUnavailable}, L{RpcFault} or L{RpcProtocolError}.
        """
        body = xmlrpc.client.dumps(params, methodname=method, allow_none=False).encode("utf-8")
        result: Deferred[Any] = self._semaphore.run(self._post, body)
        result.addTimeout(self._timeout, self._reactor, onTimeoutCancel=self._timed_out)
        result.addErrback(_unavailable, self.url)
        return result

    def _post(self, body: bytes) -> Deferred[Any]:
        headers = Headers({b"Content-Type": [b"text/xml"], b"User-Agent": [b"consoleproxy"]})
        request = self._agent.request(
            b"POST", self.url.encode("ascii"), headers, _BytesProducer(body)
        )
        return request.addCallback(self._read)

    def _read(self, response: IResponse) -> Deferred[Any]:
        if response.code != 200:
            response.deliverBody(_Discard())
            raise RpcProtocolError(f"HTTP {response.code} from {self.url}")
        if response.length is not None and response.length > MAX_RESPONSE_BYTES:
            response.deliverBody(_Discard())
            raise RpcProtocolError(
                f"response of {response.length} bytes exceeds {MAX_RESPONSE_BYTES} bytes"
            )
        reader = _BoundedReader(MAX_RESPONSE_BYTES)
        response.deliverBody(reader)
        return reader.done.addCallback(parse_response)

    def _timed_out(self, result: Any, timeout: float) -> Failure:
        return Failure(RpcUnavailable(f"{self.url} did not answer within {timeout:g} s"))

    def close(self) -> Deferred[None]:
        """Close idle connections (call when shutting down)."""
        return self._pool.closeCachedConnections()


def _unavailable(failure: Failure, url: str) -> Failure:
    if failure.check(ConnectError):
        return Failure(RpcUnavailable(f"cannot connect to {url}: {failure.getErrorMessage()}"))
    if failure.check(RpcFault, RpcProtocolError, RpcUnavailable):
        return failure
    if failure.check(ResponseNeverReceived, RequestTransmissionFailed):
        why = "; ".join(reason.getErrorMessage() for reason in failure.value.reasons)
        return Failure(RpcUnavailable(f"{url}: no response ({why})"))
    return Failure(RpcUnavailable(f"{url}: {failure.getErrorMessage()}"))


class _BytesProducer:
    """A request body from bytes (twisted.web.client.FileBodyProducer needs a file)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BoundedReader(Protocol):
    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
            self.transport.stopProducing()
            if not self.done.called:
                self.done.errback(RpcProtocolError(f"response exceeds {self._limit} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(RpcUnavailable(f"response cut short: {reason.getErrorMessage()}"))


class _Discard(Protocol):
    """Abandons a response body: the connection is closed rather than reused."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:
        pass


def parse_xml(data: bytes | str) -> Element:
    """
    Parse XML refusing any DTD, entity declaration or external reference.

    @raise RpcProtocolError: for anything that is not plain, well-formed XML.
    """
    try:
        return fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ParseError, DefusedXmlException, ValueError) as e:
        raise RpcProtocolError(f"unreadable XML: {type(e).__name__}: {e}") from e


def parse_response(data: bytes) -> Any:
    """
    Decode an XML-RPC C{methodResponse}: the single returned value, or
    L{RpcFault}.
    """
    root = parse_xml(data)
    if root.tag != "methodResponse":
        raise RpcProtocolError(f"expected methodResponse, got {root.tag}")
    fault = root.find("fault/value")
    if fault is not None:
        detail = _value(fault)
        if not isinstance(detail, dict):
            raise RpcProtocolError("malformed fault")
        return _raise_fault(detail)
    value = root.find("params/param/value")
    if value is None:
        raise RpcProtocolError("response has no value")
    return _value(value)


def _raise_fault(detail: dict[str, Any]) -> Any:
    code = detail.get("faultCode")
    raise RpcFault(code if isinstance(code, int) else 0, str(detail.get("faultString", "")))


def _value(element: Element) -> Any:
    children = list(element)
    if not children:
        return element.text or ""  # a bare <value> is a string
    if len(children) != 1:
        raise RpcProtocolError("a value holds one type element")
    typed = children[0]
    decoder = _DECODERS.get(typed.tag)
    if decoder is None:
        raise RpcProtocolError(f"unknown XML-RPC type {typed.tag}")
    try:
        return decoder(typed)
    except (ValueError, TypeError) as e:
        raise RpcProtocolError(f"bad {typed.tag} value") from e


def _boolean(element: Element) -> bool:
    text = (element.text or "").strip()
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def _array(element: Element) -> list[Any]:
    return [_value(v) for v in element.findall("data/value")]


def _struct(element: Element) -> dict[str, Any]:
    result = {}
    for member in element.findall("member"):
        name, value = member.find("name"), member.find("value")
        if name is None or value is None:
            raise ValueError("struct member without name or value")
        result[name.text or ""] = _value(value)
    return result


_DECODERS: dict[str, Callable[[Element], Any]] = {
    "string": lambda e: e.text or "",
    "int": lambda e: int((e.text or "").strip()),
    "i4": lambda e: int((e.text or "").strip()),
    "i8": lambda e: int((e.text or "").strip()),
    "boolean": _boolean,
    "double": lambda e: float((e.text or "").strip()),
    "dateTime.iso8601": lambda e: e.text or "",
    "base64": lambda e: (e.text or "").strip(),
    "nil": lambda e: None,
    "array": _array,
    "struct": _struct,
}
