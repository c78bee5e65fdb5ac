"""
``/healthz`` and ``/readyz``: is the process alive, and can it serve consoles now?

L{HealthResource} answers 200 ``{"status": "ok"}`` as long as the process
serves HTTP at all (a liveness probe).

L{ReadinessResource} runs named checks (each a function returning a
Deferred) concurrently, each with a deadline on the injected clock (a check
still running then is cancelled), and answers 200
``{"status": "ready", "checks": {"guacd": "ok", ...}}`` when all succeeded,
else 503 ``{"status": "not ready", "checks": {"guacd": "<short error>", ...}}``;
an L{Advisory} check is shown but does not decide: when only such checks fail
the answer is 200 ``{"status": "degraded", ...}`` (a server whose SSH and RDP
consoles fail still serves VNC; a load balancer must not take it out);
503 ``{"status": "draining"}`` while the server drains, without running any.
One run's result is shared by the probes that arrive while it runs and cached
for a second after it, so probes cannot multiply the load on guacd or oned.

The check builders: L{guacd_check} (a TCP connection to guacd, TLS handshake
included for a ``tls:`` endpoint, then closed), L{oned_check}
(``one.system.version``), L{server_admin_check} (oned accepts
``opennebula.server_admin_auth``, advisory), L{inventory_check} (the inventory
file is the one in use), L{redis_check} (the cluster's Redis is available).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IHandshakeListener,
    INegotiated,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from consoleproxy.clouds.inventory import InventoryCloud
from consoleproxy.clouds.opennebula.cloud import OpenNebulaCloud
from consoleproxy.clouds.opennebula.oned import Oned
from consoleproxy.errors import Unauthenticated
from consoleproxy.net.factories import quiet_factory
from consoleproxy.net.routing import json_body

#: A readiness check: fires (with anything) when fine, fails with the reason.
Check = Callable[[], Deferred[Any]]

#: Longest error text a check reports.
MAX_ERROR = 160


@dataclass(frozen=True)
class Advisory:
    """A check that ``/readyz`` reports but that does not decide readiness."""

    check: Check

    def __call__(self) -> Deferred[Any]:
        """Run the check."""
        return self.check()


def _answer(request: Request, status: int, body: Mapping[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


class _ProbeResource(Resource):
    """A leaf that answers GET and HEAD with L{answer}, other methods with a JSON 405."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        """Dispatch on the method."""
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return json_body(request, 405, "Method Not Allowed", "method not allowed here")
        return self.answer(request)

    def answer(self, request: Request) -> Any:
        """The body, or C{NOT_DONE_YET}."""
        raise NotImplementedError


class HealthResource(_ProbeResource):
    """``/healthz``: 200 ``{"status": "ok"}`` while the process serves."""

    def answer(self, request: Request) -> bytes:
        """Always fine: answering is the proof."""
        return _answer(request, 200, {"status": "ok"})


def short_error(failure: Failure) -> str:
    """A failure's message, on one line and at most L{MAX_ERROR} characters."""
    message = failure.getErrorMessage().strip() or failure.type.__name__
    message = " ".join(message.split())
    if len(message) > MAX_ERROR:
        message = message[: MAX_ERROR - 1] + "\u2026"
    return message


class ReadinessResource(_ProbeResource):
    """
    ``/readyz``: whether every check succeeds now.

    @param checks: by name (the name is the key in the answer).
    @param clock: times the deadlines and the cache.
    @param timeout: seconds each check may take.
    @param draining: true while the server drains (then 503 at once).
    @param cache: seconds a result is reused.
    """

    log = Logger()

    def __init__(
        self,
        checks: Mapping[str, Check],
        clock: IReactorTime,
        timeout: float = 2.0,
        draining: Callable[[], bool] = lambda: False,
        cache: float = 1.0,
    ) -> None:
        super().__init__()
        self.checks = dict(checks)
        self.clock = clock
        self.timeout = timeout
        self.draining = draining
        self.cache = cache
        self._result: tuple[float, dict[str, str]] | None = None
        self._waiting: list[Deferred[dict[str, str]]] | None = None
        self._state: str | None = None
        self._advisory = {
            name for name, check in self.checks.items() if isinstance(check, Advisory)
        }

    def results(self) -> Deferred[dict[str, str]]:
        """Fire with each check's outcome (``ok`` or its error), running them if needed."""
        if self._result is not None and self.clock.seconds() - self._result[0] < self.cache:
            return succeed(dict(self._result[1]))
        result: Deferred[dict[str, str]] = Deferred()
        if self._waiting is not None:
            self._waiting.append(result)
            return result
        self._waiting = [result]
        names = list(self.checks)
        runs = [self._run(self.checks[name]) for name in names]
        gatherResults(runs).addCallback(
            lambda outcomes: self._done(dict(zip(names, outcomes, strict=True)))
        )
        return result

    def _run(self, check: Check) -> Deferred[str]:
        running = maybeDeferred(check)
        running.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._late)
        return running.addCallbacks(lambda _: "ok", short_error)

    def _late(self, result: Any, timeout: float) -> Failure:
        return Failure(TimeoutError(f"no answer within {timeout:g} s"))

    def _state_of(self, outcomes: dict[str, str]) -> str:
        """``ready``, ``degraded`` (only advisory checks fail) or ``not ready``."""
        failing = {name for name, outcome in outcomes.items() if outcome != "ok"}
        if not failing:
            return "ready"
        return "degraded" if failing <= self._advisory else "not ready"

    def _done(self, outcomes: dict[str, str]) -> None:
        self._result = (self.clock.seconds(), outcomes)
        state = self._state_of(outcomes)
        if state != self._state:
            self._state = state
            if state == "ready":
                self.log.info("Ready")
            else:
                failing = {name: why for name, why in outcomes.items() if why != "ok"}
                self.log.warn("{state}: {failing}", state=state.capitalize(), failing=failing)
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(dict(outcomes))

    def _body(self, request: Request, outcomes: dict[str, str]) -> bytes:
        state = self._state_of(outcomes)
        return _answer(
            request, 503 if state == "not ready" else 200, {"status": state, "checks": outcomes}
        )

    def answer(self, request: Request) -> Any:
        """Answer now when the result is known, else when the checks are done."""
        if self.draining():
            return _answer(request, 503, {"status": "draining"})
        known: list[dict[str, str]] = []
        pending = self.results()
        pending.addCallback(lambda outcomes: known.append(outcomes) or outcomes)
        if known:
            return self._body(request, known[0])
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def respond(outcomes: dict[str, str]) -> None:
            if not gone:
                request.write(self._body(request, outcomes))
                request.finish()

        pending.addCallback(respond)
        return NOT_DONE_YET


# -- checks ----------------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Connected(Protocol):
    """Fires C{done} once connected (and, over TLS, once the handshake is done), then closes."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        if not INegotiated.providedBy(self.transport):
            self.handshakeCompleted()

    def handshakeCompleted(self) -> None:
        self.transport.loseConnection()
        if not self.done.called:
            self.done.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.errback(reason)


def guacd_check(endpoint: IStreamClientEndpoint) -> Check:
    """
    A check that connects to guacd and closes (no Guacamole handshake).

    Over a ``tls:`` endpoint the TLS handshake (certificate and name
    verification included) must complete too.
    """

    def check() -> Deferred[None]:
        connecting = endpoint.connect(quiet_factory(_Connected))
        return connecting.addCallback(lambda protocol: protocol.done)

    return check


def oned_check(oned: Oned, session: Callable[[], str] | None = None) -> Check:
    """
    A check that oned answers ``one.system.version``.

    oned authenticates every call, this one too.  With C{session} (e.g. the
    server admin's), the call must succeed.  Without, it is made with a
    session of no user, and oned's refusal to authenticate it is proof
    enough that oned is up (other failures are not).
    """

    def check() -> Deferred[Any]:
        if session is not None:
            return oned.version(session())
        asking = oned.version("consoleproxy-readiness:-")
        return asking.addErrback(lambda failure: failure.trap(Unauthenticated))

    return check


def server_admin_check(cloud: OpenNebulaCloud) -> Advisory:
    """
    An advisory check that oned accepts the server-admin credential
    (``opennebula.server_admin_auth``): SSH and RDP consoles need it, VNC
    does not.  Failing, it says why (oned's refusal); a later success
    clears it, as any successful call with the credential does.
    """

    def check() -> Deferred[Any]:
        def why(failure: Failure) -> Failure:
            problem = cloud.admin_status.problem
            return Failure(RuntimeError(problem)) if problem is not None else failure

        return cloud.check_server_admin().addErrback(why)

    return Advisory(check)


def inventory_check(cloud: InventoryCloud) -> Check:
    """A check that the inventory in use is the file's (re-read when it changed)."""

    def check() -> Deferred[None]:
        problem = cloud.file_problem()
        if problem is not None:
            raise RuntimeError(f"{problem} (the previous inventory is in use)")
        return succeed(None)

    return check


def redis_check(client: Any) -> Check:
    """
    A check that the cluster's Redis is available (C{cluster.redis}): without
    it no token can be opened (they fail closed, status 512), so a load
    balancer should send new consoles to another instance.  It reads the
    client's state (kept by its own pings and back-off): no call per probe.

    @param client: a L{consoleproxy.cluster.redis_client.RedisClient}
        (C{available}, C{problem}).
    """

    def check() -> Deferred[None]:
        if not client.available:
            raise RuntimeError(f"Redis unavailable: {client.problem}")
        return succeed(None)

    return check
