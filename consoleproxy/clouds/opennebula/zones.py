"""
Where other zones' console proxies are.

A zone's relay URL comes from the configuration (``[zones.<id>] url``), else
from the zone's ``FIREEDGE_ENDPOINT``, else from the host of its XML-RPC
``ENDPOINT`` and the default port, as FireEdge derives it.  Zones come from
oned's zone pool, fetched with the server-admin credential, cached and
refreshed; when oned cannot be asked, the last answer (or the configuration
alone) stands in.  Unknown zones are refused before any connection is made,
disabled ones with a clear message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from consoleproxy.guacamole.status import GuacamoleError, Status

#: FireEdge's (and our) default port, used with the host of a zone's ENDPOINT.
DEFAULT_PORT = 2616


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


def zones_from_pool(pool: Element) -> dict[str, Zone]:
    """Zones from a ``ZONE_POOL`` document."""
    zones = {}
    for zone in pool.findall("ZONE"):
        zone_id = (zone.findtext("ID") or "").strip()
        if not zone_id:
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
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        configured: Mapping[str, str],
        fetch_pool: Callable[[], Deferred[Element]] | None = None,
        refresh: float = 60.0,
    ) -> None:
        self._clock = clock
        self._configured = dict(configured)
        self._fetch_pool = fetch_pool
        self._refresh = refresh
        self._zones: dict[str, Zone] = {}
        self._fetched_at: float | None = None

    def lookup(self, zone_id: str) -> Deferred[Zone]:
        """
        The zone, if it is known, enabled and reachable somehow.

        @raise GuacamoleError: (in the Deferred) RESOURCE_NOT_FOUND for an
            unknown zone, RESOURCE_CONFLICT for a disabled one,
            UPSTREAM_NOT_FOUND when no relay URL can be found for it.
        """
        now = self._clock.seconds()
        stale = self._fetched_at is None or now - self._fetched_at >= self._refresh
        if self._fetch_pool is None or not stale:
            return maybeDeferred(self._answer, zone_id)

        def fetched(pool: Element) -> Zone:
            self._zones = zones_from_pool(pool)
            self._fetched_at = self._clock.seconds()
            return self._answer(zone_id)

        def failed(failure: Any) -> Zone:
            self.log.warn(
                "Zone pool not refreshed ({why}); using what is known",
                why=failure.getErrorMessage(),
            )
            return self._answer(zone_id)

        return self._fetch_pool().addCallbacks(fetched, failed)

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
