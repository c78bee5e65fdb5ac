"""
The OpenNebula cloud: oned decides who may see which VM.

The user's own credentials become the oned session (HTTP Basic
``user:password``, or ``Authorization: Bearer user:<login token>``), so oned
applies its own authentication and ACLs; consoleproxy keeps no user list.
Attributes oned encrypts (``CONTEXT/PASSWORD``, the user's
``SSH_PRIVATE_KEY``) are read, after the user's own call has succeeded, with
the optional server-admin credential (``sunstone_auth``) in oned's
server_cipher session form.  oned refusing that credential is the server's
problem, not the user's: a 503 naming ``opennebula.server_admin_auth``
(L{ServerAdminStatus} logs it and ``/readyz`` shows it), never a 401.

Consoles of VMs in another zone (``?zone=N``) are looked up in that zone's
oned, found through the local zone pool, and sealed for that zone.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any
from xml.etree.ElementTree import Element

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger
from zope.interface import implementer

from consoleproxy.clouds.inventory import parse_basic
from consoleproxy.clouds.opennebula.console_settings import (
    Secrets,
    StatePolicy,
    check_state,
    rdp_parameters,
    ssh_parameters,
    vnc_parameters,
)
from consoleproxy.clouds.opennebula.oned import Oned, ServerAdmin, ServerAdminStatus
from consoleproxy.clouds.opennebula.zones import MAX_ZONES
from consoleproxy.consoles import Console, Identity, zone_id, zone_key
from consoleproxy.errors import BadRequest, Conflict, NotFound, Unauthenticated
from consoleproxy.interfaces import IAuthenticator, ICloud, IRoles


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1."""
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: The group oned creates first: always id 0, named ``oneadmin``.
ONEADMIN_GROUP_ID = 0
#: Seconds a user's role is remembered (a group change takes effect after at most this).
ROLE_CACHE_SECONDS = 10.0
#: Roles remembered at most (the oldest is forgotten first): bounded memory.
ROLE_CACHE_SIZE = 1024


def is_admin_document(user: Element, admin_groups: Iterable[str | int]) -> bool:
    """
    Whether oned's user document (``/USER``: ``GID``, ``GNAME``,
    ``GROUPS/ID``, the primary group among them) puts the user in one of
    C{admin_groups}.

    A number (or a string of digits) is a group id and matches the primary
    or any secondary group; a name matches the primary group's ``GNAME``
    (oned's user document names no other group), and ``oneadmin`` also
    matches group 0 wherever it is, since that group is always oneadmin.
    """
    ids = {(user.findtext("GID") or "").strip()}
    ids |= {(e.text or "").strip() for e in user.findall("GROUPS/ID")}
    primary = (user.findtext("GNAME") or "").strip()
    for group in admin_groups:
        text = str(group)
        if text.isdigit():
            if str(int(text)) in ids:
                return True
        elif text == primary or (text == "oneadmin" and str(ONEADMIN_GROUP_ID) in ids):
            return True
    return False


@implementer(IAuthenticator, ICloud, IRoles)
class OpenNebulaCloud:
    """
    Consoles of OpenNebula VMs.

    @param oned: the local zone's oned.
    @param oned_for: builds an L{Oned} for another zone's XML-RPC endpoint.
    @param clock: for server_cipher token expiry.
    @param local_zone: this zone's id; tokens for it carry no zone.
    @param server_admin: the server-admin credential, or None (then
        encrypted attributes cannot be used).
    @param loopback_address: what to use for a hypervisor oned reports as
        loopback; None keeps it when C{guacd_is_local}, else refuses.
    """

    name = "opennebula"
    log = Logger()

    def __init__(
        self,
        oned: Oned,
        oned_for: Callable[[str], Oned],
        clock: Any,
        *,
        local_zone: str = "0",
        server_admin: ServerAdmin | None = None,
        policy: StatePolicy | None = None,
        loopback_address: str | None = None,
        guacd_is_local: bool = True,
        admin_groups: Iterable[str | int] = ("oneadmin",),
    ) -> None:
        self.oned = oned
        self._oned_for = oned_for
        self._zones: dict[str, Oned] = {}  # by XML-RPC endpoint, at most MAX_ZONES
        self._clock = clock
        self.local_zone = zone_key(local_zone)
        self.server_admin = server_admin
        #: What the last call with the server-admin credential found.
        self.admin_status = ServerAdminStatus(clock)
        self.policy = policy or StatePolicy()
        self.loopback_address = loopback_address
        self.guacd_is_local = guacd_is_local
        #: Groups (names or ids) whose members are administrators (``opennebula.admin_groups``).
        self.admin_groups = tuple(admin_groups)
        self._roles: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    # -- IAuthenticator --------------------------------------------------------------

    def authenticate(self, authorization: bytes | None) -> Deferred[Identity]:
        """
        Take the user's credentials as an oned session; oned checks them on
        the first call.
        """
        credentials = parse_basic(authorization)
        if credentials is None and authorization:
            scheme, _, value = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                try:
                    text = value.strip().decode("utf-8")
                except UnicodeDecodeError:
                    text = ""
                user, colon, token = text.partition(":")
                if colon and user and token:
                    credentials = (user, token)
        if credentials is None:
            raise Unauthenticated(
                "credentials required: HTTP Basic user:password, or Bearer user:<login token>"
            )
        user, secret = credentials
        return succeed(Identity(name=user, secret=f"{user}:{secret}"))

    # -- IRoles -----------------------------------------------------------------------

    def with_role(self, identity: Identity) -> Deferred[Identity]:
        """
        Ask oned who the user is (``one.user.info`` with id -1, as the user):
        an administrator when in one of L{admin_groups}.  The answer is kept
        for L{ROLE_CACHE_SECONDS}, keyed by a digest of the credentials (a
        wrong password is never answered from the cache); oned refusing the
        credentials fails with L{Unauthenticated}.
        """
        assert identity.secret is not None
        key = hashlib.sha256(identity.secret.encode("utf-8", "surrogatepass")).hexdigest()
        now = self._clock.seconds()
        known = self._roles.get(key)
        if known is not None and known[0] > now:
            return succeed(replace(identity, admin=known[1]))

        def found(user: Element) -> Identity:
            admin = is_admin_document(user, self.admin_groups)
            self._roles.pop(key, None)
            self._roles[key] = (self._clock.seconds() + ROLE_CACHE_SECONDS, admin)
            while len(self._roles) > ROLE_CACHE_SIZE:
                self._roles.popitem(last=False)
            return replace(identity, admin=admin)

        return self.oned.user_info(identity.secret, -1).addCallback(found)

    # -- ICloud ----------------------------------------------------------------------

    @inlineCallbacks
    def console(  # type: ignore[no-untyped-def]
        self, identity: Identity, vm_id: int, console_type: str, zone: str | None
    ):
        """Ask oned (the zone's, if another) for the VM and build guacd's settings."""
        assert identity.secret is not None
        session = identity.secret
        zone = None if zone is None else zone_key(zone)
        remote = zone is not None and zone != self.local_zone
        oned = (yield self._zone_oned(session, zone)) if remote else self.oned
        vm: Element = yield oned.vm_info(session, vm_id)
        check_state(vm, console_type, self.policy)
        if console_type == "vnc":
            parameters = vnc_parameters(vm)
        else:
            secrets, user = yield self._secrets(oned, session, vm_id, vm, console_type)
            if console_type == "ssh":
                parameters = ssh_parameters(vm, user, secrets)
            else:
                parameters = rdp_parameters(vm, secrets)
        self._loopback(parameters, vm_id)
        records = vm.findall("HISTORY_RECORDS/HISTORY")
        cluster = (records[-1].findtext("CID") or "").strip() if records else ""
        return Console(
            vm_id=vm_id,
            console_type=console_type,
            parameters=parameters,
            zone=zone if remote else None,
            cluster=cluster or None,
        )

    @inlineCallbacks
    def _secrets(self, oned: Oned, session: str, vm_id: int, vm: Element, console_type: str):  # type: ignore[no-untyped-def]
        """The decrypted documents (with the server-admin credential) and the user's own."""
        wants_key = console_type == "ssh" and bool(
            (vm.findtext("TEMPLATE/CONTEXT/SSH_PUBLIC_KEY") or "").strip()
        )
        user = (yield oned.user_info(session, -1)) if wants_key else None
        if self.server_admin is None:
            return Secrets(), user
        admin = self._admin_session()
        watch = self.admin_status.watch
        calls = [watch(oned.vm_info(admin, vm_id, True))]
        if user is not None:
            calls.append(watch(oned.user_info(admin, int(user.findtext("ID") or -1), True)))
        documents = yield gatherResults(calls, consumeErrors=True).addErrback(
            lambda failure: failure.value.subFailure
        )
        return Secrets(vm=documents[0], user=documents[1] if len(documents) > 1 else None), user

    def _admin_session(self) -> str:
        assert self.server_admin is not None
        return self.server_admin.session(self.server_admin.user, self._clock.seconds())

    def zone_pool(self) -> Deferred[Element]:
        """The local zone pool, read with the server-admin credential (the zone directory's)."""
        return self.admin_status.watch(self.oned.zonepool_info(self._admin_session()))

    def check_server_admin(self) -> Deferred[Any]:
        """
        Whether oned accepts the server-admin credential now (``/readyz``):
        ``one.system.version`` with it, which oned authenticates.
        """
        return self.admin_status.watch(self.oned.version(self._admin_session()))

    def _zone_oned(self, session: str, zone: str | None) -> Deferred[Oned]:
        """The zone's oned; the zone is looked up every time (state, endpoint)."""
        assert zone is not None

        def found(document: Element) -> Oned:
            if (document.findtext("STATE") or "0").strip() == "1":
                raise Conflict(f"zone {zone} is disabled")
            endpoint = (document.findtext("TEMPLATE/ENDPOINT") or "").strip()
            if not endpoint or endpoint == "-":
                raise Conflict(f"zone {zone} has no ENDPOINT")
            if endpoint not in self._zones:
                if len(self._zones) >= MAX_ZONES:  # the oldest goes (its idle connections)
                    self._zones.pop(next(iter(self._zones))).close()
                self._zones[endpoint] = self._oned_for(endpoint)
            return self._zones[endpoint]

        def missing(failure: Any) -> Any:
            failure.trap(NotFound)
            raise NotFound(f"zone {zone} does not exist")

        return self.oned.zone_info(session, zone_id(zone)).addCallbacks(found, missing)

    def _loopback(self, parameters: dict[str, str], vm_id: int) -> None:
        host = parameters.get("hostname", "")
        if not is_loopback(host):
            return
        if self.loopback_address:
            parameters["hostname"] = self.loopback_address
        elif not self.guacd_is_local:
            raise BadRequest(
                f"VM {vm_id}'s console is at {host!r} as oned reports it, and guacd runs on "
                "another host: set [opennebula] loopback_address to an address of the "
                "hypervisor that guacd can reach"
            )

    def close(self) -> Deferred[Any]:
        """Close idle oned connections."""
        return gatherResults([o.close() for o in (self.oned, *self._zones.values())])
