"""The landing page, ``GET /``: the user's consoles, or where consoles come from."""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from consoleproxy.consoles import Identity
from consoleproxy.web.landing import LandingPage
from tests.helpers.consoleserver import start_console_server
from tests.helpers.support import basic, http_request


class LandingOverHttpTests(TestCase):
    @inlineCallbacks
    def test_asks_for_credentials(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self)
        code, headers, body = yield http_request(server.port, "/")
        self.assertEqual(code, 401)
        self.assertTrue(headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Basic "))
        self.assertIn(b"Sign-in needed", body)

    @inlineCallbacks
    def test_lists_the_users_consoles(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self)
        code, headers, body = yield http_request(
            server.port, "/", headers={b"Authorization": basic("alice", "wonderland")}
        )
        self.assertEqual(code, 200)
        self.assertIn(b"default-src 'none'", headers.getRawHeaders(b"content-security-policy")[0])
        self.assertIn(b'<a href="/console/7/vnc">VNC</a>', body)
        self.assertIn(b'<a href="/console/7/ssh">SSH</a>', body)

    @inlineCallbacks
    def test_another_user_sees_none_of_them(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self)
        code, _, body = yield http_request(
            server.port, "/", headers={b"Authorization": basic("bob", "builder")}
        )
        self.assertEqual(code, 200)
        self.assertNotIn(b"/console/7/", body)
        self.assertIn(b"bob may open no console here.", body)

    @inlineCallbacks
    def test_wrong_password(self):  # type: ignore[no-untyped-def]
        server = yield start_console_server(self)
        code, _, _ = yield http_request(
            server.port, "/", headers={b"Authorization": basic("alice", "nope")}
        )
        self.assertEqual(code, 401)


class _NoListing:
    """A cloud that cannot list consoles (as OpenNebula's)."""

    def authenticate(self, authorization: bytes | None) -> object:
        raise AssertionError("the page without a listing checks no password")


class _Listing:
    def __init__(self) -> None:
        self.authenticated = 0

    def authenticate(self, authorization: bytes | None) -> object:
        self.authenticated += 1
        return succeed(Identity("<eve>"))

    def listing(self, identity: Identity) -> object:
        return succeed([])


class LandingPageTests(SynchronousTestCase):
    def render(self, page: LandingPage) -> tuple[int, bytes]:
        request = DummyRequest([b""])
        result = self.successResultOf(page.render(request))
        return request.responseCode or 200, result

    def test_without_a_listing_no_password_and_no_vm(self) -> None:
        page = LandingPage(_NoListing(), _NoListing())
        self.assertFalse(page.checks_passwords)
        code, body = self.render(page)
        self.assertEqual(code, 200)
        self.assertIn(b"/console/&lt;VM id&gt;/&lt;vnc|ssh|rdp&gt;", body)

    def test_names_are_escaped(self) -> None:
        from zope.interface import directlyProvides  # noqa: PLC0415

        from consoleproxy.interfaces import IConsoleDirectory  # noqa: PLC0415

        cloud = _Listing()
        directlyProvides(cloud, IConsoleDirectory)
        page = LandingPage(cloud, cloud)
        self.assertTrue(page.checks_passwords)
        _, body = self.render(page)
        self.assertIn(b"&lt;eve&gt; may open no console here.", body)
        self.assertEqual(cloud.authenticated, 1)
