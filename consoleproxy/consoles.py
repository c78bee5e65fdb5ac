"""
What a console is: who asks, which VM, and the guacd settings that reach it.

A L{Console} comes from the cloud backend and travels sealed inside a token;
the browser can only adjust the display (L{Display}), never the target.  That
split is the defence against SSRF through the console: hostname, port,
recording paths and the like come from the cloud or nowhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consoleproxy.errors import BadRequest
from consoleproxy.guacamole.status import GuacamoleError, Status

#: Console types of the token API, and the guacd protocol each selects.
CONSOLE_TYPES = ("vnc", "ssh", "rdp")

#: Query parameters of the WebSocket that may adjust an SSH console.
SSH_DISPLAY_PARAMETERS = ("color-scheme", "font-name", "font-size")

#: The largest zone id: oned's ids are C ints (and XML-RPC's ``<int>`` is 32 bits).
MAX_ZONE_ID = 2**31 - 1
_ZONE_ID = re.compile(r"[0-9]{1,10}", re.ASCII)
_NUMBER = re.compile(r"([0-9]{1,6})(?:\.[0-9]{1,6})?", re.ASCII)
_MAX_DIMENSION = 16384
_MAX_DPI = 1200
_MAX_FONT_SIZE = 512
_MAX_TEXT = 256


class ZoneIdError(BadRequest, ValueError):
    """
    A zone id that is not a decimal number from 0 to L{MAX_ZONE_ID} (400).

    A L{BadRequest} so the token API answers 400; a C{ValueError} so a token
    whose zone claim does not parse is a malformed token.
    """


def zone_id(value: str | int) -> int:
    """
    A zone id from a query value, a claim or the configuration.

    The one parser of zone ids, so that every part compares the same number
    (``00`` is zone 0 everywhere, not a zone of its own): ASCII digits only
    (no sign, space, underscore or other scripts' digits), at most ten of
    them, at most L{MAX_ZONE_ID}.

    @raise ZoneIdError: for anything else (its message shows at most a short,
        ASCII-escaped prefix of the value).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _ZONE_ID.fullmatch(value):
        number = int(value)
    else:
        shown = ascii(value[:16]) if isinstance(value, str) else type(value).__name__
        raise ZoneIdError(f"a zone id is a whole number from 0 to {MAX_ZONE_ID}, not {shown}")
    if not 0 <= number <= MAX_ZONE_ID:
        raise ZoneIdError(f"a zone id is a whole number from 0 to {MAX_ZONE_ID}, not {number}")
    return number


def zone_key(value: str | int) -> str:
    """
    A zone id in its one text form (L{zone_id}, then decimal): how tokens,
    relays and the zone directory name and compare zones.

    @raise ZoneIdError: as L{zone_id}.
    """
    return str(zone_id(value))


@dataclass(frozen=True)
class Identity:
    """
    A user the authenticator vouched for.

    @ivar name: the user name, for logs, tokens and guacd's ``name``.
    @ivar secret: whatever the cloud needs to act as this user (e.g. an
        oned session string); never logged, never put in a token.
    @ivar admin: the user is an administrator of consoleproxy (sees and ends
        every live session, shares any of them, plays recordings back).
    """

    name: str
    secret: str | None = field(default=None, repr=False)
    admin: bool = False


@dataclass(frozen=True)
class Listing:
    """One VM a user may open, for the landing page: its id, name and console types."""

    vm_id: int
    name: str
    types: tuple[str, ...]


@dataclass(frozen=True)
class Console:
    """
    How guacd reaches one console of one VM.

    @ivar vm_id: the VM's id in its cloud.
    @ivar console_type: C{"vnc"}, C{"ssh"} or C{"rdp"}; also guacd's protocol.
    @ivar parameters: guacd connection parameters (``hostname``, ``port``,
        ``password``, ...) by guacd argument name.
    @ivar zone: the zone the console lives in, C{None} for the local one;
        always in L{zone_key}'s form (``00`` becomes ``0``).
    @ivar cluster: the hypervisor's cluster, when the cloud knows it (tunnel
        policy).
    """

    vm_id: int
    console_type: str
    parameters: Mapping[str, str] = field(repr=False)
    zone: str | None = None
    cluster: str | None = None

    def __post_init__(self) -> None:
        if self.zone is not None:
            object.__setattr__(self, "zone", zone_key(self.zone))
        if self.console_type not in CONSOLE_TYPES:
            raise ValueError(f"unknown console type {self.console_type!r}")
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError("console parameters must map str to str")


@dataclass(frozen=True)
class Display:
    """
    The display the browser asked for with the WebSocket's query string.

    @ivar parameters: connect parameters the browser may set (for SSH:
        ``color-scheme``, ``font-name``, ``font-size``).
    """

    width: int = 1024
    height: int = 768
    dpi: int = 96
    parameters: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_query(cls, query: Mapping[str, list[str]], console_type: str) -> Display:
        """
        Read C{width}, C{height}, C{dpi} (and SSH's display parameters).

        Every other query value is ignored: it must never reach guacd.

        @raise GuacamoleError: with L{Status.CLIENT_BAD_REQUEST} for a value
            that is repeated, not a number, or out of range.
        """
        width = _integer(query, "width", 1, _MAX_DIMENSION, cls.width)
        height = _integer(query, "height", 1, _MAX_DIMENSION, cls.height)
        dpi = _integer(query, "dpi", 1, _MAX_DPI, cls.dpi)
        parameters: dict[str, str] = {}
        if console_type == "ssh":
            for name in ("color-scheme", "font-name"):
                text = _single(query, name)
                if text is not None:
                    if len(text) > _MAX_TEXT or not text.isprintable():
                        raise GuacamoleError(Status.CLIENT_BAD_REQUEST, f"bad {name}")
                    parameters[name] = text
            size = _integer(query, "font-size", 1, _MAX_FONT_SIZE, None)
            if size is not None:
                parameters["font-size"] = str(size)
        return cls(width, height, dpi, parameters)


def _single(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise GuacamoleError(Status.CLIENT_BAD_REQUEST, f"{name} given more than once")
    return values[0]


def _integer(query: Mapping[str, list[str]], name: str, low: int, high: int, default: Any) -> Any:
    text = _single(query, name)
    if text is None or text == "":
        return default
    # Browsers multiply by devicePixelRatio, so a fraction may come: floor it.
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise GuacamoleError(Status.CLIENT_BAD_REQUEST, f"{name} is not a number")
    value = int(match.group(1))
    if not low <= value <= high:
        raise GuacamoleError(Status.CLIENT_BAD_REQUEST, f"{name} is out of range")
    return value
