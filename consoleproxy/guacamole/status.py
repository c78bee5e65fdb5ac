"""
Guacamole status codes and the WebSocket close codes they map to.

The numbers are the protocol's (``guac_protocol_status`` in libguac, the
``GuacamoleStatus`` enum of guacamole-client).  guacamole-common-js reads a
closed tunnel's status from the close reason with ``parseInt``, so every close
this proxy sends carries the decimal Guacamole status as its reason.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """Guacamole protocol status codes (sent in decimal on the wire)."""

    SUCCESS = 0x0000
    UNSUPPORTED = 0x0100
    SERVER_ERROR = 0x0200
    SERVER_BUSY = 0x0201
    UPSTREAM_TIMEOUT = 0x0202
    UPSTREAM_ERROR = 0x0203
    RESOURCE_NOT_FOUND = 0x0204
    RESOURCE_CONFLICT = 0x0205
    RESOURCE_CLOSED = 0x0206
    UPSTREAM_NOT_FOUND = 0x0207
    UPSTREAM_UNAVAILABLE = 0x0208
    SESSION_CONFLICT = 0x0209
    SESSION_TIMEOUT = 0x020A
    SESSION_CLOSED = 0x020B
    CLIENT_BAD_REQUEST = 0x0300
    CLIENT_UNAUTHORIZED = 0x0301
    CLIENT_FORBIDDEN = 0x0303
    CLIENT_TIMEOUT = 0x0308
    CLIENT_OVERRUN = 0x030D
    CLIENT_BAD_TYPE = 0x030F
    CLIENT_TOO_MANY = 0x031D

    @property
    def websocket_code(self) -> int:
        """The WebSocket close code guacamole-client uses for this status."""
        return _WEBSOCKET_CODES.get(self, 1011)

    @classmethod
    def parse(cls, value: str) -> Status:
        """
        Read a status from a decimal string (an ``error`` instruction).

        Unknown or malformed values become L{Status.SERVER_ERROR} rather than
        an exception: a peer's odd status must not break the close path.
        """
        try:
            return cls(int(value))
        except ValueError:
            return cls.SERVER_ERROR


# WebSocket close codes (RFC 6455): 1000 normal, 1002 protocol error,
# 1003 unsupported data, 1008 policy violation, 1009 too big, 1011 server error.
_WEBSOCKET_CODES = {
    Status.SUCCESS: 1000,
    Status.UNSUPPORTED: 1011,
    Status.SERVER_ERROR: 1011,
    Status.SERVER_BUSY: 1008,
    Status.UPSTREAM_TIMEOUT: 1011,
    Status.UPSTREAM_ERROR: 1011,
    Status.RESOURCE_NOT_FOUND: 1002,
    Status.RESOURCE_CONFLICT: 1008,
    Status.RESOURCE_CLOSED: 1002,
    Status.UPSTREAM_NOT_FOUND: 1011,
    Status.UPSTREAM_UNAVAILABLE: 1011,
    Status.SESSION_CONFLICT: 1008,
    Status.SESSION_TIMEOUT: 1002,
    Status.SESSION_CLOSED: 1002,
    Status.CLIENT_BAD_REQUEST: 1002,
    Status.CLIENT_UNAUTHORIZED: 1008,
    Status.CLIENT_FORBIDDEN: 1008,
    Status.CLIENT_TIMEOUT: 1002,
    Status.CLIENT_OVERRUN: 1009,
    Status.CLIENT_BAD_TYPE: 1003,
    Status.CLIENT_TOO_MANY: 1008,
}


class GuacamoleError(Exception):
    """
    A failure that ends a console session with a Guacamole status.

    The message is for logs and operators; only the status reaches the browser.
    """

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
