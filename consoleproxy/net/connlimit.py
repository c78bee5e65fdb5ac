"""
How many connections one client may hold, and the descriptors kept in reserve.

Every TCP connection costs a file descriptor, and the process has a fixed
number of them (C{RLIMIT_NOFILE}): without a cap, one address could open
connections until nothing is left, and then neither ``/healthz`` nor a new
session's upstream socket can be opened.  L{ConnectionGate} decides at
accept time, before a TLS handshake or a byte of HTTP, with a dictionary
look-up:

  - B{per client}: at most C{per_client} open connections per address (an
    IPv6 client's /64, as the rate limits count it).  A connection from a
    trusted frontend (C{server.trusted_proxies}) cannot be attributed yet (its
    ``X-Forwarded-For`` is not read), so frontends have their own, larger cap
    (C{per_frontend}) per frontend address; behind them the site counts the
    real client's long-lived requests (static files, WebSockets) against
    C{per_client} when the request arrives (L{ConnectionGate.acquire_client}).
  - B{descriptor reserve}: with fewer than C{reserve} descriptors left below
    the limit, a new connection is accepted only as a I{health-only}
    connection (``/healthz`` and ``/readyz`` answer, everything else gets 503,
    at most L{RESERVE_PER_CLIENT} such connections per client); with fewer than
    half the reserve left, it is refused outright.  The other half stays for
    work in flight: the upstream sockets of sessions being opened, tunnels,
    log files.

Counting open descriptors is a read of ``/proc/self/fd``: it is done at most
every C{interval} seconds (close to the limit every 50 ms, or less often when
the count itself is slow: it never takes over a tenth of the time), and in
between the gate adds the connections it admitted and released since, so
that an accept costs no system call.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from twisted.internet.interfaces import IReactorTime

from consoleproxy.net.clients import Client, Network, in_networks

#: Health-only connections one client may hold while the reserve is in use.
RESERVE_PER_CLIENT = 2


def raise_descriptor_limit() -> tuple[int, int, int]:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit (each connection is one).

    @return: the soft limit before, the soft limit now and the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        target = _kernel_max_open() or soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft, hard
        return soft, target, hard
    return soft, soft, hard


def _kernel_max_open() -> int | None:
    try:
        with open("/proc/sys/fs/nr_open", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def soft_descriptor_limit() -> int:
    """The process's soft C{RLIMIT_NOFILE} now."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def count_open_descriptors() -> int | None:
    """The process's open descriptors (``/proc/self/fd``), or C{None} if unknown."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return None


class Admission(Enum):
    """What the gate decides for a new connection."""

    #: Served as usual.
    NORMAL = "normal"
    #: Near the descriptor limit: only the health endpoints are served.
    HEALTH_ONLY = "health-only"


@dataclass
class Lease:
    """One admitted connection (or request); L{release} gives its place back (once)."""

    key: str
    admission: Admission
    _release: Callable[[Lease], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        """The connection is gone; calling this again does nothing."""
        release, self._release = self._release, None
        if release is not None:
            release(self)


class Refused(Exception):
    """A connection is refused; the message says why (for a log line)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(why)
        self.key = key


class DescriptorBudget:
    """
    The process's open descriptors against its limit, cheaply estimated.

    @param reserve: descriptors kept below the limit (see the module docstring).
    @param count: counts the open descriptors (C{None}: unknown, no reserve).
    @param limit: the descriptor limit (the soft C{RLIMIT_NOFILE}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        reserve: int,
        *,
        count: Callable[[], int | None] = count_open_descriptors,
        limit: Callable[[], int] = soft_descriptor_limit,
        interval: float = 1.0,
    ) -> None:
        self.clock = clock
        self.reserve = reserve
        self._count = count
        self._limit = limit
        self.interval = interval
        self._measured_at: float | None = None
        self._measured = 0
        self._limit_now = 0
        self._admitted_then = 0
        self._close_gap = 0.05

    def state(self, admitted: int) -> Admission | None:
        """
        Whether one more connection fits, with C{admitted} connections open.

        @return: L{Admission.NORMAL}, L{Admission.HEALTH_ONLY}, or C{None}: no room.
        """
        now = self.clock.seconds()
        estimate = self._measured + admitted - self._admitted_then
        due = self._measured_at is None or now - self._measured_at >= self.interval
        close = estimate >= self._limit_now - 2 * self.effective_reserve
        if due or (close and now - self._measured_at >= self._close_gap):  # type: ignore[operator]
            started = time.perf_counter()
            counted = self._count()
            # Counting a huge table takes a while: at most a tenth of the time.
            self._close_gap = max(0.05, 10 * (time.perf_counter() - started))
            self._measured_at = now
            self._limit_now = self._limit()
            self._admitted_then = admitted
            if counted is None:
                self._measured, self._limit_now = 0, 1 << 62
            else:
                self._measured = counted
            estimate = self._measured
        reserve = self.effective_reserve
        if estimate >= self._limit_now - reserve // 2:
            return None
        if estimate >= self._limit_now - reserve:
            return Admission.HEALTH_ONLY
        return Admission.NORMAL

    @property
    def effective_reserve(self) -> int:
        """The reserve, but never more than a quarter of the limit (a small limit)."""
        return min(self.reserve, self._limit_now // 4)

    @property
    def last_count(self) -> tuple[int, int]:
        """The last count of open descriptors and the limit then (for logs, tests)."""
        return self._measured, self._limit_now


class ConnectionGate:
    """
    Open connections by client, with caps, and the descriptor reserve.

    See the module docstring.  A connection is admitted by L{admit} (at
    accept time) and gives its place back with L{Lease.release} when it is
    gone.
    """

    def __init__(
        self,
        per_client: int,
        *,
        per_frontend: int = 4096,
        frontends: Sequence[Network] = (),
        budget: DescriptorBudget | None = None,
    ) -> None:
        self.per_client = per_client
        self.per_frontend = per_frontend
        self.frontends = list(frontends)
        self.budget = budget
        self._open: dict[str, int] = {}
        self._health_only: dict[str, int] = {}
        #: Connections open now (admitted, not yet released).
        self.total = 0

    def key_of(self, host: str) -> tuple[str, int]:
        """The key a peer is counted under, and that key's cap."""
        if host == "-" or (self.frontends and in_networks(host, self.frontends)):
            # (No address: a UNIX socket, which only a local frontend reaches.)
            return f"frontend {host}", self.per_frontend
        return Client(host, "").rate_key(), self.per_client

    def admit(self, host: str) -> Lease:
        """
        A new connection from C{host} (an IP address): admit it or say why not.

        @raise Refused: over its cap, or no descriptors to spare.
        """
        key, cap = self.key_of(host)
        held = self._open.get(key, 0)
        if held >= cap:
            raise Refused(key, f"over the cap of {cap} connections per client")
        admission = Admission.NORMAL
        if self.budget is not None:
            state = self.budget.state(self.total)
            if state is None:
                raise Refused("descriptors", "the server is at its descriptor limit")
            admission = state
        if admission is Admission.HEALTH_ONLY:
            if self._health_only.get(key, 0) >= RESERVE_PER_CLIENT:
                raise Refused(key, "the server is at its descriptor limit")
            self._health_only[key] = self._health_only.get(key, 0) + 1
        self._open[key] = held + 1
        self.total += 1
        return Lease(key, admission, self._give_back)

    def acquire_client(self, client: Client) -> Lease | None:
        """
        A long-lived request of a client behind a frontend: count it against
        C{per_client}.  @return: its lease, or C{None} when over the cap.
        """
        key = client.rate_key()
        held = self._open.get(key, 0)
        if held >= self.per_client:
            return None
        self._open[key] = held + 1
        return Lease(key, Admission.NORMAL, self._give_back_request)

    def _give_back(self, lease: Lease) -> None:
        self.total -= 1
        self._give_back_request(lease)
        if lease.admission is Admission.HEALTH_ONLY:
            _decrement(self._health_only, lease.key)

    def _give_back_request(self, lease: Lease) -> None:
        _decrement(self._open, lease.key)

    def open_by(self, key: str) -> int:
        """Connections open now under C{key} (for tests and metrics)."""
        return self._open.get(key, 0)

    def __len__(self) -> int:
        """The clients with open connections (the table's size)."""
        return len(self._open)


def _decrement(table: dict[str, int], key: str) -> None:
    left = table.get(key, 0) - 1
    if left > 0:
        table[key] = left
    else:
        table.pop(key, None)
