"""A faithful fake of OpenNebula oned's XML-RPC API, for tests.

A real XML-RPC server over HTTP on loopback (path ``/RPC2``). Facts come from
OpenNebula/one (branches one-6.10, one-7.0 and master, 2026); no upstream code is reused.
Behaviours reproduced, with the upstream file each one comes from:

- Session string ``user:secret`` split at the first ``:``; a disabled or unknown user
  fails; a user whose driver matches ``server*`` goes to the server path, anyone else to
  the internal path: src/um/UserPool.cc (``authenticate``), src/um/User.cc
  (``split_secret``).
- Internal path, in oned's order: a login token of the user (``EXPIRATION_TIME`` -1 never
  expires; an expired one is dropped and fails even when it equals the password), then
  the cached session, then the core driver (stored password = hex SHA-256 of the plain
  one): src/um/UserPool.cc (``authenticate_internal``), src/um/LoginToken.cc,
  include/AuthRequest.h (``core_authenticate``).
- Server path ``serveradmin:<target>[:<egid>]:<token>``: the target user runs the call;
  an EGID (whole decimal int) replaces the target's groups, unchecked; only the server
  user's ENABLED flag is checked, not the target's: src/um/UserPool.cc
  (``authenticate_server``). The driver decrypts the base64 token with AES-256-CBC,
  key = first 32 and IV = first 16 characters of serveradmin's stored password (the hex
  SHA-256 of the plain one), splits the plain text at ``:`` (Ruby ``split``, trailing
  empty fields dropped), requires field 0 == the server user's name and fails when
  ``now >= int(last field)``; the middle field (target) is never compared with the
  session's target: src/authm_mad/remotes/server_cipher/server_cipher_auth.rb,
  src/authm_mad/remotes/server_cipher/authenticate.
- After a good secret oned caches it per (target) user for SESSION_EXPIRATION_TIME (900 s
  in 6.10's oned.conf), skipping the driver, so an expired server_cipher token still
  works inside that window; off here unless ``session_cache_seconds`` is set:
  src/um/UserPool.cc, src/um/LoginToken.cc (``SessionToken``), share/etc/oned.conf.
- serveradmin is created with primary group 0 (oneadmin) and group set {0}:
  src/um/UserPool.cc (bootstrap). Admin = uid 0 or group 0 in the caller's groups:
  include/Request.h, include/RequestAttributes.h (``is_admin``).
- ``one.*.info``: id -1 is the caller for users; a missing object is NO_EXISTS (resp id =
  the id) before any authorisation; ``decrypt`` is honoured for admins only, and up to 7.0
  not even read (type-checked) for others: src/rm/RequestManagerInfo.cc (6.10, 7.0),
  src/rm/xml-rpc/VirtualMachineXRPC.cc and src/rm/api/SharedAPI.cc (7.2+). Zones are
  readable by everyone (ACL ``* ZONE/* USE *``): src/acl/AclManager.cc.
- Responses ``[true, value, 0]``; failures ``[false, msg, code, resp_id, repl_idx]`` with
  ``repl_idx`` an ``<i8>`` of UINT64_MAX (-1 on the wire) when unset. 5 elements since
  5.10, 4 in 5.4-5.8 (no repl idx), 3 before: src/rm/Request.cc (each tag),
  src/rm/xml-rpc/RequestXRPC.cc (7.x), include/Request.h (codes).
- Messages: ``[m] User couldn't be authenticated, aborting call.``, ``[m] User [uid] :
  Not authorized to perform USE VM [7].``, ``[m] Error getting virtual machine [7].``:
  src/rm/Request.cc (``failure_message``, ``object_name``), src/authm/AuthManager.cc.
- Unknown method: XML-RPC fault -506 ``Method 'x' not defined``; missing or mistyped
  parameters: fault -501 (``Not enough parameters``, ``Parameter that is supposed to be
  integer is not``...); unparsable call: fault -503: xmlrpc-c src/registry.c,
  src/cpp/param_list.cpp, include/xmlrpc-c/util.h. The session parameter is read before
  authentication, the id after it: src/rm/Request.cc (6.10 ``execute``).
- Documents: VM per ``VirtualMachine::to_xml_extended`` (all HISTORY records, 7.x adds
  PLAN_ID/ACTION_ID), USER per ``User::to_xml_extended`` (PASSWORD, LOGIN_TOKEN), ZONE per
  ``Zone::to_xml``; template attributes sorted by name, vector sub-attributes sorted,
  template values in CDATA: src/vm/VirtualMachine.cc, src/vm/History.cc,
  src/um/User.cc, src/zone/Zone.cc, src/common/Attribute.cc, include/NebulaUtil.h,
  share/doc/xsd/{vm,user,zone}.xsd. ``plain_values`` names a few values written as
  escaped text instead, so parsers meet both forms (oned itself always uses CDATA there).
- Encrypted attributes: VM ``CONTEXT/PASSWORD``, user ``SSH_PRIVATE_KEY`` and
  ``SSH_PASSPHRASE`` (share/etc/oned.conf ``*_ENCRYPTED_ATTR``) as base64 of AES-256-CBC
  under one_key with a NULL (all-zero) IV: src/common/NebulaUtil.cc. The key here is fake.

Failure knobs (``delay``, ``malformed``, ``entity_bomb``, ``error_elements``) are test
devices, not oned behaviour. Secrets never reach the log or ``calls``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import xmlrpc.client
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import defer, endpoints, interfaces
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import resource, server

# Request::ErrorCode (include/Request.h)
SUCCESS = 0x0
AUTHENTICATION = 0x100
AUTHORIZATION = 0x200
NO_EXISTS = 0x400
ACTION = 0x800
RPC_API = 0x1000
INTERNAL = 0x2000
ALLOCATE = 0x4000
LOCKED = 0x8000
REPLICATION = 0x10000

# xmlrpc-c fault codes (include/xmlrpc-c/util.h, xmlrpc_c::fault::code_t)
FAULT_TYPE = -501
FAULT_PARSE = -503
FAULT_NO_SUCH_METHOD = -506

#: ``replication_idx`` defaults to UINT64_MAX, sent through ``value_i8``: -1 on the wire.
NO_REPLICATION_INDEX = -1

ONEADMIN_UID = 0
SERVERADMIN_UID = 1
ONEADMIN_GID = 0
USERS_GID = 1
SERVER_NAME = "serveradmin"
CORE_AUTH = "core"
SERVER_CIPHER_AUTH = "server_cipher"

#: The default oned.conf SESSION_EXPIRATION_TIME (6.10): how long oned caches a good secret.
ONED_SESSION_EXPIRATION_TIME = 900

VM_ENCRYPTED = frozenset({("CONTEXT", "PASSWORD")})
USER_ENCRYPTED = frozenset({"SSH_PRIVATE_KEY", "SSH_PASSPHRASE"})

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_OBJECT_NAMES = {"VM": "virtual machine", "USER": "user", "ZONE": "zone"}

log = Logger()


class _I8(int):
    """An integer that serialises as ``<i8>`` (xmlrpc-c ``value_i8``)."""


class _Fault(Exception):
    """An XML-RPC fault raised while dispatching a call."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Failure(Exception):
    """An oned failure response (``[false, msg, code, ...]``)."""

    def __init__(self, code: int, message: str, resp_id: int = -1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.resp_id = resp_id


# -- crypto --------------------------------------------------------------------------------


def _aes_cbc_encrypt(key: bytes, iv: bytes, plain: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _aes_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """Decrypt and unpad; ValueError on a bad length or bad padding (OpenSSL's bad decrypt)."""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def sha256_hex(text: str) -> str:
    """oned's stored form of a password (``one_util::sha256_digest``)."""
    return hashlib.sha256(text.encode()).hexdigest()


def server_cipher_key(password: str) -> tuple[bytes, bytes]:
    """(key, iv) of the server_cipher driver for serveradmin's plain password."""
    key = sha256_hex(password)[:32]
    return key.encode("ascii"), key[:16].encode("ascii")


def _ruby_to_i(text: str) -> int:
    """Ruby ``String#to_i``: the leading decimal integer, else 0."""
    match = re.match(r"\s*([+-]?\d[\d_]*)", text)
    if match is None:
        return 0
    return int(match.group(1).replace("_", "") or "0")


def _cpp_parse_int(text: str) -> int | None:
    """``istringstream >> int`` that must consume the whole string, else None."""
    if re.fullmatch(r"\s*[+-]?\d+", text) is None:
        return None
    value = int(text)
    return value if _INT_MIN <= value <= _INT_MAX else None


# -- model ---------------------------------------------------------------------------------


@dataclass
class FakeUser:
    """A user of the fake cloud; ``password`` is the plain text."""

    name: str
    password: str
    uid: int
    gid: int
    gname: str
    groups: list[int]
    auth_driver: str = CORE_AUTH
    enabled: bool = True
    template: dict[str, str] = field(default_factory=dict)
    #: login token -> expiration epoch (-1: never)
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def password_hash(self) -> str:
        """The PASSWORD oned stores and shows (hex SHA-256)."""
        return sha256_hex(self.password)

    @property
    def is_admin(self) -> bool:
        """uid 0 or member of group 0 (oneadmin)."""
        return self.uid == ONEADMIN_UID or ONEADMIN_GID in self.groups


@dataclass
class FakeVM:
    """A VM; secrets are kept in plain text and encrypted when rendered."""

    id: int
    name: str
    uid: int
    gid: int
    uname: str
    gname: str
    state: int = 3
    lcm_state: int = 3
    graphics: dict[str, str] | None = None
    nics: list[dict[str, str]] = field(default_factory=list)
    nic_aliases: list[dict[str, str]] = field(default_factory=list)
    context: dict[str, str] | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    users_allowed: set[str] = field(default_factory=set)
    #: extra TEMPLATE attributes: str values are single, dict values vector attributes
    template: dict[str, str | dict[str, str]] = field(default_factory=dict)
    user_template: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeZone:
    """A zone of the federation."""

    id: int
    name: str
    state: int = 0
    endpoint: str = "http://localhost:2633/RPC2"
    fireedge_endpoint: str | None = None
    #: SERVER_POOL/SERVER entries (dicts of ID, NAME, ENDPOINT)
    servers: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Caller:
    """Who a call runs as, after authentication."""

    uid: int
    name: str
    gid: int
    group_ids: frozenset[int]

    @property
    def is_admin(self) -> bool:
        """RequestAttributes::is_admin: uid 0 or group 0 among the groups."""
        return self.uid == ONEADMIN_UID or ONEADMIN_GID in self.group_ids


# -- XML ---------------------------------------------------------------------------------


def _cdata(value: str) -> str:
    # oned writes the value as is; a "]]>" inside would break its XML, split it here.
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def _bomb_dtd(root: str) -> str:
    lines = [f"<!DOCTYPE {root} [", ' <!ENTITY lol "lol">']
    previous = "lol"
    for level in range(1, 10):
        name = f"lol{level}"
        lines.append(f' <!ENTITY {name} "{("&" + previous + ";") * 10}">')
        previous = name
    lines.append("]>")
    return "\n".join(lines)


_BOMB_REFERENCE = "&lol9;"
_BOMB_PLACEHOLDER = "FAKEONED-ENTITY-BOMB-PLACEHOLDER"


def _xmlrpc_escape(text: str) -> str:
    return escape(text).replace("\r", "&#x0d;")


def _xmlrpc_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"<boolean>{int(value)}</boolean>"
    if isinstance(value, _I8):
        return f"<i8>{int(value)}</i8>"
    if isinstance(value, int):
        return f"<i4>{value}</i4>"
    return f"<string>{_xmlrpc_escape(str(value))}</string>"


_XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\r\n'


def _response_envelope(values: list[Any], dtd: str = "") -> bytes:
    """A methodResponse holding one array, shaped like xmlrpc-c's output."""
    items = "".join(f"<value>{_xmlrpc_value(v)}</value>\r\n" for v in values)
    text = (
        _XML_DECLARATION
        + (dtd + "\r\n" if dtd else "")
        + "<methodResponse>\r\n<params>\r\n<param><value><array><data>\r\n"
        + items
        + "</data></array></value></param>\r\n</params>\r\n</methodResponse>\r\n"
    )
    return text.encode("utf-8")


def _fault_envelope(code: int, message: str) -> bytes:
    text = (
        _XML_DECLARATION + "<methodResponse>\r\n<fault>\r\n<value><struct>\r\n"
        "<member><name>faultCode</name>\r\n"
        f"<value><i4>{code}</i4></value></member>\r\n"
        "<member><name>faultString</name>\r\n"
        f"<value><string>{_xmlrpc_escape(message)}</string></value></member>\r\n"
        "</struct></value>\r\n</fault>\r\n</methodResponse>\r\n"
    )
    return text.encode("utf-8")


# -- transport -----------------------------------------------------------------------------


class _TrackingFactory(WrappingFactory):
    """Wraps the Site to know the open connections, so that stop() can close them."""

    noisy = False

    def __init__(self, wrapped: server.Site) -> None:
        super().__init__(wrapped)
        self._idle: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def close_all(self) -> defer.Deferred[None]:
        """Abort every open connection; fires once all are gone."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        for wrapper in list(self.protocols):
            wrapper.transport.abortConnection()
        return d


class _QuietSite(server.Site):
    noisy = False

    def log(self, request: server.Request) -> None:
        """No access log: the tests need none."""


class _RPC2(resource.Resource):
    isLeaf = True

    def __init__(self, fake: FakeOned) -> None:
        super().__init__()
        self._fake = fake

    def render_POST(self, request: server.Request) -> bytes | int:
        body = self._fake.handle_body(request.content.read())
        request.setHeader(b"content-type", b"text/xml")
        if self._fake.delay <= 0:
            return body
        self._fake._answer_later(request, body)
        return server.NOT_DONE_YET


# -- the fake ----------------------------------------------------------------------------


class FakeOned:
    """oned's XML-RPC API on loopback, backed by ``users``, ``vms`` and ``zones``.

    ``clock`` (default: the reactor) times ``delay`` and is "now" for token expiry.
    """

    #: fake one_key; oned's /var/lib/one/.one/one_key holds 64 hex chars, AES uses the first 32
    one_key = "fakeoned-one-key-0123456789abcde"

    def __init__(
        self,
        reactor: Any,
        *,
        clock: interfaces.IReactorTime | None = None,
        version: str = "6.10.0",
    ) -> None:
        self._reactor = reactor
        self.clock: interfaces.IReactorTime = clock if clock is not None else reactor
        self.version = version
        self.users: dict[str, FakeUser] = {}
        self.vms: dict[int, FakeVM] = {}
        self.zones: dict[int, FakeZone] = {}
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        #: seconds before answering (slow oned), timed on ``clock``
        self.delay: float = 0.0
        #: answer with a truncated envelope
        self.malformed: bool = False
        #: "envelope": billion laughs in the XML-RPC response; "document": in the XML string
        self.entity_bomb: str | None = None
        #: 5 (oned >= 5.10), 4 (5.4-5.8) or 3 (older) elements in failure arrays
        self.error_elements: int = 5
        #: template value names written as escaped text instead of CDATA
        self.plain_values: frozenset[str] = frozenset({"PORT", "IP"})
        #: cache a good secret per user like oned (SESSION_EXPIRATION_TIME); 0 = off
        self.session_cache_seconds: float = 0.0
        self._sessions: dict[str, tuple[str, float]] = {}
        self._serveradmin_password: str | None = None
        self._timers: set[interfaces.IDelayedCall] = set()
        self._port: interfaces.IListeningPort | None = None
        self._factory: _TrackingFactory | None = None
        self._next_uid = 2

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/RPC2`` once started."""
        if self._port is None:
            raise RuntimeError("FakeOned is not listening")
        return f"http://127.0.0.1:{self._port.getHost().port}/RPC2"

    @property
    def pending(self) -> int:
        """Answers held back by ``delay``."""
        return len(self._timers)

    def start(self) -> defer.Deferred[int]:
        """Listen on an ephemeral loopback port; fires with the port number."""
        root = resource.Resource()
        root.putChild(b"RPC2", _RPC2(self))
        site = _QuietSite(root, reactor=self._reactor)
        self._factory = _TrackingFactory(site)
        endpoint = endpoints.TCP4ServerEndpoint(self._reactor, 0, interface="127.0.0.1")

        def listening(port: interfaces.IListeningPort) -> int:
            self._port = port
            return port.getHost().port

        return endpoint.listen(self._factory).addCallback(listening)

    def stop(self) -> defer.Deferred[None]:
        """Stop listening, cancel held answers, close open connections."""
        for call in list(self._timers):
            if call.active():
                call.cancel()
        self._timers.clear()
        waits: list[defer.Deferred[Any]] = []
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))
        if self._factory is not None:
            waits.append(self._factory.close_all())
        d = defer.gatherResults(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def _answer_later(self, request: server.Request, body: bytes) -> None:
        def answer() -> None:
            self._timers.discard(call)
            if not finished:
                request.write(body)
                request.finish()

        def gone(reason: Failure) -> None:
            finished.append(True)
            self._timers.discard(call)
            if call.active():
                call.cancel()

        finished: list[bool] = []
        call = self.clock.callLater(self.delay, answer)
        self._timers.add(call)
        request.notifyFinish().addErrback(gone)

    # -- population --------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        password: str,
        *,
        uid: int | None = None,
        admin: bool = False,
        template: Mapping[str, str] | None = None,
        tokens: Iterable[str | tuple[str, int]] = (),
        auth_driver: str | None = None,
        enabled: bool = True,
        groups: Iterable[int] | None = None,
    ) -> FakeUser:
        """Add a user; ``admin`` puts it in group 0 (oneadmin), else in 1 (users).

        ``tokens`` are login tokens: a string never expires, ``(token, epoch)`` does.
        serveradmin gets the server_cipher driver (and uid 1) unless told otherwise.
        """
        if uid is None:
            if name == "oneadmin":
                uid = ONEADMIN_UID
            elif name == SERVER_NAME:
                uid = SERVERADMIN_UID
            else:
                uid = max([self._next_uid, *(u.uid + 1 for u in self.users.values())])
                self._next_uid = uid + 1
        gid, gname = (ONEADMIN_GID, "oneadmin") if admin else (USERS_GID, "users")
        driver = auth_driver or (SERVER_CIPHER_AUTH if name == SERVER_NAME else CORE_AUTH)
        token_map: dict[str, int] = {}
        for token in tokens:
            if isinstance(token, str):
                token_map[token] = -1
            else:
                token_map[token[0]] = int(token[1])
        user = FakeUser(
            name=name,
            password=password,
            uid=uid,
            gid=gid,
            gname=gname,
            groups=list(groups) if groups is not None else [gid],
            auth_driver=driver,
            enabled=enabled,
            template=dict(template or {}),
            tokens=token_map,
        )
        self.users[name] = user
        return user

    @property
    def serveradmin_password(self) -> str | None:
        """serveradmin's plain password (the one in sunstone_auth), if any."""
        user = self.users.get(SERVER_NAME)
        return user.password if user is not None else self._serveradmin_password

    @serveradmin_password.setter
    def serveradmin_password(self, password: str | None) -> None:
        self._serveradmin_password = password
        user = self.users.get(SERVER_NAME)
        if password is None:
            self.users.pop(SERVER_NAME, None)
        elif user is not None:
            user.password = password
        else:
            self.add_user(SERVER_NAME, password, admin=True)

    def add_vm(
        self,
        vm_id: int,
        owner: str,
        *,
        name: str | None = None,
        state: int = 3,
        lcm_state: int = 3,
        graphics: Mapping[str, str] | None = None,
        nics: Iterable[Mapping[str, str]] = (),
        nic_aliases: Iterable[Mapping[str, str]] = (),
        context: Mapping[str, str] | None = None,
        history: Iterable[Mapping[str, str]] = (),
        users_allowed: Iterable[str] = (),
        template: Mapping[str, str | dict[str, str]] | None = None,
        user_template: Mapping[str, str] | None = None,
    ) -> FakeVM:
        """Add a VM owned by the existing user ``owner`` (values as oned's strings)."""
        user = self.users.get(owner)
        if user is None:
            raise ValueError(f"add_vm: no user named {owner!r}; add_user first")
        vm = FakeVM(
            id=vm_id,
            name=name if name is not None else f"vm-{vm_id}",
            uid=user.uid,
            gid=user.gid,
            uname=user.name,
            gname=user.gname,
            state=state,
            lcm_state=lcm_state,
            graphics=dict(graphics) if graphics is not None else None,
            nics=[dict(n) for n in nics],
            nic_aliases=[dict(n) for n in nic_aliases],
            context=dict(context) if context is not None else None,
            history=[dict(h) for h in history],
            users_allowed=set(users_allowed),
            template=dict(template or {}),
            user_template=dict(user_template or {}),
        )
        self.vms[vm_id] = vm
        return vm

    def add_zone(
        self,
        zone_id: int,
        name: str,
        *,
        state: int = 0,
        endpoint: str = "http://localhost:2633/RPC2",
        fireedge_endpoint: str | None = None,
        servers: Iterable[Mapping[str, str]] = (),
    ) -> FakeZone:
        """Add a zone (STATE 0 enabled, 1 disabled)."""
        zone = FakeZone(
            id=zone_id,
            name=name,
            state=state,
            endpoint=endpoint,
            fireedge_endpoint=fireedge_endpoint,
            servers=[dict(s) for s in servers],
        )
        self.zones[zone_id] = zone
        return zone

    # -- helpers for tests -------------------------------------------------------------

    def encrypt_secret(self, plain: str) -> str:
        """An attribute as oned stores it encrypted (base64 AES-256-CBC, zero IV)."""
        data = _aes_cbc_encrypt(self.one_key.encode(), bytes(16), plain.encode())
        return base64.b64encode(data).decode("ascii")

    def decrypt_secret(self, encrypted: str) -> str:
        """The inverse of encrypt_secret."""
        data = base64.b64decode(encrypted)
        return _aes_cbc_decrypt(self.one_key.encode(), bytes(16), data).decode()

    def server_cipher_session(
        self,
        target: str,
        expires: int,
        *,
        egid: int | None = None,
        password: str | None = None,
        payload_target: str | None = None,
    ) -> str:
        """A ``serveradmin:<target>[:<egid>]:<token>`` session as Sunstone/FireEdge build it."""
        secret = password if password is not None else self.serveradmin_password
        if secret is None:
            raise ValueError("no serveradmin password")
        key, iv = server_cipher_key(secret)
        inner = payload_target if payload_target is not None else target
        plain = f"{SERVER_NAME}:{inner}:{expires}".encode()
        token = base64.b64encode(_aes_cbc_encrypt(key, iv, plain)).decode("ascii")
        middle = f"{egid}:" if egid is not None else ""
        return f"{SERVER_NAME}:{target}:{middle}{token}"

    # -- authentication ----------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.seconds()

    def _cached(self, user: FakeUser, secret: str) -> bool:
        entry = self._sessions.get(user.name)
        return entry is not None and entry[0] == secret and self._now() < entry[1]

    def _cache(self, user: FakeUser, secret: str) -> None:
        if self.session_cache_seconds > 0:
            self._sessions[user.name] = (secret, self._now() + self.session_cache_seconds)

    @staticmethod
    def _caller(user: FakeUser, egid: int | None = None) -> Caller:
        if egid is not None:
            return Caller(user.uid, user.name, egid, frozenset({egid}))
        return Caller(user.uid, user.name, user.gid, frozenset(user.groups))

    def authenticate(self, session: str) -> Caller | None:
        """Who ``session`` runs as, or None (UserPool::authenticate)."""
        username, sep, secret = session.partition(":")
        if not sep:
            return None
        user = self.users.get(username)
        if user is None or not user.enabled:
            # unknown users would go to external drivers; the fake has none
            return None
        if fnmatchcase(user.auth_driver, "server*"):
            return self._authenticate_server(user, secret)
        return self._authenticate_internal(user, secret)

    def _authenticate_internal(self, user: FakeUser, secret: str) -> Caller | None:
        if secret in user.tokens:
            expiration = user.tokens[secret]
            if expiration == -1 or self._now() < expiration:
                return self._caller(user)
            del user.tokens[secret]
            return None
        if self._cached(user, secret):
            return self._caller(user)
        if user.auth_driver != CORE_AUTH:
            return None  # public or external drivers: not modelled
        if sha256_hex(secret) != user.password_hash:
            return None
        self._cache(user, secret)
        return self._caller(user)

    def _authenticate_server(self, server_user: FakeUser, secret: str) -> Caller | None:
        target_name, sep, token = secret.partition(":")
        if not sep:
            return None  # "Wrong token format"
        egid: int | None = None
        first, sep, rest = token.partition(":")
        if sep:
            egid = _cpp_parse_int(first)
            if egid is None:
                return None  # "Wrong token format"
            token = rest
        target = self.users.get(target_name)
        if target is None:
            return None  # "User: x does not exist. Returned by server auth"
        if self._cached(target, token):
            return self._caller(target, egid)
        if not self._server_cipher_valid(server_user, token):
            return None
        self._cache(target, token)
        return self._caller(target, egid)

    def _server_cipher_valid(self, server_user: FakeUser, token: str) -> bool:
        stored = server_user.password_hash
        key, iv = stored[:32].encode("ascii"), stored[:16].encode("ascii")
        try:
            data = base64.b64decode(token)
            plain = _aes_cbc_decrypt(key, iv, data).decode("latin-1")
        except (ValueError, binascii.Error):
            return False  # OpenSSL "bad decrypt" and the like
        fields = plain.split(":")
        while fields and fields[-1] == "":
            fields.pop()  # Ruby's split drops trailing empty fields
        if not fields or fields[0] != server_user.name:
            return False  # "User name missmatch"
        return int(self._now()) < _ruby_to_i(fields[-1])  # else "login token expired"

    # -- dispatch ----------------------------------------------------------------------

    def handle_body(self, body: bytes) -> bytes:
        """The HTTP body answering one XML-RPC call body."""
        try:
            params, method = xmlrpc.client.loads(body, use_builtin_types=True)
        except (ExpatError, ValueError, TypeError, IndexError, xmlrpc.client.Error) as e:
            return self._finish_fault(
                _Fault(FAULT_PARSE, f"Call XML not a proper XML-RPC call.  {e}")
            )
        if method is None:
            return self._finish_fault(
                _Fault(FAULT_PARSE, "Call XML not a proper XML-RPC call.  no methodName")
            )
        try:
            _caller, value = self.dispatch(method, tuple(params))
        except _Fault as fault:
            return self._finish_fault(fault)
        except _Failure as failure:
            return self._finish(self._failure_values(method, failure), None)
        return self._finish([True, value, SUCCESS], value if isinstance(value, str) else None)

    def dispatch(self, method: str, params: tuple[Any, ...]) -> tuple[Caller, Any]:
        """Run one call: (caller, success value); raises _Fault or _Failure."""
        handler = self._METHODS.get(method)
        args = params[1:]
        if handler is None:
            self._record(method, "", args)
            raise _Fault(FAULT_NO_SUCH_METHOD, f"Method '{method}' not defined")
        try:
            session = _param_string(params, 0)
        except _Fault:
            self._record(method, "", args)
            raise
        caller = self.authenticate(session)
        self._record(method, caller.name if caller else "", args)
        if caller is None:
            raise _Failure(AUTHENTICATION, "User couldn't be authenticated, aborting call.")
        log.debug("fake oned: {method} as {user}", method=method, user=caller.name)
        return caller, handler(self, caller, params)

    def _record(self, method: str, user: str, args: tuple[Any, ...]) -> None:
        self.calls.append((method, user, args))

    def _failure_values(self, method: str, failure: _Failure) -> list[Any]:
        values: list[Any] = [False, f"[{method}] {failure.message}", failure.code]
        if self.error_elements >= 4:
            values.append(failure.resp_id)
        if self.error_elements >= 5:
            values.append(_I8(NO_REPLICATION_INDEX))
        return values

    def _finish_fault(self, fault: _Fault) -> bytes:
        return self._mangle(_fault_envelope(fault.code, fault.message))

    def _finish(self, values: list[Any], document: str | None) -> bytes:
        dtd = ""
        if self.entity_bomb == "envelope":
            values = [values[0], _BOMB_PLACEHOLDER, *values[2:]]
            dtd = _bomb_dtd("methodResponse")
        elif self.entity_bomb == "document" and document is not None and document[:1] == "<":
            values = [values[0], _bomb_document(document), *values[2:]]
        elif self.entity_bomb not in (None, "envelope", "document"):
            raise ValueError(f"entity_bomb must be envelope or document: {self.entity_bomb!r}")
        body = _response_envelope(values, dtd)
        if dtd:
            body = body.replace(_BOMB_PLACEHOLDER.encode(), _BOMB_REFERENCE.encode())
        return self._mangle(body)

    def _mangle(self, body: bytes) -> bytes:
        if self.malformed:
            return body[: len(body) // 2]
        return body

    # -- methods -----------------------------------------------------------------------

    def _decrypt_wanted(self, caller: Caller, params: tuple[Any, ...]) -> bool:
        # <= 7.0 (RequestManagerInfo.cc): the flag is only read (type-checked) for admins;
        # >= 7.2 (xml-rpc/*XRPC.cc, SharedAPI.cc): read for everyone, honoured for admins
        if len(params) > 2 and (caller.is_admin or _version(self.version) >= (7, 1, 80)):
            return _param_bool(params, 2) and caller.is_admin
        return False

    def _authorize(self, caller: Caller, kind: str, oid: int, allowed: bool) -> None:
        if allowed:
            return
        suffix = f" [{oid}]" if oid != -1 else ""
        raise _Failure(
            AUTHORIZATION,
            f"User [{caller.uid}] : Not authorized to perform USE {kind}{suffix}.",
        )

    @staticmethod
    def _missing(kind: str, oid: int) -> _Failure:
        obname = _OBJECT_NAMES[kind]
        where = f" [{oid}]." if oid != -1 else " Pool."
        return _Failure(NO_EXISTS, f"Error getting {obname}{where}", resp_id=oid)

    def _vm_info(self, caller: Caller, params: tuple[Any, ...]) -> str:
        oid = _param_int(params, 1)
        vm = self.vms.get(oid)
        if oid < 0:
            self._authorize(caller, "VM", oid, caller.is_admin)
        if vm is None:
            raise self._missing("VM", oid)
        allowed = caller.is_admin or vm.uid == caller.uid or caller.name in vm.users_allowed
        self._authorize(caller, "VM", oid, allowed)
        return self.vm_xml(vm, decrypt=self._decrypt_wanted(caller, params))

    def _user_info(self, caller: Caller, params: tuple[Any, ...]) -> str:
        oid = _param_int(params, 1)
        if oid == -1:
            oid = caller.uid
        user = next((u for u in self.users.values() if u.uid == oid), None)
        if oid < 0:
            self._authorize(caller, "USER", oid, caller.is_admin)
        if user is None:
            raise self._missing("USER", oid)
        self._authorize(caller, "USER", oid, caller.is_admin or caller.uid == oid)
        return self.user_xml(user, decrypt=self._decrypt_wanted(caller, params))

    def _zone_info(self, caller: Caller, params: tuple[Any, ...]) -> str:
        oid = _param_int(params, 1)
        zone = self.zones.get(oid)
        if zone is None:
            raise self._missing("ZONE", oid)
        self._decrypt_wanted(caller, params)
        return self.zone_xml(zone)

    def _zonepool_info(self, caller: Caller, params: tuple[Any, ...]) -> str:
        zones = "".join(self.zone_xml(self.zones[i]) for i in sorted(self.zones))
        return f"<ZONE_POOL>{zones}</ZONE_POOL>"

    def _system_version(self, caller: Caller, params: tuple[Any, ...]) -> str:
        return self.version

    _METHODS: ClassVar[Mapping[str, Any]] = {
        "one.vm.info": _vm_info,
        "one.user.info": _user_info,
        "one.zone.info": _zone_info,
        "one.zonepool.info": _zonepool_info,
        "one.system.version": _system_version,
    }

    # -- documents ---------------------------------------------------------------------

    def _value(self, name: str, value: str) -> str:
        if name in self.plain_values:
            return f"<{name}>{escape(value)}</{name}>"
        return f"<{name}>{_cdata(value)}</{name}>"

    def _vector(self, name: str, values: Mapping[str, str]) -> str:
        inner = "".join(self._value(k, str(values[k])) for k in sorted(values) if k)
        return f"<{name}>{inner}</{name}>"

    def _template(self, root: str, attributes: list[tuple[str, str | Mapping[str, str]]]) -> str:
        # std::multimap order: by name, equal names in insertion order (sort is stable)
        parts = []
        for name, value in sorted(attributes, key=lambda item: item[0]):
            if isinstance(value, Mapping):
                parts.append(self._vector(name, value))
            else:
                parts.append(self._value(name, str(value)))
        return f"<{root}>{''.join(parts)}</{root}>"

    def vm_xml(self, vm: FakeVM, *, decrypt: bool = False) -> str:
        """The document ``one.vm.info`` returns."""
        seven = _major(self.version) >= 7
        attributes: list[tuple[str, str | Mapping[str, str]]] = [
            ("CPU", "1"),
            ("MEMORY", "128"),
            ("TEMPLATE_ID", "0"),
            ("TM_MAD_SYSTEM", "ssh"),
            ("VMID", str(vm.id)),
        ]
        if vm.context is not None:
            context = dict(vm.context)
            for vector, key in VM_ENCRYPTED:
                if vector == "CONTEXT" and context.get(key) and not decrypt:
                    context[key] = self.encrypt_secret(context[key])
            attributes.append(("CONTEXT", context))
        if vm.graphics is not None:
            attributes.append(("GRAPHICS", vm.graphics))
        for index, nic in enumerate(vm.nics):
            attributes.append(("NIC", {"NIC_ID": str(index), **nic}))
        for index, alias in enumerate(vm.nic_aliases):
            attributes.append(("NIC_ALIAS", {"NIC_ID": str(len(vm.nics) + index), **alias}))
        attributes = [a for a in attributes if a[0] not in vm.template] + list(vm.template.items())
        records = sorted(
            (dict(h, SEQ=str(h.get("SEQ", i))) for i, h in enumerate(vm.history)),
            key=lambda h: int(h["SEQ"]),
        )
        if records:
            history = "".join(self._history_xml(vm, h, seven) for h in records)
            history_xml = f"<HISTORY_RECORDS>{history}</HISTORY_RECORDS>"
        else:
            history_xml = "<HISTORY_RECORDS/>"
        deploy_id = f"one-{vm.id}" if records else ""
        return (
            "<VM>"
            f"<ID>{vm.id}</ID><UID>{vm.uid}</UID><GID>{vm.gid}</GID>"
            f"<UNAME>{escape(vm.uname)}</UNAME><GNAME>{escape(vm.gname)}</GNAME>"
            f"<NAME>{escape(vm.name)}</NAME>"
            "<PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A>"
            "<GROUP_U>0</GROUP_U><GROUP_M>0</GROUP_M><GROUP_A>0</GROUP_A>"
            "<OTHER_U>0</OTHER_U><OTHER_M>0</OTHER_M><OTHER_A>0</OTHER_A></PERMISSIONS>"
            "<LAST_POLL>0</LAST_POLL>"
            f"<STATE>{vm.state}</STATE><LCM_STATE>{vm.lcm_state}</LCM_STATE>"
            f"<PREV_STATE>{vm.state}</PREV_STATE><PREV_LCM_STATE>{vm.lcm_state}</PREV_LCM_STATE>"
            "<RESCHED>0</RESCHED><STIME>1700000000</STIME><ETIME>0</ETIME>"
            f"<DEPLOY_ID>{deploy_id}</DEPLOY_ID>"
            "<MONITORING></MONITORING><SCHED_ACTIONS></SCHED_ACTIONS>"
            + self._template("TEMPLATE", attributes)
            + self._template("USER_TEMPLATE", list(vm.user_template.items()))
            + history_xml
            + "<BACKUPS><BACKUP_CONFIG></BACKUP_CONFIG><BACKUP_IDS></BACKUP_IDS></BACKUPS>"
            "</VM>"
        )

    def _history_xml(self, vm: FakeVM, record: Mapping[str, str], seven: bool) -> str:
        def get(name: str, default: str) -> str:
            return str(record.get(name, default))

        fields = [
            ("OID", get("OID", str(vm.id))),
            ("SEQ", get("SEQ", "0")),
            ("HOSTNAME", escape(get("HOSTNAME", ""))),
            ("HID", get("HID", "0")),
            ("CID", get("CID", "0")),
            ("STIME", get("STIME", "1700000000")),
            ("ETIME", get("ETIME", "0")),
            ("VM_MAD", _cdata(get("VM_MAD", "kvm"))),
            ("TM_MAD", _cdata(get("TM_MAD", "ssh"))),
            ("DS_ID", get("DS_ID", "0")),
        ]
        if seven:
            fields += [("PLAN_ID", get("PLAN_ID", "-1")), ("ACTION_ID", get("ACTION_ID", "-1"))]
        fields += [(name, get(name, "0")) for name in ("PSTIME", "PETIME", "RSTIME", "RETIME")] + [
            (name, get(name, "0")) for name in ("ESTIME", "EETIME", "ACTION")
        ]
        fields += [
            ("UID", get("UID", "-1")),
            ("GID", get("GID", "-1")),
            ("REQUEST_ID", get("REQUEST_ID", "-1")),
        ]
        return "<HISTORY>" + "".join(f"<{n}>{v}</{n}>" for n, v in fields) + "</HISTORY>"

    def user_xml(self, user: FakeUser, *, decrypt: bool = False) -> str:
        """The document ``one.user.info`` returns."""
        template = dict(user.template)
        if not decrypt:
            for key in USER_ENCRYPTED:
                if template.get(key):
                    template[key] = self.encrypt_secret(template[key])
        groups = "".join(f"<ID>{g}</ID>" for g in sorted(user.groups))
        tokens = "".join(
            f"<LOGIN_TOKEN><TOKEN>{escape(t)}</TOKEN><EXPIRATION_TIME>{e}</EXPIRATION_TIME>"
            "<EGID>-1</EGID></LOGIN_TOKEN>"
            for t, e in sorted(user.tokens.items())
        )
        return (
            "<USER>"
            f"<ID>{user.uid}</ID><GID>{user.gid}</GID><GROUPS>{groups}</GROUPS>"
            f"<GNAME>{escape(user.gname)}</GNAME><NAME>{escape(user.name)}</NAME>"
            f"<PASSWORD>{_cdata(user.password_hash)}</PASSWORD>"
            f"<AUTH_DRIVER>{_cdata(user.auth_driver)}</AUTH_DRIVER>"
            f"<ENABLED>{int(user.enabled)}</ENABLED>"
            + tokens
            + self._template("TEMPLATE", list(template.items()))
            + "<DATASTORE_QUOTA></DATASTORE_QUOTA><NETWORK_QUOTA></NETWORK_QUOTA>"
            "<VM_QUOTA></VM_QUOTA><IMAGE_QUOTA></IMAGE_QUOTA>"
            "<DEFAULT_USER_QUOTAS><DATASTORE_QUOTA></DATASTORE_QUOTA>"
            "<NETWORK_QUOTA></NETWORK_QUOTA><VM_QUOTA></VM_QUOTA><IMAGE_QUOTA></IMAGE_QUOTA>"
            "</DEFAULT_USER_QUOTAS>"
            "</USER>"
        )

    def zone_xml(self, zone: FakeZone) -> str:
        """The document ``one.zone.info`` returns."""
        attributes: list[tuple[str, str | Mapping[str, str]]] = [("ENDPOINT", zone.endpoint)]
        if zone.fireedge_endpoint is not None:
            attributes.append(("FIREEDGE_ENDPOINT", zone.fireedge_endpoint))
        servers = "".join(self._vector("SERVER", s) for s in zone.servers)
        return (
            "<ZONE>"
            f"<ID>{zone.id}</ID><NAME>{escape(zone.name)}</NAME><STATE>{zone.state}</STATE>"
            + self._template("TEMPLATE", attributes)
            + f"<SERVER_POOL>{servers}</SERVER_POOL>"
            "</ZONE>"
        )


def _version(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _major(version: str) -> int:
    return (_version(version) or (0,))[0]


def _bomb_document(document: str) -> str:
    root = re.match(r"<([A-Za-z_]+)", document)
    name = root.group(1) if root else "VM"
    bombed, count = re.subn(r"<NAME>.*?</NAME>", "<NAME>&lol9;</NAME>", document, count=1)
    if count == 0:
        bombed = document.replace(f"<{name}>", f"<{name}>{_BOMB_REFERENCE}", 1)
    return _bomb_dtd(name) + "\n" + bombed


def _param(params: tuple[Any, ...], index: int) -> Any:
    if index >= len(params):
        raise _Fault(FAULT_TYPE, "Not enough parameters")
    return params[index]


def _param_string(params: tuple[Any, ...], index: int) -> str:
    value = _param(params, index)
    if not isinstance(value, str):
        raise _Fault(FAULT_TYPE, "Parameter that is supposed to be a string is not")
    return value


def _param_int(params: tuple[Any, ...], index: int) -> int:
    value = _param(params, index)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Fault(FAULT_TYPE, "Parameter that is supposed to be integer is not")
    if value < _INT_MIN:
        raise _Fault(FAULT_TYPE, "Integer parameter too low")
    if value > _INT_MAX:
        raise _Fault(FAULT_TYPE, "Integer parameter too high")
    return value


def _param_bool(params: tuple[Any, ...], index: int) -> bool:
    value = _param(params, index)
    if not isinstance(value, bool):
        raise _Fault(FAULT_TYPE, "Parameter that is supposed to be boolean is not")
    return value
