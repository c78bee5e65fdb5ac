"""
The cluster's shared state as one object, built from the configuration's values.

The composition root (tap.py) calls L{build} when C{cluster.redis} is set,
starts it before listening and stops it after draining; the relays and the
token API get its parts through their seams (C{spent} for ISpentTokens,
C{leases} beside the session table, C{api_rate} beside the API's limiter,
C{registry} for the admin API), and C{/readyz} asks C{client.available}.
L{workers_problem} is the start-up rule for several worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from consoleproxy.cluster.leases import ClusterLeases
from consoleproxy.cluster.ratelimit import ClusterRateLimiter
from consoleproxy.cluster.redis_client import (
    RedisClient,
    load_trust_roots,
    parse_redis_url,
    read_password_file,
)
from consoleproxy.cluster.registry import SessionRegistry
from consoleproxy.cluster.spent_tokens import RedisSpentTokens


@dataclass
class ClusterState:
    """Everything shared through one Redis."""

    client: RedisClient
    spent: RedisSpentTokens
    leases: ClusterLeases
    api_rate: ClusterRateLimiter
    registry: SessionRegistry

    def start(self) -> None:
        """Connect, and start refreshing leases and session records."""
        self.client.start()
        self.leases.start()
        self.registry.start()

    def stop(self) -> Deferred[None]:
        """Stop refreshing and disconnect (held leases lapse after their TTL)."""
        self.leases.stop()
        self.registry.stop()
        return self.client.stop()


def build(
    reactor: Any,
    *,
    url: str,
    password_file: str = "",
    trust_roots: str = "",
    prefix: str = "consoleproxy:",
    max_sessions: int,
    max_sessions_per_user: int,
    api_rate: float,
    api_burst: int,
) -> ClusterState:
    """
    The shared state for C{cluster.redis} = C{url} (not started).

    @raise ValueError: a bad URL, password file or trust roots (config.py
        has checked them already; this is for callers that did not).
    """
    client = RedisClient(
        reactor,
        parse_redis_url(url),
        password=read_password_file(password_file) if password_file else None,
        trust_roots=load_trust_roots(trust_roots) if trust_roots else None,
    )
    return ClusterState(
        client=client,
        spent=RedisSpentTokens(client, reactor, prefix=prefix),
        leases=ClusterLeases(
            client,
            reactor,
            max_total=max_sessions,
            max_per_user=max_sessions_per_user,
            prefix=prefix,
        ),
        api_rate=ClusterRateLimiter(client, reactor, api_rate, api_burst, prefix=prefix),
        registry=SessionRegistry(client, reactor, prefix=prefix),
    )


def workers_problem(workers: int, redis_url: str) -> str | None:
    """
    Why C{workers} processes cannot start without Redis, or C{None}.

    Several processes each with its own memory would each let a token open
    once, and each count its own sessions: single use and the caps would
    silently stop holding.
    """
    if workers > 1 and not redis_url:
        return (
            f"server.workers = {workers} needs cluster.redis: without a shared Redis each "
            "process would let every token open once more and count only its own sessions "
            "against the caps"
        )
    return None
