"""
The HTTP front: the site and its URL map (``site``), the HTTP connection with
its limits and deadlines (``http_channel``), the token API (``api``), the
console page (``console_page``) and its static files (``assets``, ``static/``),
the live sessions API (``sessions_api``).

May import: ``consoleproxy.clouds`` and ``consoleproxy.tunnels``, the core
modules at the top, ``consoleproxy.guacamole`` and ``consoleproxy.net``.
Never the relays or ops: ``tap`` mounts their resources on the site.
"""
