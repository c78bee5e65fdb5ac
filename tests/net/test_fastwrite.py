"""write_now: sends at once on plain TCP, queues the rest, keeps the order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from consoleproxy.net.fastwrite import _rest, write_now


class _Sink(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.waiting: tuple[int, Deferred[bytes]] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.waiting is not None and len(self.received) >= self.waiting[0]:
            _, done = self.waiting
            self.waiting = None
            done.callback(self.received)

    def wait_for(self, count: int) -> Deferred[bytes]:
        done: Deferred[bytes] = Deferred()
        self.waiting = (count, done)
        self.dataReceived(b"")
        return done


class TcpTests(TestCase):
    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.sink = _Sink()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: self.sink)
        )
        self.addCleanup(port.stopListening)
        self.client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(self.client.transport.loseConnection)

    @inlineCallbacks
    def test_small_writes_leave_nothing_queued(self):  # type: ignore[no-untyped-def]
        transport = self.client.transport
        write_now(transport, (b"\x81\x03", b"abc"))
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        received = yield self.sink.wait_for(5)
        self.assertEqual(received, b"\x81\x03abc")

    @inlineCallbacks
    def test_what_the_kernel_does_not_take_is_queued_in_order(self):  # type: ignore[no-untyped-def]
        transport = self.client.transport
        big = bytes(range(256)) * 40000  # 10 MB: more than the socket buffers hold
        write_now(transport, (b"head", big))
        self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)
        write_now(transport, (b"tail",))  # queued behind, never sent ahead
        received = yield self.sink.wait_for(len(big) + 8)
        self.assertEqual(received, b"head" + big + b"tail")


class OtherTransportTests(SynchronousTestCase):
    def test_other_transports_get_write_sequence(self) -> None:
        transport = StringTransport()
        write_now(transport, (b"a", b"bc"))
        self.assertEqual(transport.value(), b"abc")


class RestTests(SynchronousTestCase):
    @given(st.lists(st.binary(max_size=20), max_size=6), st.data())
    def test_rest_is_the_unsent_suffix(self, parts: list[bytes], data: st.DataObject) -> None:
        whole = b"".join(parts)
        sent = data.draw(st.integers(0, len(whole)))
        rest = _rest(parts, sent)
        self.assertEqual(b"".join(rest), whole[sent:])
        self.assertNotIn(b"", rest)
