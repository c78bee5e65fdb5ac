"""
The connection to Redis that the cluster's shared state goes through.

Why txredisapi: it is Twisted-native (Deferreds, endpoints, C{ClientService}
reconnection with exponential back-off and jitter), maintained (1.6.0,
2026), and has what we use: AUTH and SELECT on every (re)connection,
EVAL/EVALSHA with the script cache handled (EVALSHA first, EVAL on
C{NOSCRIPT}), pub/sub.  redis-py's asyncio client would need the asyncio
reactor under the whole server, a change of every timing property the relay
has been measured with, for one dependency.

Three things txredisapi does not do the way we need, and what this module
does about them:

 - Verified TLS: its C{ssl_context_factory} argument defaults to an
   unverifying C{ClientContextFactory}.  We build the endpoint ourselves,
   C{wrapClientTLS(optionsForClientTLS(host, trustRoot), HostnameEndpoint)},
   and hand it to C{RedisFactory.startConnecting}, its supported way in;
   the host name and the chain are checked (service_identity).
 - Deadlines on the injected clock: every call here is bounded by
   C{deadline} seconds on the injected reactor (a hung Redis must not hang a
   token open), on top of txredisapi's own C{replyTimeout}, which aborts the
   hung connection so that the next calls fail at once and reconnection
   starts.  txredisapi schedules its own timers and reconnection on the
   global reactor (it imports it); this module imports txredisapi lazily, so
   importing consoleproxy.cluster does not install a reactor.
 - A refused AUTH or SELECT makes txredisapi stop reconnecting for good (a
   Redis that hangs during SELECT looks the same); we log it and start a new
   connection after the longest back-off, so a Redis that comes back with
   the right password is used again without a restart.

While there is no connection, every call fails at once with
L{RedisUnavailable}, a L{GuacamoleError} with status 512 (SERVER_ERROR,
WebSocket close 1011): what depends on Redis fails closed, and the browser
is told the server had an internal problem, not that the remote desktop is
unreachable (519/520 would say that).  L{RedisClient.available} and its
observers feed C{/readyz} and metrics.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from OpenSSL.crypto import X509
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure

from consoleproxy.guacamole.status import GuacamoleError, Status

SCHEMES = ("redis", "rediss", "unix")

#: Redis answers that mean "not usable now" rather than "your command is wrong".
_UNAVAILABLE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "NOAUTH", "BUSY", "TRYAGAIN")


class RedisUnavailable(GuacamoleError):
    """
    Redis did not answer (no connection, or not within the deadline).

    Status 512 (SERVER_ERROR, WebSocket close 1011): the relay closes a
    session it cannot check with this status instead of opening it unchecked.
    """

    def __init__(self, message: str) -> None:
        super().__init__(Status.SERVER_ERROR, message)


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is: C{redis://host:port/db}, C{rediss://host:port/db} (TLS,
    verified) or C{unix:///path?db=N}.
    """

    scheme: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0

    @property
    def tls(self) -> bool:
        """Whether the connection is TLS (C{rediss://})."""
        return self.scheme == "rediss"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """
    Read C{cluster.redis}.

    A password in the URL is refused: it would end up in logs and process
    listings; it belongs in C{cluster.redis_password_file}.

    @raise ValueError: naming what is wrong.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("a redis://, rediss:// or unix:// URL")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"a redis://, rediss:// or unix:// URL, not {parts.scheme or url!r}://")
    if parts.password is not None or parts.username:
        raise ValueError("no user or password in the URL: use cluster.redis_password_file")
    if parts.fragment:
        raise ValueError("no #fragment in the URL")
    query = parse_qs(parts.query, keep_blank_values=True)
    if set(query) - {"db"}:
        raise ValueError(f"unknown URL parameters {sorted(set(query) - {'db'})}")
    if parts.scheme == "unix":
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise ValueError("unix:///absolute/path/to/redis.sock[?db=N]")
        return RedisAddress("unix", path=path, db=_db(query.get("db", ["0"])[-1]))
    if query:
        raise ValueError("the database is the path: redis://host:port/N")
    try:
        port = parts.port or 6379
    except ValueError as e:
        raise ValueError(f"bad port: {e}") from e
    if not parts.hostname:
        raise ValueError("a host: redis://host:port/db")
    return RedisAddress(parts.scheme, parts.hostname, port, db=_db(parts.path.strip("/") or "0"))


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"the database is a whole number, not {text!r}")
    return int(text)


def read_password_file(path: str) -> str:
    """
    The password in C{path} (its first line), for Redis AUTH.

    @raise ValueError: the file is missing, not a regular file, empty, or
        readable by everyone (a password others can read is no secret).
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_mode & stat.S_IROTH:
            raise ValueError(f"{path} is readable by everyone: chmod o-r {path}")
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text") from e
    password = text.splitlines()[0].strip() if text.strip() else ""
    if not password:
        raise ValueError(f"{path} is empty")
    return password


def load_trust_roots(path: str) -> Any:
    """
    The CA certificates in C{path} (a PEM file, or a directory of them) as a
    Twisted trust root for C{rediss://}.

    @raise ValueError: when there is no certificate there.
    """
    location = Path(path)
    try:
        files = (
            sorted(p for p in location.iterdir() if p.is_file())
            if location.is_dir()
            else [location]
        )
        pems = [f.read_bytes() for f in files]
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    found = []
    for pem in pems:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            found += x509.load_pem_x509_certificates(pem)
    if not found:
        raise ValueError(f"no PEM certificate in {path}")
    return trustRootFromCertificates([Certificate(X509.from_cryptography(c)) for c in found])


@dataclass(frozen=True)
class Script:
    """A Lua script run atomically by Redis (EVALSHA, EVAL when not cached)."""

    source: str


class RedisClient:
    """
    One Redis connection (and, once something subscribes, a second one for
    pub/sub), kept open with back-off, every call bounded by a deadline.

    @param reactor: for connecting and for the deadlines.
    @param deadline: seconds a call may take before it fails with
        L{RedisUnavailable}.
    @param initial_delay, max_delay: the reconnection back-off (exponential,
        with jitter), seconds.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        *,
        password: str | None = None,
        trust_roots: Any = None,
        deadline: float = 1.0,
        connect_timeout: float = 5.0,
        initial_delay: float = 0.5,
        max_delay: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.address = address
        self.deadline = deadline
        self.connect_timeout = connect_timeout
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self._password = password
        self._trust_roots = trust_roots
        self._factory: Any = None
        self._subscriber: Any = None
        self._restarts: dict[str, Any] = {}
        self._observers: list[Callable[[bool], None]] = []
        self._waiting: list[Deferred[None]] = []
        self._handlers: dict[str, list[Callable[[str], None]]] = {}
        self._stopped = True
        self.available = False
        #: Why Redis is unavailable (for logs and /readyz), "" when it is.
        self.problem = "not connected yet"

    # -- Life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (and keep reconnecting until L{stop})."""
        self._stopped = False
        self._factory = self._connect("main")
        if self._handlers:
            self._subscriber = self._connect("subscriber")

    def stop(self) -> Deferred[None]:
        """Close the connections and stop reconnecting."""
        self._stopped = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        factories = [f for f in (self._factory, self._subscriber) if f is not None]
        self._factory = self._subscriber = None
        self._set_available(False, "stopped")
        done: Deferred[None] = succeed(None)
        for factory in factories:
            done.addCallback(lambda _, f=factory: f.disconnect())
        return done.addCallback(lambda _: None)

    def when_available(self) -> Deferred[None]:
        """A Deferred that fires once Redis is (or is already) connected."""
        if self.available:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def add_observer(self, observer: Callable[[bool], None]) -> None:
        """Call C{observer(available)} whenever availability changes."""
        self._observers.append(observer)

    def _endpoint(self) -> Any:
        address = self.address
        if address.scheme == "unix":
            return UNIXClientEndpoint(self.reactor, address.path, timeout=self.connect_timeout)
        endpoint = HostnameEndpoint(
            self.reactor, address.host, address.port, timeout=self.connect_timeout
        )
        if address.tls:
            options = optionsForClientTLS(address.host, trustRoot=self._trust_roots)
            endpoint = wrapClientTLS(options, endpoint)
        return endpoint

    def _connect(self, role: str) -> Any:
        main, subscriber = _factory_classes()
        factory = (subscriber if role == "subscriber" else main)(
            uuid=str(self.address),
            dbid=self.address.db or None,  # no SELECT for db 0: one round trip less
            poolsize=1,
            isLazy=True,
            password=self._password,
            replyTimeout=self.deadline,
            convertNumbers=False,
        )
        factory.client = self
        factory.role = role
        factory.initialDelay = self.initial_delay
        factory.maxDelay = self.max_delay
        factory.deferred.addErrback(lambda _: None)  # failures reach us via connectionError
        factory.startConnecting(self._endpoint())
        return factory

    # -- Events from the factories ------------------------------------------------------

    def _connection_up(self, factory: Any, conn: Any) -> None:
        if factory.role == "subscriber":
            if factory is self._subscriber and self._handlers:
                conn.subscribe(list(self._handlers)).addErrback(
                    lambda f: self.log.warn(
                        "cluster: Redis SUBSCRIBE failed: {why}", why=f.getErrorMessage()
                    )
                )
        elif factory is self._factory:
            # A frozen Redis still completes TCP handshakes (the kernel does):
            # available only once it answers.  No answer: replyTimeout aborts
            # the connection and the back-off goes on.
            def answered(_: object) -> None:
                if factory is self._factory and conn.connected:
                    self._set_available(True, "")

            conn.execute_command("PING").addCallbacks(answered, lambda _: None)

    def _connection_down(self, factory: Any, why: str) -> None:
        if factory is self._factory and not factory.size:
            self._set_available(False, why)

    def _refused(self, factory: Any, why: str) -> None:
        """txredisapi gave up on C{factory} (AUTH or SELECT failed): start anew later."""
        if self._stopped or factory not in (self._factory, self._subscriber):
            return
        role = factory.role
        self.log.error(
            "cluster: Redis at {where} refused the connection ({why}); trying again in {delay:g} s",
            where=str(self.address),
            why=why,
            delay=self.max_delay,
        )
        if role == "main":
            self._set_available(False, why)
        factory.disconnect()

        def restart() -> None:
            self._restarts.pop(role, None)
            if self._stopped:
                return
            if role == "main":
                self._factory = self._connect("main")
            else:
                self._subscriber = self._connect("subscriber")

        self._restarts[role] = self.reactor.callLater(self.max_delay, restart)

    def _set_available(self, available: bool, why: str) -> None:
        if available == self.available:
            self.problem = why if not available else ""
            return
        self.available = available
        self.problem = why
        if available:
            self.log.info("cluster: Redis at {where} is available", where=str(self.address))
        elif not self._stopped:
            self.log.error(
                "cluster: Redis at {where} is unavailable ({why}): token opening fails "
                "closed (status 512) until it is back; reconnecting with back-off",
                where=str(self.address),
                why=why,
            )
        for observer in list(self._observers):
            observer(available)
        if available:
            waiting, self._waiting = self._waiting, []
            for waiter in waiting:
                waiter.callback(None)

    # -- Calls --------------------------------------------------------------------------

    def execute(self, *command: Any) -> Deferred[Any]:
        """
        Run one Redis command, e.g. C{execute("SET", key, "1", "NX", "PX", 5000)}.

        @return: its reply; L{RedisUnavailable} when there is no connection
            or no reply within the deadline; txredisapi's C{ResponseError}
            for a command Redis refused.
        """
        if not self.available or self._factory is None:
            return fail(RedisUnavailable(f"Redis at {self.address} is unavailable: {self.problem}"))
        return self._bounded(self._factory.handler.execute_command(*command), str(command[0]))

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred[Any]:
        """Run a L{Script} atomically (EVALSHA; EVAL the first time on a connection)."""
        if not self.available or self._factory is None:
            return fail(RedisUnavailable(f"Redis at {self.address} is unavailable: {self.problem}"))
        return self._bounded(self._factory.handler.eval(script.source, keys, args), "script")

    def _bounded(self, d: Deferred[Any], what: str) -> Deferred[Any]:
        d.addTimeout(self.deadline, self.reactor)
        return d.addErrback(self._translate, what)

    def _translate(self, failure: Failure, what: str) -> Failure:
        import txredisapi  # noqa: PLC0415 (see _factory_classes)

        if failure.check(TimeoutError, CancelledError):
            raise RedisUnavailable(f"Redis {what}: no answer within {self.deadline:g} s")
        if failure.check(txredisapi.ConnectionError):
            raise RedisUnavailable(f"Redis {what}: {failure.getErrorMessage()}")
        if failure.check(txredisapi.ResponseError) and str(failure.value).startswith(
            _UNAVAILABLE_REPLIES
        ):
            raise RedisUnavailable(f"Redis {what}: {str(failure.value)[:200]}")
        return failure

    # -- Pub/sub ------------------------------------------------------------------------

    def subscribe(self, channel: str, handler: Callable[[str], None]) -> None:
        """
        Call C{handler(message)} for every message published on C{channel}.

        The subscription has its own connection (Redis's rule for pub/sub)
        and is renewed after every reconnection; messages published while it
        was down are lost (pub/sub does not queue), which is why what they
        say must also be true in the keys (see L{registry}).
        """
        new = channel not in self._handlers
        self._handlers.setdefault(channel, []).append(handler)
        if self._stopped:
            return
        if self._subscriber is None:
            self._subscriber = self._connect("subscriber")
        elif new and self._subscriber.size:
            self._subscriber.handler.subscribe([channel])

    def publish(self, channel: str, message: str) -> Deferred[int]:
        """Publish C{message}; the number of subscribers that got it."""
        return self.execute("PUBLISH", channel, message)

    def _message(self, channel: Any, message: Any) -> None:
        if isinstance(channel, bytes):
            channel = channel.decode("utf-8", "replace")
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        for handler in list(self._handlers.get(channel, ())):
            try:
                handler(message)
            except Exception:
                self.log.failure("cluster: a pub/sub handler of {channel} failed", channel=channel)


_CLASSES: tuple[Any, Any] | None = None


def _factory_classes() -> tuple[Any, Any]:
    """
    txredisapi's factories, telling a L{RedisClient} about their connections.

    Built on first use: importing txredisapi installs the default reactor.
    """
    global _CLASSES  # noqa: PLW0603 (built once, on first use)
    if _CLASSES is not None:
        return _CLASSES
    import txredisapi  # noqa: PLC0415 (it installs the default reactor)

    class Factory(txredisapi.RedisFactory):  # type: ignore[misc]
        client: RedisClient
        role: str

        def addConnection(self, conn: Any) -> None:
            super().addConnection(conn)
            if conn in self.pool:
                self.client._connection_up(self, conn)

        def delConnection(self, conn: Any) -> None:
            super().delConnection(conn)
            self.client._connection_down(self, "connection lost")

        def connectionError(self, why: str) -> None:
            super().connectionError(why)
            self.client._refused(self, why)

    class Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            self.factory.client._message(channel, message)

    class SubscriberFactory(Factory):
        protocol = Subscriber

    _CLASSES = (Factory, SubscriberFactory)
    return _CLASSES
