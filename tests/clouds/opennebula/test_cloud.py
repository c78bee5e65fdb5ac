"""
The OpenNebula backend against the fake oned (a real XML-RPC server), end to end:
credentials -> token API -> oned -> token -> WebSocket -> fake guacd's connect values.
"""

from __future__ import annotations

import base64

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import TestCase

from consoleproxy import tap
from consoleproxy.clouds.opennebula.oned import (
    SERVER_ADMIN_KEY,
    ServerAdminRefused,
    ServerAdminStatus,
)
from consoleproxy.config import Config
from consoleproxy.guacamole.status import GuacamoleError
from consoleproxy.ops.health import Advisory, ReadinessResource, server_admin_check
from consoleproxy.tokens import TokenError
from tests.helpers.fakeguacd import FakeGuacd
from tests.helpers.fakeoned import FakeOned
from tests.helpers.support import get_json, start_server
from tests.helpers.wsclient import connect

ALICE = b"Basic " + base64.b64encode(b"alice:wonderland")
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n-----END OPENSSH PRIVATE KEY-----"
HISTORY = (
    {"HOSTNAME": "kvm-old", "HID": "1", "SEQ": "0"},
    {"HOSTNAME": "kvm-2", "HID": "2", "SEQ": "1"},
)
VNC = {"TYPE": "vnc", "PORT": "5907", "PASSWD": "vnc-pw", "LISTEN": "0.0.0.0"}


class OpenNebulaTestCase(TestCase):
    """A fake oned with users and VMs, a fake guacd, consoleproxy on the opennebula backend."""

    server_admin = True
    guacd = "tcp:127.0.0.1:{port}"
    loopback_address = ""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.oned = FakeOned(reactor)
        yield self.oned.start()
        self.addCleanup(self.oned.stop)
        self.fake_guacd = FakeGuacd(reactor)
        yield self.fake_guacd.start()
        self.addCleanup(self.fake_guacd.stop)
        self.oned.add_user("oneadmin", "admin-pw", admin=True)
        self.oned.add_user("serveradmin", "server-pw", admin=True)
        self.oned.add_user(
            "alice",
            "wonderland",
            tokens=["alice-login-token"],
            template={"SSH_PRIVATE_KEY": KEY, "SSH_PASSPHRASE": "key-pp"},
        )
        self.oned.add_user("bob", "builder")
        self.oned.add_vm(7, "alice", graphics=VNC, history=HISTORY)
        self.oned.add_vm(
            8,
            "alice",
            graphics=VNC,
            history=HISTORY,
            nics=[{"IP": "10.0.0.8", "NETWORK": "private"}],
            nic_aliases=[
                {"IP": "10.0.1.8", "EXTERNAL_IP": "203.0.113.8", "SSH": "yes", "RDP": "YES"}
            ],
            context={"USERNAME": "ubuntu", "PASSWORD": "context-pw", "NETWORK": "YES"},
        )
        self.oned.add_vm(
            9,
            "alice",
            history=HISTORY,
            nics=[{"IP": "10.0.0.9", "SSH": "YES"}],
            context={"USERNAME": "root", "SSH_PUBLIC_KEY": "ssh-ed25519 AAAA alice"},
        )
        settings = {
            "cloud": "opennebula",
            "one_xmlrpc": self.oned.url,
            "one_timeout": 1.0,
            "guacd": self.guacd.format(port=self.fake_guacd.port),
            "one_loopback_address": self.loopback_address,
        }
        if self.server_admin:
            auth = self.mktemp()
            with open(auth, "w") as f:
                f.write("serveradmin:server-pw\n")
            settings["one_server_admin_auth"] = auth
        self.cloud = tap.build_cloud(Config.load(overrides=settings), reactor)
        self.addCleanup(self.cloud.close)
        self.server = yield start_server(self, guacd_port=self.fake_guacd.port, cloud=self.cloud)

    def url(self, path: str) -> bytes:
        return self.server.url(path)

    @inlineCallbacks
    def refused(self, path, status, words, authorization=ALICE):  # type: ignore[no-untyped-def]
        code, _, body = yield get_json(self.url(path), authorization)
        self.assertEqual((code, body["id"]), (status, status), body)
        self.assertIn(words, body["data"])
        return body

    @inlineCallbacks
    def connect_values(self, path, authorization=ALICE, query=""):  # type: ignore[no-untyped-def]
        """Mint a token, open the relay with it, return what guacd got."""
        code, _, body = yield get_json(self.url(path), authorization)
        self.assertEqual(code, 200, body)
        client = yield connect(self.server.ws_url(f"/guacamole?token={body['data']}{query}"))
        yield client.opened
        conn = yield self.fake_guacd.wait_for_connection(len(self.fake_guacd.connections))
        client.sendClose(1000)
        yield client.closed
        yield conn.closed
        return conn


class ConsoleTests(OpenNebulaTestCase):
    @inlineCallbacks
    def test_vnc_end_to_end(self):  # type: ignore[no-untyped-def]
        conn = yield self.connect_values("/fireedge/api/vm/7/guacamole/vnc")
        self.assertEqual(conn.select, "vnc")
        values = {k: v for k, v in conn.connect.items() if v}
        self.assertEqual(values, {"hostname": "kvm-2", "port": "5907", "password": "vnc-pw"})
        self.assertEqual(conn.name, "alice")
        self.assertIn(("one.vm.info", "alice", (7, False)), self.oned.calls)

    @inlineCallbacks
    def test_bearer_login_token(self):  # type: ignore[no-untyped-def]
        conn = yield self.connect_values(
            "/api/vm/7/guacamole/vnc", authorization=b"Bearer alice:alice-login-token"
        )
        self.assertEqual(conn.connect["hostname"], "kvm-2")

    @inlineCallbacks
    def test_ssh_nic_alias_with_decrypted_password(self):  # type: ignore[no-untyped-def]
        conn = yield self.connect_values("/api/vm/8/guacamole/ssh")
        values = {k: v for k, v in conn.connect.items() if v}
        self.assertEqual(
            values,
            {
                "hostname": "203.0.113.8",
                "port": "22",
                "username": "ubuntu",
                "password": "context-pw",
            },
        )
        admin_calls = [c for c in self.oned.calls if c[1] == "serveradmin"]
        self.assertEqual([c[0] for c in admin_calls], ["one.vm.info"])
        self.assertEqual(admin_calls[0][2], (8, True))

    @inlineCallbacks
    def test_rdp_with_decrypted_password(self):  # type: ignore[no-untyped-def]
        conn = yield self.connect_values("/api/vm/8/guacamole/rdp")
        self.assertEqual(conn.select, "rdp")
        self.assertEqual(conn.connect["password"], "context-pw")
        self.assertEqual(conn.connect["security"], "rdp")
        self.assertEqual(conn.connect["ignore-cert"], "true")

    @inlineCallbacks
    def test_ssh_key_from_user_template(self):  # type: ignore[no-untyped-def]
        conn = yield self.connect_values("/api/vm/9/guacamole/ssh")
        self.assertEqual(conn.connect["private-key"], KEY)
        self.assertEqual(conn.connect["passphrase"], "key-pp")
        self.assertEqual(conn.connect["username"], "root")
        self.assertEqual(conn.connect["password"], "")

    @inlineCallbacks
    def test_ipv6_only_and_forwarded_port(self):  # type: ignore[no-untyped-def]
        self.oned.add_vm(10, "alice", history=HISTORY, nics=[{"IP6": "2001:db8::10", "SSH": "YES"}])
        self.oned.add_vm(
            11,
            "alice",
            history=HISTORY,
            nics=[{"IP": "192.168.1.5", "SSH": "YES", "EXTERNAL_PORT_RANGE": "20000:20099"}],
        )
        conn = yield self.connect_values("/api/vm/10/guacamole/ssh")
        self.assertEqual(conn.connect["hostname"], "2001:db8::10")
        conn = yield self.connect_values("/api/vm/11/guacamole/ssh")
        self.assertEqual((conn.connect["hostname"], conn.connect["port"]), ("kvm-2", "20021"))


class ClusterTests(OpenNebulaTestCase):
    @inlineCallbacks
    def test_cluster_of_the_last_host_reaches_the_token(self):  # type: ignore[no-untyped-def]
        """The tunnel policy can match OpenNebula clusters: the token carries the CID."""
        self.oned.add_vm(
            30,
            "alice",
            graphics=VNC,
            history=({"HOSTNAME": "kvm-a", "CID": "0"}, {"HOSTNAME": "edge-1", "CID": "100"}),
        )
        code, _, body = yield get_json(self.url("/api/vm/30/guacamole/vnc"), ALICE)
        self.assertEqual(code, 200, body)
        console = self.server.tokens.open(body["data"]).console
        self.assertEqual((console.parameters["hostname"], console.cluster), ("edge-1", "100"))


class RefusalTests(OpenNebulaTestCase):
    @inlineCallbacks
    def test_wrong_password_401(self):  # type: ignore[no-untyped-def]
        wrong = b"Basic " + base64.b64encode(b"alice:nope")
        yield self.refused("/api/vm/7/guacamole/vnc", 401, "couldn't be authenticated", wrong)
        yield self.refused("/api/vm/7/guacamole/vnc", 401, "credentials required", None)

    @inlineCallbacks
    def test_not_permitted_403(self):  # type: ignore[no-untyped-def]
        bob = b"Basic " + base64.b64encode(b"bob:builder")
        yield self.refused("/api/vm/7/guacamole/vnc", 403, "Not authorized", bob)

    @inlineCallbacks
    def test_missing_vm_404(self):  # type: ignore[no-untyped-def]
        yield self.refused("/api/vm/99/guacamole/vnc", 404, "Error getting virtual machine [99]")

    @inlineCallbacks
    def test_old_four_element_errors(self):  # type: ignore[no-untyped-def]
        self.oned.error_elements = 4
        yield self.refused("/api/vm/99/guacamole/vnc", 404, "Error getting")
        bob = b"Basic " + base64.b64encode(b"bob:builder")
        yield self.refused("/api/vm/7/guacamole/vnc", 403, "Not authorized", bob)

    @inlineCallbacks
    def test_no_graphics_and_spice(self):  # type: ignore[no-untyped-def]
        yield self.refused("/api/vm/9/guacamole/vnc", 400, "has no GRAPHICS")
        self.oned.add_vm(12, "alice", graphics={"TYPE": "SPICE", "PORT": "5912"}, history=HISTORY)
        yield self.refused("/api/vm/12/guacamole/vnc", 400, "GRAPHICS/TYPE is SPICE")

    @inlineCallbacks
    def test_states(self):  # type: ignore[no-untyped-def]
        self.oned.add_vm(13, "alice", graphics=VNC, history=())
        yield self.refused("/api/vm/13/guacamole/vnc", 409, "not been deployed")
        self.oned.add_vm(14, "alice", graphics=VNC, history=HISTORY, state=8, lcm_state=0)
        yield self.refused("/api/vm/14/guacamole/vnc", 409, "POWEROFF")
        self.oned.add_vm(
            15, "alice", history=HISTORY, lcm_state=16, nics=[{"IP": "10.0.0.15", "SSH": "YES"}]
        )
        yield self.refused("/api/vm/15/guacamole/ssh", 409, "LCM state 16")

    @inlineCallbacks
    def test_slow_oned_503(self):  # type: ignore[no-untyped-def]
        self.oned.delay = 3.0
        yield self.refused("/api/vm/7/guacamole/vnc", 503, "did not answer within 1 s")

    @inlineCallbacks
    def test_oned_down_503(self):  # type: ignore[no-untyped-def]
        yield self.oned.stop()
        yield self.refused("/api/vm/7/guacamole/vnc", 503, "unreachable")

    @inlineCallbacks
    def test_malformed_502(self):  # type: ignore[no-untyped-def]
        self.oned.malformed = True
        yield self.refused("/api/vm/7/guacamole/vnc", 502, "unusable")

    @inlineCallbacks
    def test_entity_bombs_502(self):  # type: ignore[no-untyped-def]
        for where in ("envelope", "document"):
            self.oned.entity_bomb = where
            body = yield self.refused("/api/vm/7/guacamole/vnc", 502, "unusable")
            self.assertRegex(body["data"], "DTDForbidden|EntitiesForbidden")

    @inlineCallbacks
    def test_no_secret_in_refusals(self):  # type: ignore[no-untyped-def]
        body = yield self.refused(
            "/api/vm/7/guacamole/vnc", 401, "", b"Basic " + base64.b64encode(b"alice:s3cr3t")
        )
        self.assertNotIn("s3cr3t", body["data"])


class WithoutServerAdminTests(OpenNebulaTestCase):
    server_admin = False

    @inlineCallbacks
    def test_encrypted_password_refused_clearly(self):  # type: ignore[no-untyped-def]
        body = yield self.refused("/api/vm/8/guacamole/rdp", 400, "CONTEXT/PASSWORD")
        self.assertIn("server_admin_auth", body["data"])
        self.assertEqual(self.fake_guacd.connections, [])

    @inlineCallbacks
    def test_encrypted_key_refused_clearly(self):  # type: ignore[no-untyped-def]
        yield self.refused("/api/vm/9/guacamole/ssh", 400, "SSH_PRIVATE_KEY")

    @inlineCallbacks
    def test_vnc_needs_no_admin(self):  # type: ignore[no-untyped-def]
        conn = yield self.connect_values("/api/vm/7/guacamole/vnc")
        self.assertEqual(conn.connect["password"], "vnc-pw")


class ZoneTests(OpenNebulaTestCase):
    @inlineCallbacks
    def test_zones(self):  # type: ignore[no-untyped-def]
        remote = FakeOned(reactor)
        yield remote.start()
        self.addCleanup(remote.stop)
        remote.add_user("alice", "wonderland")
        remote.add_vm(70, "alice", graphics=VNC, history=({"HOSTNAME": "kvm-remote"},))
        self.oned.add_zone(0, "OpenNebula")
        self.oned.add_zone(1, "far", endpoint=remote.url)
        self.oned.add_zone(2, "off", state=1, endpoint=remote.url)
        code, _, body = yield get_json(self.url("/api/vm/70/guacamole/vnc?zone=1"), ALICE)
        self.assertEqual(code, 200, body)
        self.assertRaises(TokenError, self.server.tokens.open, body["data"])  # not local
        claims = self.server.tokens.open(body["data"], "1")
        self.assertEqual(claims.console.zone, "1")
        self.assertEqual(claims.console.parameters["hostname"], "kvm-remote")
        yield self.refused("/api/vm/70/guacamole/vnc?zone=5", 404, "zone 5 does not exist")
        yield self.refused("/api/vm/70/guacamole/vnc?zone=2", 409, "zone 2 is disabled")
        code, _, body = yield get_json(self.url("/api/vm/7/guacamole/vnc?zone=0"), ALICE)
        self.assertEqual(code, 200, body)
        self.assertIsNone(self.server.tokens.open(body["data"]).console.zone)


class LoopbackTests(OpenNebulaTestCase):
    guacd = "tcp:guacd.example.com:4822"

    @inlineCallbacks
    def test_loopback_hypervisor_refused_when_guacd_is_elsewhere(self):  # type: ignore[no-untyped-def]
        self.oned.add_vm(20, "alice", graphics=VNC, history=({"HOSTNAME": "localhost"},))
        yield self.refused("/api/vm/20/guacamole/vnc", 400, "loopback_address")


class LoopbackRewriteTests(OpenNebulaTestCase):
    guacd = "tcp:guacd.example.com:4822"
    loopback_address = "192.0.2.10"

    @inlineCallbacks
    def test_loopback_hypervisor_rewritten(self):  # type: ignore[no-untyped-def]
        self.oned.add_vm(20, "alice", graphics=VNC, history=({"HOSTNAME": "127.0.0.1"},))
        code, _, body = yield get_json(self.url("/api/vm/20/guacamole/vnc"), ALICE)
        self.assertEqual(code, 200, body)
        claims = self.server.tokens.open(body["data"])
        self.assertEqual(claims.console.parameters["hostname"], "192.0.2.10")


class LoopbackKeptTests(OpenNebulaTestCase):
    @inlineCallbacks
    def test_loopback_kept_when_guacd_is_local(self):  # type: ignore[no-untyped-def]
        self.oned.add_vm(20, "alice", graphics=VNC, history=({"HOSTNAME": "::1"},))
        conn = yield self.connect_values("/api/vm/20/guacamole/vnc")
        self.assertEqual(conn.connect["hostname"], "::1")


class ZoneIdTests(OpenNebulaTestCase):
    """One zone-id parser on the token API: 400 for what is no zone id, ``00`` is ``0``."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        self.remote = FakeOned(reactor)
        yield self.remote.start()
        self.addCleanup(self.remote.stop)
        self.remote.add_user("alice", "wonderland")
        self.remote.add_vm(70, "alice", graphics=VNC, history=({"HOSTNAME": "kvm-remote"},))
        self.oned.add_zone(0, "OpenNebula")
        self.oned.add_zone(1, "far", endpoint=self.remote.url)

    @inlineCallbacks
    def test_not_zone_ids_400(self):  # type: ignore[no-untyped-def]
        for value in (
            "2147483648",  # 2^31: oned's ids are C ints (was a 500: XML-RPC overflow)
            "9999999999",
            "00000000001",  # overlong
            "-1",
            "+1",
            "1_0",
            "%201",
            "%D9%A1",  # ARABIC-INDIC DIGIT ONE
            "%C3%A9",
            "%FF",
            "x",
            "",
        ):
            code, headers, body = yield get_json(
                self.url(f"/api/vm/70/guacamole/vnc?zone={value}"), ALICE
            )
            self.assertEqual((code, body["id"]), (400, 400), (value, body))
            self.assertIn("a zone id is a whole number", body["data"])
            self.assertIsNone(headers.getRawHeaders(b"www-authenticate"))
        self.assertNotIn("one.zone.info", [c[0] for c in self.oned.calls])

    @inlineCallbacks
    def test_largest_zone_id_asks_oned(self):  # type: ignore[no-untyped-def]
        yield self.refused("/api/vm/70/guacamole/vnc?zone=2147483647", 404, "does not exist")

    @inlineCallbacks
    def test_leading_zeros_name_the_same_zone(self):  # type: ignore[no-untyped-def]
        code, _, body = yield get_json(self.url("/api/vm/7/guacamole/vnc?zone=00"), ALICE)
        self.assertEqual(code, 200, body)
        self.assertIsNone(self.server.tokens.open(body["data"]).console.zone)  # local
        code, _, body = yield get_json(self.url("/api/vm/70/guacamole/vnc?zone=0001"), ALICE)
        self.assertEqual(code, 200, body)
        self.assertEqual(self.server.tokens.open(body["data"], "1").console.zone, "1")
        code, _, body = yield get_json(self.url("/api/vm/70/guacamole/vnc?zone=1"), ALICE)
        self.assertEqual(self.server.tokens.open(body["data"], "01").console.zone, "1")


class ServerAdminRefusedTests(OpenNebulaTestCase):
    """
    serveradmin's password changed in oned, sunstone_auth not updated: oned
    refuses every call made with the server-admin credential (AUTHENTICATION).
    """

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        yield super().setUp()
        self.clock = Clock()
        self.events: list[dict] = []
        self.cloud.admin_status = ServerAdminStatus(self.clock)
        self.cloud.admin_status.log = Logger(observer=self.events.append)
        self.oned.serveradmin_password = "rotated-in-oned"

    def errors_logged(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.error]

    @inlineCallbacks
    def test_ssh_and_rdp_503_naming_the_key_without_a_challenge(self):  # type: ignore[no-untyped-def]
        for path in ("/api/vm/8/guacamole/ssh", "/api/vm/8/guacamole/rdp"):
            code, headers, body = yield get_json(self.url(path), ALICE)
            self.assertEqual((code, body["id"]), (503, 503), body)
            self.assertIn("opennebula.server_admin_auth", body["data"])
            self.assertIsNone(headers.getRawHeaders(b"www-authenticate"))
        code, _, body = yield get_json(self.url("/api/vm/7/guacamole/vnc"), ALICE)
        self.assertEqual(code, 200, body)  # VNC needs no server-admin credential

    @inlineCallbacks
    def test_logged_once_a_minute(self):  # type: ignore[no-untyped-def]
        for _ in range(3):
            yield get_json(self.url("/api/vm/8/guacamole/ssh"), ALICE)
        self.assertEqual(len(self.errors_logged()), 1)
        self.assertIn("oned refused opennebula.server_admin_auth", self.errors_logged()[0])
        self.assertIn("couldn't be authenticated", self.errors_logged()[0])
        self.assertNotIn("server-pw", repr(self.events))
        self.clock.advance(59)
        yield get_json(self.url("/api/vm/8/guacamole/ssh"), ALICE)
        self.assertEqual(len(self.errors_logged()), 1)
        self.clock.advance(1)
        yield get_json(self.url("/api/vm/8/guacamole/ssh"), ALICE)
        self.assertEqual(len(self.errors_logged()), 2)

    @inlineCallbacks
    def test_readyz_shows_it_until_a_call_succeeds(self):  # type: ignore[no-untyped-def]
        readiness = ReadinessResource(
            {"opennebula.server_admin_auth": server_admin_check(self.cloud)}, Clock(), cache=0
        )
        outcomes = yield readiness.results()
        self.assertIn("oned refused opennebula.server_admin_auth", outcomes[SERVER_ADMIN_KEY])
        self.assertIn("couldn't be authenticated", outcomes[SERVER_ADMIN_KEY])
        self.assertEqual(readiness._state_of(outcomes), "degraded")  # VNC still served
        self.oned.serveradmin_password = "server-pw"  # sunstone_auth and oned agree again
        code, _, body = yield get_json(self.url("/api/vm/8/guacamole/ssh"), ALICE)
        self.assertEqual(code, 200, body)
        self.assertIsNone(self.cloud.admin_status.problem)
        outcomes = yield readiness.results()
        self.assertEqual(outcomes, {SERVER_ADMIN_KEY: "ok"})

    @inlineCallbacks
    def test_zone_pool_refusal_is_seen(self):  # type: ignore[no-untyped-def]
        yield self.assertFailure(self.cloud.zone_pool(), ServerAdminRefused)
        self.assertIn("opennebula.server_admin_auth", self.cloud.admin_status.problem)

    @inlineCallbacks
    def test_wired_into_readyz_and_the_zone_directory(self):  # type: ignore[no-untyped-def]
        config = Config.load(overrides={"cloud": "opennebula", "one_xmlrpc": self.oned.url})
        checks = tap.readiness_checks(config, None, self.cloud)
        self.assertIsInstance(checks[SERVER_ADMIN_KEY], Advisory)
        directory = tap.build_zones(config, self.cloud, reactor)
        yield self.assertFailure(directory.lookup("1"), GuacamoleError)  # nothing known
        self.assertIn("couldn't be authenticated", self.cloud.admin_status.problem)
        self.assertEqual(len(self.errors_logged()), 1)
