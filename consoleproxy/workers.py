"""
Several worker processes on one host (C{server.workers} > 1).

The main process binds every configured endpoint once (one socket each, the
configuration's own endpoint strings, so C{tcp:}, C{ssl:}, C{unix:} and
C{systemd:} all work and a port in use stops start-up before any child
exists), never accepts on them, and starts N workers that inherit the
sockets (descriptors 3, 4, ...) and serve them with C{adoptStreamPort}: the
kernel's one accept queue per socket is shared by every worker.  Why not
C{SO_REUSEPORT}: it needs a bind per worker (a port half-bound while workers
start or restart), does not exist for UNIX sockets nor for sockets systemd
passes, and a worker that dies drops the connections queued on its own
socket; one shared socket loses nothing while a worker restarts.

Each worker is the same C{twistd consoleproxy} with the same options: it
builds everything itself (an C{ssl:} endpoint's certificates too: it wraps
the adopted socket in TLS), and tells the main process over a pipe once it
serves.  The main process supervises them (L{WorkerSupervisor}): a worker
that dies is started again after a back-off, SIGTERM drains every worker,
SIGHUP reaches every worker, and it tells systemd C{READY=1} once all serve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp, unix
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from zope.interface import implementer

from consoleproxy.ops.systemd import notify

log = Logger()

#: The environment a worker is started with: its index, its descriptors, its pipe.
INDEX_VARIABLE = "CONSOLEPROXY_WORKER"
FDS_VARIABLE = "CONSOLEPROXY_WORKER_FDS"
READY_VARIABLE = "CONSOLEPROXY_WORKER_READY"
CONTROL_VARIABLE = "CONSOLEPROXY_WORKER_CONTROL"
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: The first descriptor a worker inherits a listening socket on.
FIRST_FD = 3

#: twistd's entry point, run by the same Python as this process.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: Restart back-off: the first delay, the longest, and how long a worker must
#: have lived for the next death to start from the first delay again.
FIRST_DELAY = 0.5
LONGEST_DELAY = 30.0
HEALTHY_AFTER = 60.0

#: Seconds beyond the drain grace after which a worker that has not exited is killed.
STOP_MARGIN = 30.0

#: The response header saying which worker answered.
WORKER_HEADER = b"Consoleproxy-Worker"


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process was told by its main process (its environment)."""

    index: int
    fds: tuple[int, ...]
    ready_fd: int
    metrics_dir: str
    control_fd: int = -1

    @classmethod
    def from_environment(cls, environ: Any = None) -> WorkerRole | None:
        """The role in C{environ} (default os.environ), or C{None}: not a worker."""
        environ = os.environ if environ is None else environ
        if INDEX_VARIABLE not in environ:
            return None
        fds = tuple(int(fd) for fd in environ.get(FDS_VARIABLE, "").split(",") if fd)
        return cls(
            index=int(environ[INDEX_VARIABLE]),
            fds=fds,
            ready_fd=int(environ.get(READY_VARIABLE, "-1")),
            metrics_dir=environ.get(METRICS_VARIABLE, ""),
            control_fd=int(environ.get(CONTROL_VARIABLE, "-1")),
        )

    def tell_ready(self) -> None:
        """Tell the main process this worker serves every endpoint."""
        if self.ready_fd < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)
        object.__setattr__(self, "ready_fd", -1)


class _Commands(Protocol):
    """The worker's end of the control socket: one command a line."""

    def __init__(self, control: WorkerControl) -> None:
        self.control = control
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line == b"drain":
                self.control.drain()
            elif line == b"now":
                self.control.now()

    def connectionLost(self, reason: Any = None) -> None:
        # The main process is gone: nobody supervises this worker any more.
        self.control.drain()


class WorkerControl(Service):
    """
    What the main process tells a worker, over a socket of their own rather
    than by signals: C{drain} (the drain, as SIGTERM does) and C{now} (a
    second signal: end the grace).  A worker ignores SIGTERM and SIGINT:
    systemd (C{KillMode=control-group}, its default) and a terminal's Ctrl-C
    signal every process of the service, and a worker that counted those
    beside its main process's word would see two stops and end its grace at
    once.  A worker whose main process is gone (the socket closes) drains.
    """

    def __init__(self, reactor: Any, fd: int, serving: Any) -> None:
        """@param serving: the L{consoleproxy.tap.ShutdownService} that drains."""
        self.reactor = reactor
        self.fd = fd
        self.serving = serving

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            # After the reactor has set its own handlers, which it does once running.
            self.reactor.callWhenRunning(self._ignore_stop_signals)
        if self.fd >= 0:
            self.reactor.adoptStreamConnection(
                self.fd, socket.AF_UNIX, Factory.forProtocol(lambda: _Commands(self))
            )
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def _ignore_stop_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)

    def drain(self) -> None:
        """Stop as SIGTERM stops (nothing if already stopping)."""
        with contextlib.suppress(ReactorNotRunning):
            self.reactor.stop()

    def now(self) -> None:
        """End the grace: as a second SIGTERM does."""
        if self.serving.running:
            self.serving.received.extend([signal.SIGTERM, signal.SIGTERM])
            self.drain()
        else:
            self.serving.end_grace()


def tag_log_lines(index: int, publisher: Any = None) -> None:
    """
    Make every log line of this worker say so: the bracketed system of
    twistd's text lines (and of the journal and JSON formats) becomes
    C{worker N <namespace>}.  Added before twistd starts logging, so this
    observer runs before the ones that write.
    """
    from twisted.logger import globalLogPublisher  # noqa: PLC0415

    prefix = f"worker {index}"

    def tag(event: dict[str, Any]) -> None:
        system = event.get("log_system") or event.get("log_namespace") or "-"
        if not str(system).startswith(prefix):
            event["log_system"] = f"{prefix} {system}"

    (globalLogPublisher if publisher is None else publisher).addObserver(tag)


def listen_arguments(argv: Sequence[str], descriptions: Sequence[str]) -> list[str]:
    """
    A worker's plugin options: the main process's, with the endpoints
    replaced.  A worker never binds, so C{tcp:}, C{unix:} and C{systemd:}
    endpoints (systemd's descriptors belong to the main process) are parsed as
    a placeholder; C{ssl:} ones are kept: the worker loads their certificates.
    """
    kept: list[str] = []
    skip = False
    for argument in argv:
        if skip:
            skip = False
            continue
        if argument == "--listen":
            skip = True
            continue
        if argument.startswith("--listen="):
            continue
        kept.append(argument)
    for description in descriptions:
        kind = description.split(":", 1)[0]
        kept.append(f"--listen={description if kind == 'ssl' else 'tcp:1:interface=127.0.0.1'}")
    return kept


def twistd_logger(argv: Sequence[str], plugin_argv: Sequence[str]) -> list[str]:
    """
    The C{--logger} option of twistd's command line C{argv} (before the
    plugin's own C{plugin_argv}), for the workers: they log as the main
    process does (the journal's or JSON lines under C{consoleproxy serve}).
    Other twistd options are not passed on: a worker never daemonizes, has no
    pid file, and writes to the inherited standard output (a C{--logfile}
    rotated by several processes at once would lose lines).
    """
    options = list(argv[1 : len(argv) - len(plugin_argv)])
    for i, option in enumerate(options):
        if option == "--logger" and i + 1 < len(options):
            return ["--logger", options[i + 1]]
        if option.startswith("--logger="):
            return [option]
    return []


def _family(address: Any) -> socket.AddressFamily:
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot share a {type(address).__name__} listening socket")


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A worker's endpoint: the listening socket inherited on C{fd}, served with
    C{adoptStreamPort} (and wrapped in TLS when C{tls} is the configured
    C{ssl:} endpoint's context factory).
    """

    def __init__(self, reactor: Any, fd: int, tls: Any = None) -> None:
        self.reactor = reactor
        self.fd = fd
        self.tls = tls

    def listen(self, factory: Any) -> Deferred[Any]:
        """Serve C{factory} on the inherited socket; the C{IListeningPort}."""
        probe = socket.socket(fileno=self.fd)
        try:
            family = probe.family
        finally:
            probe.detach()
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        if family == socket.AF_UNIX:
            # What adoptStreamPort does, but the socket file stays when this worker
            # stops: the others still serve it, and the main process removes it last.
            port = _SharedUNIXPort._fromListeningDescriptor(self.reactor, self.fd, factory)
            port.startListening()
        else:
            port = self.reactor.adoptStreamPort(self.fd, family, factory)
        # Both duplicate the descriptor; the original is closed.
        os.close(self.fd)
        return succeed(port)


class _SharedUNIXPort(unix.Port):
    """A UNIX listening socket shared with other processes: closing it leaves the file."""

    def connectionLost(self, reason: Any) -> None:
        """Close without removing the socket file (L{unix.Port} would)."""
        tcp.Port.connectionLost(self, reason)


def adopted_endpoints(reactor: Any, role: WorkerRole, endpoints: Sequence[Any]) -> list[Any]:
    """The worker's endpoints, one per inherited descriptor, in configuration order."""
    if len(role.fds) != len(endpoints):
        raise RuntimeError(f"worker given {len(role.fds)} sockets for {len(endpoints)} endpoints")
    return [
        AdoptedEndpoint(reactor, fd, getattr(endpoint, "_sslContextFactory", None))
        for fd, endpoint in zip(role.fds, endpoints, strict=True)
    ]


class WorkerTagged(Resource):
    """Every answer says which worker gave it (C{Consoleproxy-Worker: N}): tests, operators."""

    isLeaf = True

    def __init__(self, inner: Resource, index: int) -> None:
        super().__init__()
        self.inner = inner
        self.value = str(index).encode()

    def render(self, request: Any) -> Any:
        """Tag, then answer as the wrapped resource does."""
        request.setHeader(WORKER_HEADER, self.value)
        return self.inner.render(request)

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        """Leaf: never asked; kept for non-leaf wrapped resources."""
        return self.inner.getChildWithDefault(path, request)


class _Worker(ProcessProtocol):
    """One worker process, as the supervisor sees it."""

    def __init__(self, supervisor: WorkerSupervisor, index: int, ready_fd: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ready_fd = ready_fd
        self.ready = False
        self.started = supervisor.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None
        self.control: socket.socket | None = None

    def tell(self, command: bytes) -> None:
        """Send a command line over the control socket (C{drain}, C{now})."""
        if self.control is not None:
            with contextlib.suppress(OSError):
                self.control.send(command + b"\n")

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.ready_fd and b"ready" in data and not self.ready:
            self.ready = True
            self.supervisor.worker_ready(self)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason.value)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """
    The main process with workers: binds, starts and restarts the workers,
    forwards SIGTERM and SIGHUP, and speaks to systemd.

    @param endpoints: the configured server endpoints (bound here, never accepted on).
    @param descriptions: their strings, for messages.
    @param argv: the plugin options this process was started with (the workers get them).
    @param listen_failed: turns a description and an error into the exception
        that stops start-up with one line.
    """

    def __init__(  # noqa: PLR0917 - each is needed, named in the docstring
        self,
        reactor: Any,
        workers: int,
        endpoints: Sequence[Any],
        descriptions: Sequence[str],
        argv: Sequence[str],
        grace: float,
        listen_failed: Callable[[str, BaseException], BaseException],
        *,
        python: str = sys.executable,
        environ: Any = None,
        logger: Sequence[str] = (),
    ) -> None:
        self.reactor = reactor
        self.workers = workers
        self.endpoints = list(endpoints)
        self.descriptions = list(descriptions)
        self.argv = list(argv)
        self.grace = grace
        self.listen_failed = listen_failed
        self.python = python
        self.logger = list(logger)
        self.environ = dict(os.environ if environ is None else environ)
        self.ports: list[Any] = []
        self.live: dict[int, _Worker] = {}
        self.delays: dict[int, float] = {}
        self.restarts: dict[int, Any] = {}
        self.stopping = False
        self.ready_sent = False
        self.metrics_dir = ""
        self._bound = False
        #: Deaths seen: (index, pid, exit code, signal), for logs and tests.
        self.deaths: list[tuple[int, int | None, int | None, int | None]] = []

    # -- start ---------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every endpoint (before twistd drops privileges); a failure stops start-up."""
        super().privilegedStartService()
        self._bound = True
        for description, endpoint in zip(self.descriptions, self.endpoints, strict=True):
            outcome: list[Any] = []
            endpoint.listen(Factory()).addBoth(outcome.append)
            result = outcome[0] if outcome else RuntimeError("did not listen at once")
            if isinstance(result, Failure):
                result = result.value
            if isinstance(result, BaseException):
                for port in self.ports:
                    port.stopListening()
                raise self.listen_failed(description, result)
            # This process never accepts: the workers do.
            result.stopReading()
            self.ports.append(result)

    def startService(self) -> None:
        if not self._bound:
            self.privilegedStartService()
        super().startService()
        self.metrics_dir = tempfile.mkdtemp(prefix="consoleproxy-metrics-")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reopen))
        for index in range(self.workers):
            self.delays[index] = FIRST_DELAY
            self.start_worker(index)
        log.info(
            "Main process {pid}: {n} workers serving {endpoints}",
            pid=os.getpid(),
            n=self.workers,
            endpoints=", ".join(self.descriptions),
        )

    def worker_environment(self, index: int, ready_fd: int, control_fd: int = -1) -> dict[str, str]:
        """A worker's environment: this one's, minus systemd's, plus its role."""
        env = {
            k: v
            for k, v in self.environ.items()
            if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
        }
        env[INDEX_VARIABLE] = str(index)
        env[FDS_VARIABLE] = ",".join(str(FIRST_FD + i) for i in range(len(self.ports)))
        env[READY_VARIABLE] = str(ready_fd)
        env[CONTROL_VARIABLE] = str(control_fd)
        env[METRICS_VARIABLE] = self.metrics_dir
        return env

    def start_worker(self, index: int) -> None:
        """Start worker C{index} on the shared sockets."""
        self.restarts.pop(index, None)
        if self.stopping:
            return
        ready_fd = FIRST_FD + len(self.ports)
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for i, port in enumerate(self.ports):
            child_fds[FIRST_FD + i] = port.fileno()
        child_fds[ready_fd] = "r"
        control_fd = ready_fd + 1
        ours, theirs = socket.socketpair()
        child_fds[control_fd] = theirs.fileno()
        worker = _Worker(self, index, ready_fd)
        args = [self.python, "-c", TWISTD, *self.logger, "-n", "--pidfile=", "consoleproxy"]
        args += listen_arguments(self.argv, self.descriptions)
        self.reactor.spawnProcess(
            worker,
            self.python,
            args,
            env=self.worker_environment(index, ready_fd, control_fd),
            childFDs=child_fds,
        )
        theirs.close()
        ours.setblocking(False)
        worker.control = ours
        self.live[index] = worker
        log.info("Worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def worker_ready(self, worker: _Worker) -> None:
        """A worker serves; once all do, tell systemd."""
        if self.ready_sent or self.stopping:
            return
        if len(self.live) == self.workers and all(w.ready for w in self.live.values()):
            addresses = ", ".join(str(port.getHost()) for port in self.ports)
            notify(
                f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self.workers} workers on {addresses}",
                self.environ,
            )
            self.ready_sent = True

    def worker_ended(self, worker: _Worker, reason: BaseException) -> None:
        """Log a worker's death; start it again after the back-off unless stopping."""
        code = getattr(reason, "exitCode", None)
        signum = getattr(reason, "signal", None)
        self.deaths.append((worker.index, worker.pid, code, signum))
        if worker.control is not None:
            worker.control.close()
            worker.control = None
        if self.live.get(worker.index) is worker:
            del self.live[worker.index]
        if self.metrics_dir and worker.pid is not None:
            from prometheus_client import multiprocess  # noqa: PLC0415

            with contextlib.suppress(OSError):
                multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        if self.stopping:
            log.info(
                "Worker {index} (pid {pid}) exited: {how}",
                index=worker.index,
                pid=worker.pid,
                how=_how(code, signum),
            )
            return
        lived = self.reactor.seconds() - worker.started
        delay = FIRST_DELAY if lived >= HEALTHY_AFTER else self.delays[worker.index]
        self.delays[worker.index] = min(delay * 2, LONGEST_DELAY)
        log.error(
            "Worker {index} (pid {pid}) died after {lived:.1f} s: {how}; "
            "starting it again in {delay:g} s (its sessions are lost, the others' go on)",
            index=worker.index,
            pid=worker.pid,
            lived=lived,
            how=_how(code, signum),
            delay=delay,
        )
        self.restarts[worker.index] = self.reactor.callLater(delay, self.start_worker, worker.index)

    # -- signals -------------------------------------------------------------------

    def reopen(self) -> None:
        """SIGHUP: every worker reopens its logs."""
        self.signal_all("HUP")

    def tell_all(self, command: bytes) -> None:
        """Send C{command} to every living worker over its control socket."""
        for worker in list(self.live.values()):
            worker.tell(command)

    def signal_all(self, name: str) -> None:
        """Send signal C{name} to every living worker."""
        for worker in list(self.live.values()):
            with contextlib.suppress(Exception):
                worker.transport.signalProcess(name)

    def stopService(self) -> Deferred[Any]:
        """
        SIGTERM: every worker drains (its own C{drain_grace}); once all have
        exited the sockets close.  A second SIGTERM or SIGINT is passed on
        (each worker then ends its grace at once).  Both are told over the
        control sockets (L{WorkerControl} says why not by signals).
        """
        super().stopService()
        self.stopping = True
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        notify("STOPPING=1\nSTATUS=draining the workers' sessions", self.environ)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.reactor.callFromThread(self.tell_all, b"now"))
        ended = [w.ended for w in self.live.values()]
        self.tell_all(b"drain")
        kill = self.reactor.callLater(self.grace + STOP_MARGIN, self.signal_all, "KILL")

        def done(_: Any) -> None:
            if kill.active():
                kill.cancel()
            for port in self.ports:
                port.stopListening()
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

        return gatherResults(ended).addCallback(done)


def _how(code: int | None, signum: int | None) -> str:
    if signum is not None:
        try:
            return f"killed by {signal.Signals(signum).name}"
        except ValueError:
            return f"killed by signal {signum}"
    return f"exit status {code}"
