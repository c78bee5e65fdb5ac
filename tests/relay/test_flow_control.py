"""relay.websocket.FlowControl: who is read while which buffer is over the limit."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.relay.websocket import FlowControl


class FlowControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.browser, self.upstream = StringTransport(), StringTransport()
        self.stalls: list[float] = []
        self.drains = 0
        self.flow = FlowControl(
            self.browser, lambda: self.stalls.append(self.clock.seconds()), self.clock
        )
        self.flow.stall_timeout = 30.0
        self.flow.drained = self._drained
        self.flow.couple(self.upstream)

    def _drained(self) -> None:
        self.drains += 1

    def states(self) -> tuple[str, str]:
        return self.browser.producerState, self.upstream.producerState

    def test_browser_full_pauses_both_until_drained(self) -> None:
        self.browser.producer.pauseProducing()  # the browser's buffer went over the limit
        self.assertEqual(self.states(), ("paused", "paused"))
        self.clock.advance(29)
        self.browser.producer.resumeProducing()  # drained
        self.assertEqual(self.states(), ("producing", "producing"))
        self.assertEqual(self.drains, 1)
        self.clock.advance(60)
        self.assertEqual(self.stalls, [])

    def test_upstream_full_pauses_the_browser_only(self) -> None:
        self.upstream.producer.pauseProducing()
        self.assertEqual(self.states(), ("paused", "producing"))
        # The browser's buffer fills and drains meanwhile: the browser stays paused.
        self.browser.producer.pauseProducing()
        self.browser.producer.resumeProducing()
        self.assertEqual(self.states(), ("paused", "producing"))
        self.upstream.producer.resumeProducing()
        self.assertEqual(self.states(), ("producing", "producing"))

    def test_stall(self) -> None:
        self.browser.producer.pauseProducing()
        self.clock.advance(29.9)
        self.assertEqual(self.stalls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.stalls, [30.0])

    def test_no_stall_limit(self) -> None:
        self.flow.stall_timeout = 0
        self.browser.producer.pauseProducing()
        self.clock.advance(3600)
        self.assertEqual(self.stalls, [])

    def test_release_reads_the_browser_again(self) -> None:
        self.browser.producer.pauseProducing()
        self.flow.release()
        self.assertIsNone(self.browser.producer)
        self.assertEqual(self.browser.producerState, "producing")
        self.clock.advance(60)
        self.assertEqual((self.stalls, self.clock.getDelayedCalls()), ([], []))
        # The upstream lingers a while: its buffer no longer pauses the browser.
        self.upstream.producer.pauseProducing()
        self.assertEqual(self.browser.producerState, "producing")

    def test_coupled_while_full(self) -> None:
        flow = FlowControl(StringTransport(), lambda: None, self.clock)
        flow._browser.producer.pauseProducing()
        upstream = StringTransport()
        flow.couple(upstream)
        self.assertEqual(upstream.producerState, "paused")
