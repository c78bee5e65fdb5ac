"""/healthz and /readyz: the resources, the deadline and cache, and the checks of each part."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from consoleproxy.clouds.inventory import InventoryCloud
from consoleproxy.clouds.opennebula.oned import Oned
from consoleproxy.clouds.opennebula.xmlrpc import XmlRpcClient
from consoleproxy.ops.health import (
    Advisory,
    HealthResource,
    ReadinessResource,
    guacd_check,
    inventory_check,
    oned_check,
)
from tests.helpers.fakeoned import FakeOned
from tests.helpers.support import (
    http_request,
    serve_resource,
    synchronous_verifier,
    wait,
    write_inventory,
)
from tests.helpers.testca import make_tls_files


def get(resource: Any, method: bytes = b"GET") -> DummyRequest:
    """Render C{resource} for a DummyRequest (finished now, or once the resource finishes)."""
    request = DummyRequest([b""])
    request.method = method
    body = resource.render(request)
    if body is not NOT_DONE_YET:
        request.write(body)
        request.finish()
    return request


def answer(request: DummyRequest) -> tuple[int, dict[str, Any]]:
    """The status and the JSON of a finished request."""
    assert request.finished == 1, "not finished"
    return request.responseCode or 200, json.loads(b"".join(request.written))


class _Hanging:
    """A check that never answers, and records its cancellations."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    def __call__(self) -> Deferred[None]:
        self.calls += 1
        return Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))


class _Counting:
    """A check that succeeds (or fails) at once, and counts its calls."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error

    def __call__(self) -> Deferred[None]:
        self.calls += 1
        return succeed(None) if self.error is None else fail(self.error)


class HealthTests(SynchronousTestCase):
    def test_ok(self) -> None:
        request = get(HealthResource())
        self.assertEqual(answer(request), (200, {"status": "ok"}))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])

    def test_head(self) -> None:
        self.assertEqual(get(HealthResource(), b"HEAD").responseCode, 200)

    def test_other_methods(self) -> None:
        request = get(HealthResource(), b"POST")
        self.assertEqual(answer(request)[0], 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual(answer(get(ReadinessResource({}, Clock()), b"DELETE"))[0], 405)


class ReadinessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def resource(self, checks: dict[str, Any], **kwargs: Any) -> ReadinessResource:
        return ReadinessResource(checks, self.clock, **kwargs)

    def test_ready(self) -> None:
        readiness = self.resource({"guacd": _Counting(), "cloud": _Counting()})
        self.assertEqual(
            answer(get(readiness)),
            (200, {"status": "ready", "checks": {"guacd": "ok", "cloud": "ok"}}),
        )

    def test_not_ready(self) -> None:
        """One failing check: 503, with each check's outcome in short words."""
        long = "Connection was refused by other side: 111:\n  Connection refused." + "x" * 500
        checks = {"guacd": _Counting(ConnectionError(long)), "cloud": _Counting()}
        status, body = answer(get(self.resource(checks)))
        self.assertEqual(status, 503)
        self.assertEqual(body["status"], "not ready")
        self.assertEqual(body["checks"]["cloud"], "ok")
        guacd = body["checks"]["guacd"]
        self.assertTrue(guacd.startswith("Connection was refused by other side: 111: Connection"))
        self.assertLessEqual(len(guacd), 160)

    def test_advisory_check_degrades_without_503(self) -> None:
        """
        An advisory check (the server-admin credential) is shown, and only a
        gating one makes the server not ready: VNC consoles still work.
        """
        refused = _Counting(RuntimeError("oned refused opennebula.server_admin_auth: ..."))
        checks = {"cloud": _Counting(), "opennebula.server_admin_auth": Advisory(refused)}
        status, body = answer(get(self.resource(checks)))
        self.assertEqual((status, body["status"]), (200, "degraded"))
        self.assertIn("oned refused", body["checks"]["opennebula.server_admin_auth"])
        checks["cloud"] = _Counting(ConnectionError("oned down"))
        status, body = answer(get(self.resource(checks)))
        self.assertEqual((status, body["status"]), (503, "not ready"))

    def test_raising_check(self) -> None:
        """A check that raises instead of failing its Deferred is a failed check."""

        def broken() -> Deferred[None]:
            raise RuntimeError("inventory unreadable")

        status, body = answer(get(self.resource({"cloud": broken})))
        self.assertEqual((status, body["checks"]), (503, {"cloud": "inventory unreadable"}))

    def test_deadline(self) -> None:
        """A check still running at the deadline is cancelled and reported as late."""
        hanging = _Hanging()
        readiness = self.resource({"guacd": hanging, "cloud": _Counting()}, timeout=2.0)
        request = get(readiness)
        self.clock.advance(1.9)
        self.assertEqual(request.finished, 0)
        self.clock.advance(0.1)
        self.assertEqual(hanging.cancelled, 1)
        self.assertEqual(
            answer(request),
            (
                503,
                {"status": "not ready", "checks": {"guacd": "no answer within 2 s", "cloud": "ok"}},
            ),
        )

    def test_concurrent(self) -> None:
        """Checks run side by side: two 1.5 s checks are done after 1.5 s, not 3."""

        def slow() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            self.clock.callLater(1.5, d.callback, None)
            return d

        request = get(self.resource({"a": slow, "b": slow}, timeout=2.0))
        self.clock.advance(1.5)
        self.assertEqual(answer(request)[0], 200)

    def test_cached(self) -> None:
        """A result is reused for a second; probes during a run share it."""
        counting = _Counting()
        readiness = self.resource({"cloud": counting})
        get(readiness)
        self.clock.advance(0.9)
        self.assertEqual(answer(get(readiness))[0], 200)
        self.assertEqual(counting.calls, 1)
        self.clock.advance(0.1)
        get(readiness)
        self.assertEqual(counting.calls, 2)

        hanging = _Hanging()
        readiness = self.resource({"guacd": hanging})
        first, second = get(readiness), get(readiness)
        self.assertEqual(hanging.calls, 1)
        self.clock.advance(2)
        self.assertEqual(answer(first), answer(second))

    def test_draining(self) -> None:
        """While draining: 503 at once, no check runs."""
        counting = _Counting()
        draining = [True]
        readiness = self.resource({"cloud": counting}, draining=lambda: draining[0])
        self.assertEqual(answer(get(readiness)), (503, {"status": "draining"}))
        self.assertEqual(counting.calls, 0)
        draining[0] = False
        self.assertEqual(answer(get(readiness))[0], 200)

    def test_client_gone(self) -> None:
        """A client that leaves during the checks is not answered, and nothing fails."""
        readiness = self.resource({"guacd": _Hanging()})
        gone = get(readiness)
        gone.processingFailed(Failure(ConnectionDone()))  # what a lost connection does
        staying = get(readiness)
        self.clock.advance(2)
        self.assertEqual((gone.finished, gone.written), (0, []))
        self.assertEqual(answer(staying)[0], 503)
        self.assertEqual(self.flushLoggedErrors(), [])


class _Accepting(Protocol):
    """guacd's stand-in: counts connections and their ends."""

    def connectionMade(self) -> None:
        self.factory.accepted += 1

    def connectionLost(self, reason: Failure) -> None:
        self.factory.closed += 1


class _Server(Factory):
    protocol = _Accepting

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = 0


class GuacdCheckTests(TestCase):
    async def listen(self, description: str = "tcp:0:interface=127.0.0.1") -> tuple[int, _Server]:
        server = _Server()
        port = await serverFromString(reactor, description).listen(server)
        self.addCleanup(port.stopListening)
        return port.getHost().port, server

    async def until_closed(self, server: _Server) -> None:
        for _ in range(100):
            if server.closed:
                return
            await wait(0.01)

    async def test_reachable(self) -> None:
        """guacd accepts: the check succeeds and closes its connection."""
        port, server = await self.listen()
        check = guacd_check(clientFromString(reactor, f"tcp:127.0.0.1:{port}"))
        await check()
        await self.until_closed(server)
        self.assertEqual((server.accepted, server.closed), (1, 1))

    async def test_refused(self) -> None:
        listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(_Server())
        closed_port = listening.getHost().port
        await listening.stopListening()
        readiness = ReadinessResource(
            {"guacd": guacd_check(clientFromString(reactor, f"tcp:127.0.0.1:{closed_port}"))},
            reactor,
        )
        outcomes = await readiness.results()
        self.assertIn("refused", outcomes["guacd"])

    async def tls(self, names: tuple[str, ...] = ("localhost",)) -> tuple[int, _Server, str]:
        key, cert, _ = make_tls_files(FilePath(self.mktemp()), names)
        port, server = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        )
        return port, server, FilePath(cert).sibling("ca").path

    async def test_tls(self) -> None:
        """Over TLS, the handshake (verification included) must succeed."""
        port, server, roots = await self.tls()
        check = guacd_check(clientFromString(reactor, f"tls:localhost:{port}:trustRoots={roots}"))
        await check()
        await self.until_closed(server)
        self.assertEqual(server.accepted, 1)

    async def test_tls_wrong_name(self) -> None:
        port, _, roots = await self.tls(names=("guacd.example.com",))
        check = guacd_check(clientFromString(reactor, f"tls:localhost:{port}:trustRoots={roots}"))
        readiness = ReadinessResource({"guacd": check}, reactor)
        outcomes = await readiness.results()
        self.assertNotEqual(outcomes["guacd"], "ok")

    async def test_tls_hangs(self) -> None:
        """A server that never does its TLS part times out, and the connection is dropped."""
        port, server = await self.listen()
        check = guacd_check(clientFromString(reactor, f"tls:localhost:{port}"))
        readiness = ReadinessResource({"guacd": check}, reactor, timeout=0.3)
        outcomes = await readiness.results()
        self.assertEqual(outcomes, {"guacd": "no answer within 0.3 s"})
        await self.until_closed(server)
        self.assertEqual((server.accepted, server.closed), (1, 1))


class ReadyzOverHttpTests(TestCase):
    async def test_served(self) -> None:
        """Over HTTP: 200 while ready, 503 (with the reason) once guacd is gone."""
        listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(_Server())
        guacd = clientFromString(reactor, f"tcp:127.0.0.1:{listening.getHost().port}")
        readiness = ReadinessResource({"guacd": guacd_check(guacd)}, reactor, cache=0)
        port = await serve_resource(self, readiness)
        code, headers, body = await http_request(port, "/readyz")
        self.assertEqual(
            (code, json.loads(body)), (200, {"status": "ready", "checks": {"guacd": "ok"}})
        )
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"]
        )
        await listening.stopListening()
        code, _, body = await http_request(port, "/readyz")
        self.assertEqual(code, 503)
        self.assertIn("refused", json.loads(body)["checks"]["guacd"])
        code, _, body = await http_request(port, "/readyz", b"HEAD")
        self.assertEqual((code, body), (503, b""))


class OnedCheckTests(TestCase):
    async def setUp(self) -> None:
        self.fake = FakeOned(reactor)
        self.fake.add_user("alice", "wonderland")
        await self.fake.start()
        self.addCleanup(self.fake.stop)
        self.rpc = XmlRpcClient(reactor, self.fake.url, timeout=5)
        self.addCleanup(self.rpc.close)
        self.oned = Oned(self.rpc)

    async def outcome(self, session: Any = None) -> str:
        readiness = ReadinessResource({"oned": oned_check(self.oned, session)}, reactor)
        return (await readiness.results())["oned"]

    async def test_authenticated(self) -> None:
        self.assertEqual(await self.outcome(lambda: "alice:wonderland"), "ok")
        self.assertEqual(self.fake.calls[-1], ("one.system.version", "alice", ()))

    async def test_refused_session(self) -> None:
        """With a session, oned must accept it."""
        outcome = await self.outcome(lambda: "alice:wrong")
        self.assertIn("User couldn't be authenticated", outcome)

    async def test_anonymous(self) -> None:
        """Without a session, oned's refusal to authenticate proves it answers."""
        self.assertEqual(await self.outcome(), "ok")
        self.assertEqual(self.fake.calls[-1][0], "one.system.version")

    async def test_garbled(self) -> None:
        """An answer that is no XML-RPC response is a failure, with or without a session."""
        self.fake.malformed = True
        self.assertIn("unusable", await self.outcome())
        self.assertIn("unusable", await self.outcome(lambda: "alice:wonderland"))

    async def test_down(self) -> None:
        await self.fake.stop()
        self.assertIn("OpenNebula is unreachable", await self.outcome())

    async def test_slow(self) -> None:
        """A slow oned misses the deadline; the call is cancelled."""
        self.fake.clock = Clock()
        self.fake.delay = 10
        readiness = ReadinessResource({"oned": oned_check(self.oned)}, reactor, timeout=0.3)
        self.assertEqual(await readiness.results(), {"oned": "no answer within 0.3 s"})
        for _ in range(100):
            if not self.fake.pending:
                break
            await wait(0.01)
        self.assertEqual(self.fake.pending, 0)


class InventoryCheckTests(SynchronousTestCase):
    def test_file(self) -> None:
        """Fine while the file in use is the file on disk; not while it is broken or gone."""
        path = write_inventory(self.mktemp())
        cloud = InventoryCloud(path, synchronous_verifier())
        readiness = ReadinessResource({"cloud": inventory_check(cloud)}, Clock(), cache=0)
        self.assertEqual(readiness.results().result, {"cloud": "ok"})
        with open(path, "a", encoding="utf-8") as f:
            f.write("[[vm]]\nid = 'not a number'\n")
        outcome = readiness.results().result["cloud"]
        self.assertIn("(the previous inventory is in use)", outcome)
        self.assertIn(path, outcome)
        self.assertIn(7, cloud.inventory.vms)
        write_inventory(os.path.dirname(path))
        self.assertEqual(readiness.results().result, {"cloud": "ok"})
        os.remove(path)
        self.assertIn("cannot read inventory", readiness.results().result["cloud"])
