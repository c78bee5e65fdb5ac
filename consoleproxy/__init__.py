"""
consoleproxy: a web console proxy for clouds.

Browsers ask the token API for a console token, then open a WebSocket with it;
consoleproxy opens the token, performs the Guacamole handshake with guacd and
relays the session.  See README.md for the data flow.
"""

__version__ = "0.1.0"
