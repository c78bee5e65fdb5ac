"""The site (site.py): its access log lines of refusals are rate-limited per client."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from consoleproxy.web.site import ConsoleProxyWeb, Operations, build_site


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        pass


class RefusalAccessLogTests(SynchronousTestCase):
    def test_503_and_429_lines_throttled_per_client(self) -> None:
        clock = Clock()
        web = ConsoleProxyWeb(None, Resource(), operations=Operations(draining=lambda: True))  # type: ignore[arg-type]
        site = build_site(web, clock)
        log = _Lines()
        site._logFile = log  # type: ignore[assignment]

        def ask(host: str) -> None:
            channel = site.buildProtocol(IPv4Address("TCP", host, 1))
            channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 1)))
            channel.dataReceived(b"GET /api/vm/1/guacamole/vnc HTTP/1.1\r\nHost: x\r\n\r\n")

        for _ in range(50):
            ask("192.0.2.1")
        ask("192.0.2.2")
        self.assertEqual(len([x for x in log.lines if x.startswith('"192.0.2.1"')]), 5)
        self.assertEqual(len([x for x in log.lines if x.startswith('"192.0.2.2"')]), 1)
        self.assertIn('" 503 ', log.lines[0])
