"""
The Guacamole protocol: the wire format of instructions (``instructions``),
status codes and the WebSocket close codes they map to (``status``), and the
client side of guacd (``guacd``: connect, handshake, then whole instructions).

May import: ``consoleproxy.net``.  It knows nothing of clouds, tokens or
browsers.
"""
