"""
State that several consoleproxy processes share: Redis.

One process serves one host's share of consoles; several processes (every
core of a host, many hosts behind a load balancer) need one truth for what
must hold across all of them: a token opens one session in the whole cluster
(L{spent_tokens}), the session caps count every process's sessions and come
back when a process dies (L{leases}), the token API's rate limit counts a
client's requests wherever they land (L{ratelimit}), and the live sessions
are listed and ended from anywhere (L{registry}).  L{redis_client} is the one
connection they all use: deadlines on every call, back-off, an C{available}
state for C{/readyz}.

May import: the core modules at the top (consoles, errors, interfaces,
tokens), consoleproxy.guacamole and consoleproxy.net.
"""
