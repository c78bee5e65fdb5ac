"""A protocol-faithful fake of Apache guacd 1.6.0, for tests.

Facts come from apache/guacamole-server at tag 1.6.0; no upstream code is reused.
Behaviours reproduced, with the upstream file each one comes from:

- Wire format ``LENGTH.VALUE`` joined by ``,`` ended by ``;``, LENGTH counted in characters
  found by UTF-8 lead bytes (a stray byte counts as one): src/libguac/protocol.c,
  src/libguac/unicode.c.
- Parser limits: element length above 8192 characters, a 129th element, or an unfinished
  instruction filling the 32768-byte buffer is a parse error; the 5-digit limit is declared
  but never enforced, and an empty length (``.``) reads as 0: src/libguac/parser.c,
  src/libguac/guacamole/parser-constants.h, src/libguac/guacamole/parser.h.
- ``select``: a wrong opcode, a wrong argument count, a parse error or 15 s of silence close
  the socket at once and send nothing; ``$<id>`` of no live connection gets
  ``error,No such connection.,516`` then close: src/guacd/connection.c, src/guacd/proc.h.
- An unknown protocol forks a process that cannot load its plugin: nothing is sent and the
  socket lingers (below): src/guacd/proc.c, src/libguac/client.c.
- ``args,VERSION_1_5_0,<names>``: src/libguac/user-handshake.c, src/libguac/protocol.c,
  src/libguac/guacamole/protocol-constants.h; names (official Docker build: every optional
  feature but the SSH agent): src/protocols/{vnc,ssh,rdp}/settings.c, configure.ac,
  Dockerfile.
- Handshake opcodes ``size`` (2+ arguments or failure), ``audio``, ``video``, ``image``,
  ``timezone``, ``name``: all optional, any order, repeatable, unknown opcodes ignored,
  until ``connect``: src/libguac/user-handshake.c, src/libguac/user-handlers.c. Version
  None reproduces the pre-1.1 fixed order size, audio, video, image, connect (same file at
  tag 1.0.0).
- ``ready,$<uuid>`` is sent BEFORE the ``connect`` arity (version + one value per name) is
  checked; a wrong count is only logged and the user thread ends: src/libguac/user-handshake.c,
  src/libguac/id.c.
- Receive timeout: 15 s without any byte while an instruction is awaited: src/guacd/proc.h,
  src/libguac/parser.c, src/libguac/socket-fd.c. In the handshake it ends the user thread
  silently; after ``ready`` it sends ``error,Aborted. See logs.,776`` then ``disconnect``:
  src/libguac/user-handshake.c, src/libguac/user.c, src/libguac/guacamole/protocol-types.h.
- Keep-alive: every 5 s a check sends ``nop`` to joined users if nothing was broadcast
  for 5 s: src/libguac/socket.c, src/libguac/guacamole/socket-constants.h, src/guacd/proc.c.
- Client ``disconnect``, a client ``sync`` newer than the last server ``sync``, or a parse
  error end the user: ``disconnect`` is sent: src/libguac/user-handlers.c,
  src/libguac/user-handshake.c, src/libguac/client.c.
- An error sent to a user (``guac_user_abort``/``guac_client_abort``) stops its input loop
  after the next instruction or timeout, then ``disconnect``: src/libguac/user.c,
  src/libguac/client.c, src/libguac/user-handshake.c.
- A client that closes its socket without ``disconnect`` is noticed by guacd 1.6 only when it
  next writes to that socket (an idle console: at its 15 s "User is not responding");
  ``ended_by`` records whether ``disconnect`` arrived before the socket closed (the
  behaviour as issue 13 reports it; the fake still ends the user at once on EOF).
- An unreachable VNC/SSH target often ends the user with a bare ``disconnect`` and no
  ``error``, as observed with guacd 1.6 (issue 13; the exact path in the sources is not
  traced here): ``Behaviour``'s ``unreachable_disconnect`` models that.
- Linger: once the connection process drops a user, guacd's parent keeps the TCP socket
  open until the client sends more bytes or closes: src/guacd/connection.c.
- Connection ids ``$`` + lower-case UUID, joinable while a user remains: src/libguac/id.c,
  src/libguac/guacamole/client-constants.h, src/guacd/connection.c, src/guacd/proc.c.
- TLS from the first byte when listening on an ``ssl:`` endpoint: src/guacd/connection.c.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, endpoints, interfaces, protocol, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

PROTOCOL_VERSION = "VERSION_1_5_0"
TIMEOUT = 15.0
KEEP_ALIVE_INTERVAL = 5.0
MAX_ELEMENT_LENGTH = 8192
MAX_ELEMENTS = 128
MAX_INSTRUCTION_BYTES = 32768
BLOB_MAX_BYTES = 6048
STATUS_RESOURCE_NOT_FOUND = 516
STATUS_CLIENT_TIMEOUT = 776
ABORT_MESSAGE = "Aborted. See logs."

_SFTP = (
    "enable-sftp",
    "sftp-hostname",
    "sftp-host-key",
    "sftp-port",
    "sftp-timeout",
    "sftp-username",
    "sftp-password",
    "sftp-private-key",
    "sftp-passphrase",
    "sftp-public-key",
    "sftp-directory",
    "sftp-root-directory",
    "sftp-server-alive-interval",
    "sftp-disable-download",
    "sftp-disable-upload",
)
_RECORDING = (
    "recording-path",
    "recording-name",
    "recording-exclude-output",
    "recording-exclude-mouse",
    "recording-include-keys",
    "create-recording-path",
    "recording-write-existing",
)
_WOL = ("wol-send-packet", "wol-mac-addr", "wol-broadcast-addr", "wol-udp-port", "wol-wait-time")

VNC_ARGS: tuple[str, ...] = (
    "hostname",
    "port",
    "read-only",
    "disable-display-resize",
    "encodings",
    "username",
    "password",
    "swap-red-blue",
    "color-depth",
    "cursor",
    "autoretry",
    "clipboard-encoding",
    "dest-host",
    "dest-port",  # ENABLE_VNC_REPEATER
    "enable-audio",
    "audio-servername",  # ENABLE_PULSE
    "reverse-connect",
    "listen-timeout",  # ENABLE_VNC_LISTEN
    *_SFTP,  # ENABLE_COMMON_SSH
    *_RECORDING,
    "disable-copy",
    "disable-paste",
    "disable-server-input",
    *_WOL,
    "force-lossless",
    "compress-level",
    "quality-level",
)
SSH_ARGS: tuple[str, ...] = (
    "hostname",
    "host-key",
    "port",
    "timeout",
    "username",
    "password",
    "font-name",
    "font-size",
    "enable-sftp",
    "sftp-root-directory",
    "sftp-disable-download",
    "sftp-disable-upload",
    "private-key",
    "passphrase",
    "public-key",
    # "enable-agent" sits here only in builds configured with --enable-ssh-agent
    "color-scheme",
    "command",
    "typescript-path",
    "typescript-name",
    "create-typescript-path",
    "typescript-write-existing",
    *_RECORDING,
    "read-only",
    "server-alive-interval",
    "backspace",
    "terminal-type",
    "scrollback",
    "locale",
    "timezone",
    "disable-copy",
    "disable-paste",
    *_WOL,
)
RDP_ARGS: tuple[str, ...] = (
    "hostname",
    "port",
    "timeout",
    "domain",
    "username",
    "password",
    "width",
    "height",
    "dpi",
    "initial-program",
    "color-depth",
    "disable-audio",
    "enable-printing",
    "printer-name",
    "enable-drive",
    "drive-name",
    "drive-path",
    "create-drive-path",
    "disable-download",
    "disable-upload",
    "console",
    "console-audio",
    "server-layout",
    "security",
    "ignore-cert",
    "cert-tofu",
    "cert-fingerprints",
    "disable-auth",
    "remote-app",
    "remote-app-dir",
    "remote-app-args",
    "static-channels",
    "client-name",
    "enable-wallpaper",
    "enable-theming",
    "enable-font-smoothing",
    "enable-full-window-drag",
    "enable-desktop-composition",
    "enable-menu-animations",
    "disable-bitmap-caching",
    "disable-offscreen-caching",
    "disable-glyph-caching",
    "disable-gfx",
    "preconnection-id",
    "preconnection-blob",
    "timezone",
    *_SFTP,  # ENABLE_COMMON_SSH
    *_RECORDING[:4],
    "recording-exclude-touch",
    *_RECORDING[4:],
    "resize-method",
    "enable-audio-input",
    "enable-touch",
    "read-only",
    "gateway-hostname",
    "gateway-port",
    "gateway-domain",
    "gateway-username",
    "gateway-password",
    "load-balance-info",
    "disable-copy",
    "disable-paste",
    *_WOL,
    "force-lossless",
    "normalize-clipboard",
)
DEFAULT_ARGS: dict[str, tuple[str, ...]] = {"vnc": VNC_ARGS, "ssh": SSH_ARGS, "rdp": RDP_ARGS}

_LEGACY_ORDER = ("size", "audio", "video", "image", "connect")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_log = Logger(namespace="fakeguacd")


def encode(*elements: str) -> bytes:
    """Encode one instruction (opcode first) the way guacd writes it."""
    body = ",".join(f"{len(e)}.{e}" for e in elements)
    return (body + ";").encode("utf-8", "surrogateescape")


def _charsize(lead: int) -> int:
    """Bytes of a UTF-8 character judged by its lead byte only, as libguac does."""
    for size, mask, value in ((2, 0x1F, 0xDF), (3, 0x0F, 0xEF), (4, 0x07, 0xF7)):
        if lead | mask == value:
            return size
    return 1


class Parser:
    """Incremental parser with guacd's limits; after an error it accepts nothing more."""

    def __init__(self) -> None:
        self._buf = b""
        self._elements: list[str] = []
        self._value = bytearray()
        self._length: int | None = None  # None while reading length digits
        self._digits = 0
        self._size = 0  # bytes of the current instruction consumed so far
        self.error: str | None = None

    def feed(self, data: bytes) -> list[list[str]]:
        """Consume bytes; return complete instructions. Sets ``error`` on a parse error."""
        done: list[list[str]] = []
        if self.error is not None:
            return done
        buf, i = self._buf + data, 0
        while i < len(buf) and self.error is None:
            if self._length is None:
                byte = buf[i]
                i = self._take(i, 1)
                if 0x30 <= byte <= 0x39:
                    self._digits = self._digits * 10 + byte - 0x30
                    if self._digits > MAX_ELEMENT_LENGTH:
                        self.error = "element too long"
                elif byte == 0x2E:
                    self._length, self._digits = self._digits, 0
                else:
                    self.error = "bad length"
            elif self._length > 0:
                chunk = buf[i : i + self._length]
                ascii_run = _NON_ASCII.search(chunk)
                step = len(chunk) if ascii_run is None else ascii_run.start()
                if step == 0:
                    step = _charsize(buf[i])
                    if i + step > len(buf):
                        break  # wait for the rest of this character
                    self._length -= 1
                else:
                    self._length -= step
                self._value += buf[i : i + step]
                i = self._take(i, step)
            else:
                byte = buf[i]
                self._size += 1
                i += 1
                self._elements.append(bytes(self._value).decode("utf-8", "surrogateescape"))
                self._value, self._length = bytearray(), None
                if byte == 0x3B:
                    done.append(self._elements)
                    self._elements, self._size = [], 0
                elif byte != 0x2C:
                    self.error = "bad terminator"
                elif len(self._elements) == MAX_ELEMENTS:
                    self.error = "too many elements"
                elif self._size >= MAX_INSTRUCTION_BYTES:
                    self.error = "instruction too long"
        self._buf = buf[i:]
        if self.error is None and self._size + len(self._buf) >= MAX_INSTRUCTION_BYTES:
            self.error = "instruction too long"
        return done

    def _take(self, i: int, n: int) -> int:
        self._size += n
        if self._size >= MAX_INSTRUCTION_BYTES:
            self.error = "instruction too long"  # buffer full and no ';' yet
        return i + n


def _parse_timestamp(text: str) -> int:
    """guacd's lenient integer parse of a ``sync`` timestamp."""
    sign, number = 1, 0
    for char in text:
        if char == "-":
            sign = -sign
        else:
            number = number * 10 + ord(char) - 0x30
    return sign * number


class HandshakeFailed(Exception):
    """The user never joined the connection; the argument says why."""


class _Notifier:
    """Gives every caller its own Deferred, fired once with the same outcome."""

    def __init__(self) -> None:
        self._outcome: tuple[bool, object] | None = None
        self._waiting: list[defer.Deferred] = []

    @property
    def fired(self) -> bool:
        return self._outcome is not None

    def deferred(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self._outcome is None:
            self._waiting.append(d)
        else:
            self._deliver(d)
        return d

    def fire(self, ok: bool, value: object) -> None:
        if self._outcome is None:
            self._outcome = (ok, value)
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                self._deliver(d)

    def _deliver(self, d: defer.Deferred) -> None:
        assert self._outcome is not None
        ok, value = self._outcome
        if ok:
            d.callback(value)
        else:
            d.errback(Failure(HandshakeFailed(value)))


@dataclass
class Behaviour:
    """Script for one connection; the defaults behave like a healthy guacd."""

    refuse_select: bool | tuple[str, int] = False  # True: close at once; (msg, status): error first
    refuse_connect: tuple[str, int] | None = None  # error right after ready, as an upstream failure
    silent: bool = False  # after select, never answer nor time out
    ready_delay: float = 0.0  # seconds between connect and ready
    echo: bool = False  # after ready, send back every instruction but nop/sync/disconnect
    flood: bool = False  # after ready, write blobs as fast as the transport takes them
    flood_limit: int | None = None  # stop after this many blobs
    flood_sync_every: int = 32  # a sync after every this many blobs
    # after ready, connect to connect's hostname:port as guacd would, read the RFB
    # banner, and report it with ``name`` (guacd names the desktop there); an
    # unreachable target gets guacd's ``error,Aborted. See logs.,519``
    upstream: bool = False
    # with upstream: an unreachable target gets only ``disconnect``, no ``error``
    unreachable_disconnect: bool = False


@implementer(interfaces.IPushProducer)
class Flood:
    """Writes ``blob`` instructions with periodic ``sync``, honouring pauseProducing."""

    batch = 64  # at most this many blobs per turn; the transport normally pauses sooner
    tick = 0.001  # seconds between turns (not 0: Clock.advance would loop forever)

    def __init__(self, conn: FakeGuacdConnection, behaviour: Behaviour) -> None:
        self._conn, self._limit = conn, behaviour.flood_limit
        self._every = max(1, behaviour.flood_sync_every)
        payload = base64.b64encode(bytes(i % 251 for i in range(BLOB_MAX_BYTES))).decode()
        self._blob = encode("blob", "1", payload)
        self.sent = self.syncs = self.bytes = self.pauses = 0
        self.paused = self.stopped = False
        self._call: interfaces.IDelayedCall | None = None

    def start(self) -> None:
        self._conn.transport.registerProducer(self, True)
        self._produce()

    def _produce(self) -> None:
        self._call = None
        for _ in range(self.batch):
            if self.paused or self.stopped:
                return
            if self._limit is not None and self.sent >= self._limit:
                self.finish()
                return
            if self.sent and self.sent % self._every == 0:
                self.bytes += self._conn.send_sync(1)
                self.syncs += 1
            self._conn._output(self._blob)
            self.sent += 1
            self.bytes += len(self._blob)
        self._call = self._conn.clock.callLater(self.tick, self._produce)

    def pauseProducing(self) -> None:
        """Stop writing until resumed."""
        self.paused = True
        self.pauses += 1
        self._cancel()

    def resumeProducing(self) -> None:
        """Continue writing."""
        if not self.stopped and self.paused:
            self.paused = False
            self._produce()

    def stopProducing(self) -> None:
        """Stop for good."""
        self.stopped = True
        self._cancel()

    def finish(self) -> None:
        """Stop and unregister from a transport that is still connected."""
        if not self.stopped:
            self.stopProducing()
            if not self._conn._lost:
                self._conn.transport.unregisterProducer()

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _Session:
    """One guacd connection process: id, argument names, users, keep-alive."""

    def __init__(self, fake: FakeGuacd, protocol_name: str, names: list[str]) -> None:
        self.fake, self.protocol, self.names = fake, protocol_name, names
        self.connection_id = "$" + str(uuid.uuid4())
        self.users: list[FakeGuacdConnection] = []
        self._ended = False
        self.last_output = fake.clock.seconds()
        self.last_sent_timestamp = int(fake.clock.seconds() * 1000)
        self._keep_alive = task.LoopingCall(self._tick)
        self._keep_alive.clock = fake.clock
        self._keep_alive.start(KEEP_ALIVE_INTERVAL, now=False)
        fake.sessions[self.connection_id] = self

    def _tick(self) -> None:
        # guacd compares "> 5000 ms" on a free-running 5 s poll; ">=" keeps Clock tests exact
        if self.fake.clock.seconds() - self.last_output >= KEEP_ALIVE_INTERVAL:
            for user in self.users:
                if user.state == "running":
                    user._output(encode("nop"))

    def user_ended(self, conn: FakeGuacdConnection) -> None:
        if conn in self.users:
            self.users.remove(conn)
        if not any(user.joined for user in self.users):
            self.end()

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._keep_alive.running:
            self._keep_alive.stop()
        self.fake.sessions.pop(self.connection_id, None)
        for user in list(self.users):
            user._end_child("connection process ended")
        self.users.clear()


class FakeGuacdConnection(protocol.Protocol):
    """One accepted socket, as guacd's parent process and connection process see it."""

    def __init__(self, fake: FakeGuacd, behaviour: Behaviour) -> None:
        self.fake, self.behaviour, self.clock = fake, behaviour, fake.clock
        # select, handshake, silent, ready-wait, running, linger, closing, closed
        self.state = "select"
        self.select: str | None = None
        self.size: list[str] | None = None
        self.audio: list[str] | None = None
        self.video: list[str] | None = None
        self.image: list[str] | None = None
        self.timezone: str | None = None
        self.name: str | None = None
        self.connect_version: str | None = None
        self.connect_values: list[str] | None = None
        self.connect: dict[str, str] | None = None
        self.connection_id: str | None = None
        self.handshake_received: list[list[str]] = []
        self.received: list[list[str]] = []
        self.received_bytes = self.sent_bytes = 0
        self.joined = False  # guac_client_add_user succeeded
        # how the running user ended from the client's side: "disconnect" (the instruction
        # came before the socket closed) or "eof" (the socket closed first)
        self.ended_by: str | None = None
        self.user_active = True
        self._arity_ok = False
        self._lost = False
        self.flood: Flood | None = None
        self.upstream: protocol.Protocol | None = None  # the console connection (upstream)
        self.upstream_banner: str | None = None
        self._session: _Session | None = None
        self._parser = Parser()
        self._pending: deque[list[str] | str] = deque()  # instructions, or a parse error text
        self._timer: interfaces.IDelayedCall | None = None
        self._ready_call: interfaces.IDelayedCall | None = None
        self._handshake = _Notifier()
        self._closed = _Notifier()

    @property
    def handshake_done(self) -> defer.Deferred:
        """A new Deferred per access: the connection id once joined, else HandshakeFailed.

        A wrong ``connect`` arity fails it even though ``ready`` was sent, as the user never
        joins; an error after ready (``refuse_connect``) does not.
        """
        return self._handshake.deferred()

    @property
    def closed(self) -> defer.Deferred:
        """A new Deferred firing with a reason text once the socket is gone."""
        return self._closed.deferred()

    @property
    def lingering(self) -> bool:
        """guacd dropped the user but keeps the socket until the client writes or closes."""
        return self.state == "linger"

    # -- Twisted protocol ------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Start the 15 s wait for ``select``."""
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        """Parse and act; in linger, any byte makes guacd close."""
        self.received_bytes += len(data)
        if self.state == "linger":
            _log.info("fakeguacd: client wrote after its user ended; closing")
            self._close_now()
            return
        if self.state in ("closing", "closed"):
            return
        if self.state in ("select", "handshake", "running"):
            self._arm_timer()
        self._pending.extend(self._parser.feed(data))
        if self._parser.error is not None:
            self._pending.append(self._parser.error)
        self._pump()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Forget timers and the user; fire ``closed``."""
        if self.state == "running" and self.ended_by is None:
            self.ended_by = "eof"
        self.state, self._lost = "closed", True
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
        self._stop_timers()
        self._pending.clear()
        session, self._session = self._session, None
        if session is not None:
            session.user_ended(self)
        self._handshake.fire(False, "connection closed")
        self.fake._settled(self)
        self._closed.fire(True, reason.getErrorMessage())

    # -- public scripting ------------------------------------------------------------------

    def send(self, *elements: str) -> None:
        """Encode and send one instruction (counts as connection output for keep-alive)."""
        self._output(encode(*elements))

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are."""
        self._output(data)

    def send_sync(self, frames: int = 1) -> int:
        """Send ``sync,<now ms>,<frames>`` and remember it as the newest server timestamp."""
        stamp = int(self.clock.seconds() * 1000)
        if self._session is not None:
            self._session.last_sent_timestamp = stamp
        data = encode("sync", str(stamp), str(frames))
        self._output(data)
        return len(data)

    def send_error(self, message: str, status: int) -> None:
        """Send ``error`` and drop the user the way guacd does at this stage."""
        data = encode("error", message, str(status))
        if self.state == "select":
            self._write(data)
            self._close_now()
        elif self.state in ("handshake", "silent", "ready-wait"):
            self._write(data)
            self._end_child("error during handshake")
        elif self.state == "running":
            self._output(data)
            self.user_active = False  # loop ends after the next instruction or timeout
            if self.flood is not None:
                self.flood.finish()

    def close(self) -> None:
        """Close the socket without an error instruction."""
        self._close_now()

    # -- internals -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and self.state not in ("closing", "closed"):
            self.transport.write(data)
            self.sent_bytes += len(data)

    def _output(self, data: bytes) -> None:
        self._write(data)
        if self._session is not None and self.state == "running":
            self._session.last_output = self.clock.seconds()

    def _arm_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(TIMEOUT)
        else:
            self._timer = self.clock.callLater(TIMEOUT, self._timed_out)

    def _stop_timers(self) -> None:
        for call in (self._timer, self._ready_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._ready_call = None
        if self.flood is not None:
            self.flood.finish()

    def _close_now(self) -> None:
        self._stop_timers()
        self._pending.clear()
        if self.transport is not None and self.state not in ("closing", "closed"):
            self.state = "closing"
            self.transport.loseConnection()
        self._handshake.fire(False, "closed by guacd")
        self.fake._settled(self)

    def _end_child(self, why: str) -> None:
        """The connection process lets go of this user; the parent lingers."""
        if self.state in ("linger", "closing", "closed"):
            return
        _log.info("fakeguacd: user ended ({why})", why=why)
        self.state = "linger"
        self._stop_timers()
        self._pending.clear()
        self._handshake.fire(False, why)
        self.fake._settled(self)
        session, self._session = self._session, None
        if session is not None:
            session.user_ended(self)

    def _timed_out(self) -> None:
        self._timer = None
        if self.state == "select":
            _log.info("fakeguacd: timeout waiting for select; closing")
            self._close_now()
        elif self.state == "handshake":
            _log.info("fakeguacd: handshake failed, connect was not received")
            self._end_child("handshake timeout")
        elif self.state == "running":
            if self.user_active:
                _log.info("fakeguacd: user is not responding")
                self._output(encode("error", ABORT_MESSAGE, str(STATUS_CLIENT_TIMEOUT)))
            self._finish_user()

    def _finish_user(self) -> None:
        self._write(encode("disconnect"))
        self._end_child("user left")

    def _pump(self) -> None:
        while self._pending and self.state in ("select", "handshake", "silent", "running"):
            item = self._pending.popleft()
            if isinstance(item, str):
                self._parse_failed(item)
            elif self.state == "select":
                self._on_select(item)
            elif self.state == "silent":
                self.handshake_received.append(item)
            elif self.state == "handshake":
                self._on_handshake(item)
            else:
                self._on_running(item)

    def _parse_failed(self, why: str) -> None:
        _log.info("fakeguacd: instruction parse error ({why})", why=why)
        if self.state == "select":
            self._close_now()
        elif self.state == "running":
            self._finish_user()
        elif self.state == "handshake":
            self._end_child("parse error")

    def _on_select(self, instruction: list[str]) -> None:
        if instruction[0] != "select" or len(instruction) != 2:
            _log.info("fakeguacd: expected select with one argument; closing")
            self._close_now()
            return
        self.select = identifier = instruction[1]
        refusal = self.behaviour.refuse_select
        if refusal:
            if isinstance(refusal, tuple):
                self._write(encode("error", refusal[0], str(refusal[1])))
            self._close_now()
            return
        if identifier.startswith("$"):
            session = self.fake.sessions.get(identifier)
            if session is None:
                _log.info("fakeguacd: connection {id} does not exist", id=identifier)
                self._write(encode("error", "No such connection.", str(STATUS_RESOURCE_NOT_FOUND)))
                self._close_now()
                return
        elif identifier in self.fake.args:
            session = _Session(self.fake, identifier, self.fake.args[identifier])
        else:
            _log.info("fakeguacd: support for protocol {p} is not installed", p=identifier)
            self.state = "handshake"
            self._end_child("unknown protocol")
            return
        self._session = session
        session.users.append(self)
        if self.behaviour.silent:
            self.state = "silent"
            self._stop_timers()
            return
        self.state = "handshake"
        version = [] if self.fake.version is None else [self.fake.version]
        self._write(encode("args", *version, *session.names))
        self._arm_timer()

    def _on_handshake(self, instruction: list[str]) -> None:
        opcode, arguments = instruction[0], instruction[1:]
        self.handshake_received.append(instruction)
        if self.fake.version is None:
            expected = _LEGACY_ORDER[min(len(self.handshake_received), 5) - 1]
            if opcode != expected:
                self._end_child(f"expected {expected}")
                return
        if opcode == "connect":
            self._on_connect(arguments)
        elif opcode == "size":
            if len(arguments) < 2:
                self._end_child("size lacks arguments")
                return
            self.size = arguments
        elif opcode in ("audio", "video", "image"):
            setattr(self, opcode, arguments)
        elif opcode in ("timezone", "name"):
            setattr(self, opcode, arguments[0] if arguments and arguments[0] else None)
        else:
            _log.debug("fakeguacd: no handshake handler for {op}", op=opcode)

    def _on_connect(self, values: list[str]) -> None:
        assert self._session is not None
        names = self._session.names
        self._arity_ok = len(values) == len(names) + (self.fake.version is not None)
        if self.fake.version is not None and values:
            self.connect_version, values = values[0], values[1:]
        self.connect_values = values
        if self._arity_ok:
            self.connect = dict(zip(names, values, strict=True))
        _log.info(
            "fakeguacd: connect with {n} values for {p}", n=len(values), p=self._session.protocol
        )
        if self.behaviour.ready_delay > 0:
            self.state = "ready-wait"
            self._stop_timers()
            self._ready_call = self.clock.callLater(self.behaviour.ready_delay, self._ready)
        else:
            self._ready()

    def _ready(self) -> None:
        self._ready_call = None
        assert self._session is not None
        self.connection_id = self._session.connection_id
        self._write(encode("ready", self.connection_id))
        if not self._arity_ok:
            _log.info("fakeguacd: client did not return the expected number of arguments")
            self._end_child("wrong connect argument count")
            return
        self.state, self.joined = "running", True
        self._arm_timer()
        if self.behaviour.refuse_connect is not None:
            self.send_error(*self.behaviour.refuse_connect)
        elif self.behaviour.flood:
            self.flood = Flood(self, self.behaviour)
            self.flood.start()
        elif self.behaviour.upstream:
            self._connect_upstream()
        self._handshake.fire(True, self.connection_id)
        self.fake._settled(self)
        self._pump()

    def _connect_upstream(self) -> None:
        """Reach the console target like guacd does; see ``Behaviour.upstream``."""
        assert self.connect is not None
        conn = self
        endpoint = endpoints.TCP4ClientEndpoint(
            self.fake.reactor, self.connect["hostname"], int(self.connect["port"]), timeout=5
        )

        class Upstream(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                if conn.upstream_banner is None:
                    conn.upstream_banner = data[:12].decode("latin-1")
                    if not conn._lost:
                        conn.send("name", conn.upstream_banner.strip())

        def connected(upstream: protocol.Protocol) -> None:
            conn.upstream = upstream
            if conn._lost:
                upstream.transport.loseConnection()

        def failed(reason: Failure) -> None:
            if conn._lost:
                return
            if conn.behaviour.unreachable_disconnect:
                conn._finish_user()
            else:
                conn.send_error(ABORT_MESSAGE, 519)

        endpoint.connect(protocol.Factory.forProtocol(Upstream)).addCallbacks(connected, failed)

    def _on_running(self, instruction: list[str]) -> None:
        self.received.append(instruction)
        opcode = instruction[0]
        if opcode == "disconnect":
            if self.ended_by is None:
                self.ended_by = "disconnect"
            self.user_active = False
        elif opcode == "sync":
            assert self._session is not None
            stamp = _parse_timestamp(instruction[1] if len(instruction) > 1 else "")
            if stamp > self._session.last_sent_timestamp:
                _log.info("fakeguacd: sync timestamp from the future; user aborted")
                self.user_active = False
        elif self.behaviour.echo and opcode != "nop":
            self.send(*instruction)
        if not self.user_active:
            self._finish_user()


class FakeGuacd(protocol.ServerFactory):
    """A listening fake guacd; see the module docstring for what it reproduces."""

    noisy = False

    def __init__(
        self,
        reactor: Any,
        *,
        clock: interfaces.IReactorTime | None = None,
        endpoint: str = "tcp:0:interface=127.0.0.1",
        version: str | None = PROTOCOL_VERSION,
        args: dict[str, list[str]] | None = None,
        behaviour: Behaviour | Callable[[int], Behaviour] | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: interfaces.IReactorTime = clock if clock is not None else reactor
        self.endpoint, self.version, self.behaviour = endpoint, version, behaviour
        self.args: dict[str, list[str]] = {k: list(v) for k, v in DEFAULT_ARGS.items()}
        self.args.update({k: list(v) for k, v in (args or {}).items()})
        self.port = 0
        self.connections: list[FakeGuacdConnection] = []
        self.sessions: dict[str, _Session] = {}
        self._listener: interfaces.IListeningPort | None = None
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def buildProtocol(self, addr: object) -> FakeGuacdConnection:
        """Make the next connection, scripted by ``behaviour`` (called with its 1-based number)."""
        number = len(self.connections) + 1
        script = self.behaviour(number) if callable(self.behaviour) else self.behaviour
        conn = FakeGuacdConnection(self, script or Behaviour())
        self.connections.append(conn)
        return conn

    def start(self) -> defer.Deferred:
        """Listen on the endpoint; fires with the port number."""
        endpoint = endpoints.serverFromString(self.reactor, self.endpoint)

        def listening(port: interfaces.IListeningPort) -> int:
            self._listener = port
            self.port = port.getHost().port
            return self.port

        return endpoint.listen(self).addCallback(listening)

    def stop(self) -> defer.Deferred:
        """Stop listening, close every connection, cancel every timer."""
        waits = []
        if self._listener is not None:
            waits.append(defer.maybeDeferred(self._listener.stopListening))
            self._listener = None
        for conn in self.connections:
            if not conn._lost and conn.transport is not None:
                waits.append(conn.closed)
                conn._stop_timers()
                conn.transport.abortConnection()
        for session in list(self.sessions.values()):
            session.end()
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def wait_for_connection(self, n: int = 1) -> defer.Deferred:
        """Fires with the n-th connection once its handshake succeeded or failed."""
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((n, d))
        if len(self.connections) >= n:
            self._settled(self.connections[n - 1])
        return d

    def live_connection_ids(self) -> list[str]:
        """Ids that ``select,$<id>`` can join right now."""
        return list(self.sessions)

    def _settled(self, conn: FakeGuacdConnection) -> None:
        if not conn._handshake.fired or conn not in self.connections:
            return
        number = self.connections.index(conn) + 1
        ready = [d for n, d in self._waiters if n == number]
        self._waiters = [(n, d) for n, d in self._waiters if n != number]
        for d in ready:
            d.callback(conn)
