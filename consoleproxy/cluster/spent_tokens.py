"""
Spent tokens in Redis: a token opens one session in the whole cluster.

C{SET <prefix>spent:<id> 1 NX PX <ms>} is atomic: of any number of
processes spending one token at once, exactly one gets C{OK}.  The key lives
as long as the token could still be opened (its remaining lifetime plus a
margin for the clocks of the hosts disagreeing), then Redis drops it by
itself: nothing to prune, and it outlives a restart of any consoleproxy.

It implements C{ISpentTokens.spend} (consoleproxy/interfaces.py, issue 13)
with a Deferred answer.  When Redis cannot answer, C{spend} fails with
L{RedisUnavailable} (Guacamole status 512, WebSocket close 1011): the token
is not opened unchecked.  The log line is the client's ("cluster: Redis at
... is unavailable (...): token opening fails closed (status 512) ...") once
per outage, and the relay's close line per refused session.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from consoleproxy.cluster.redis_client import RedisClient
from consoleproxy.interfaces import ISpentTokens

#: Seconds added to a spent record's life: a host whose clock is behind may
#: still take the token for valid that long after its expiry by ours.
CLOCK_SKEW = 30.0


class SpentAnswer(Deferred[bool]):
    """
    The answer of L{RedisSpentTokens.spend}: a Deferred that refuses to be
    read as a C{bool}.  A caller written for the in-memory stores
    (C{if not spent.spend(...)}) would otherwise take every Deferred for
    "first use" and let replays through; it gets a TypeError instead.
    """

    def __bool__(self) -> bool:
        raise TypeError("RedisSpentTokens.spend answers a Deferred: wait for it")


@implementer(ISpentTokens)
class RedisSpentTokens:
    """The cluster's record of spent tokens (see the module docstring)."""

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        *,
        prefix: str = "consoleproxy:",
        clock_skew: float = CLOCK_SKEW,
    ) -> None:
        self.client = client
        self.clock = clock
        self.prefix = prefix
        self.clock_skew = clock_skew

    def key(self, token_id: bytes) -> str:
        """The Redis key recording C{token_id}'s use."""
        return f"{self.prefix}spent:{token_id.hex()}"

    def spend(self, token_id: bytes, expires: float) -> Deferred[bool]:
        """
        Record the use of a token, atomically with the check.

        @param token_id: the token's unique id (its nonce).
        @param expires: when the token expires (seconds since the epoch).
        @return: a Deferred firing C{True} for the first use in the cluster,
            C{False} for any later one; failing with L{RedisUnavailable}
            when Redis cannot say.
        """
        remaining = expires - self.clock.seconds() + self.clock_skew
        milliseconds = max(1, math.ceil(remaining * 1000))
        d: Deferred[Any] = self.client.execute(
            "SET", self.key(token_id), "1", "NX", "PX", milliseconds
        )
        answer = SpentAnswer()
        d.addCallback(lambda reply: reply == "OK").chainDeferred(answer)
        return answer
