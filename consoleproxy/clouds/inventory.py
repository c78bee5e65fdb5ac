"""
The embedded cloud: VMs, their consoles and users from one TOML file.

It lets consoleproxy run with no cloud at all (a lab, a demo, a handful of
machines), and it is the reference implementation of the two seams,
L{IAuthenticator} and L{ICloud}.  The file is re-read when it changes; a
broken edit keeps the previous contents in force and is logged.

Format (see ``consoleproxy/examples/inventory.toml``)::

    [users.alice]
    password_hash = "$argon2id$..."     # from consoleproxy passwd
    admin = true                        # optional (default false): an administrator

    [[vm]]
    id = 7
    name = "web-1"
    users = ["alice"]                   # or ["*"] for every user
    [vm.vnc]                            # guacd parameters of the vnc console
    hostname = "10.0.0.5"
    port = 5907
    password = "secret"
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from consoleproxy.clouds.passwords import PasswordVerifier
from consoleproxy.consoles import CONSOLE_TYPES, Console, Identity, Listing
from consoleproxy.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from consoleproxy.interfaces import IAuthenticator, ICloud, IConsoleDirectory, IRoles

_PARAMETER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_USER_NAME = re.compile(r"[^\s:]{1,128}")
#: Every user may open a VM whose ``users`` holds this.
ANYONE = "*"


class InventoryError(ValueError):
    """The inventory file is unusable; the message names the place."""


@dataclass(frozen=True)
class _VM:
    id: int
    name: str
    users: frozenset[str]
    consoles: Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class Inventory:
    """The parsed contents of an inventory file."""

    users: Mapping[str, str]  # name -> password hash
    vms: Mapping[int, _VM]
    #: The users with ``admin = true``: administrators (the sessions API, sharing, recordings).
    admins: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str, source: str = "inventory") -> Inventory:
        """
        Parse and validate an inventory.

        @raise InventoryError: naming the first problem found.
        """
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InventoryError(f"{source}: {e}") from e
        unknown = set(data) - {"users", "vm"}
        if unknown:
            raise InventoryError(f"{source}: unknown keys {sorted(unknown)}")
        users = {}
        admins = set()
        for name, entry in _table(data, "users", source).items():
            where = f"{source}: users.{name}"
            if not _USER_NAME.fullmatch(name):
                raise InventoryError(f"{where}: a user name has no blanks or ':'")
            entry = _table_of(entry, where)
            extra = set(entry) - {"password_hash", "admin"}
            if extra:
                raise InventoryError(f"{where}: unknown keys {sorted(extra)}")
            password_hash = entry.get("password_hash")
            if not isinstance(password_hash, str) or not password_hash.startswith("$argon2"):
                raise InventoryError(
                    f"{where}.password_hash: an Argon2 hash is required (consoleproxy passwd)"
                )
            users[name] = password_hash
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                raise InventoryError(f"{where}.admin: true or false")
            if admin:
                admins.add(name)
        vms: dict[int, _VM] = {}
        entries = data.get("vm", [])
        if not isinstance(entries, list):
            raise InventoryError(f"{source}: vm must be an array of tables ([[vm]])")
        for index, entry in enumerate(entries):
            vm = _parse_vm(_table_of(entry, f"{source}: vm[{index}]"), f"{source}: vm[{index}]")
            if vm.id in vms:
                raise InventoryError(f"{source}: vm[{index}].id: VM {vm.id} is listed twice")
            vms[vm.id] = vm
        return cls(users=users, vms=vms, admins=frozenset(admins))


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    return _table_of(data.get(key, {}), f"{where}: {key}")


def _table_of(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InventoryError(f"{where}: must be a table")
    return value


def _parse_vm(entry: Mapping[str, Any], where: str) -> _VM:
    vm_id = entry.get("id")
    if not isinstance(vm_id, int) or isinstance(vm_id, bool) or vm_id < 0:
        raise InventoryError(f"{where}.id: a VM id is a whole number >= 0")
    name = entry.get("name", f"vm-{vm_id}")
    users = entry.get("users", [])
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise InventoryError(f"{where}.users: a list of user names")
    consoles = {}
    for console_type in CONSOLE_TYPES:
        if console_type in entry:
            consoles[console_type] = _parse_console(
                _table_of(entry[console_type], f"{where}.{console_type}"),
                f"{where}.{console_type}",
            )
    unknown = set(entry) - {"id", "name", "users", *CONSOLE_TYPES}
    if unknown:
        raise InventoryError(f"{where}: unknown keys {sorted(unknown)}")
    return _VM(id=vm_id, name=str(name), users=frozenset(users), consoles=consoles)


def _parse_console(entry: Mapping[str, Any], where: str) -> Mapping[str, str]:
    parameters = {}
    for key, value in entry.items():
        if not _PARAMETER_NAME.fullmatch(key):
            raise InventoryError(f"{where}.{key}: not a guacd parameter name")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int | str):
            value = str(value)
        else:
            raise InventoryError(f"{where}.{key}: must be a string, number or boolean")
        parameters[key] = value
    if not parameters.get("hostname"):
        raise InventoryError(f"{where}.hostname is required")
    port = parameters.get("port")
    if port is None or not port.isdigit() or not 0 < int(port) < 65536:
        raise InventoryError(f"{where}.port: a TCP port 1-65535 is required")
    return parameters


@implementer(IAuthenticator, ICloud, IConsoleDirectory, IRoles)
class InventoryCloud:
    """
    Users and VMs of an inventory file, re-read when the file changes.

    @param path: the inventory file.
    @param verifier: checks passwords off the reactor thread.
    @param clock: with one, the file is looked at no more than once every
        L{CHECK_INTERVAL} seconds (a busy server asks several times per
        request); without, at every request.
    """

    name = "inventory"
    log = Logger()
    #: Seconds between looks at the file, when there is a clock.
    CHECK_INTERVAL = 1.0

    def __init__(
        self,
        path: str | os.PathLike[str],
        verifier: PasswordVerifier,
        clock: IReactorTime | None = None,
    ) -> None:
        self.path = Path(path)
        self._verifier = verifier
        self._clock = clock
        self._next_check = 0.0
        self._stamp: tuple[int, int] | None = None
        self._reload_error: str | None = None
        self.inventory = self._load()

    def _load(self) -> Inventory:
        try:
            stat = self.path.stat()
            text = self.path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InventoryError(f"cannot read inventory {self.path}: {e}") from e
        inventory = Inventory.parse(text, str(self.path))
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return inventory

    def _current(self) -> Inventory:
        """The inventory, re-read first if the file changed since the last read."""
        if self._clock is not None:
            now = self._clock.seconds()
            if now < self._next_check:
                return self.inventory
            self._next_check = now + self.CHECK_INTERVAL
        try:
            stat = self.path.stat()
        except OSError:
            return self.inventory
        if (stat.st_mtime_ns, stat.st_size) != self._stamp:
            try:
                self.inventory = self._load()
                self._reload_error = None
                self.log.info("Reloaded inventory {path}", path=str(self.path))
            except InventoryError as e:
                self._stamp = (stat.st_mtime_ns, stat.st_size)
                self._reload_error = str(e)
                self.log.error("Inventory not reloaded, keeping the previous one: {e}", e=str(e))
        return self.inventory

    def file_problem(self) -> str | None:
        """
        Re-read the file if it changed, then say whether the inventory in use is the file's.

        @return: C{None} when it is, else why not (the file is unreadable or
            invalid; the previously loaded inventory stays in use).
        """
        try:
            self.path.stat()
        except OSError as e:
            return f"cannot read inventory {self.path}: {e.strerror or e}"
        self._current()
        return self._reload_error

    def authenticate(self, authorization: bytes | None) -> Deferred[Identity]:
        """HTTP Basic against the inventory's Argon2 hashes."""
        credentials = parse_basic(authorization)
        if credentials is None:
            raise Unauthenticated("credentials required (HTTP Basic)")
        user, password = credentials
        password_hash = self._current().users.get(user)

        def checked(ok: bool) -> Identity:
            if not ok:
                raise Unauthenticated("wrong user name or password")
            return Identity(name=user, admin=user in self._current().admins)

        return self._verifier.verify(password_hash, password).addCallback(checked)

    def with_role(self, identity: Identity) -> Deferred[Identity]:
        """
        The identity with C{admin} from the inventory as it is now (an edit
        that removes ``admin = true`` takes effect at the next request).
        """
        admin = identity.name in self._current().admins
        return succeed(replace(identity, admin=admin))

    def console(
        self, identity: Identity, vm_id: int, console_type: str, zone: str | None
    ) -> Deferred[Console]:
        """The console as the inventory describes it, if this user may open it."""
        if zone is not None:
            raise NotFound(f"zone {zone} is unknown: the inventory has no zones")
        vm = self._current().vms.get(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} does not exist")
        if identity.name not in vm.users and ANYONE not in vm.users:
            raise Forbidden(f"user {identity.name} may not open the consoles of VM {vm_id}")
        parameters = vm.consoles.get(console_type)
        if parameters is None:
            raise BadRequest(f"VM {vm_id} has no {console_type} console")
        return succeed(Console(vm_id=vm_id, console_type=console_type, parameters=parameters))

    def listing(self, identity: Identity) -> Deferred[list[Listing]]:
        """The VMs this user may open, by id, with their console types."""
        vms = self._current().vms.values()
        return succeed(
            [
                Listing(vm.id, vm.name, tuple(t for t in CONSOLE_TYPES if t in vm.consoles))
                for vm in sorted(vms, key=lambda vm: vm.id)
                if identity.name in vm.users or ANYONE in vm.users
            ]
        )


def parse_basic(authorization: bytes | None) -> tuple[str, str] | None:
    """
    Read ``Basic base64(user:password)``; C{None} when absent or malformed.

    User names and passwords are UTF-8 (RFC 7617's charset).
    """
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic" or len(encoded) > 4096:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return user, password
