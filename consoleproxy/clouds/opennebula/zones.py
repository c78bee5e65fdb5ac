"""
Where other zones' console proxies are.

A zone's relay URL comes from the configuration (``[zones.<id>] url``), else
from the zone's ``FIREEDGE_ENDPOINT``, else from the host of its XML-RPC
``ENDPOINT`` and the default port, as FireEdge derives it.  Zones come from
oned's zone pool, fetched with the server-admin credential, cached and
refreshed (one fetch at a time, shared by the lookups waiting for it); when
oned cannot be asked, the last answer (or the configuration alone) stands in,
and oned is asked again after L{ZoneDirectory.retry} seconds, not on every
lookup.  Unknown zones are refused before any connection is made, disabled
ones with a clear message.

Zone ids come from browsers: they are parsed by L{consoleproxy.consoles.zone_id}
(``00`` is zone 0, anything but a decimal id up to 2^31-1 is refused), and
only the zones in oned's pool (at most L{MAX_ZONES}) or the configuration are
kept; an unknown id is refused from what is kept, leaving nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger

from consoleproxy.consoles import ZoneIdError, zone_key
from consoleproxy.guacamole.status import GuacamoleError, Status

#: FireEdge's (and our) default port, used with the host of a zone's ENDPOINT.
DEFAULT_PORT = 2616

#: Zones kept from oned's pool (OpenNebula federations have a handful); the
#: rest of a larger pool is ignored, with a warning.
MAX_ZONES = 1024

#: Seconds between two warnings that the zone pool could not be fetched.
WARN_INTERVAL = 60.0


@dataclass(frozen=True)
class Zone:
    """Another zone, as far as consoles are concerned."""

    id: str
    name: str
    enabled: bool
    url: str | None  # the remote relay's WebSocket URL


def relay_url(fireedge_endpoint: str, endpoint: str, port: int = DEFAULT_PORT) -> str | None:
    """
    The WebSocket URL of a zone's console relay.

    ``FIREEDGE_ENDPOINT`` (``https://zone2.example.com/fireedge``) becomes
    ``wss://zone2.example.com/fireedge/guacamole``; without it, the host of
    ``ENDPOINT`` with C{port}: ``ws://<host>:2616/fireedge/guacamole``.
    """
    fireedge_endpoint = fireedge_endpoint.strip()
    if fireedge_endpoint and fireedge_endpoint != "-":
        parts = urlsplit(fireedge_endpoint)
        scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
        if scheme is None or not parts.netloc:
            return None
        path = parts.path.rstrip("/")
        path += "/guacamole" if path.endswith("/fireedge") else "/fireedge/guacamole"
        return f"{scheme}://{parts.netloc}{path}"
    endpoint = endpoint.strip()
    if endpoint and endpoint != "-":
        host = urlsplit(endpoint).hostname
        if host:
            host = f"[{host}]" if ":" in host else host
            return f"ws://{host}:{port}/fireedge/guacamole"
    return None


def zones_from_pool(pool: Element, limit: int = MAX_ZONES) -> dict[str, Zone]:
    """Zones from a ``ZONE_POOL`` document: at most C{limit}, ids that do not parse skipped."""
    zones = {}
    for zone in pool.findall("ZONE"):
        if len(zones) >= limit:
            break
        try:
            zone_id = zone_key((zone.findtext("ID") or "").strip())
        except ZoneIdError:
            continue
        zones[zone_id] = Zone(
            id=zone_id,
            name=(zone.findtext("NAME") or "").strip(),
            enabled=(zone.findtext("STATE") or "0").strip() != "1",
            url=relay_url(
                zone.findtext("TEMPLATE/FIREEDGE_ENDPOINT") or "",
                zone.findtext("TEMPLATE/ENDPOINT") or "",
            ),
        )
    return zones


class ZoneDirectory:
    """
    The zones, by id.

    @param configured: relay URLs from the configuration, by zone id; they
        win over oned's, and are all there is without oned.
    @param fetch_pool: fetches the zone pool from oned (or None).
    @param refresh: seconds an answer from oned is used before asking again.
    @param retry: seconds after a failed fetch before oned is asked again
        (at most C{refresh}).
    @raise ZoneIdError: a configured zone id is not one.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        configured: Mapping[str, str],
        fetch_pool: Callable[[], Deferred[Element]] | None = None,
        refresh: float = 60.0,
        retry: float = 5.0,
    ) -> None:
        self._clock = clock
        self._configured = {zone_key(k): v for k, v in configured.items()}
        self._fetch_pool = fetch_pool
        self._refresh = refresh
        self.retry = min(retry, refresh)
        self._zones: dict[str, Zone] = {}
        self._asked_at: float | None = None  # the last fetch's start
        self._ok = False  # whether that fetch succeeded (or still runs)
        self._fetching: list[Deferred[None]] | None = None
        self._warned_at: float | None = None

    @property
    def cached(self) -> int:
        """How many zones from oned's pool are kept (at most L{MAX_ZONES})."""
        return len(self._zones)

    def lookup(self, zone_id: str | int) -> Deferred[Zone]:
        """
        The zone, if it is known, enabled and reachable somehow.

        @raise GuacamoleError: (in the Deferred) CLIENT_BAD_REQUEST for
            something that is no zone id, RESOURCE_NOT_FOUND for an unknown
            zone, RESOURCE_CONFLICT for a disabled one, UPSTREAM_NOT_FOUND
            when no relay URL can be found for it.
        """
        try:
            key = zone_key(zone_id)
        except ZoneIdError as e:
            return fail(GuacamoleError(Status.CLIENT_BAD_REQUEST, e.message))
        return self._fresh().addCallback(lambda _: self._answer(key))

    def _fresh(self) -> Deferred[None]:
        """Fire once the pool is fresh enough: at once, or after the one fetch under way."""
        if self._fetching is not None:
            waiting: Deferred[None] = Deferred()
            self._fetching.append(waiting)
            return waiting
        now = self._clock.seconds()
        wait = self._refresh if self._ok else self.retry
        if self._fetch_pool is None or (self._asked_at is not None and now - self._asked_at < wait):
            return succeed(None)
        self._asked_at, self._ok, self._fetching = now, True, []

        def fetched(pool: Element) -> None:
            self._zones = zones_from_pool(pool)
            if len(pool.findall("ZONE")) > MAX_ZONES:
                self.log.warn("Zone pool has more than {n} zones: the rest ignored", n=MAX_ZONES)

        def failed(failure: Any) -> None:
            self._ok = False
            if self._warned_at is None or now - self._warned_at >= WARN_INTERVAL:
                self._warned_at = now
                self.log.warn(
                    "Zone pool not refreshed ({why}); using what is known",
                    why=failure.getErrorMessage(),
                )

        def done(_: None) -> None:
            waiting, self._fetching = self._fetching or [], None
            for d in waiting:
                d.callback(None)

        fetching = maybeDeferred(self._fetch_pool).addCallback(fetched)
        return fetching.addErrback(failed).addCallback(done)

    def _answer(self, zone_id: str) -> Zone:
        zone = self._zones.get(zone_id)
        configured = self._configured.get(zone_id)
        if zone is None and configured is None:
            raise GuacamoleError(Status.RESOURCE_NOT_FOUND, f"zone {zone_id} is unknown")
        if zone is None:
            zone = Zone(id=zone_id, name="", enabled=True, url=configured)
        elif configured is not None:
            zone = Zone(id=zone.id, name=zone.name, enabled=zone.enabled, url=configured)
        if not zone.enabled:
            raise GuacamoleError(Status.RESOURCE_CONFLICT, f"zone {zone_id} is disabled")
        if zone.url is None:
            raise GuacamoleError(
                Status.UPSTREAM_NOT_FOUND,
                f"zone {zone_id} has no FIREEDGE_ENDPOINT or ENDPOINT: set [zones.{zone_id}] url",
            )
        return zone
