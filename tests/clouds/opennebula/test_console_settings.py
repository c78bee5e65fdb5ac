"""guacd settings from OpenNebula VM documents (FireEdge's rules, fixed)."""

from __future__ import annotations

import base64
import os
import warnings
from xml.etree.ElementTree import Element, TreeBuilder, XMLParser

from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.clouds.opennebula.console_settings import (
    Secrets,
    StatePolicy,
    check_state,
    looks_encrypted,
    rdp_parameters,
    ssh_parameters,
    vnc_parameters,
)
from consoleproxy.clouds.opennebula.xmlrpc import parse_xml
from consoleproxy.errors import BadRequest, Conflict

CIPHER = base64.b64encode(os.urandom(32)).decode()


def attributes(values: dict[str, str], cdata: bool = True) -> str:
    if cdata:
        return "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in values.items())
    return "".join(f"<{k}>{v}</{k}>" for k, v in values.items())


def vm(
    *,
    state: int = 3,
    lcm: int = 3,
    graphics: dict[str, str] | None = None,
    nics: tuple[tuple[str, dict[str, str]], ...] = (),
    context: dict[str, str] | None = None,
    hosts: tuple[str, ...] = ("kvm-1",),
) -> Element:
    """A /VM document shaped after vm.xsd."""
    template = ""
    if graphics is not None:
        template += f"<GRAPHICS>{attributes(graphics)}</GRAPHICS>"
    for tag, nic in nics:
        template += f"<{tag}>{attributes(nic)}</{tag}>"
    if context is not None:
        template += f"<CONTEXT>{attributes(context)}</CONTEXT>"
    history = "".join(
        f"<HISTORY><OID>7</OID><SEQ>{i}</SEQ><HOSTNAME>{h}</HOSTNAME><HID>{i}</HID></HISTORY>"
        for i, h in enumerate(hosts)
    )
    return parse_xml(
        f"<VM><ID>7</ID><UID>3</UID><NAME>web</NAME><STATE>{state}</STATE>"
        f"<LCM_STATE>{lcm}</LCM_STATE><TEMPLATE>{template}</TEMPLATE>"
        f"<USER_TEMPLATE/><HISTORY_RECORDS>{history}</HISTORY_RECORDS></VM>"
    )


def user(**template: str) -> Element:
    return parse_xml(
        f"<USER><ID>3</ID><NAME>alice</NAME><TEMPLATE>{attributes(template)}</TEMPLATE></USER>"
    )


GRAPHICS = {"TYPE": "vnc", "PORT": "5907", "PASSWD": "pw", "LISTEN": "0.0.0.0"}


class VncTests(SynchronousTestCase):
    def test_last_history_record_is_the_host(self) -> None:
        params = vnc_parameters(vm(graphics=GRAPHICS, hosts=("kvm-1", "kvm-2", "kvm-3")))
        self.assertEqual(params, {"hostname": "kvm-3", "port": "5907", "password": "pw"})

    def test_type_any_case_and_plain_values(self) -> None:
        document = parse_xml(
            "<VM><ID>7</ID><STATE>3</STATE><LCM_STATE>3</LCM_STATE><TEMPLATE><GRAPHICS>"
            "<TYPE>VNC</TYPE><PORT>5900</PORT></GRAPHICS></TEMPLATE><HISTORY_RECORDS><HISTORY>"
            "<HOSTNAME>h</HOSTNAME></HISTORY></HISTORY_RECORDS></VM>"
        )
        self.assertEqual(vnc_parameters(document), {"hostname": "h", "port": "5900"})

    def test_refusals(self) -> None:
        self.assertIn("has no GRAPHICS", str(self.assertRaises(BadRequest, vnc_parameters, vm())))
        error = self.assertRaises(
            BadRequest, vnc_parameters, vm(graphics={"TYPE": "spice", "PORT": "1"})
        )
        self.assertIn("GRAPHICS/TYPE is SPICE", str(error))
        error = self.assertRaises(Conflict, vnc_parameters, vm(graphics={"TYPE": "vnc"}))
        self.assertIn("no VNC port", str(error))
        error = self.assertRaises(Conflict, vnc_parameters, vm(graphics=GRAPHICS, hosts=()))
        self.assertIn("has not been deployed", str(error))


class StateTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        policy = StatePolicy()
        check_state(vm(lcm=3), "ssh", policy)
        check_state(vm(lcm=16), "vnc", policy)  # UNKNOWN: VNC yes
        self.assertRaises(Conflict, check_state, vm(lcm=16), "ssh", policy)
        self.assertRaises(Conflict, check_state, vm(lcm=2), "vnc", policy)  # BOOT
        error = self.assertRaises(Conflict, check_state, vm(state=8, lcm=0), "vnc", policy)
        self.assertIn("POWEROFF", str(error))

    def test_configurable(self) -> None:
        check_state(vm(lcm=16), "ssh", StatePolicy(ssh=frozenset({3, 16})))


class SshTests(SynchronousTestCase):
    def test_first_flagged_nic_or_alias_external_ip_first(self) -> None:
        document = vm(
            nics=(
                ("NIC", {"IP": "10.0.0.1"}),
                ("NIC_ALIAS", {"IP": "10.0.0.2", "SSH": "yes", "EXTERNAL_IP": "203.0.113.9"}),
                ("NIC", {"IP": "10.0.0.3", "SSH": "YES"}),
            ),
            context={"USERNAME": "ubuntu", "PASSWORD": "plain-pw", "SSH_PORT": "2222"},
        )
        self.assertEqual(
            ssh_parameters(document, None, Secrets()),
            {
                "hostname": "203.0.113.9",
                "port": "2222",
                "username": "ubuntu",
                "password": "plain-pw",
            },
        )

    def test_ipv6_only(self) -> None:
        document = vm(nics=(("NIC", {"IP6_GLOBAL": "2001:db8::7", "SSH": "YES"}),))
        self.assertEqual(ssh_parameters(document, None, Secrets())["hostname"], "2001:db8::7")

    def test_port_forwarded_nic(self) -> None:
        document = vm(
            nics=(("NIC", {"IP": "10.0.0.1", "SSH": "YES", "EXTERNAL_PORT_RANGE": "9000:9099"}),),
            hosts=("old", "kvm-9"),
        )
        params = ssh_parameters(document, None, Secrets())
        self.assertEqual((params["hostname"], params["port"]), ("kvm-9", "9021"))

    def test_no_flagged_nic(self) -> None:
        error = self.assertRaises(
            BadRequest, ssh_parameters, vm(nics=(("NIC", {"IP": "1"}),)), None, Secrets()
        )
        self.assertIn("SSH=YES", str(error))

    def test_encrypted_password_never_sent(self) -> None:
        document = vm(
            nics=(("NIC", {"IP": "10.0.0.1", "SSH": "YES"}),), context={"PASSWORD": CIPHER}
        )
        error = self.assertRaises(BadRequest, ssh_parameters, document, None, Secrets())
        self.assertIn("server_admin_auth", str(error))
        self.assertNotIn(CIPHER, str(error))
        decrypted = vm(context={"PASSWORD": "the-real-one"})
        params = ssh_parameters(document, None, Secrets(vm=decrypted))
        self.assertEqual(params["password"], "the-real-one")

    def test_key_from_user_template(self) -> None:
        document = vm(
            nics=(("NIC", {"IP": "10.0.0.1", "SSH": "YES"}),),
            context={"SSH_PUBLIC_KEY": "ssh-ed25519 AAA", "USERNAME": "root", "PASSWORD": "x"},
        )
        key = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----"
        params = ssh_parameters(document, user(SSH_PRIVATE_KEY=key, SSH_PASSPHRASE="pp"), Secrets())
        self.assertEqual(params["private-key"], key)
        self.assertEqual(params["passphrase"], "pp")
        self.assertNotIn("password", params)
        error = self.assertRaises(
            BadRequest, ssh_parameters, document, user(SSH_PRIVATE_KEY=CIPHER), Secrets()
        )
        self.assertIn("SSH_PRIVATE_KEY", str(error))
        params = ssh_parameters(
            document, user(SSH_PRIVATE_KEY=CIPHER), Secrets(user=user(SSH_PRIVATE_KEY=key))
        )
        self.assertEqual(params["private-key"], key)

    def test_key_wanted_but_user_has_none_falls_back_to_password(self) -> None:
        document = vm(
            nics=(("NIC", {"IP": "10.0.0.1", "SSH": "YES"}),),
            context={"SSH_PUBLIC_KEY": "ssh-ed25519 AAA", "PASSWORD": "pw"},
        )
        self.assertEqual(ssh_parameters(document, user(), Secrets())["password"], "pw")


class RdpTests(SynchronousTestCase):
    def test_fireedge_mapping(self) -> None:
        document = vm(
            nics=(
                (
                    "NIC",
                    {
                        "IP": "10.0.0.5",
                        "RDP": "yes",
                        "RDP_SERVER_LAYOUT": "de-de-qwertz",
                        "RDP_ENABLE_WALLPAPER": "YES",
                        "RDP_DISABLE_AUDIO": "yes",
                        "RDP_ENABLE_THEMING": "NO",
                    },
                ),
            ),
            context={
                "USERNAME": "Administrator",
                "PASSWORD": "pw",
                "RDP_PORT": "3390",
                "RDP_SECURITY": "NLA",
            },
        )
        self.assertEqual(
            rdp_parameters(document, Secrets()),
            {
                "hostname": "10.0.0.5",
                "port": "3390",
                "security": "nla",
                "ignore-cert": "true",
                "resize-method": "display-update",
                "server-layout": "de-de-qwertz",
                "enable-wallpaper": "true",
                "disable-audio": "true",
                "username": "Administrator",
                "password": "pw",
            },
        )

    def test_defaults_and_forwarded_port(self) -> None:
        document = vm(
            nics=(("NIC", {"IP": "10.0.0.5", "RDP": "YES", "EXTERNAL_PORT_RANGE": "9000:13000"}),)
        )
        params = rdp_parameters(document, Secrets())
        self.assertEqual(
            (params["hostname"], params["port"], params["security"]), ("kvm-1", "12388", "rdp")
        )
        short = vm(nics=(("NIC", {"IP": "1", "RDP": "YES", "EXTERNAL_PORT_RANGE": "9000:9099"}),))
        self.assertRaises(BadRequest, rdp_parameters, short, Secrets())


class EncryptedTests(SynchronousTestCase):
    def test_looks_encrypted(self) -> None:
        self.assertTrue(looks_encrypted(CIPHER))
        for plain in ("password", "", "abc=", "-----BEGIN", base64.b64encode(b"x" * 15).decode()):
            self.assertFalse(looks_encrypted(plain))


class ElementTruthTests(SynchronousTestCase):
    def test_element_truthiness_is_not_relied_on(self) -> None:
        """
        Python 3.12 warns (DeprecationWarning) when an Element is tested for
        truth; an Element class that does so on any Python shows that the VM
        document code never does (C{vm.find("TEMPLATE") or ()} did).
        """

        class WarningElement(Element):
            def __bool__(self) -> bool:
                warnings.warn("Testing an element's truth value", DeprecationWarning, 2)
                return len(self) != 0

        builder = TreeBuilder(element_factory=WarningElement)
        parser = XMLParser(target=builder)
        parser.feed(
            "<VM><ID>8</ID><TEMPLATE><NIC><IP>10.0.0.8</IP><SSH>YES</SSH></NIC></TEMPLATE>"
            "<HISTORY_RECORDS><HISTORY><HOSTNAME>kvm</HOSTNAME></HISTORY></HISTORY_RECORDS></VM>"
        )
        vm = parser.close()
        with warnings.catch_warnings():
            warnings.filters[:] = [f for f in warnings.filters if f[0] == "error"]
            parameters = ssh_parameters(vm, None, Secrets())
        self.assertEqual(parameters["hostname"], "10.0.0.8")
