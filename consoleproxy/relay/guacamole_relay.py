"""
The browser side of a console: a WebSocket speaking subprotocol ``guacamole``.

Life of a session (Apache's Java tunnel is the model):

 1. ``onConnect``: refuse a client that does not offer ``guacamole``; open
    and spend the token; read the display from the query; connect to guacd
    and complete its handshake, all before the WebSocket is accepted.  The
    browser's socket is paused meanwhile (Autobahn would otherwise parse a
    second handshake out of whatever else arrives).
 2. A refused token or a failed handshake still accepts the WebSocket, then
    closes it at once with the mapped close code and the decimal Guacamole
    status as the reason: guacamole-common-js reads the status from there,
    and a refused HTTP upgrade would show as "server unreachable".
 3. ``onOpen``: the tunnel UUID goes out first (``0.,36.<uuid>;``), then
    everything guacd sent after ``ready``.  Each guacd read becomes one text
    message of whole instructions.  Each browser message must hold whole
    instructions; the internal opcode is handled here (``ping`` echoed,
    the rest dropped) and never reaches guacd.
 4. Backpressure both ways (websocket.FlowControl): a browser that stops
    reading pauses reading from guacd and from the browser itself (its
    ``ping`` echoes are written like relayed data), and a guacd that stops
    reading pauses the browser.
 5. Whichever side closes first, the other follows at once; guacd is told
    ``disconnect`` first (it would otherwise notice only when it next
    writes).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from consoleproxy.clouds.opennebula.zones import Zone, ZoneDirectory
from consoleproxy.consoles import Display, ZoneIdError, zone_key
from consoleproxy.guacamole.guacd import GuacdProtocol, HandshakeRequest, connect_guacd
from consoleproxy.guacamole.instructions import (
    INTERNAL_OPCODE,
    InstructionError,
    elements,
    encode,
    split,
)
from consoleproxy.guacamole.status import GuacamoleError, Status
from consoleproxy.interfaces import ITunnels
from consoleproxy.relay.federation import ZoneHop, connect_zone
from consoleproxy.relay.websocket import (
    MAX_OUTGOING_MESSAGE,
    RelayFactory,
    RelayPolicy,
    RelaySession,
    query_value,
    token_value,
)
from consoleproxy.tokens import Claims, TokenAuthority, TokenError
from consoleproxy.tunnels.routes import Route

SUBPROTOCOL = "guacamole"
#: What guacamole-common-js sends by itself, without the user: not input.
_NOT_INPUT = ("4.sync,", "3.nop;", "3.ack,")


@dataclass(frozen=True)
class FederationSettings:
    """
    How this proxy reaches other zones' proxies.

    @ivar origin: the Origin header presented to them (they allow it).
    @ivar trust_roots: for wss: (C{None}: the platform's).
    """

    origin: str | None = None
    trust_roots: Any = None
    timeout: float = 15.0


@dataclass(frozen=True)
class RelaySettings:
    """How the relay reaches guacd and how long it waits."""

    guacd: IStreamClientEndpoint
    handshake_timeout: float = 15.0
    timezone: str = "UTC"
    #: How long guacd gets to read what is left once the browser has gone.
    linger: float = 5.0


class GuacamoleRelayProtocol(RelaySession):
    """One console session: a browser's WebSocket and its guacd connection."""

    subprotocol = SUBPROTOCOL
    upstream_name = "guacd"
    factory: GuacamoleRelayFactory

    def __init__(self) -> None:
        super().__init__()
        self._guacd: GuacdProtocol | None = None
        self._hop: ZoneHop | None = None
        self._zone: str | None = None
        self._tunnel_id = ""

    # -- opening -------------------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Any:
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "subprotocol 'guacamole' required")
        try:
            self._admit(request)
            zone = _zone(request.params)
            token = token_value(request.params)
            if zone is not None and zone != self.factory.local_zone:
                return self._via_zone(request, zone, token)
            checked = self._checked(
                self._open_local(token, zone), lambda claims: self._display(request, claims)
            )
        except TokenError as e:
            self.factory.refused_token(e.reason)
            return self._refuse(Status.CLIENT_UNAUTHORIZED, f"token refused ({e.reason})")
        except GuacamoleError as e:
            return self._refuse(e.status, str(e))
        self.transport.pauseProducing()
        self._pending = True
        if isinstance(checked, Deferred):  # the cluster's answer (Redis)
            return checked.addCallback(self._find_route).addCallbacks(
                self._guacd_ready, self._setup_failed
            )
        return self._find_route(checked).addCallbacks(self._guacd_ready, self._setup_failed)

    def _display(self, request: ConnectionRequest, claims: Claims) -> Display:
        """The display asked for, once the token is known to be for this zone."""
        display = Display.from_query(request.params, claims.console.console_type)
        if claims.console.zone not in (None, self.factory.local_zone):
            raise GuacamoleError(
                Status.CLIENT_FORBIDDEN,
                f"token is for zone {claims.console.zone}, not this one",
            )
        return display

    def _find_route(self, display: Display) -> Deferred[GuacdProtocol]:
        """The session has its place: find the way to the console, then guacd."""
        assert self._claims is not None
        routing = self.factory.tunnels.route(self._claims.console)
        return routing.addCallback(self._routed, display)

    def _routed(self, route: Route, display: Display) -> Deferred[GuacdProtocol]:
        """The way to the console is known (maybe a tunnel): now guacd."""
        claims = self._take_route(route)
        handshake = HandshakeRequest(
            protocol=claims.console.console_type,
            parameters={**route.parameters, **display.parameters},
            width=display.width,
            height=display.height,
            dpi=display.dpi,
            timezone=self.factory.settings.timezone,
            name=claims.user,
        )
        self._connecting = connect_guacd(
            self.factory.settings.guacd,
            handshake,
            self.factory.clock,
            self.factory.settings.handshake_timeout,
        )
        return self._connecting

    def _open_local(self, token: str, zone: str | None) -> Claims | Deferred[Claims]:
        """A token for a console of this zone: minted here, or by another zone for this one."""
        if zone is not None:
            try:
                return self.factory.tokens.open(token, zone)
            except TokenError as e:
                if e.reason != "tampered":
                    raise
        return self.factory.tokens.open(token)

    def _via_zone(self, request: ConnectionRequest, zone: str, token: str) -> Any:
        """A console of another zone: open the token for it, then hop to its proxy."""
        try:
            checked = self._checked(
                self.factory.tokens.open(token, zone),
                lambda claims: Display.from_query(request.params, claims.console.console_type),
            )
        except TokenError as e:
            self.factory.refused_token(e.reason)
            return self._refuse(Status.CLIENT_UNAUTHORIZED, f"token refused ({e.reason})")
        except GuacamoleError as e:
            return self._refuse(e.status, str(e))
        directory, hop = self.factory.zones, self.factory.federation
        if directory is None or hop is None:
            if isinstance(checked, Deferred):
                checked.addErrback(lambda _: None)  # the refusal below says enough
            return self._refuse(Status.RESOURCE_NOT_FOUND, f"zone {zone} is unknown")
        self._zone = zone
        self.transport.pauseProducing()
        self._pending = True

        def look_up(display: Display) -> Deferred[Zone]:
            query.update(
                {
                    "width": str(display.width),
                    "height": str(display.height),
                    "dpi": str(display.dpi),
                    **display.parameters,
                }
            )
            return directory.lookup(zone)

        query = {"token": token, "zone": zone}

        def reach(found: Zone) -> Deferred[ZoneHop]:
            assert found.url is not None
            return connect_zone(
                self.factory.clock,
                found.url,
                query,
                origin=hop.origin,
                trust_roots=hop.trust_roots,
                timeout=hop.timeout,
                # The remote relay's messages are as large as ours to browsers.
                max_message_size=MAX_OUTGOING_MESSAGE,
            )

        looked_up = (
            checked.addCallback(look_up) if isinstance(checked, Deferred) else look_up(checked)
        )
        return looked_up.addCallback(reach).addCallbacks(self._zone_ready, self._setup_failed)

    def _zone_ready(self, hop: ZoneHop) -> str:
        self._pending = False
        self._hop = hop
        if self._gone:
            hop.dropConnection()
        return SUBPROTOCOL

    def _open_via_zone(self, hop: ZoneHop) -> None:
        claims = self._claims
        assert claims is not None
        self._mark_open(zone=self._zone)
        self._log.info(
            "Console opened: user={user} vm={vm} type={type} via zone {zone} peer={peer}",
            user=claims.user,
            vm=claims.console.vm_id,
            type=claims.console.console_type,
            zone=self._zone,
            peer=self._peer,
        )
        hop.attach(self._from_zone, self._zone_closed)
        self._couple(hop.transport)

    def _from_zone(self, payload: bytes, binary: bool) -> None:
        if self.state == self.STATE_OPEN:
            self.bytes_to_browser += len(payload)
            self._send_message(payload, binary)

    def _zone_closed(self, code: int | None, reason: str | None) -> None:
        """The remote zone closed: close the browser's side the same way."""
        # The reason is the decimal status, maybe with words ("523 ended by an administrator").
        status = Status.parse(reason.split(" ", 1)[0]) if reason else Status.SUCCESS
        if self._close_status is None:
            self._close_status = (status, f"zone {self._zone} closed ({code})")
        self._stop_flow()
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(
                code=code or 1000, reasonUtf8=(reason or "").encode()[:123], isReply=False
            )

    def _guacd_ready(self, guacd: GuacdProtocol) -> str:
        self._connecting = None
        self._pending = False
        self._guacd = guacd
        return SUBPROTOCOL

    def onOpen(self) -> None:
        if self._closed_if_refused("Console"):
            return
        if self._hop is not None:
            self._open_via_zone(self._hop)
            return
        guacd, claims = self._guacd, self._claims
        assert guacd is not None and claims is not None
        self._mark_open(connection_id=guacd.connection_id)
        self._tunnel_id = str(uuid.uuid4())
        self._log.info(
            "Console opened: user={user} vm={vm} type={type} guacd={conn} peer={peer}",
            user=claims.user,
            vm=claims.console.vm_id,
            type=claims.console.console_type,
            conn=guacd.connection_id,
            peer=self._peer,
        )
        self._send(encode(INTERNAL_OPCODE, self._tunnel_id))
        guacd.attach(self._send, self._guacd_closed)
        self._couple(guacd.transport)

    # -- relaying ------------------------------------------------------------------

    def _send(self, instructions: str) -> None:
        """Send whole instructions, in as few messages as the size limit allows."""
        if self.state != self.STATE_OPEN:
            return  # closing: guacd's side is being closed too
        payload = instructions.encode("utf-8")
        self.bytes_to_browser += len(payload)
        limit = MAX_OUTGOING_MESSAGE
        if len(payload) <= limit:
            self._send_message(payload, False)
            return
        # Rare (a read larger than the limit): cut at instruction boundaries.
        batch: list[bytes] = []
        size = 0
        for instruction in split(instructions):
            raw = instruction.encode("utf-8")
            if batch and size + len(raw) > limit:
                self._send_message(b"".join(batch), False)
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)
        self._send_message(b"".join(batch), False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._hop is not None:  # the remote relay checks what the browser sends
            self.bytes_from_browser += len(payload)
            self._touch()  # (and judges what is input; here every message counts)
            self._hop.sendMessage(payload, isBinary=isBinary)
            return
        guacd = self._guacd
        if guacd is None or self._close_status is not None:
            return
        self.bytes_from_browser += len(payload)
        if isBinary:
            self._end(Status.CLIENT_BAD_TYPE, "browser sent a binary message")
            return
        try:
            # Autobahn has validated the UTF-8 already.
            instructions = split(payload.decode("utf-8"))
        except InstructionError as e:
            self._end(e.status, f"browser sent bad data: {e}")
            return
        forward = []
        echoes = []
        for instruction in instructions:
            # The internal opcode is the empty one: its length is 0, however written
            # ("0.", "00.": the parser accepts leading zeros, as guacd does).
            if instruction.startswith("0") and int(instruction[: instruction.index(".")]) == 0:
                parts = elements(instruction)
                if len(parts) > 1 and parts[1] == "ping":
                    echoes.append(instruction)
                continue
            forward.append(instruction)
        if echoes:
            # One message for the message's pings; written like relayed data, so
            # a browser that does not read them is paused (FlowControl).
            self._send("".join(echoes))
        if forward:
            if not all(i.startswith(_NOT_INPUT) for i in forward):
                self._touch()
            guacd.send("".join(forward))

    # -- closing -------------------------------------------------------------------

    def _guacd_closed(self, status: Status, message: str) -> None:
        """guacd's side is gone: close the browser's with guacd's status."""
        if self._close_status is None:
            self._close_status = (status, message)
        self._close(status)

    def _drop_upstream(self) -> None:
        hop = self._hop
        if hop is not None and hop.transport is not None:
            if hop.state == hop.STATE_OPEN:
                hop.sendClose(1000)
            # Then close the socket: the remote gets the close frame, then FIN.
            self._linger_close(hop.transport, hop.is_closed)
            return
        guacd = self._guacd
        if guacd is not None and guacd.transport is not None and not guacd.closed.called:
            # guacd 1.6 notices a closed socket only when it next writes to it
            # (for an idle console: its 15 s "User is not responding"): say so.
            guacd.disconnect()
            self._linger_close(guacd.transport, guacd.closed)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        guacd = self._guacd
        upstream = f"guacd={guacd.connection_id}" if guacd is not None else f"zone={self._zone}"
        self._finish(wasClean, code, "Console", upstream)


def _zone(query: Mapping[str, list[str]]) -> str | None:
    """``?zone=``: a zone id in its one form (``00`` is ``0``), or CLIENT_BAD_REQUEST."""
    text = query_value(query, "zone")
    try:
        return None if text is None else zone_key(text)
    except ZoneIdError as e:
        raise GuacamoleError(Status.CLIENT_BAD_REQUEST, e.message) from e


class GuacamoleRelayFactory(RelayFactory):
    """Builds Guacamole relay sessions; holds what they share."""

    protocol = GuacamoleRelayProtocol
    relay_name = "guacamole"

    def __init__(
        self,
        tokens: TokenAuthority,
        settings: RelaySettings,
        clock: IReactorTime,
        max_message_size: int = 65536,
        tunnels: ITunnels | None = None,
        *,
        local_zone: str = "0",
        zones: ZoneDirectory | None = None,
        federation: FederationSettings | None = None,
        policy: RelayPolicy | None = None,
    ) -> None:
        super().__init__(
            tokens,
            clock,
            handshake_timeout=settings.handshake_timeout,
            linger=settings.linger,
            max_message_size=max_message_size,
            tunnels=tunnels,
            policy=policy,
        )
        self.settings = settings
        self.local_zone = local_zone
        self.zones = zones
        self.federation = federation

    @property
    def local_zone(self) -> str:
        """This proxy's zone id, in its one form (``00`` is ``0``)."""
        return self._local_zone

    @local_zone.setter
    def local_zone(self, zone: str | int) -> None:
        self._local_zone = zone_key(zone)
