"""
Networking building blocks that every other part stands on.

Who the client is behind trusted frontends (``clients``), Klein-style routes
and JSON answers on plain twisted.web (``routing``), per-address rate limits
and throttled log lines (``ratelimit``), per-address connection caps and the
descriptor reserve (``connlimit``), client-supplied text made safe for log
lines (``logsafe``), quiet factories for outgoing connections (``factories``)
and writing to a socket at once (``fastwrite``).

May import: nothing else of consoleproxy.  Everything else may import it.
"""
