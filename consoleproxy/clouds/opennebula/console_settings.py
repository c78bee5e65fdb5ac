"""
guacd settings from OpenNebula VM documents: FireEdge's rules, without its flaws.

  - VNC needs ``GRAPHICS/TYPE`` VNC (any case) and a ``PORT``; the host is
    the ``HOSTNAME`` of the last ``HISTORY`` record.  A VM that was never
    deployed is refused (FireEdge falls back to ``localhost``).
  - Consoles are refused in states where they cannot work (FireEdge only
    greys out its buttons).
  - SSH and RDP use the first NIC or NIC_ALIAS flagged SSH/RDP (any case),
    ``EXTERNAL_IP`` before ``IP``, the IPv6 address when there is no IPv4.
    A NIC with ``EXTERNAL_PORT_RANGE`` is reached on the hypervisor at the
    forwarded port (internal port p -> ``p_ini + p - 1``: SSH at
    ``p_ini + 21``), as the Ruby Sunstone did.
  - Encrypted attributes (``CONTEXT/PASSWORD``, the user's
    ``SSH_PRIVATE_KEY``) are used only once decrypted; ciphertext is never
    handed to guacd as if it were the secret.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from consoleproxy.errors import BadRequest, Conflict

#: VM STATE values (include/VirtualMachine.h).
ACTIVE = 3
STATE_NAMES = {
    0: "INIT",
    1: "PENDING",
    2: "HOLD",
    3: "ACTIVE",
    4: "STOPPED",
    5: "SUSPENDED",
    6: "DONE",
    8: "POWEROFF",
    9: "UNDEPLOYED",
    10: "CLONING",
    11: "CLONING_FAILURE",
}
#: LCM_STATE values in which FireEdge's UI offers VNC (modules/constants/vm.js):
#: RUNNING, MIGRATE, SHUTDOWN, CANCEL, UNKNOWN, HOTPLUG, SHUTDOWN_POWEROFF,
#: HOTPLUG_SNAPSHOT, HOTPLUG_NIC, HOTPLUG_SAVEAS(_POWEROFF, _SUSPENDED),
#: SHUTDOWN_UNDEPLOY, DISK_SNAPSHOT, DISK_SNAPSHOT_REVERT, DISK_RESIZE, BACKUP.
VNC_LCM_STATES = frozenset({3, 4, 12, 13, 16, 17, 18, 24, 25, 26, 27, 28, 29, 57, 58, 62, 69})
#: SSH and RDP need a running guest.
RUNNING_ONLY = frozenset({3})

_PORT_FOR = {"ssh": 22, "rdp": 3389}
_RDP_FLAGS = {
    "RDP_DISABLE_AUDIO": "disable-audio",
    "RDP_ENABLE_AUDIO_INPUT": "enable-audio-input",
    "RDP_ENABLE_WALLPAPER": "enable-wallpaper",
    "RDP_ENABLE_THEMING": "enable-theming",
    "RDP_ENABLE_FONT_SMOOTHING": "enable-font-smoothing",
    "RDP_ENABLE_FULL_WINDOW_DRAG": "enable-full-window-drag",
    "RDP_ENABLE_DESKTOP_COMPOSITION": "enable-desktop-composition",
    "RDP_ENABLE_MENU_ANIMATIONS": "enable-menu-animations",
    "RDP_DISABLE_BITMAP_CACHING": "disable-bitmap-caching",
    "RDP_DISABLE_OFFSCREEN_CACHING": "disable-offscreen-caching",
    "RDP_DISABLE_GLYPH_CACHING": "disable-glyph-caching",
}


@dataclass(frozen=True)
class StatePolicy:
    """In which LCM states (of an ACTIVE VM) each console type may open."""

    vnc: frozenset[int] = VNC_LCM_STATES
    ssh: frozenset[int] = RUNNING_ONLY
    rdp: frozenset[int] = RUNNING_ONLY

    def allows(self, console_type: str, lcm_state: int) -> bool:
        """Whether C{console_type} works in C{lcm_state}."""
        states: Iterable[int] = getattr(self, console_type)
        return lcm_state in states


@dataclass(frozen=True)
class Secrets:
    """
    Decrypted attributes, read with the server-admin credential.

    C{None} means "not decrypted": the caller had no way to decrypt.
    """

    vm: Element | None = None  # /VM read with decrypt
    user: Element | None = None  # /USER read with decrypt


def _text(element: Element | None, path: str) -> str:
    if element is None:
        return ""
    return (element.findtext(path) or "").strip()


def vm_id(vm: Element) -> int:
    """The VM's id."""
    return int(_text(vm, "ID") or -1)


def check_state(vm: Element, console_type: str, policy: StatePolicy) -> None:
    """
    Refuse a console the VM's state cannot serve.

    @raise Conflict: with the state's name and what is needed.
    """
    state = _number(_text(vm, "STATE"))
    lcm = _number(_text(vm, "LCM_STATE"))
    if state != ACTIVE:
        name = STATE_NAMES.get(state, str(state))
        raise Conflict(f"VM {vm_id(vm)} is {name}: its {console_type} console needs a running VM")
    if not policy.allows(console_type, lcm):
        raise Conflict(
            f"VM {vm_id(vm)} is in LCM state {lcm}: its {console_type} console is not "
            "available in this state"
        )


def _number(text: str) -> int:
    return int(text) if text.isdigit() else -1


def hypervisor(vm: Element) -> str:
    """
    The host the VM is (or was last) on: HOSTNAME of the last HISTORY record.

    @raise Conflict: the VM was never deployed.
    """
    records = vm.findall("HISTORY_RECORDS/HISTORY")
    hostname = _text(records[-1], "HOSTNAME") if records else ""
    if not hostname:
        raise Conflict(f"VM {vm_id(vm)} has not been deployed on a host")
    return hostname


def vnc_parameters(vm: Element) -> dict[str, str]:
    """guacd ``vnc`` settings."""
    graphics = vm.find("TEMPLATE/GRAPHICS")
    kind = _text(graphics, "TYPE")
    if graphics is None or kind.lower() != "vnc":
        found = f"GRAPHICS/TYPE is {kind.upper()}" if kind else "it has no GRAPHICS"
        raise BadRequest(f"VM {vm_id(vm)} has no VNC console ({found})")
    port = _text(graphics, "PORT")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise Conflict(f"VM {vm_id(vm)} has no VNC port yet (GRAPHICS/PORT is set at deploy)")
    parameters = {"hostname": hypervisor(vm), "port": port}
    password = _text(graphics, "PASSWD")
    if password:
        parameters["password"] = password
    return parameters


def _flagged_nic(vm: Element, flag: str) -> Element:
    template = vm.find("TEMPLATE")
    for child in () if template is None else template:
        if child.tag in ("NIC", "NIC_ALIAS") and _text(child, flag).lower() == "yes":
            return child
    raise BadRequest(
        f"VM {vm_id(vm)} has no NIC with {flag}=YES: set {flag}=YES on the NIC to reach"
    )


def _nic_target(vm: Element, nic: Element, port: int) -> tuple[str, int]:
    forwarded = _text(nic, "EXTERNAL_PORT_RANGE")
    if forwarded:
        first, _, last = forwarded.partition(":")
        if not (first.isdigit() and last.isdigit()):
            raise BadRequest(
                f"VM {vm_id(vm)}: EXTERNAL_PORT_RANGE {forwarded!r} is not p_ini:p_end"
            )
        outside = int(first) + port - 1
        if outside > int(last):
            raise BadRequest(
                f"VM {vm_id(vm)}: port {port} is outside the forwarded range {forwarded}"
            )
        return hypervisor(vm), outside
    for attribute in ("EXTERNAL_IP", "IP", "IP6_GLOBAL", "IP6", "IP6_ULA"):
        address = _text(nic, attribute)
        if address:
            return address, port
    raise BadRequest(f"VM {vm_id(vm)}: the NIC has no IP address")


def _context(vm: Element, name: str) -> str:
    return _text(vm, f"TEMPLATE/CONTEXT/{name}")


def looks_encrypted(value: str) -> bool:
    """
    Whether a value looks like oned's ciphertext (base64 of AES blocks).

    oned hands encrypted attributes to callers without decrypt rights as
    base64 of AES-CBC output: whole 16-byte blocks.
    """
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) >= 16 and len(raw) % 16 == 0


def _decrypted(document: Element | None, path: str) -> str | None:
    """The attribute from a decrypted document; None when there is none."""
    return None if document is None else _text(document, path)


def _secret(value: str, decrypted: str | None, what: str, vm: Element) -> str:
    """A secret attribute: decrypted if we could, refused if it is ciphertext."""
    if decrypted is not None:
        return decrypted
    if value and looks_encrypted(value):
        raise BadRequest(
            f"{what} of VM {vm_id(vm)} is encrypted and consoleproxy cannot decrypt it: "
            "configure [opennebula] server_admin_auth (the sunstone_auth file)"
        )
    return value


def _context_password(vm: Element, secrets: Secrets, parameters: dict[str, str]) -> None:
    """CONTEXT/PASSWORD, decrypted when it must be, into C{parameters}."""
    password = _secret(
        _context(vm, "PASSWORD"),
        _decrypted(secrets.vm, "TEMPLATE/CONTEXT/PASSWORD"),
        "CONTEXT/PASSWORD",
        vm,
    )
    if password:
        parameters["password"] = password


def ssh_parameters(vm: Element, user: Element | None, secrets: Secrets) -> dict[str, str]:
    """guacd ``ssh`` settings; C{user} is the requesting user's document."""
    nic = _flagged_nic(vm, "SSH")
    port = _context(vm, "SSH_PORT") or "22"
    if not port.isdigit():
        raise BadRequest(f"VM {vm_id(vm)}: CONTEXT/SSH_PORT {port!r} is not a port")
    host, port_number = _nic_target(vm, nic, int(port))
    parameters = {"hostname": host, "port": str(port_number)}
    username = _context(vm, "USERNAME")
    if username:
        parameters["username"] = username
    if _context(vm, "SSH_PUBLIC_KEY"):
        key = _secret(
            _text(user, "TEMPLATE/SSH_PRIVATE_KEY"),
            _decrypted(secrets.user, "TEMPLATE/SSH_PRIVATE_KEY"),
            "the user's SSH_PRIVATE_KEY",
            vm,
        )
        if key:
            parameters["private-key"] = key
            passphrase = _secret(
                _text(user, "TEMPLATE/SSH_PASSPHRASE"),
                _decrypted(secrets.user, "TEMPLATE/SSH_PASSPHRASE"),
                "the user's SSH_PASSPHRASE",
                vm,
            )
            if passphrase:
                parameters["passphrase"] = passphrase
            return parameters
    _context_password(vm, secrets, parameters)
    return parameters


def rdp_parameters(vm: Element, secrets: Secrets) -> dict[str, str]:
    """guacd ``rdp`` settings."""
    nic = _flagged_nic(vm, "RDP")
    port = _context(vm, "RDP_PORT") or "3389"
    if not port.isdigit():
        raise BadRequest(f"VM {vm_id(vm)}: CONTEXT/RDP_PORT {port!r} is not a port")
    host, port_number = _nic_target(vm, nic, int(port))
    parameters = {
        "hostname": host,
        "port": str(port_number),
        "security": _context(vm, "RDP_SECURITY").lower() or "rdp",
        "ignore-cert": "true",
        "resize-method": _text(nic, "RDP_RESIZE_METHOD") or "display-update",
    }
    layout = _text(nic, "RDP_SERVER_LAYOUT")
    if layout:
        parameters["server-layout"] = layout
    for attribute, name in _RDP_FLAGS.items():
        if _text(nic, attribute).lower() == "yes":
            parameters[name] = "true"
    username = _context(vm, "USERNAME")
    if username:
        parameters["username"] = username
    _context_password(vm, secrets, parameters)
    return parameters
