"""
consoleproxy: a web console proxy for clouds.

Browsers ask the token API for a console token, then open a WebSocket with it;
consoleproxy opens the token, performs the Guacamole handshake with guacd and
relays the session.  The folders follow the data, top to bottom; a module may
import its own package and the layers below it, never one above or beside it:

=====================  ====================================================
``tap``, ``config``,    the composition root: options, configuration, the
``cli``                 service tree, the ``consoleproxy`` command
                        (imports everything)
``ops/``                metrics, health endpoints, the audit log
``web/``,               the HTTP front: site, token API, console page;
``relay/``              the WebSocket relays (Guacamole, raw VNC), sessions,
                        the zone hop
``clouds/``,            which VM a user may open and its guacd settings
``tunnels/``            (inventory, OpenNebula); how guacd reaches it (SSH)
``cluster/``            state several processes share (Redis): spent tokens,
                        session leases, rate limits, live sessions
``tokens``,             the core vocabulary: sealed tokens, what a console
``consoles``,           is, the seams (zope.interface) and API errors
``interfaces``,
``errors``
``guacamole/``          the Guacamole protocol and the guacd client
``net/``                networking building blocks (client addresses,
                        routes, rate limits, factories, fast writes)
=====================  ====================================================

``web`` and ``relay`` never import each other, nor do ``clouds``,
``tunnels`` and ``cluster``; ``tests/test_layout.py`` holds the rule.
"""

__version__ = "0.1.0"
