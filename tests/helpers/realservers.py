"""Real servers on loopback for integration tests: OpenSSH sshd, a TCP echo, Xvfb + x11vnc.

Every helper takes the running L{TestCase} and the reactor, puts all of its files in a
fresh C{testcase.mktemp()} directory, binds 127.0.0.1 only, and returns a L{Deferred} that
fires once the server really accepts connections (its greeting is read with short TCP
probes; a port taken by someone else meanwhile is retried with another); a server that
does not come up within L{START_TIMEOUT} seconds fails with L{ServerStartError}, whose
message ends with the server's log tail.  A missing program raises L{SkipTest} naming the
Debian package to install.

Processes are started with C{reactor.spawnProcess} and stopped by a cleanup registered with
C{testcase.addCleanup} (or earlier by C{stop()}/C{kill()}, the cleanup then just waits):
SIGTERM to the whole process tree, SIGKILL after L{STOP_GRACE} seconds, and it returns
only once every process is gone and reaped, so trial's dirty-reactor check stays clean and
no process, zombie or file descriptor is left.  The tree matters for sshd: it forks a
process per connection, which forks the session's command, and neither dies with the
listener.  sshd also orphans processes while it runs (one per connection dropped before
authentication; session commands whose connection closed first), so while an sshd runs
this process is a child subreaper (Linux C{prctl(PR_SET_CHILD_SUBREAPER)}): orphans are
re-parented here instead of to pid 1 (which some sandboxes hardly ever reap) and the
teardown reaps them.  Side effect: other orphans of this process tree during that time
also become our children, and stay zombies until trial exits if nobody reaps them.

sshd sessions run with C{HOME} set to an empty directory in the temp dir (C{SetEnv}), so
shells read none of the real user's dotfiles: a root C{~/.bashrc} (pyenv, ...) would slow
every session down and can leave stale locks behind when a test kills a session.

Twisted Conch notes for tests: C{KnownHostsFile} matches host names literally, so Conch's
endpoint needs L{Sshd.bare_known_hosts_line} (C{127.0.0.1 ssh-ed25519 ...}), not the
OpenSSH C{[127.0.0.1]:port} form; and C{SSHCommandClientEndpoint} never tells its protocol
when the TCP connection drops uncleanly (twisted/twisted#7901), so after L{Sshd.kill} watch
the transport (C{protocol.transport.conn.transport.transport}) instead.

Fixed points outside the temp directory, all imposed by the programs themselves:

 - sshd needs its privilege separation directory C{/run/sshd}; it is created if missing.
   Sessions start in the user's home directory (from passwd), as usual.
 - Xvfb keeps its socket and lock in C{/tmp/.X11-unix/X<n>} and C{/tmp/.X<n>-lock}; the
   display number is picked by Xvfb itself (C{-displayfd}), which skips used ones.

Debian 12 packages: openssh-server (sshd), xvfb, x11vnc, x11-xserver-utils (xsetroot),
x11-utils (xev), xdotool, imagemagick (import); openssh-client only for manual checks.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import defer, error, process, protocol
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

__all__ = [
    "LOOPBACK",
    "START_TIMEOUT",
    "STOP_GRACE",
    "ServerStartError",
    "Sshd",
    "VncDesktop",
    "free_port",
    "make_client_key",
    "start_sshd",
    "start_tcp_echo",
    "start_vnc_desktop",
]

# The reactor's provided interfaces (IReactorProcess, IReactorTCP, IReactorTime) cannot be
# spelt as one type; the helpers need all three.
Reactor = Any

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
"""Seconds a server has to start accepting connections."""
STOP_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL when stopping a server."""
KILL_TIMEOUT = 5.0
"""Seconds processes may take to disappear after SIGKILL before teardown fails."""

SSHD = "/usr/sbin/sshd"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PORT_RETRIES = 3
# A probe waits this long for the greeting (sshd and x11vnc send theirs at once), then
# tries again: a port taken by a silent process is noticed quickly.
_PROBE_TIMEOUT = 0.5
_LOG_LIMIT = 256 * 1024


class ServerStartError(Exception):
    """A server did not start; the message carries its log tail."""


def _require(program: str, package: str) -> str:
    """The absolute path of C{program}, or L{SkipTest} naming the apt package to install."""
    path = program if os.path.isabs(program) else shutil.which(program, path=SAFE_PATH)
    if path is None or not os.access(path, os.X_OK):
        raise SkipTest(f"{program} is not installed (apt-get install {package})")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _new_directory(testcase: TestCase) -> str:
    """A fresh absolute directory for one server's files."""
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory, mode=0o700)
    return directory


def _write_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create C{path} (which must not exist) with C{mode} and C{data}."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may only have narrowed it; be exact


# -- Keys ---------------------------------------------------------------------------------


def _ed25519_openssh(passphrase: bytes | None = None) -> tuple[bytes, str]:
    """A new ed25519 key: (OpenSSH private key file bytes, C{ssh-ed25519 AAAA...} line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase)
    )
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public.decode("ascii")


def make_client_key(directory: str, passphrase: bytes | None = None) -> tuple[str, str]:
    """Write a throwaway ed25519 client key into C{directory}.

    The private key is in OpenSSH format, mode 0600, encrypted with C{passphrase} when one
    is given (bcrypt KDF + AES, as C{ssh-keygen -N} does); the public line is also written
    next to it as C{<path>.pub}.

    @return: (private key path, C{ssh-ed25519 AAAA...} public line).
    """
    os.makedirs(directory, exist_ok=True)
    private, public = _ed25519_openssh(passphrase)
    for n in itertools.count(1):
        path = os.path.join(directory, f"client_ed25519_{n}")
        try:
            _write_file(path, private)
        except FileExistsError:
            continue
        _write_file(path + ".pub", (public + "\n").encode("ascii"), 0o644)
        return path, public
    raise AssertionError("unreachable")


# -- Process trees ------------------------------------------------------------------------


class _Proc(NamedTuple):
    """One line of C{/proc/<pid>/stat}, the fields we use."""

    ppid: int
    state: str
    comm: str
    session: int


def _proc_table() -> dict[int, _Proc]:
    """Every process on the system, from /proc."""
    table: dict[int, _Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        close = stat.rindex(b")")
        comm = stat[stat.index(b"(") + 1 : close].decode("utf-8", "replace")
        state, ppid, _pgrp, session = stat[close + 2 :].split()[:4]
        table[int(name)] = _Proc(int(ppid), state.decode("ascii"), comm, int(session))
    return table


def _descendants(root: int, table: dict[int, _Proc]) -> set[int]:
    """All descendants of C{root} in C{table} (not C{root} itself)."""
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal(pids: Iterable[int], signum: int) -> None:
    """Send C{signum} to each pid that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _reap(pids: Iterable[int]) -> None:
    """Reap those of C{pids} that were re-parented to us and have exited."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _exists(pid: int) -> bool:
    """Whether C{pid} still exists, zombies included (they are not reaped yet)."""
    return os.path.exists(f"/proc/{pid}")


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _exit_description(reason: Failure) -> str:
    """C{exit code N} or C{signal N}, from a C{processEnded} reason."""
    sig = getattr(reason.value, "signal", None)
    if sig is not None:
        return f"signal {sig}"
    return f"exit code {getattr(reason.value, 'exitCode', None)}"


class _Subreaper:
    """Reference-counted C{PR_SET_CHILD_SUBREAPER} on this process (a no-op off Linux)."""

    def __init__(self) -> None:
        self._holders = 0
        self._restore: bool | None = None

    @staticmethod
    def _prctl() -> Callable[..., int] | None:
        try:
            prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
        return prctl

    def acquire(self) -> None:
        """Become a child subreaper (if not already) until the matching L{release}."""
        prctl = self._prctl()
        if self._holders == 0 and prctl is not None:
            current = ctypes.c_int(0)
            if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(current), 0, 0, 0) == 0:
                self._restore = bool(current.value)
                if not current.value:
                    prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self._holders += 1

    def release(self) -> None:
        """Undo one L{acquire}; the last one restores the previous setting."""
        self._holders -= 1
        prctl = self._prctl()
        if self._holders == 0 and prctl is not None and self._restore is False:
            prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
            self._restore = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Be a child subreaper while the context is open."""
        self.acquire()
        try:
            yield
        finally:
            self.release()


_subreaper = _Subreaper()


def _ssh_connection(pid: int) -> str | None:
    """The C{SSH_CONNECTION} environment variable of C{pid}, if readable and set."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"SSH_CONNECTION="):
            return entry.split(b"=", 1)[1].decode("ascii", "replace")
    return None


Adopts = Callable[[int, _Proc], bool]
"""Whether a live orphan re-parented to us belongs to a given server (then it is killed)."""


def _adopted(adopts: Adopts) -> set[int]:
    """Orphans re-parented to this process that a teardown should kill and reap.

    Those are our children not spawned through the reactor (whose processes are registered
    with it): zombies that left our session (an orphan with nobody else to reap it), and
    live ones that C{adopts} recognises.
    """
    me, my_session = os.getpid(), os.getsid(0)
    spawned = set(process.reapProcessHandlers)
    return {
        pid
        for pid, proc in _proc_table().items()
        if proc.ppid == me
        and pid not in spawned
        and (proc.session != my_session if proc.state in "ZX" else adopts(pid, proc))
    }


class _Outcome:
    """One asynchronous result that any number of callers may wait for."""

    _PENDING = object()

    def __init__(self) -> None:
        self._result: object = self._PENDING
        self._waiters: list[Deferred[Any]] = []

    @property
    def done(self) -> bool:
        """Whether the result is known."""
        return self._result is not self._PENDING

    def set(self, result: object) -> None:
        """Record the result (a L{Failure} for an error) and wake every waiter."""
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)

    def _fire(self, waiter: Deferred[Any]) -> None:
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)

    def wait(self) -> Deferred[Any]:
        """A new L{Deferred} for the result."""
        waiter: Deferred[Any] = Deferred()
        if self.done:
            self._fire(waiter)
        else:
            self._waiters.append(waiter)
        return waiter


class _Child(protocol.ProcessProtocol):
    """A spawned server process: its log, extra output fds, exit, and tree teardown."""

    def __init__(self, name: str, reactor: Reactor, adopts: Adopts | None = None) -> None:
        self.name = name
        self.reactor = reactor
        self.adopts = adopts
        """Recognises descendants orphaned while the server ran (see L{_spawn})."""
        self.output = bytearray()
        self.fd_data: dict[int, bytearray] = {}
        self.listeners: list[Callable[[int, bytes], None]] = []
        self.reason: Failure | None = None
        self._ended = _Outcome()
        self._teardown: _Outcome | None = None

    # ProcessProtocol

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in (1, 2):
            self.output += data
            if len(self.output) > _LOG_LIMIT:
                del self.output[: len(self.output) - _LOG_LIMIT]
        else:
            self.fd_data.setdefault(childFD, bytearray()).extend(data)
        for listener in list(self.listeners):
            listener(childFD, data)

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self._ended.set(None)

    # State

    @property
    def pid(self) -> int | None:
        """The pid while the process is not reaped, else None."""
        return None if self.transport is None else self.transport.pid

    @property
    def running(self) -> bool:
        """Whether the process (or a holder of its output pipes) is still there."""
        return self.reason is None

    def ended(self) -> Deferred[None]:
        """Fires once the process is reaped and its pipes are closed."""
        return self._ended.wait()

    def log(self) -> str:
        """What the process wrote to stdout and stderr so far (the last 256 KiB)."""
        return self.output.decode("utf-8", "replace")

    def tail(self, lines: int = 40) -> str:
        """The last C{lines} lines of the log, for error messages."""
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- {self.name} log tail ---\n{text or '(empty)'}\n--- end of {self.name} log ---"

    def exit_description(self) -> str:
        """How the process ended, e.g. C{exit code 255} or C{signal 9}."""
        return "still running" if self.reason is None else _exit_description(self.reason)

    def tree(self) -> list[int]:
        """The pids of the process and all its live descendants (root first)."""
        root = self.pid
        if root is None:
            return []
        return [root, *sorted(_descendants(root, _proc_table()))]

    # Teardown

    def terminate(self, *, crash: bool = False) -> Deferred[None]:
        """Stop the whole process tree once; every call waits for that one teardown.

        @param crash: SIGKILL everything at once (after freezing the tree with SIGSTOP so
            nothing is sent to peers in between), instead of SIGTERM then SIGKILL.
        """
        if self._teardown is None:
            outcome = self._teardown = _Outcome()
            stopping = ensureDeferred(self._stop_tree(crash))
            if self.adopts is not None:
                stopping.addBoth(self._release_subreaper)
            stopping.addBoth(outcome.set)
        return self._teardown.wait()

    @staticmethod
    def _release_subreaper(result: object) -> object:
        """Undo the L{_subreaper} hold that L{_spawn} took for this server."""
        _subreaper.release()
        return result

    async def _freeze(self, root: int) -> set[int]:
        """SIGSTOP C{root} and its descendants until no new one appears; return them."""
        frozen = {root}
        _signal(frozen, signal.SIGSTOP)
        for _ in range(200):
            table = _proc_table()
            new = _descendants(root, table) - frozen
            _signal(new, signal.SIGSTOP)
            frozen |= new
            if not new and all(p not in table or table[p].state in "TtZX" for p in frozen):
                break
            await deferLater(self.reactor, 0.005)
        return frozen

    async def _stop_tree(self, crash: bool) -> None:
        root = self.pid
        with _subreaper.held():
            if root is None or not self.running:
                tree: set[int] = set()
            elif crash:
                tree = await self._freeze(root)
                _signal(tree, signal.SIGKILL)
            else:
                tree = await self._terminate_gracefully(root)
            # Orphans adopted earlier (sshd leaves one behind for each connection dropped
            # before authentication) are killed and reaped too.
            deadline = self.reactor.seconds() + KILL_TIMEOUT
            others = tree - {root}
            while True:
                orphans = set() if self.adopts is None else _adopted(self.adopts) - others
                _signal(orphans, signal.SIGKILL)
                others |= orphans
                _reap(others)
                alive = sorted(p for p in others if _exists(p))
                if not self.running and not alive:
                    return
                if self.reactor.seconds() > deadline:
                    raise RuntimeError(
                        f"{self.name}: processes {alive} (root {root}, ended: "
                        f"{not self.running}) still exist {KILL_TIMEOUT} s after SIGKILL"
                    )
                await deferLater(self.reactor, 0.01)

    async def _terminate_gracefully(self, root: int) -> set[int]:
        """SIGTERM the tree, then SIGKILL what is left after L{STOP_GRACE}; the pids."""
        tree = {root} | _descendants(root, _proc_table())
        _signal(tree, signal.SIGTERM)
        deadline = self.reactor.seconds() + STOP_GRACE
        while self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.02)
            if self.pid is not None:
                # children forked meanwhile (a connection accepted while stopping)
                new = _descendants(self.pid, _proc_table()) - tree
                _signal(new, signal.SIGTERM)
                tree |= new
            _reap(tree - {root})
            if not self.running and not any(_exists(p) for p in tree - {root}):
                return tree
        if self.pid is not None:
            tree |= _descendants(self.pid, _proc_table())
        else:
            tree.discard(root)  # reaped already: its pid may be reused
        _signal(tree, signal.SIGKILL)
        return tree


def _spawn(
    testcase: TestCase,
    reactor: Reactor,
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    path: str,
    extra_fds: Iterable[int] = (),
    adopts: Adopts | None = None,
) -> _Child:
    """Spawn C{argv} (stdin closed) and register its tree teardown as a cleanup.

    @param adopts: For servers whose descendants can be orphaned while they run (sshd:
        a connection process exiting before its children).  This process is then a child
        subreaper until the teardown, so orphans are re-parented here rather than to pid 1
        (which some sandboxes never reap), and the teardown kills those C{adopts}
        recognises and reaps every orphaned zombie.
    """
    child = _Child(name, reactor, adopts)
    if adopts is not None:
        _subreaper.acquire()
    child_fds: dict[int, str] = {0: "w", 1: "r", 2: "r"}
    child_fds.update((fd, "r") for fd in extra_fds)
    try:
        reactor.spawnProcess(child, argv[0], argv, env=env, path=path, childFDs=child_fds)
    except BaseException:
        if adopts is not None:
            _subreaper.release()
        raise
    child.transport.closeStdin()
    testcase.addCleanup(child.terminate)
    return child


class _OneShot(protocol.ProcessProtocol):
    """Collect a short command's output and exit."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.reason: Failure | None = None
        self.ended = _Outcome()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        (self.out if childFD == 1 else self.err).extend(data)

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.set(None)


async def _run(
    reactor: Reactor,
    argv: list[str],
    *,
    env: dict[str, str],
    path: str,
    timeout: float = START_TIMEOUT,
) -> str:
    """Run a short command to completion; its stdout, or L{RuntimeError} with its output."""
    one = _OneShot()
    reactor.spawnProcess(one, argv[0], argv, env=env, path=path)
    one.transport.closeStdin()
    timer = reactor.callLater(timeout, one.transport.signalProcess, "KILL")
    try:
        await one.ended.wait()
    finally:
        if timer.active():
            timer.cancel()
    assert one.reason is not None
    if not one.reason.check(error.ProcessDone):
        output = (one.out + one.err).decode("utf-8", "replace")
        how = _exit_description(one.reason)
        late = f" after {timeout:.0f} s" if timer.called else ""
        raise RuntimeError(f"{' '.join(argv)} ended with {how}{late}:\n{output}")
    return one.out.decode("utf-8", "replace")


# -- Readiness probes ---------------------------------------------------------------------


class _GreetingProbe(protocol.Protocol):
    """Read the server's first line (or C{want} bytes), then abort the connection."""

    def __init__(self, want: int) -> None:
        self.want = want
        self.data = b""
        self.lost: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want or b"\n" in self.data:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(self.data)


async def _greeting(reactor: Reactor, port: int, want: int, timeout: float) -> bytes | None:
    """The greeting of 127.0.0.1:C{port}, or None if nothing accepts connections there."""
    probe = _GreetingProbe(want)
    endpoint = TCP4ClientEndpoint(reactor, LOOPBACK, port, timeout=timeout)
    try:
        await connectProtocol(endpoint, probe)
    except error.ConnectError:
        return None
    timer = reactor.callLater(timeout, probe.transport.abortConnection)
    try:
        return await probe.lost
    finally:
        if timer.active():
            timer.cancel()


async def _wait_for_greeting(
    reactor: Reactor, child: _Child, port: int, greeting: bytes, timeout: float
) -> None:
    """Poll 127.0.0.1:C{port} until it answers with C{greeting}; fail if C{child} dies."""
    deadline = reactor.seconds() + timeout
    while True:
        if not child.running:
            raise ServerStartError(
                f"{child.name} ended ({child.exit_description()}) before accepting "
                f"connections on {LOOPBACK}:{port}\n{child.tail()}"
            )
        got = await _greeting(reactor, port, len(greeting), _PROBE_TIMEOUT)
        if got is not None and got.startswith(greeting):
            return
        if reactor.seconds() >= deadline:
            seen = "connection refused" if got is None else f"greeting {got!r}"
            raise ServerStartError(
                f"{child.name} did not answer {greeting!r} on {LOOPBACK}:{port} within "
                f"{timeout:.0f} s (last probe: {seen})\n{child.tail()}"
            )
        await deferLater(reactor, 0.05)


async def _wait_until(
    reactor: Reactor,
    child: _Child,
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    *,
    failure: type[Exception] = ServerStartError,
) -> None:
    """Poll C{ready()} until true; raise C{failure} if C{child} ends first or on timeout."""
    deadline = reactor.seconds() + timeout
    while not ready():
        if not child.running:
            raise failure(
                f"{child.name} ended ({child.exit_description()}) before {what}\n{child.tail()}"
            )
        if reactor.seconds() >= deadline:
            raise failure(f"{child.name}: no {what} within {timeout:.1f} s\n{child.tail()}")
        await deferLater(reactor, 0.02)


async def _start_on_free_port(
    testcase: TestCase,
    reactor: Reactor,
    name: str,
    make_argv: Callable[[int], list[str]],
    greeting: bytes,
    *,
    env: dict[str, str],
    path: str,
    adopts: Callable[[int], Adopts] | None = None,
) -> tuple[_Child, int]:
    """Start a server on a free port, retrying when another process took the port first."""
    for attempt in range(_PORT_RETRIES):
        port = free_port()
        child = _spawn(
            testcase,
            reactor,
            name,
            make_argv(port),
            env=env,
            path=path,
            adopts=None if adopts is None else adopts(port),
        )
        try:
            await _wait_for_greeting(reactor, child, port, greeting, START_TIMEOUT)
        except ServerStartError:
            lost_race = not child.running and "Address already in use" in child.log()
            if lost_race and attempt + 1 < _PORT_RETRIES:
                continue
            raise
        return child, port
    raise AssertionError("unreachable")


# -- sshd ---------------------------------------------------------------------------------


class Sshd:
    """A running OpenSSH sshd on 127.0.0.1 (see L{start_sshd})."""

    def __init__(
        self,
        *,
        child: _Child,
        port: int,
        directory: str,
        config_path: str,
        effective_config: str,
        host_key_public_openssh: str,
        client_key_path: str,
        client_key_public: str,
        authorized_keys_path: str,
    ) -> None:
        self._child = child
        self.port = port
        """The TCP port on 127.0.0.1."""
        self.directory = directory
        """The temp directory holding every file of this server."""
        self.config_path = config_path
        """The sshd_config passed with C{-f}."""
        self.effective_config = effective_config
        """What C{sshd -T -f config} printed: the configuration sshd runs with."""
        self.host_key_public_openssh = host_key_public_openssh
        """The host key's C{ssh-ed25519 AAAA...} line."""
        self.client_key_path = client_key_path
        """A throwaway unencrypted ed25519 client key (OpenSSH format, mode 0600)."""
        self.client_key_public = client_key_public
        """The client key's C{ssh-ed25519 AAAA...} line."""
        self.authorized_keys_path = authorized_keys_path
        """The C{AuthorizedKeysFile}; sshd reads it at each authentication."""
        self.user = pwd.getpwuid(os.getuid()).pw_name
        """The user sshd runs as and lets in (root under the test setup)."""
        self.home = os.path.join(directory, "home")
        """HOME of the sessions (C{SetEnv}), an empty directory: no dotfiles are read."""

    @property
    def log(self) -> str:
        """What sshd (and its per-connection processes) wrote so far (LogLevel VERBOSE)."""
        return self._child.log()

    @property
    def pid(self) -> int | None:
        """The listener's pid, None once it has been reaped."""
        return self._child.pid

    @property
    def running(self) -> bool:
        """Whether the listener (or a process holding its log pipe) is still there."""
        return self._child.running

    def processes(self) -> list[int]:
        """The listener's pid and those of its live descendants (connections, sessions)."""
        return self._child.tree()

    def known_hosts_line(self) -> str:
        """The OpenSSH C{known_hosts} line: C{[127.0.0.1]:<port> ssh-ed25519 AAAA...}."""
        host = LOOPBACK if self.port == 22 else f"[{LOOPBACK}]:{self.port}"
        return f"{host} {self.host_key_public_openssh}"

    def bare_known_hosts_line(self) -> str:
        """C{127.0.0.1 ssh-ed25519 AAAA...}: Twisted Conch's C{KnownHostsFile} ignores ports.

        Conch's C{SSHCommandClientEndpoint} looks the host up by the bare host name and IP,
        so a known_hosts file for it needs this line (the C{[host]:port} form never matches).
        """
        return f"{LOOPBACK} {self.host_key_public_openssh}"

    def write_known_hosts(self, path: str) -> str:
        """Write a known_hosts file with both lines above; return C{path}."""
        with open(path, "w") as f:
            f.write(self.known_hosts_line() + "\n" + self.bare_known_hosts_line() + "\n")
        return path

    def add_authorized_key(self, line: str) -> None:
        """Authorize another public key line (effective for the next authentication)."""
        with open(self.authorized_keys_path, "a") as f:
            f.write(line.strip() + "\n")

    def kill(self) -> Deferred[None]:
        """Crash sshd now: SIGKILL the listener and every connection and session process.

        The tree is frozen with SIGSTOP first, so clients see their TCP connections drop
        with no SSH message before.  Fires once all of them are gone; the port then refuses
        connections.  (Killing only the listener would leave sessions running.)
        """
        return self._child.terminate(crash=True)

    def stop(self) -> Deferred[None]:
        """SIGTERM sshd's whole tree, SIGKILL after a grace; fires once all are gone."""
        return self._child.terminate()


def _sshd_value(value: str) -> str:
    """Quote a configuration value that contains blanks."""
    return f'"{value}"' if re.search(r"\s", value) else value


def _sshd_config(
    port: int,
    directory: str,
    host_key: str,
    authorized_keys: str,
    extra: dict[str, str],
) -> str:
    # Sessions get HOME in the temp dir (SetEnv overrides the passwd entry): shells then
    # read none of the real user's dotfiles (a root ~/.bashrc may run slow tools, even
    # take locks that a killed session leaves behind).  The working directory stays the
    # passwd one.
    """An sshd_config that depends on nothing under /etc/ssh."""
    options: dict[str, str] = {
        "ListenAddress": f"{LOOPBACK}:{port}",
        "AddressFamily": "inet",
        "HostKey": _sshd_value(host_key),
        "PidFile": _sshd_value(os.path.join(directory, "sshd.pid")),
        "AuthorizedKeysFile": _sshd_value(authorized_keys),
        "AuthorizedPrincipalsFile": "none",
        "StrictModes": "no",
        "PubkeyAuthentication": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "HostbasedAuthentication": "no",
        "UsePAM": "no",
        "PermitRootLogin": "prohibit-password",
        "AllowTcpForwarding": "yes",
        "MaxSessions": "100",
        "MaxStartups": "100",
        "LogLevel": "VERBOSE",
        "PermitUserRC": "no",
        "PrintMotd": "no",
        "PrintLastLog": "no",
        "UseDNS": "no",
        "X11Forwarding": "no",
        "Subsystem": "sftp internal-sftp",
        "SetEnv": _sshd_value(f"HOME={os.path.join(directory, 'home')}"),
    }
    by_lower = {key.lower(): key for key in options}
    for key, value in extra.items():
        options.pop(by_lower.get(key.lower(), key), None)
        options[key] = value
    lines = ["# Written by tests/helpers/realservers.py; used with sshd -f, nothing from /etc/ssh."]
    lines += [f"{key} {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def _sshd_adopts(port: int) -> Adopts:
    """Orphans of the sshd on C{port}: sshd processes and session commands."""
    server = f"{LOOPBACK} {port}"

    def adopts(pid: int, proc: _Proc) -> bool:
        connection = _ssh_connection(pid)
        if connection is not None:
            return connection.endswith(f" {server}")
        return proc.comm == "sshd"

    return adopts


def start_sshd(
    testcase: TestCase,
    reactor: Reactor,
    *,
    authorized_keys: list[str] | None = None,
    extra_config: dict[str, str] | None = None,
) -> Deferred[Sshd]:
    """Start C{/usr/sbin/sshd -D -e -f <config>} on 127.0.0.1:<free port>.

    It runs as the current user (root under the test setup) with a throwaway ed25519 host
    key, public key authentication only (C{PermitRootLogin prohibit-password}, no PAM),
    TCP forwarding allowed, C{MaxSessions 100} and C{MaxStartups 100}, C{LogLevel VERBOSE}
    to the pipe read into L{Sshd.log}.  The configuration is checked with C{sshd -T} first.

    @param authorized_keys: Public key lines to authorize; by default only the generated
        client key L{Sshd.client_key_path} (pass a list to choose exactly, C{[]} for none).
    @param extra_config: sshd_config options added, or replacing ours (matched without case).
    @return: Fires with an L{Sshd} once sshd sends its C{SSH-2.0-} banner.
    """
    sshd = _require(SSHD, "openssh-server")
    return ensureDeferred(_start_sshd(testcase, reactor, sshd, authorized_keys, extra_config))


async def _start_sshd(
    testcase: TestCase,
    reactor: Reactor,
    sshd: str,
    authorized_keys: list[str] | None,
    extra_config: dict[str, str] | None,
) -> Sshd:
    if os.geteuid() == 0:
        # The privilege separation directory: sshd refuses to start without it.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    directory = _new_directory(testcase)
    host_private, host_public = _ed25519_openssh()
    host_key = os.path.join(directory, "ssh_host_ed25519_key")
    _write_file(host_key, host_private)
    _write_file(host_key + ".pub", (host_public + "\n").encode("ascii"), 0o644)
    client_key, client_public = make_client_key(directory)
    os.mkdir(os.path.join(directory, "home"), 0o700)
    authorized = os.path.join(directory, "authorized_keys")
    lines = [client_public] if authorized_keys is None else authorized_keys
    _write_file(authorized, "".join(line.strip() + "\n" for line in lines).encode(), 0o644)
    config = os.path.join(directory, "sshd_config")
    env = {"PATH": SAFE_PATH, "LANG": "C"}

    def argv(port: int) -> list[str]:
        text = _sshd_config(port, directory, host_key, authorized, extra_config or {})
        with open(config, "w") as f:
            f.write(text)
        return [sshd, "-D", "-e", "-f", config]

    argv(free_port())  # write a configuration to validate; each attempt writes its own port
    try:
        effective = await _run(reactor, [sshd, "-T", "-f", config], env=env, path=directory)
    except RuntimeError as e:
        raise ServerStartError(f"sshd rejects its configuration {config}:\n{e}") from None
    child, port = await _start_on_free_port(
        testcase,
        reactor,
        "sshd",
        argv,
        b"SSH-2.0-",
        env=env,
        path=directory,
        adopts=_sshd_adopts,
    )
    return Sshd(
        child=child,
        port=port,
        directory=directory,
        config_path=config,
        effective_config=effective,
        host_key_public_openssh=host_public,
        client_key_path=client_key,
        client_key_public=client_public,
        authorized_keys_path=authorized,
    )


# -- TCP echo -----------------------------------------------------------------------------


class _Echo(protocol.Protocol):
    """Write back whatever arrives."""

    factory: _EchoFactory

    def connectionMade(self) -> None:
        self.factory.live.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.live.discard(self)
        if not self.factory.live and not self.factory.lost.done:
            self.factory.lost.set(None)


class _EchoFactory(protocol.Factory):
    protocol = _Echo

    def __init__(self) -> None:
        self.live: set[_Echo] = set()
        self.lost = _Outcome()


def start_tcp_echo(testcase: TestCase, reactor: Reactor) -> Deferred[int]:
    """An in-process TCP echo server on 127.0.0.1:<free port>; fires with the port.

    The cleanup stops listening and aborts connections still open.
    """
    factory = _EchoFactory()
    listening = reactor.listenTCP(0, factory, interface=LOOPBACK)

    async def close() -> None:
        await listening.stopListening()
        while factory.live:
            waiter = _Outcome()
            factory.lost = waiter
            for echo in list(factory.live):
                echo.transport.abortConnection()
            await waiter.wait()

    testcase.addCleanup(lambda: ensureDeferred(close()))
    port: int = listening.getHost().port
    return defer.succeed(port)


# -- Xvfb + x11vnc ------------------------------------------------------------------------

_XEV_START = re.compile(r"^(KeyPress|KeyRelease) event\b")
_XEV_KEYSYM = re.compile(r"\(keysym 0x[0-9a-f]+, ([^)\s]+)\)")
_IM_PIXEL = re.compile(r"^0,0:\s*\(([^)]*)\)", re.M)
_IM_HEADER = re.compile(r"enumeration:\s*\d+,\d+,(\d+),")


_XVFB_OPTIONS = ("-nolisten", "tcp", "-noreset")
# x11vnc: loopback IPv4 only, many viewers, no ~/.x11vncrc, no external commands; poll the
# screen without DAMAGE or MIT-SHM (both are optional in containers, the screen is small).
_X11VNC_OPTIONS = (
    *("-localhost", "-listen", LOOPBACK, "-noipv6", "-forever", "-shared"),
    *("-noxdamage", "-noshm", "-norc", "-nocmds"),
)


class _KeyWatcher:
    """Key events parsed from the output of C{xev -root -event keyboard}."""

    def __init__(self, xev: _Child) -> None:
        self.xev = xev
        self.events: list[tuple[str, str]] = []
        self._buffer = ""
        self._kind = ""
        xev.listeners.append(self._output)

    def _output(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        self._buffer += data.decode("utf-8", "replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            # "KeyPress event, serial 18, ..." then "    state 0x0, keycode 38 (keysym 0x61, a)"
            start = _XEV_START.match(line)
            if start:
                self._kind = start.group(1)
                continue
            keysym = _XEV_KEYSYM.search(line)
            if keysym and self._kind:
                self.events.append((self._kind, keysym.group(1)))
                self._kind = ""

    async def wait(self, reactor: Reactor, event: str, keysym: str, timeout: float) -> None:
        """Wait until C{(event, keysym)} was seen; L{TimeoutError} after C{timeout}."""
        await _wait_until(
            reactor,
            self.xev,
            lambda: (event, keysym) in self.events,
            f"{event} of {keysym} (seen: {self.events})",
            timeout,
            failure=TimeoutError,
        )


class VncDesktop:
    """An Xvfb display painted one colour, served by x11vnc (see L{start_vnc_desktop}).

    Key events reaching the X server are observed with C{xev -root -event keyboard}: with
    no window manager and no other window, the focus is PointerRoot and keys typed through
    VNC (x11vnc injects them with XTEST) are delivered to the root window, where xev
    reports them.  A test that maps its own windows changes where keys go.
    """

    def __init__(
        self,
        *,
        reactor: Reactor,
        directory: str,
        display: str,
        port: int,
        password: str | None,
        size: tuple[int, int],
        colour: tuple[int, int, int],
        env: dict[str, str],
        xvfb: _Child,
        x11vnc: _Child,
        keys: _KeyWatcher,
    ) -> None:
        self._reactor = reactor
        self._env = env
        self._xvfb = xvfb
        self._x11vnc = x11vnc
        self._keys = keys
        self._xev = keys.xev
        self.directory = directory
        """The temp directory holding this desktop's files."""
        self.display = display
        """The X display, e.g. C{":3"}."""
        self.port = port
        """x11vnc's RFB port on 127.0.0.1."""
        self.password = password
        """The VNC password (VNC uses its first 8 characters), or None for no auth."""
        self.width, self.height = size
        """The screen size in pixels."""
        self.colour = colour
        """The (r, g, b) the whole root window is painted with."""

    @property
    def log(self) -> str:
        """x11vnc's log so far."""
        return self._x11vnc.log()

    @property
    def xvfb_log(self) -> str:
        """Xvfb's log so far."""
        return self._xvfb.log()

    def processes(self) -> list[int]:
        """The pids of Xvfb, x11vnc and xev (with any descendants), while running."""
        return [*self._xvfb.tree(), *self._x11vnc.tree(), *self._xev.tree()]

    def key_events(self) -> list[tuple[str, str]]:
        """Key events the X server delivered so far, e.g. C{[("KeyPress", "a"), ...]}.

        Names are X keysym names (C{a}, C{Return}, C{Shift_L}, C{F1}, ...).
        """
        return list(self._keys.events)

    def clear_key_events(self) -> None:
        """Forget the key events seen so far."""
        self._keys.events.clear()

    def wait_for_key(
        self, keysym: str, event: str = "KeyPress", timeout: float = 5.0
    ) -> Deferred[None]:
        """Fires once C{(event, keysym)} was seen (already or later).

        @raise TimeoutError: (as the Deferred's failure) after C{timeout} seconds; the
            message lists the events seen and ends with xev's output.
        """
        return ensureDeferred(self._keys.wait(self._reactor, event, keysym, timeout))

    def xdotool(self, *args: str) -> Deferred[str]:
        """Run C{xdotool ARGS} against the display; fires with its stdout."""
        xdotool = _require("xdotool", "xdotool")
        return ensureDeferred(
            _run(self._reactor, [xdotool, *args], env=self._env, path=self.directory)
        )

    def screenshot_rgb(self, x: int, y: int) -> Deferred[tuple[int, int, int]]:
        """The (r, g, b) of pixel (x, y) of the root window, read from the X side."""
        return ensureDeferred(self._pixel(x, y))

    async def _pixel(self, x: int, y: int) -> tuple[int, int, int]:
        im_import = _require("import", "imagemagick")
        text = await _run(
            self._reactor,
            [im_import, "-silent", "-window", "root", "-crop", f"1x1+{x}+{y}", "txt:-"],
            env=self._env,
            path=self.directory,
        )
        header = _IM_HEADER.search(text)
        pixel = _IM_PIXEL.search(text)
        if header is None or pixel is None:
            raise ValueError(f"cannot parse ImageMagick's pixel output {text!r}")
        top = int(header.group(1))
        values = [float(v.rstrip("%")) for v in pixel.group(1).split(",")[:3]]
        r, g, b = (round(v * 255 / top) for v in values)
        return r, g, b

    def stop(self) -> Deferred[None]:
        """Stop xev, x11vnc, then Xvfb; fires once all are gone."""

        async def stop_all() -> None:
            for child in (self._xev, self._x11vnc, self._xvfb):
                await child.terminate()

        return ensureDeferred(stop_all())


def start_vnc_desktop(
    testcase: TestCase,
    reactor: Reactor,
    *,
    width: int = 320,
    height: int = 240,
    password: str | None = "vncpw",
    colour: tuple[int, int, int] = (0x33, 0x66, 0x99),
) -> Deferred[VncDesktop]:
    """Start Xvfb (WxHx24), paint its root window C{colour}, and serve it with x11vnc.

    Xvfb picks a free display itself (C{-displayfd}); C{xsetroot -solid} paints the root
    window (Xvfb runs with C{-noreset} so the colour survives clients leaving); x11vnc
    listens on 127.0.0.1:<free port> only, C{-forever -shared}, with the password read
    from a 0600 file (C{-passwdfile}, so it is not in C{ps}) or no authentication
    (C{password=None}).  C{xev} watches key events (L{VncDesktop.key_events}).

    @return: Fires with a L{VncDesktop} once x11vnc sends its C{RFB 003.00x} greeting and
        xev sees keys (probed with one Shift_L typed through XTEST, then forgotten).
    """
    programs = {
        "Xvfb": "xvfb",
        "xsetroot": "x11-xserver-utils",
        "x11vnc": "x11vnc",
        "xev": "x11-utils",
        "xdotool": "xdotool",
        "import": "imagemagick",
    }
    paths = {name: _require(name, package) for name, package in programs.items()}
    return ensureDeferred(
        _start_vnc_desktop(
            testcase,
            reactor,
            paths=paths,
            size=(width, height),
            password=password,
            colour=colour,
        )
    )


async def _start_vnc_desktop(
    testcase: TestCase,
    reactor: Reactor,
    *,
    paths: dict[str, str],
    size: tuple[int, int],
    password: str | None,
    colour: tuple[int, int, int],
) -> VncDesktop:
    directory = _new_directory(testcase)
    base_env = {
        "PATH": SAFE_PATH,
        "HOME": directory,
        "LANG": "C",
        "XAUTHORITY": os.path.join(directory, "Xauthority"),
    }
    width, height = size
    screen = f"{width}x{height}x24"
    xvfb_argv = [paths["Xvfb"], "-displayfd", "3", "-screen", "0", screen, *_XVFB_OPTIONS]
    xvfb = _spawn(
        testcase, reactor, "Xvfb", xvfb_argv, env=base_env, path=directory, extra_fds=(3,)
    )
    await _wait_until(
        reactor,
        xvfb,
        lambda: b"\n" in xvfb.fd_data.get(3, b""),
        "display number on -displayfd",
        START_TIMEOUT,
    )
    display = ":" + xvfb.fd_data[3].decode("ascii").strip()
    env = {**base_env, "DISPLAY": display}
    hex_colour = "#{:02x}{:02x}{:02x}".format(*colour)
    await _run(reactor, [paths["xsetroot"], "-solid", hex_colour], env=env, path=directory)

    xev_argv = [paths["xev"], "-root", "-event", "keyboard"]
    keys = _KeyWatcher(_spawn(testcase, reactor, "xev", xev_argv, env=env, path=directory))

    if password is None:
        auth = ["-nopw"]
    else:
        password_file = os.path.join(directory, "vncpasswd")
        _write_file(password_file, (password + "\n").encode())
        auth = ["-passwdfile", password_file]

    def x11vnc_argv(port: int) -> list[str]:
        return [
            paths["x11vnc"],
            "-display",
            display,
            "-rfbport",
            str(port),
            *_X11VNC_OPTIONS,
            *auth,
        ]

    x11vnc, port = await _start_on_free_port(
        testcase, reactor, "x11vnc", x11vnc_argv, b"RFB 003.00", env=env, path=directory
    )
    # xev selects keyboard events on the root window soon after it starts: type Shift_L
    # until it reports one, so that no key typed by a test can be missed.
    deadline = reactor.seconds() + START_TIMEOUT
    while True:
        await _run(reactor, [paths["xdotool"], "key", "Shift_L"], env=env, path=directory)
        try:
            await keys.wait(reactor, "KeyRelease", "Shift_L", 0.3)
        except TimeoutError as e:
            if not keys.xev.running or reactor.seconds() > deadline:
                raise ServerStartError(f"xev does not see keys typed with XTEST: {e}") from e
        else:
            break
    keys.events.clear()
    return VncDesktop(
        reactor=reactor,
        directory=directory,
        display=display,
        port=port,
        password=password,
        size=size,
        colour=colour,
        env=env,
        xvfb=xvfb,
        x11vnc=x11vnc,
        keys=keys,
    )
