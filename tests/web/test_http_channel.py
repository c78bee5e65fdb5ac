"""
The bounded HTTP channel (http_channel.py): deadlines and size limits.

In-process with a StringTransport and a Clock for the exact arithmetic, then
over real loopback sockets against the real site (build_site) for what a
slow or greedy client actually sees.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from consoleproxy.web.assets import CHUNK_BYTES, BodyProducer
from consoleproxy.web.http_channel import HEALTH_ONLY_TIMEOUT, HttpLimits, LimitedChannel
from consoleproxy.web.site import Operations
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.support import serve_web, start_server, wait
from tests.helpers.wsclient import connect
from tests.relay.test_guacamole_relay import ALICE, VNC

LIMITS = HttpLimits(
    request_timeout=10, response_timeout=30, max_header_bytes=200, max_body_bytes=50, max_headers=5
)


class Hello(Resource):
    """Answers C{hello} at once."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"hello"


class Later(Resource):
    """Answers only when the test calls L{finish}; keeps its pending requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET

    def finish(self) -> None:
        """Answer the oldest pending request."""
        request = self.pending.pop(0)
        request.write(b"late")
        request.finish()


def status_of(data: bytes) -> int:
    """The status code of the first response in C{data}."""
    return int(data.split(b" ", 2)[1])


def json_of(data: bytes) -> dict[str, Any]:
    """The JSON body of the (only) response in C{data}."""
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


# -- in-process: exact timing --------------------------------------------------------


class InProcess:
    """A LimitedChannel on a StringTransport, timed by a Clock."""

    def __init__(self, resource: Resource, limits: HttpLimits = LIMITS) -> None:
        self.clock = Clock()
        site = Site(resource, reactor=self.clock, timeout=1000)
        site.protocol = lambda: LimitedChannel(limits)  # type: ignore[assignment]
        self.channel: LimitedChannel = site.buildProtocol(None)  # type: ignore[assignment]
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def deadlines(self) -> list[float]:
        """When the pending DelayedCalls fire (the idle timeout's is at 1000 s and more)."""
        return sorted(call.getTime() for call in self.clock.getDelayedCalls())

    def lose(self) -> None:
        """The connection is gone (as the reactor would say after an abort or close)."""
        self.channel.connectionLost(Failure(ConnectionError("gone")))


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class DeadlineArithmeticTests(SynchronousTestCase):
    def assertAbortedLeavingNothing(self, conn: InProcess) -> None:
        """The channel aborted its connection; once it is gone, no DelayedCall is left."""
        self.assertTrue(conn.transport.disconnected)  # StringTransport: aborted
        conn.lose()
        self.assertEqual(conn.clock.getDelayedCalls(), [])

    def test_request_deadline_from_connection(self) -> None:
        conn = InProcess(Hello())
        self.assertEqual(conn.deadlines(), [10.0, 1000.0])
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n":
            conn.clock.advance(0.3)
            conn.send(bytes([byte]))
            if conn.clock.seconds() >= 10:
                break
        # Trickling does not move the deadline (it does move the idle timeout).
        conn.clock.advance(10 - conn.clock.seconds() - 0.001)
        self.assertEqual(conn.transport.value(), b"")
        conn.clock.advance(0.001)
        self.assertEqual(status_of(conn.transport.value()), 408)
        self.assertEqual(
            json_of(conn.transport.value()),
            {
                "id": 408,
                "message": "Request Timeout",
                "data": "the request did not arrive within 10 s",
            },
        )
        self.assertTrue(conn.transport.disconnecting)

    def test_silent_connection_is_aborted_without_an_answer(self) -> None:
        conn = InProcess(Hello())
        conn.clock.advance(10)
        self.assertEqual(conn.transport.value(), b"")
        self.assertAbortedLeavingNothing(conn)

    def test_refused_client_that_never_reads_is_aborted(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"GET")
        conn.clock.advance(10)
        self.assertTrue(conn.transport.disconnecting)
        self.assertIn(15.0, conn.deadlines())  # the abort, 5 s after the refusal
        conn.clock.advance(4.9)
        self.assertFalse(conn.transport.disconnected)
        conn.clock.advance(0.1)
        self.assertAbortedLeavingNothing(conn)

    def test_refused_client_that_reads_is_not_aborted(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"GET")
        conn.clock.advance(10)
        conn.lose()
        self.assertEqual(conn.clock.getDelayedCalls(), [])

    def test_request_deadline_replaced_by_response_deadline(self) -> None:
        later = Later()
        conn = InProcess(later)
        conn.clock.advance(2)
        conn.send(GET)
        self.assertEqual(len(later.pending), 1)
        self.assertEqual(conn.deadlines(), [32.0])  # idle timeout off while a request runs
        conn.clock.advance(29.9)
        self.assertFalse(conn.transport.disconnected)
        self.assertEqual(conn.transport.value(), b"")
        conn.clock.advance(0.1)
        self.assertEqual(conn.transport.value(), b"")  # no answer at all
        self.assertAbortedLeavingNothing(conn)

    def test_keep_alive_gets_a_fresh_request_deadline(self) -> None:
        later = Later()
        conn = InProcess(later)
        conn.send(GET)
        conn.clock.advance(20)
        later.finish()
        self.assertEqual(status_of(conn.transport.value()), 200)
        self.assertEqual(conn.deadlines(), [30.0, 1020.0])
        conn.transport.clear()
        conn.clock.advance(9.9)
        self.assertEqual(conn.transport.value(), b"")
        conn.clock.advance(0.1)
        self.assertEqual(status_of(conn.transport.value()), 408)

    def test_pipelined_request_keeps_its_response_deadline(self) -> None:
        later = Later()
        conn = InProcess(later)
        conn.send(GET + GET)
        conn.clock.advance(1)
        later.finish()  # the second request is parsed now, from the buffer
        self.assertEqual(len(later.pending), 1)
        conn.transport.clear()
        # It is being answered: the request deadline (10 s) must not refuse it.
        conn.clock.advance(29.9)
        self.assertEqual(conn.transport.value(), b"")
        self.assertFalse(conn.transport.disconnected)
        later.finish()
        self.assertEqual(status_of(conn.transport.value()), 200)
        self.assertEqual(conn.deadlines(), [40.9, 1030.9])

    def test_not_persistent_no_new_deadline(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(status_of(conn.transport.value()), 200)
        self.assertTrue(conn.transport.disconnecting)
        # No request deadline; the response deadline stays until the client has read it all.
        self.assertEqual(conn.deadlines(), [30.0])
        conn.clock.advance(30)
        self.assertAbortedLeavingNothing(conn)

    def test_handed_over_cancels_the_deadline(self) -> None:
        later = Later()
        conn = InProcess(later)
        conn.send(GET)
        conn.channel.handed_over()
        self.assertEqual(conn.clock.getDelayedCalls(), [])
        conn.clock.advance(100)
        self.assertFalse(conn.transport.disconnected)

    def test_connection_lost_mid_request_leaves_no_calls(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"GET / HTTP/1.1\r\nHost")
        conn.lose()
        self.assertEqual(conn.clock.getDelayedCalls(), [])


class ClosingTests(SynchronousTestCase):
    """What is given back when a connection is gone (when_closed), and health-only connections."""

    def test_when_closed_runs_once_when_the_connection_is_lost(self) -> None:
        conn = InProcess(Hello())
        called: list[int] = []
        conn.channel.when_closed(lambda: called.append(1))
        conn.send(GET)
        self.assertEqual(called, [])
        conn.lose()
        conn.channel.connectionLost(Failure(ConnectionError("again")))
        self.assertEqual(called, [1])

    def test_forgotten_callbacks_do_not_pile_up(self) -> None:
        """One registration per request on a keep-alive connection, forgotten when it ends."""
        conn = InProcess(Hello())
        called: list[int] = []
        for _ in range(1000):
            forget = conn.channel.when_closed(lambda: called.append(1))
            forget()
        self.assertEqual(conn.channel._on_close, {})
        conn.lose()
        self.assertEqual(called, [])

    def test_when_closed_follows_a_hand_over(self) -> None:
        """After a WebSocket took the connection, its protocol's is_closed says when."""
        conn = InProcess(Later())
        called: list[int] = []
        conn.channel.when_closed(lambda: called.append(1))
        conn.send(GET)
        conn.channel.handed_over()
        websocket = Protocol()
        websocket.is_closed = Deferred()  # type: ignore[attr-defined]
        conn.transport.protocol = websocket  # what Autobahn's resource does
        conn.clock.advance(0)
        self.assertEqual(called, [])
        websocket.is_closed.callback(websocket)  # type: ignore[attr-defined]
        self.assertEqual(called, [1])

    def test_health_only_connection_has_a_short_request_deadline(self) -> None:
        clock = Clock()
        site = Site(Hello(), reactor=clock, timeout=1000)
        site.protocol = lambda: LimitedChannel(LIMITS)  # type: ignore[assignment]
        channel: LimitedChannel = site.buildProtocol(None)  # type: ignore[assignment]
        channel.health_only = True
        transport = StringTransport()
        channel.makeConnection(transport)
        clock.advance(HEALTH_ONLY_TIMEOUT)
        self.assertTrue(transport.disconnected)


class _PausingTransport(StringTransport):
    """Pauses its producer once it holds 32 KiB, as a full socket buffer would."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) - self.taken >= 32768 and self.producer is not None:
            self.producer.pauseProducing()

    taken = 0

    def drain(self) -> None:
        """The client read everything so far."""
        self.taken = len(self.value())
        self.producer.resumeProducing()


class Big(Resource):
    """Sends 1 MiB through a BodyProducer with a 2 s stall timeout."""

    isLeaf = True
    body = bytes(range(256)) * 4096

    def render(self, request: Request) -> Any:
        request.setHeader(b"Content-Length", str(len(self.body)).encode())
        BodyProducer(request, self.body, 2.0).start()
        return NOT_DONE_YET


class BodyProducerTests(SynchronousTestCase):
    def connect(self) -> tuple[Clock, _PausingTransport]:
        clock = Clock()
        site = Site(Big(), reactor=clock, timeout=1000)
        site.protocol = lambda: LimitedChannel(HttpLimits(response_timeout=600))  # type: ignore[assignment]
        channel = site.buildProtocol(None)
        transport = _PausingTransport()
        channel.makeConnection(transport)
        channel.dataReceived(GET)
        return clock, transport

    def test_sends_as_the_client_reads(self) -> None:
        clock, transport = self.connect()
        self.assertLess(len(transport.value()), 32768 + CHUNK_BYTES + 1024)
        while len(transport.value().split(b"\r\n\r\n", 1)[1]) < len(Big.body):
            clock.advance(1.9)  # slow, but never stalled for 2 s
            transport.drain()
        self.assertEqual(transport.value().split(b"\r\n\r\n", 1)[1], Big.body)
        self.assertFalse(transport.disconnected)

    def test_stalled_response_is_aborted(self) -> None:
        clock, transport = self.connect()
        clock.advance(1.9)
        self.assertFalse(transport.disconnected)
        clock.advance(0.1)
        self.assertTrue(transport.disconnected)


class SizeLimitTests(SynchronousTestCase):
    def assertRefused(self, conn: InProcess, code: int) -> dict[str, Any]:
        value = conn.transport.value()
        self.assertEqual(status_of(value), code)
        self.assertIn(b"\r\nConnection: close\r\n", value)
        self.assertTrue(conn.transport.disconnecting)
        body = json_of(value)
        self.assertEqual(body["id"], code)
        return body

    def test_headers_total_at_and_over_the_limit(self) -> None:
        # Lines count without their CRLF: "GET / HTTP/1.1" is 14 bytes.
        pad = 200 - 14 - len(b"X: ")
        conn = InProcess(Hello())
        conn.send(b"GET / HTTP/1.1\r\nX: " + b"a" * pad + b"\r\n\r\n")
        self.assertEqual(status_of(conn.transport.value()), 200)
        conn = InProcess(Hello())
        conn.send(b"GET / HTTP/1.1\r\nX: " + b"a" * (pad + 1) + b"\r\n\r\n")
        body = self.assertRefused(conn, 431)
        self.assertEqual(body["message"], "Request Header Fields Too Large")

    def test_headers_over_the_limit_in_many_lines(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"GET / HTTP/1.1\r\n" + (b"X: " + b"1" * 40 + b"\r\n") * 4)  # 186 bytes
        self.assertEqual(conn.transport.value(), b"")
        conn.send(b"Y: 123456789012\r\n")  # 15 more
        self.assertRefused(conn, 431)

    def test_one_overlong_line_unfinished(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"GET /" + b"a" * 300)  # no line end yet
        self.assertIn("over 200 bytes", self.assertRefused(conn, 431)["data"])

    def test_too_many_headers_400(self) -> None:
        conn = InProcess(Hello(), HttpLimits(max_header_bytes=4096, max_headers=3))
        conn.send(b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(5)) + b"\r\n")
        self.assertEqual(self.assertRefused(conn, 400)["message"], "Bad Request")
        refusal = conn.transport.value()
        conn.clock.advance(10)  # the request deadline does not answer again
        self.assertEqual(conn.transport.value(), refusal)
        self.assertTrue(conn.transport.disconnected)  # the abort, 5 s after the refusal

    def test_malformed_request_line_400(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"NONSENSE\r\n\r\n")
        self.assertRefused(conn, 400)

    def test_content_length_at_and_over_the_limit(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"POST / HTTP/1.1\r\nContent-Length: 50\r\n\r\n" + b"x" * 50)
        self.assertEqual(status_of(conn.transport.value()), 200)
        conn = InProcess(Hello())
        conn.send(b"POST / HTTP/1.1\r\nContent-Length: 51\r\n\r\n")
        self.assertIn("50 bytes", self.assertRefused(conn, 413)["data"])

    def test_refused_before_100_continue(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 51\r\n\r\n")
        self.assertFalse(conn.transport.value().startswith(b"HTTP/1.1 100"))
        self.assertRefused(conn, 413)

    def test_chunked_body_over_the_limit(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(60):
            conn.send(b"20\r\n" + b"y" * 32 + b"\r\n")
            if conn.transport.value():
                break
        self.assertRefused(conn, 413)

    def test_chunked_body_within_the_limit(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n32\r\n" + b"y" * 50)
        conn.send(b"\r\n0\r\n\r\n")
        self.assertEqual(status_of(conn.transport.value()), 200)

    def test_nothing_more_after_a_refusal(self) -> None:
        conn = InProcess(Hello())
        conn.send(b"POST / HTTP/1.1\r\nContent-Length: 51\r\n\r\n")
        before = conn.transport.value()
        conn.send(b"x" * 51 + GET)
        self.assertEqual(conn.transport.value(), before)


# -- over real sockets ---------------------------------------------------------------


class RawClient(Protocol):
    """Sends what it is told and records what it receives and when it was closed."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[float] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(reactor.seconds())


class NeverFinishes(Resource):
    """A response that never ends (it forgets the request when the client leaves)."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        request.write(b"")
        return NOT_DONE_YET


class SocketTests(TestCase):
    """The real site on loopback, with a 0.4 s request deadline."""

    limits = HttpLimits(
        request_timeout=0.4,
        response_timeout=0.8,
        max_header_bytes=1024,
        max_body_bytes=100,
        max_headers=10,
    )

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.later = Later()
        self.server = yield start_server(self)
        operations = Operations(health=Hello(), readiness=self.later, metrics=NeverFinishes())
        self.port = yield serve_web(
            self, self.server, operations=operations, limits=self.limits, timeout=60
        )

    @inlineCallbacks
    def client(self):  # type: ignore[no-untyped-def]
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        self.addCleanup(self._gone, client)
        return client

    @inlineCallbacks
    def _gone(self, client: RawClient):  # type: ignore[no-untyped-def]
        if not client.lost.called:
            client.transport.abortConnection()
        yield client.lost

    def trickle(self, client: RawClient, data: bytes, interval: float = 0.1) -> LoopingCall:
        """Send C{data} one byte every C{interval} seconds (until it is sent or closed)."""
        remaining = list(data)

        def one() -> None:
            if remaining and client.transport.connected:
                client.transport.write(bytes([remaining.pop(0)]))

        loop = LoopingCall(one)
        loop.start(interval)
        self.addCleanup(lambda: loop.running and loop.stop())
        return loop

    @inlineCallbacks
    def closed_within(self, client: RawClient, low: float, high: float, since: float):  # type: ignore[no-untyped-def]
        """Wait (at most C{high} + 1 s) for the server to close; check when it did."""
        client.lost.addTimeout(high + 1, reactor)
        at = yield client.lost
        self.assertGreaterEqual(at - since, low)
        self.assertLessEqual(at - since, high)

    @inlineCallbacks
    def test_slowloris_gets_408_then_closed(self):  # type: ignore[no-untyped-def]
        client = yield self.client()
        started = reactor.seconds()
        self.trickle(client, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100)
        yield self.closed_within(client, 0.35, 0.8, started)
        self.assertEqual(status_of(client.data), 408)
        self.assertEqual(json_of(client.data)["id"], 408)

    @inlineCallbacks
    def test_slow_body_gets_408(self):  # type: ignore[no-untyped-def]
        client = yield self.client()
        started = reactor.seconds()
        client.transport.write(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        client.transport.write(b"12345")
        yield self.closed_within(client, 0.35, 0.8, started)
        self.assertEqual(json_of(client.data)["id"], 408)

    @inlineCallbacks
    def refused(self, data: bytes, code: int):  # type: ignore[no-untyped-def]
        """Send C{data} at once; the answer is C{code} in JSON, then the server closes."""
        client = yield self.client()
        started = reactor.seconds()
        client.transport.write(data)
        yield self.closed_within(client, 0, 0.3, started)
        self.assertEqual(status_of(client.data), code)
        return client

    @inlineCallbacks
    def test_headers_over_the_limit_431(self):  # type: ignore[no-untyped-def]
        headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 120) for i in range(9))
        client = yield self.refused(b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n", 431)
        self.assertEqual(json_of(client.data)["id"], 431)

    @inlineCallbacks
    def test_one_overlong_header_431(self):  # type: ignore[no-untyped-def]
        data = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"v" * 2000 + b"\r\n\r\n"
        client = yield self.refused(data, 431)
        self.assertEqual(json_of(client.data)["id"], 431)

    @inlineCallbacks
    def test_too_many_headers_400(self):  # type: ignore[no-untyped-def]
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(12))
        client = yield self.refused(b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n", 400)
        self.assertEqual(json_of(client.data)["id"], 400)

    @inlineCallbacks
    def test_content_length_over_the_limit_413_before_the_body(self):  # type: ignore[no-untyped-def]
        data = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        client = yield self.refused(data, 413)
        self.assertEqual(json_of(client.data)["id"], 413)

    @inlineCallbacks
    def test_chunked_body_over_the_limit_413(self):  # type: ignore[no-untyped-def]
        chunks = (b"40\r\n" + b"z" * 64 + b"\r\n") * 40
        data = b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
        client = yield self.refused(data, 413)
        self.assertEqual(json_of(client.data)["id"], 413)

    @inlineCallbacks
    def test_keep_alive_second_request_has_its_own_deadline(self):  # type: ignore[no-untyped-def]
        client = yield self.client()
        yield wait(0.25)
        client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        while b"hello" not in client.data:
            yield wait(0.01)
        self.assertEqual(status_of(client.data), 200)
        answered = reactor.seconds()
        client.data = b""
        self.trickle(client, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # 0.4 s from the first answer, not from the connection (0.25 s before it).
        yield self.closed_within(client, 0.35, 0.8, answered)
        self.assertEqual(json_of(client.data)["id"], 408)

    @inlineCallbacks
    def test_slow_response_within_its_deadline_is_answered(self):  # type: ignore[no-untyped-def]
        client = yield self.client()
        client.transport.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        yield wait(0.6)  # past the request deadline, within the response deadline
        self.later.finish()
        while b"late" not in client.data:
            yield wait(0.01)
        self.assertEqual(status_of(client.data), 200)
        self.assertFalse(client.lost.called)

    @inlineCallbacks
    def test_response_that_never_ends_is_aborted(self):  # type: ignore[no-untyped-def]
        client = yield self.client()
        started = reactor.seconds()
        client.transport.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        yield self.closed_within(client, 0.75, 1.2, started)
        self.assertNotIn(b"HTTP/1.1 408", client.data)


class WebSocketHandOverTests(TestCase):
    @inlineCallbacks
    def test_session_outlives_the_http_deadlines(self):  # type: ignore[no-untyped-def]
        guacd = FakeGuacd(reactor)
        yield guacd.start()
        self.addCleanup(guacd.stop)
        server = yield start_server(self, guacd_port=guacd.port)
        limits = HttpLimits(request_timeout=0.3, response_timeout=0.3)
        port = yield serve_web(self, server, limits=limits)
        token = server.tokens.seal(ALICE, VNC)
        client = yield connect(f"ws://127.0.0.1:{port}/guacamole?token={token}")
        yield client.opened
        conn = yield guacd.wait_for_connection()
        channel_calls = [
            call
            for call in reactor.getDelayedCalls()
            if isinstance(getattr(call.func, "__self__", None), LimitedChannel)
        ]
        self.assertEqual(channel_calls, [])  # handed over: no HTTP deadline left
        yield wait(0.8)
        self.assertFalse(client.closed.called)
        conn.send("sync", "7")
        messages = yield client.wait_messages(2)
        self.assertEqual(messages[1], "4.sync,1.7;")
        client.sendClose(1000)
        yield client.closed
        yield conn.closed
