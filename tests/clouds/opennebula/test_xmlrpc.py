"""The XML-RPC client: safe parsing, size cap, deadlines, verified HTTPS."""

from __future__ import annotations

import xmlrpc.client

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from consoleproxy.clouds.opennebula.xmlrpc import (
    MAX_RESPONSE_BYTES,
    RpcFault,
    RpcProtocolError,
    RpcUnavailable,
    XmlRpcClient,
    parse_response,
)
from tests.helpers.testca import make_tls_files

BOMB = (
    '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
    '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
    "<methodResponse><params><param><value><string>&c;</string></value></param></params>"
    "</methodResponse>"
)

values = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**31), max_value=2**31 - 1)
    | st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"))),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet="abcXYZ_", min_size=1, max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


class ParseTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(values)
    def test_round_trip_with_the_standard_encoder(self, value) -> None:  # type: ignore[no-untyped-def]
        data = xmlrpc.client.dumps((value,), methodresponse=True).encode()
        self.assertEqual(parse_response(data), value)

    def test_oned_shapes(self) -> None:
        ok = xmlrpc.client.dumps(([True, "<VM/>", 0],), methodresponse=True).encode()
        self.assertEqual(parse_response(ok), [True, "<VM/>", 0])
        bare = (
            b"<methodResponse><params><param><value>text</value></param></params></methodResponse>"
        )
        self.assertEqual(parse_response(bare), "text")

    def test_fault(self) -> None:
        data = xmlrpc.client.dumps(
            xmlrpc.client.Fault(-506, "Method not found"), methodresponse=True
        )
        error = self.assertRaises(RpcFault, parse_response, data.encode())
        self.assertEqual((error.code, error.message), (-506, "Method not found"))

    def test_entities_and_dtds_refused(self) -> None:
        self.assertRaises(RpcProtocolError, parse_response, BOMB.encode())
        external = (
            '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><methodResponse><params>'
            "<param><value>&x;</value></param></params></methodResponse>"
        )
        self.assertRaises(RpcProtocolError, parse_response, external.encode())

    def test_malformed(self) -> None:
        for data in (
            b"",
            b"<methodResponse><params>",
            b"<html>502</html>",
            b"<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>",
            b"<methodResponse><params><param><value><boolean>2</boolean></value></param></params></methodResponse>",
            b"<methodResponse><params><param><value><blob/></value></param></params></methodResponse>",
            b"<methodResponse/>",
        ):
            self.assertRaises(RpcProtocolError, parse_response, data)


class _Server(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = xmlrpc.client.dumps(([True, "ok", 0],), methodresponse=True).encode()
        self.hang = False
        self.status = 200
        self.requests: list[bytes] = []

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        self.requests.append(request.content.read())
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", b"text/xml")
        return self.body


class ClientTests(TestCase):
    @inlineCallbacks
    def start(self, tls: bool = False):  # type: ignore[no-untyped-def]
        self.resource = _Server()
        description = "tcp:0:interface=127.0.0.1"
        self.roots = None
        if tls:
            key, cert, _ = make_tls_files(FilePath(self.mktemp()))
            description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
            self.roots = FilePath(cert).sibling("ca").path
        site = Site(self.resource)
        port = yield serverFromString(reactor, description).listen(site)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def client(self, url: str, **kwargs) -> XmlRpcClient:  # type: ignore[no-untyped-def]
        client = XmlRpcClient(reactor, url, **kwargs)
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_call(self):  # type: ignore[no-untyped-def]
        yield self.start()
        client = self.client(f"http://127.0.0.1:{self.port}/RPC2")
        value = yield client.call("one.vm.info", "alice:pw", 7)
        self.assertEqual(value, [True, "ok", 0])
        params, method = xmlrpc.client.loads(self.resource.requests[0])
        self.assertEqual((method, params), ("one.vm.info", ("alice:pw", 7)))

    @inlineCallbacks
    def test_deadline(self):  # type: ignore[no-untyped-def]
        yield self.start()
        self.resource.hang = True
        client = self.client(f"http://127.0.0.1:{self.port}/RPC2", timeout=0.3)
        error = yield self.assertFailure(client.call("x"), RpcUnavailable)
        self.assertIn("did not answer within 0.3 s", str(error))

    @inlineCallbacks
    def test_unreachable(self):  # type: ignore[no-untyped-def]
        client = self.client("http://127.0.0.1:1/RPC2")
        error = yield self.assertFailure(client.call("x"), RpcUnavailable)
        self.assertIn("cannot connect", str(error))

    @inlineCallbacks
    def test_http_error_and_oversized(self):  # type: ignore[no-untyped-def]
        yield self.start()
        client = self.client(f"http://127.0.0.1:{self.port}/RPC2")
        self.resource.status = 500
        yield self.assertFailure(client.call("x"), RpcProtocolError)
        self.resource.status = 200
        self.resource.body = b"<methodResponse>" + b" " * (MAX_RESPONSE_BYTES + 1)
        error = yield self.assertFailure(client.call("x"), RpcProtocolError)
        self.assertIn("exceeds", str(error))

    @inlineCallbacks
    def test_https_verified(self):  # type: ignore[no-untyped-def]
        yield self.start(tls=True)
        good = self.client(f"https://localhost:{self.port}/RPC2", trust_roots=self.roots)
        self.assertEqual((yield good.call("x")), [True, "ok", 0])
        untrusted = self.client(f"https://localhost:{self.port}/RPC2")
        yield self.assertFailure(untrusted.call("x"), RpcUnavailable)
        other_roots = FilePath(self.mktemp())
        make_tls_files(other_roots)
        wrong_ca = self.client(
            f"https://localhost:{self.port}/RPC2", trust_roots=other_roots.child("ca").path
        )
        yield self.assertFailure(wrong_ca.call("x"), RpcUnavailable)
