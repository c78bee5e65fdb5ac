"""
The per-client rate limit of net/ratelimit.py, counted across the cluster.

Same meaning as L{consoleproxy.net.ratelimit.RateLimiter}: a bucket of
C{burst} tokens per key refilling at C{rate} per second; C{take(key)}
answers C{None} (allowed) or the seconds until a token is there.  Keys are
the callers' as before (C{Client.rate_key()}: the address, an IPv6 client's
/64).  In Redis the bucket is one number, GCRA's "theoretical arrival time"
(C{<prefix>rate:<name>:<key>}, microseconds of Redis's clock), updated by one
Lua script: C{tat = max(stored, now) + 1/rate}; allowed while
C{tat - now <= burst/rate}; the wait otherwise is the excess.  That is the
token bucket exactly (tokens = burst - (tat - now) * rate), in one key that
expires once the bucket is full again.

Without Redis the limit falls back to this process's own L{RateLimiter}
(a limit per process is still a limit; refusing every login because Redis is
away would turn a Redis outage into a login outage).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from consoleproxy.cluster.redis_client import RedisClient, RedisUnavailable, Script
from consoleproxy.net.ratelimit import RateLimiter

GCRA = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = math.floor(tat + interval)
local over = new_tat - now - burst * interval
if over > 0 then return math.ceil(over) end
local ttl = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl)
return -1
"""
)


class ClusterRateLimiter:
    """
    Token buckets by key, shared by every process on one Redis.

    @param name: which limit (C{"api"}, C{"login"}): one key space each.
    """

    def __init__(
        self,
        client: RedisClient,
        clock: IReactorTime,
        rate: float,
        burst: int,
        *,
        name: str = "api",
        prefix: str = "consoleproxy:",
        max_clients: int = 100_000,
    ) -> None:
        self.client = client
        self.rate = rate
        self.burst = burst
        self.prefix = f"{prefix}rate:{name}:"
        #: used while Redis is unavailable
        self.fallback = RateLimiter(clock, rate, burst, max_clients)

    def take(self, key: str) -> Deferred[float | None]:
        """
        Take a token from C{key}'s bucket.

        @return: a Deferred firing C{None} when allowed, else the seconds
            until a token is there (as L{RateLimiter.take}).
        """
        if not self.client.available:
            return succeed(self.fallback.take(key))
        interval = 1_000_000 / self.rate
        d = self.client.run(GCRA, [self.prefix + key], [repr(interval), self.burst])

        def answer(reply: Any) -> float | None:
            wait = int(reply)
            return None if wait < 0 else wait / 1_000_000

        def local(failure: Any) -> float | None:
            failure.trap(RedisUnavailable)
            return self.fallback.take(key)

        return d.addCallbacks(answer, local)
