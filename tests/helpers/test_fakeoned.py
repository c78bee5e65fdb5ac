"""Tests of tests/helpers/fakeoned.py itself, so the product tests can trust it.

A small client written here (stdlib ``xmlrpc.client`` marshalling over twisted.web's
``Agent``, not the product code) talks to the fake over loopback. Time (``delay``, token
expiry) runs on a ``task.Clock`` injected into the fake; the sockets use the reactor.
Server-cipher tokens are built here from the rules in server_cipher_auth.rb, independently
of the fake's own helper.
"""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
import xmlrpc.client
from io import BytesIO
from typing import Any
from xml.parsers.expat import ExpatError

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers

from tests.helpers.fakeoned import FakeOned

NOW = 1_700_000_000
SERVERADMIN_PASSWORD = "s3rv3r-secret"


# -- an independent client -----------------------------------------------------------------


@defer.inlineCallbacks
def post(url: str, body: bytes, method: bytes = b"POST") -> Any:
    """(HTTP status, raw body) of one request."""
    agent = Agent(reactor)
    response = yield agent.request(
        method,
        url.encode(),
        Headers({b"content-type": [b"text/xml"]}),
        FileBodyProducer(BytesIO(body)) if body else None,
    )
    raw = yield readBody(response)
    return response.code, raw


@defer.inlineCallbacks
def raw_call(url: str, method: str, *params: Any) -> Any:
    """The raw response body of one XML-RPC call."""
    status, raw = yield post(url, xmlrpc.client.dumps(params, method).encode())
    assert status == 200, status
    return raw


@defer.inlineCallbacks
def call(url: str, method: str, *params: Any) -> Any:
    """The decoded result of one XML-RPC call; faults raise xmlrpc.client.Fault."""
    raw = yield raw_call(url, method, *params)
    (result,), _ = xmlrpc.client.loads(raw)
    return result


def cipher_session(target: str, expires: int, password: str = SERVERADMIN_PASSWORD) -> str:
    """``serveradmin:<target>:<token>`` per server_cipher_auth.rb ``login_token``."""
    key = hashlib.sha256(password.encode()).hexdigest()[:32]
    iv = key[:16]
    padder = padding.PKCS7(128).padder()
    plain = padder.update(f"serveradmin:{target}:{expires}".encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key.encode()), modes.CBC(iv.encode())).encryptor()
    token = base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()
    return f"serveradmin:{target}:{token}"


class FakeOnedTestCase(unittest.TestCase):
    """Starts a populated fake per test."""

    def setUp(self) -> defer.Deferred[Any]:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.fake = FakeOned(reactor, clock=self.clock)
        self.fake.add_user("oneadmin", "opennebula", admin=True)
        self.fake.add_user("serveradmin", SERVERADMIN_PASSWORD, admin=True)
        self.alice = self.fake.add_user(
            "alice",
            "wonderland",
            template={"SSH_PRIVATE_KEY": "-----BEGIN KEY-----", "SSH_PASSPHRASE": "pp"},
            tokens=("alice-login-token", ("alice-old-token", NOW - 5)),
        )
        self.bob = self.fake.add_user("bob", "builder")
        self.fake.add_vm(
            7,
            "alice",
            name="web-1",
            graphics={"TYPE": "VNC", "PORT": "5907", "PASSWD": "vnc-pw", "LISTEN": "0.0.0.0"},
            nics=[{"IP": "10.0.0.5", "SSH": "YES", "NETWORK": "lan"}],
            nic_aliases=[{"IP": "10.0.0.50", "RDP": "yes"}],
            context={"USERNAME": "root", "PASSWORD": "ctx-secret", "SSH_PORT": "2222"},
            history=[
                {"HOSTNAME": "kvm2", "HID": "2", "CID": "0", "SEQ": "1"},
                {"HOSTNAME": "kvm1", "HID": "1", "CID": "0", "SEQ": "0"},
            ],
        )
        self.fake.add_vm(8, "bob", users_allowed=["alice"], state=1, lcm_state=0)
        self.fake.add_zone(0, "OpenNebula", endpoint="http://one0:2633/RPC2")
        self.fake.add_zone(
            100,
            "edge",
            state=1,
            endpoint="http://edge:2633/RPC2",
            fireedge_endpoint="https://edge.example:2616",
        )
        self.addCleanup(self.fake.stop)
        return self.fake.start()

    @property
    def url(self) -> str:
        return self.fake.url


class SuccessShapeTests(FakeOnedTestCase):
    """Success answers of each method, and the documents' shape."""

    @defer.inlineCallbacks
    def test_start_gives_port_and_url(self) -> Any:
        self.assertRegex(self.url, r"^http://127\.0\.0\.1:\d+/RPC2$")
        result = yield call(self.url, "one.system.version", "alice:wonderland")
        self.assertEqual(result, [True, "6.10.0", 0])
        self.assertEqual(self.fake.calls, [("one.system.version", "alice", ())])

    @defer.inlineCallbacks
    def test_vm_info_document(self) -> Any:
        ok, doc, code = yield call(self.url, "one.vm.info", "alice:wonderland", 7)
        self.assertEqual((ok, code), (True, 0))
        vm = ET.fromstring(doc)
        self.assertEqual(vm.tag, "VM")
        self.assertEqual(
            [vm.findtext(p) for p in ("ID", "UID", "UNAME", "NAME", "STATE", "LCM_STATE")],
            ["7", str(self.alice.uid), "alice", "web-1", "3", "3"],
        )
        self.assertEqual(vm.findtext("TEMPLATE/GRAPHICS/PORT"), "5907")
        self.assertEqual(vm.findtext("TEMPLATE/GRAPHICS/PASSWD"), "vnc-pw")
        self.assertEqual(vm.findtext("TEMPLATE/NIC/IP"), "10.0.0.5")
        self.assertEqual(vm.findtext("TEMPLATE/NIC/SSH"), "YES")
        self.assertEqual(vm.findtext("TEMPLATE/NIC_ALIAS/RDP"), "yes")
        self.assertEqual(vm.findtext("TEMPLATE/CONTEXT/SSH_PORT"), "2222")
        # values in CDATA as oned writes them, a few plain (plain_values)
        self.assertIn("<TYPE><![CDATA[VNC]]></TYPE>", doc)
        self.assertIn("<PORT>5907</PORT>", doc)
        self.assertIn("<IP>10.0.0.5</IP>", doc)
        # template attributes and vector members sorted by name, as oned's maps do
        names = [child.tag for child in vm.find("TEMPLATE")]
        self.assertEqual(names, sorted(names))
        self.assertEqual(
            [c.tag for c in vm.find("TEMPLATE/GRAPHICS")], ["LISTEN", "PASSWD", "PORT", "TYPE"]
        )
        # all history records, in SEQ order: the last is the current host
        records = vm.findall("HISTORY_RECORDS/HISTORY")
        self.assertEqual([r.findtext("SEQ") for r in records], ["0", "1"])
        self.assertEqual(records[-1].findtext("HOSTNAME"), "kvm2")
        self.assertIn("<VM_MAD><![CDATA[kvm]]></VM_MAD>", doc)
        self.assertIsNone(records[0].find("PLAN_ID"))  # 7.x only
        top = [child.tag for child in vm]
        self.assertEqual(top[:6], ["ID", "UID", "GID", "UNAME", "GNAME", "NAME"])
        self.assertLess(top.index("TEMPLATE"), top.index("USER_TEMPLATE"))
        self.assertLess(top.index("USER_TEMPLATE"), top.index("HISTORY_RECORDS"))

    @defer.inlineCallbacks
    def test_vm_without_history(self) -> Any:
        _, doc, _ = yield call(self.url, "one.vm.info", "bob:builder", 8)
        self.assertIn("<HISTORY_RECORDS/>", doc)
        self.assertIsNone(ET.fromstring(doc).find("TEMPLATE/GRAPHICS"))
        self.assertIn("<DEPLOY_ID></DEPLOY_ID>", doc)

    @defer.inlineCallbacks
    def test_version_7_history_fields(self) -> Any:
        self.fake.version = "7.0.0"
        _, doc, _ = yield call(self.url, "one.vm.info", "alice:wonderland", 7)
        record = ET.fromstring(doc).find("HISTORY_RECORDS/HISTORY")
        tags = [c.tag for c in record]
        self.assertEqual(
            tags[tags.index("DS_ID") + 1 : tags.index("DS_ID") + 3], ["PLAN_ID", "ACTION_ID"]
        )
        result = yield call(self.url, "one.system.version", "alice:wonderland")
        self.assertEqual(result, [True, "7.0.0", 0])

    @defer.inlineCallbacks
    def test_user_info_self_and_by_id(self) -> Any:
        ok, doc, code = yield call(self.url, "one.user.info", "alice:wonderland", -1)
        self.assertEqual((ok, code), (True, 0))
        user = ET.fromstring(doc)
        self.assertEqual(user.findtext("NAME"), "alice")
        self.assertEqual(user.findtext("ID"), str(self.alice.uid))
        self.assertEqual(user.findtext("GROUPS/ID"), "1")
        self.assertEqual(user.findtext("GNAME"), "users")
        self.assertEqual(user.findtext("AUTH_DRIVER"), "core")
        self.assertEqual(user.findtext("PASSWORD"), hashlib.sha256(b"wonderland").hexdigest())
        self.assertEqual(user.findtext("LOGIN_TOKEN/EXPIRATION_TIME"), "-1")
        _, same, _ = yield call(self.url, "one.user.info", "alice:wonderland", self.alice.uid)
        self.assertEqual(same, doc)
        _, admin_view, _ = yield call(
            self.url, "one.user.info", "oneadmin:opennebula", self.alice.uid
        )
        self.assertEqual(admin_view, doc)

    @defer.inlineCallbacks
    def test_zone_info_and_pool(self) -> Any:
        ok, doc, code = yield call(self.url, "one.zone.info", "bob:builder", 100)
        self.assertEqual((ok, code), (True, 0))
        zone = ET.fromstring(doc)
        self.assertEqual([zone.findtext(p) for p in ("ID", "NAME", "STATE")], ["100", "edge", "1"])
        self.assertIn("<ENDPOINT><![CDATA[http://edge:2633/RPC2]]></ENDPOINT>", doc)
        self.assertEqual(zone.findtext("TEMPLATE/FIREEDGE_ENDPOINT"), "https://edge.example:2616")
        self.assertIsNotNone(zone.find("SERVER_POOL"))
        ok, pool, _ = yield call(self.url, "one.zonepool.info", "bob:builder")
        self.assertTrue(ok)
        root = ET.fromstring(pool)
        self.assertEqual(root.tag, "ZONE_POOL")
        self.assertEqual([z.findtext("ID") for z in root.findall("ZONE")], ["0", "100"])
        first = root.find("ZONE")
        self.assertIsNone(first.find("TEMPLATE/FIREEDGE_ENDPOINT"))
        self.fake.zones.clear()
        _, empty, _ = yield call(self.url, "one.zonepool.info", "bob:builder")
        self.assertEqual(empty, "<ZONE_POOL></ZONE_POOL>")

    @defer.inlineCallbacks
    def test_raw_envelope(self) -> Any:
        raw = yield raw_call(self.url, "one.vm.info", "alice:wonderland", 7)
        self.assertTrue(raw.startswith(b'<?xml version="1.0" encoding="UTF-8"?>'))
        self.assertIn(b"<value><boolean>1</boolean></value>", raw)
        self.assertIn(b"&lt;VM&gt;&lt;ID&gt;7&lt;/ID&gt;", raw)
        self.assertIn(b"<value><i4>0</i4></value>", raw)

    @defer.inlineCallbacks
    def test_users_allowed_and_admin_see_vm(self) -> Any:
        ok, _, _ = yield call(self.url, "one.vm.info", "alice:wonderland", 8)
        self.assertTrue(ok)
        ok, _, _ = yield call(self.url, "one.vm.info", "oneadmin:opennebula", 7)
        self.assertTrue(ok)

    @defer.inlineCallbacks
    def test_calls_never_hold_the_session(self) -> Any:
        yield call(self.url, "one.vm.info", "alice:wonderland", 7, True)
        yield call(self.url, "one.vm.info", "alice:wrong", 7)
        self.assertEqual(
            self.fake.calls, [("one.vm.info", "alice", (7, True)), ("one.vm.info", "", (7,))]
        )
        self.assertNotIn("wonderland", repr(self.fake.calls))


class ErrorTests(FakeOnedTestCase):
    """oned failure arrays and XML-RPC faults."""

    @defer.inlineCallbacks
    def test_authentication_five_elements(self) -> Any:
        result = yield call(self.url, "one.vm.info", "alice:nope", 7)
        self.assertEqual(
            result,
            [False, "[one.vm.info] User couldn't be authenticated, aborting call.", 0x100, -1, -1],
        )
        raw = yield raw_call(self.url, "one.vm.info", "alice:nope", 7)
        self.assertIn(b"<value><i8>-1</i8></value>", raw)  # UINT64_MAX through value_i8

    @defer.inlineCallbacks
    def test_authentication_four_and_three_elements(self) -> Any:
        self.fake.error_elements = 4
        result = yield call(self.url, "one.user.info", "nobody:x", -1)
        self.assertEqual(
            result,
            [False, "[one.user.info] User couldn't be authenticated, aborting call.", 256, -1],
        )
        self.fake.error_elements = 3
        result = yield call(self.url, "one.user.info", "nobody:x", -1)
        self.assertEqual(len(result), 3)

    @defer.inlineCallbacks
    def test_authorization(self) -> Any:
        uid = self.bob.uid
        result = yield call(self.url, "one.vm.info", "bob:builder", 7)
        self.assertEqual(
            result,
            [
                False,
                f"[one.vm.info] User [{uid}] : Not authorized to perform USE VM [7].",
                0x200,
                -1,
                -1,
            ],
        )
        self.fake.error_elements = 4
        result = yield call(self.url, "one.user.info", "bob:builder", self.alice.uid)
        self.assertEqual(
            result,
            [
                False,
                f"[one.user.info] User [{uid}] : Not authorized to perform USE USER "
                f"[{self.alice.uid}].",
                512,
                -1,
            ],
        )

    @defer.inlineCallbacks
    def test_no_exists(self) -> Any:
        result = yield call(self.url, "one.vm.info", "bob:builder", 99)
        self.assertEqual(
            result, [False, "[one.vm.info] Error getting virtual machine [99].", 0x400, 99, -1]
        )
        self.fake.error_elements = 4
        result = yield call(self.url, "one.zone.info", "bob:builder", 5)
        self.assertEqual(result, [False, "[one.zone.info] Error getting zone [5].", 1024, 5])
        result = yield call(self.url, "one.user.info", "oneadmin:opennebula", 42)
        self.assertEqual(result, [False, "[one.user.info] Error getting user [42].", 1024, 42])

    @defer.inlineCallbacks
    def test_unknown_method_is_a_fault(self) -> Any:
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            yield call(self.url, "one.vm.nope", "alice:wonderland", 7)
        self.assertEqual(caught.exception.faultCode, -506)
        self.assertEqual(caught.exception.faultString, "Method 'one.vm.nope' not defined")
        self.assertEqual(self.fake.calls, [("one.vm.nope", "", (7,))])

    @defer.inlineCallbacks
    def test_parameter_faults(self) -> Any:
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            yield call(self.url, "one.vm.info")
        self.assertEqual(
            (caught.exception.faultCode, caught.exception.faultString),
            (-501, "Not enough parameters"),
        )
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            yield call(self.url, "one.vm.info", "alice:wonderland", "7")
        self.assertEqual(caught.exception.faultCode, -501)
        self.assertEqual(
            [c[:2] for c in self.fake.calls], [("one.vm.info", ""), ("one.vm.info", "alice")]
        )
        # the id is read after authentication: a bad session wins over a bad id
        result = yield call(self.url, "one.vm.info", "alice:nope", "7")
        self.assertEqual(result[2], 0x100)

    @defer.inlineCallbacks
    def test_unparsable_call_and_http_errors(self) -> Any:
        status, raw = yield post(self.url, b"<methodCall><oops")
        self.assertEqual(status, 200)
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            xmlrpc.client.loads(raw)
        self.assertEqual(caught.exception.faultCode, -503)
        status, _ = yield post(self.url, b"", method=b"GET")
        self.assertEqual(status, 405)
        status, _ = yield post(self.url.replace("/RPC2", "/other"), b"<x/>")
        self.assertEqual(status, 404)


class SessionTests(FakeOnedTestCase):
    """Session strings: passwords, login tokens, server_cipher."""

    @defer.inlineCallbacks
    def test_login_tokens(self) -> Any:
        result = yield call(self.url, "one.user.info", "alice:alice-login-token", -1)
        self.assertTrue(result[0])
        result = yield call(self.url, "one.user.info", "alice:alice-old-token", -1)
        self.assertEqual(result[2], 0x100)
        self.assertNotIn("alice-old-token", self.alice.tokens)  # dropped like oned does

    @defer.inlineCallbacks
    def test_disabled_user(self) -> Any:
        self.alice.enabled = False
        result = yield call(self.url, "one.system.version", "alice:wonderland")
        self.assertEqual(result[2], 0x100)

    @defer.inlineCallbacks
    def test_server_cipher_valid_runs_as_target(self) -> Any:
        session = cipher_session("alice", NOW + 60)
        self.assertEqual(session, self.fake.server_cipher_session("alice", NOW + 60))
        result = yield call(self.url, "one.vm.info", session, 7)
        self.assertTrue(result[0])
        result = yield call(self.url, "one.vm.info", session, 99)
        self.assertEqual(result[2], 0x400)
        bobs = cipher_session("bob", NOW + 60)
        result = yield call(self.url, "one.vm.info", bobs, 7)
        self.assertEqual(
            result[1],
            f"[one.vm.info] User [{self.bob.uid}] : Not authorized to perform USE VM [7].",
        )
        self.assertEqual([c[1] for c in self.fake.calls], ["alice", "alice", "bob"])

    @defer.inlineCallbacks
    def test_server_cipher_expiry(self) -> Any:
        result = yield call(self.url, "one.vm.info", cipher_session("alice", NOW + 1), 7)
        self.assertTrue(result[0])
        # expired when now >= expiry
        result = yield call(self.url, "one.vm.info", cipher_session("alice", NOW), 7)
        self.assertEqual(result[2], 0x100)
        session = cipher_session("alice", NOW + 30)
        self.clock.advance(30)
        result = yield call(self.url, "one.vm.info", session, 7)
        self.assertEqual(result[2], 0x100)

    @defer.inlineCallbacks
    def test_server_cipher_wrong_password_or_user(self) -> Any:
        bad = cipher_session("alice", NOW + 60, password="not-it")
        result = yield call(self.url, "one.vm.info", bad, 7)
        self.assertEqual(result[2], 0x100)
        result = yield call(self.url, "one.vm.info", cipher_session("nobody", NOW + 60), 7)
        self.assertEqual(result[2], 0x100)
        # serveradmin uses the server_cipher driver: its plain password is refused
        result = yield call(self.url, "one.vm.info", f"serveradmin:{SERVERADMIN_PASSWORD}", 7)
        self.assertEqual(result[2], 0x100)
        result = yield call(self.url, "one.vm.info", "serveradmin:alice:garbage!!", 7)
        self.assertEqual(result[2], 0x100)

    @defer.inlineCallbacks
    def test_server_cipher_target_is_not_checked_against_the_token(self) -> Any:
        # the driver reads fields 0 and -1 only: a token made for serveradmin opens alice
        session = self.fake.server_cipher_session("alice", NOW + 60, payload_target="serveradmin")
        result = yield call(self.url, "one.user.info", session, -1)
        self.assertEqual(ET.fromstring(result[1]).findtext("NAME"), "alice")

    @defer.inlineCallbacks
    def test_server_cipher_serveradmin_target_is_admin(self) -> Any:
        session = cipher_session("serveradmin", NOW + 60)
        ok, doc, _ = yield call(self.url, "one.vm.info", session, 7, True)
        self.assertTrue(ok)
        self.assertEqual(ET.fromstring(doc).findtext("TEMPLATE/CONTEXT/PASSWORD"), "ctx-secret")
        ok, doc, _ = yield call(self.url, "one.user.info", session, self.alice.uid, True)
        self.assertEqual(ET.fromstring(doc).findtext("TEMPLATE/SSH_PASSPHRASE"), "pp")
        _, me, _ = yield call(self.url, "one.user.info", session, -1)
        me_xml = ET.fromstring(me)
        self.assertEqual(
            [me_xml.findtext(p) for p in ("ID", "GID", "AUTH_DRIVER")],
            ["1", "0", "server_cipher"],
        )

    @defer.inlineCallbacks
    def test_server_cipher_egid(self) -> Any:
        token = cipher_session("alice", NOW + 60).rsplit(":", 1)[1]
        as_oneadmin_group = f"serveradmin:alice:0:{token}"
        ok, doc, _ = yield call(self.url, "one.vm.info", as_oneadmin_group, 7, True)
        self.assertTrue(ok)
        self.assertEqual(ET.fromstring(doc).findtext("TEMPLATE/CONTEXT/PASSWORD"), "ctx-secret")
        self.fake.add_vm(9, "bob")
        ok, _, _ = yield call(self.url, "one.vm.info", as_oneadmin_group, 9)
        self.assertTrue(ok)
        result = yield call(self.url, "one.vm.info", f"serveradmin:alice:x1:{token}", 7)
        self.assertEqual(result[2], 0x100)
        # serveradmin with EGID 1 loses the oneadmin group
        admin_token = cipher_session("serveradmin", NOW + 60).rsplit(":", 1)[1]
        result = yield call(
            self.url, "one.vm.info", f"serveradmin:serveradmin:1:{admin_token}", 7, True
        )
        self.assertEqual(
            result[1], "[one.vm.info] User [1] : Not authorized to perform USE VM [7]."
        )

    @defer.inlineCallbacks
    def test_session_cache_like_oned(self) -> Any:
        self.fake.session_cache_seconds = 900
        session = cipher_session("alice", NOW + 10)
        result = yield call(self.url, "one.vm.info", session, 7)
        self.assertTrue(result[0])
        self.clock.advance(20)  # token expired, still cached
        result = yield call(self.url, "one.vm.info", session, 7)
        self.assertTrue(result[0])
        self.clock.advance(900)
        result = yield call(self.url, "one.vm.info", session, 7)
        self.assertEqual(result[2], 0x100)

    def test_serveradmin_password_property(self) -> None:
        self.assertEqual(self.fake.serveradmin_password, SERVERADMIN_PASSWORD)
        self.fake.serveradmin_password = "rotated"
        self.assertEqual(self.fake.users["serveradmin"].password, "rotated")
        other = FakeOned(reactor)
        other.serveradmin_password = "pw"
        self.assertEqual(other.users["serveradmin"].uid, 1)
        self.assertEqual(other.users["serveradmin"].auth_driver, "server_cipher")
        self.assertTrue(other.users["serveradmin"].is_admin)


class DecryptTests(FakeOnedTestCase):
    """Encrypted attributes and the admin-only decrypt flag."""

    @defer.inlineCallbacks
    def test_vm_password_encrypted_unless_admin_decrypts(self) -> Any:
        _, doc, _ = yield call(self.url, "one.vm.info", "alice:wonderland", 7, True)
        encrypted = ET.fromstring(doc).findtext("TEMPLATE/CONTEXT/PASSWORD")
        self.assertNotEqual(encrypted, "ctx-secret")
        self.assertEqual(len(base64.b64decode(encrypted)), 16)
        self.assertEqual(self.fake.decrypt_secret(encrypted), "ctx-secret")
        _, doc, _ = yield call(self.url, "one.vm.info", "oneadmin:opennebula", 7)
        self.assertEqual(ET.fromstring(doc).findtext("TEMPLATE/CONTEXT/PASSWORD"), encrypted)
        _, doc, _ = yield call(self.url, "one.vm.info", "oneadmin:opennebula", 7, False)
        self.assertEqual(ET.fromstring(doc).findtext("TEMPLATE/CONTEXT/PASSWORD"), encrypted)
        _, doc, _ = yield call(self.url, "one.vm.info", "oneadmin:opennebula", 7, True)
        self.assertEqual(ET.fromstring(doc).findtext("TEMPLATE/CONTEXT/PASSWORD"), "ctx-secret")
        # the VNC password is not an encrypted attribute
        self.assertEqual(ET.fromstring(doc).findtext("TEMPLATE/GRAPHICS/PASSWD"), "vnc-pw")

    @defer.inlineCallbacks
    def test_user_secrets(self) -> Any:
        _, doc, _ = yield call(self.url, "one.user.info", "alice:wonderland", -1, True)
        user = ET.fromstring(doc)
        key = user.findtext("TEMPLATE/SSH_PRIVATE_KEY")
        self.assertEqual(self.fake.decrypt_secret(key), "-----BEGIN KEY-----")
        self.assertNotEqual(user.findtext("TEMPLATE/SSH_PASSPHRASE"), "pp")
        _, doc, _ = yield call(
            self.url, "one.user.info", "oneadmin:opennebula", self.alice.uid, True
        )
        user = ET.fromstring(doc)
        self.assertEqual(user.findtext("TEMPLATE/SSH_PRIVATE_KEY"), "-----BEGIN KEY-----")
        self.assertEqual(user.findtext("TEMPLATE/SSH_PASSPHRASE"), "pp")

    @defer.inlineCallbacks
    def test_decrypt_flag_is_only_read_for_admins(self) -> Any:
        result = yield call(self.url, "one.vm.info", "alice:wonderland", 7, "yes")
        self.assertTrue(result[0])
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            yield call(self.url, "one.vm.info", "oneadmin:opennebula", 7, "yes")
        self.assertEqual(caught.exception.faultCode, -501)
        self.fake.version = "7.2.0"  # the XRPC layer reads the flag for everyone
        with self.assertRaises(xmlrpc.client.Fault) as caught:
            yield call(self.url, "one.vm.info", "alice:wonderland", 7, "yes")
        self.assertEqual(
            caught.exception.faultString, "Parameter that is supposed to be boolean is not"
        )
        _, doc, _ = yield call(self.url, "one.vm.info", "alice:wonderland", 7, True)
        self.assertNotEqual(ET.fromstring(doc).findtext("TEMPLATE/CONTEXT/PASSWORD"), "ctx-secret")


class KnobTests(FakeOnedTestCase):
    """The failure knobs: delay, malformed, entity_bomb."""

    @defer.inlineCallbacks
    def wait_for_pending(self, count: int) -> Any:
        for _ in range(200):
            if self.fake.pending == count:
                return
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.fail(f"pending never reached {count}")

    @defer.inlineCallbacks
    def test_delay_uses_the_clock(self) -> Any:
        self.fake.delay = 5.0
        answered = call(self.url, "one.system.version", "alice:wonderland")
        yield self.wait_for_pending(1)
        self.clock.advance(4.9)
        yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(answered.called)
        self.clock.advance(0.1)
        result = yield answered
        self.assertEqual(result, [True, "6.10.0", 0])
        self.assertEqual(self.fake.pending, 0)

    @defer.inlineCallbacks
    def test_delay_cancelled_when_client_goes(self) -> Any:
        self.fake.delay = 30.0
        answered = call(self.url, "one.system.version", "alice:wonderland")
        yield self.wait_for_pending(1)
        answered.cancel()
        with self.assertRaises(ResponseNeverReceived) as caught:
            yield answered
        caught.exception.reasons[0].trap(defer.CancelledError)
        yield self.wait_for_pending(0)

    @defer.inlineCallbacks
    def test_stop_closes_held_connections(self) -> Any:
        self.fake.delay = 30.0
        answered = call(self.url, "one.system.version", "alice:wonderland")
        yield self.wait_for_pending(1)
        yield self.fake.stop()
        self.assertEqual(self.fake.pending, 0)
        with self.assertRaises(ResponseNeverReceived):
            yield answered

    @defer.inlineCallbacks
    def test_malformed(self) -> Any:
        self.fake.malformed = True
        raw = yield raw_call(self.url, "one.vm.info", "alice:wonderland", 7)
        self.assertTrue(raw.startswith(b"<?xml"))
        self.assertNotIn(b"</methodResponse>", raw)
        with self.assertRaises(ExpatError):
            xmlrpc.client.loads(raw)

    @defer.inlineCallbacks
    def test_entity_bomb_in_envelope(self) -> Any:
        self.fake.entity_bomb = "envelope"
        raw = yield raw_call(self.url, "one.vm.info", "alice:wonderland", 7)
        # never parse this with an expanding parser
        self.assertIn(b"<!DOCTYPE methodResponse [", raw)
        self.assertIn(b'<!ENTITY lol9 "&lol8;&lol8;', raw)
        self.assertIn(b"<value><string>&lol9;</string></value>", raw)
        self.assertLess(len(raw), 4096)

    @defer.inlineCallbacks
    def test_entity_bomb_in_document(self) -> Any:
        self.fake.entity_bomb = "document"
        raw = yield raw_call(self.url, "one.vm.info", "alice:wonderland", 7)
        self.assertNotIn(b"<!DOCTYPE", raw)  # the envelope itself is clean
        self.assertIn(b"&lt;!DOCTYPE VM [", raw)
        (result,), _ = xmlrpc.client.loads(raw)
        self.assertTrue(result[0])
        self.assertTrue(result[1].startswith("<!DOCTYPE VM ["))
        self.assertIn('<!ENTITY lol1 "&lol;&lol;', result[1])
        self.assertIn("<NAME>&lol9;</NAME>", result[1])
        # values that are not documents are left alone
        result = yield call(self.url, "one.system.version", "alice:wonderland")
        self.assertEqual(result, [True, "6.10.0", 0])
