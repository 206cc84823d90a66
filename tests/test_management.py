"""The management API (threshold.server.api) and its Site (threshold.server.site)."""

from __future__ import annotations

import errno
import json
import socket
from typing import Any

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
)
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from threshold.server.admission import RefusedConnection
from threshold.server.api import ManagementAPI
from threshold.server.registry import ClientRegistry
from threshold.server.routes import RouteTable, TunnelError, parse_tunnels
from threshold.server.serving import ServingTable
from threshold.server.site import (
    CLOSE_GRACE,
    ManagementChannel,
    ManagementLimits,
    management_site,
)
from threshold.server.stats import GatewayStats, Limit
from threshold.wire.control import Health

URL = "http://management.invalid"
JSON = {b"content-type": [b"application/json"]}

TUNNEL = {
    "ClientId": "TestClient1",
    "ListenAddress": "127.0.0.1",
    "ListenPort": 9000,
    "ListenHostnameGlob": "*",
    "BackEndService": "fooService",
    "HaProxyProxyProtocol": True,
}


class FakeClients:
    """A ClientsView with a fixed set of connected clients."""

    def __init__(self) -> None:
        self.connected = {"TestClient1", "TestClient2"}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"CurrentState": "ClientConnected", "LastState": "ClientUnknown"}
            for name in sorted(self.connected)
        }


class FakePort:
    def __init__(self) -> None:
        self.stopped = False

    def stopListening(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


class FakeListen:
    """Records the groups asked for; listens nowhere."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int, factory: object) -> Deferred[FakePort]:
        self.calls.append((host, port))
        return succeed(FakePort())


def real_listen(host: str, port: int, factory) -> Deferred:
    return TCP4ServerEndpoint(reactor, port, interface=host).listen(factory)


class FakeSession:
    """What the registry touches of a session."""

    def __init__(self) -> None:
        self.streams: dict[int, object] = {}
        self.rtt: float | None = None

    def go_away(self, code: int = 0) -> None:
        pass


def make_api(listen=None, **kwargs: Any) -> tuple[ManagementAPI, RouteTable]:
    """An API over a route table and a serving table whose registry has
    TestClient1 and TestClient2 connected (its ``registry`` attribute)."""
    clients = FakeClients()
    registry = ClientRegistry()
    for client_id in sorted(clients.connected):
        registry.connected(client_id, FakeSession(), "p")
    serving = ServingTable(registry, GatewayStats())
    table = RouteTable(listen or FakeListen(), lambda key: Factory(), serving.update)
    api = ManagementAPI(table, clients, serving=serving, **kwargs)
    api.registry = registry  # type: ignore[attr-defined]
    return api, table


def normalised(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as the API writes it back (every field, defaults included)."""
    return parse_tunnels([entry])[0].to_json()


class StubTests(SynchronousTestCase):
    """The API through treq's in-memory StubTreq."""

    def setUp(self) -> None:
        self.listen = FakeListen()
        self.api, self.table = make_api(self.listen)
        self.treq = StubTreq(self.api.app.resource())

    def request(
        self, method: str, path: str, body: bytes | None = None, headers=None
    ) -> tuple[int, Any, bytes]:
        d = self.treq.request(method, URL + path, data=body, headers=headers)
        self.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        return response.code, response.headers, content

    def put(self, body: object, content_type: bytes = b"application/json"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request(
            "PUT", "/tunnels", raw, headers={b"content-type": [content_type]}
        )

    def assertJsonError(self, answer, status: int, **fields: Any) -> dict:
        code, headers, content = answer
        self.assertEqual(code, status, content)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        body = json.loads(content)
        self.assertIsInstance(body["error"], str)
        for key, value in fields.items():
            self.assertEqual(body[key], value, body)
        return body

    def test_ping(self):
        """GET /ping answers pong as text."""
        code, headers, content = self.request("GET", "/ping")
        self.assertEqual((code, content), (200, b"pong"))
        self.assertTrue(
            headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        )

    def test_clients(self):
        """GET /clients answers the registry's snapshot as JSON."""
        code, headers, content = self.request("GET", "/clients")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(json.loads(content), FakeClients().snapshot())

    def test_get_tunnels_empty(self):
        """GET /tunnels with nothing applied is an empty list."""
        code, _, content = self.request("GET", "/tunnels")
        self.assertEqual((code, json.loads(content)), (200, []))

    def test_put_then_get(self):
        """PUT /tunnels applies and answers the list in force; GET shows it."""
        body = [TUNNEL, dict(TUNNEL, ListenPort=9001, ClientId="TestClient2")]
        code, _, content = self.put(body)
        self.assertEqual(code, 200, content)
        expected = [normalised(t) for t in body]
        self.assertEqual(json.loads(content), expected)
        self.assertEqual(self.listen.calls, [("127.0.0.1", 9000), ("127.0.0.1", 9001)])
        code, _, content = self.request("GET", "/tunnels")
        self.assertEqual((code, json.loads(content)), (200, expected))

    def test_put_custom_apply(self):
        """An apply function given to the API is used for PUT /tunnels."""
        seen = []

        def apply(tunnels):
            seen.append(tunnels)
            return self.table.apply(tunnels)

        api = ManagementAPI(self.table, FakeClients(), apply=apply)
        self.treq = StubTreq(api.app.resource())
        code, _, content = self.put([TUNNEL])
        self.assertEqual(code, 200, content)
        self.assertEqual(
            [[t.to_json()["ClientId"] for t in ts] for ts in seen], [["TestClient1"]]
        )
        self.assertEqual(len(self.table.tunnels()), 1)

    def test_put_charset(self):
        """A charset parameter of utf-8 is accepted."""
        code, _, content = self.put([TUNNEL], b"Application/JSON; charset=UTF-8")
        self.assertEqual(code, 200, content)

    def test_put_wrong_charset(self):
        """A charset other than utf-8 is 415."""
        self.assertJsonError(
            self.put([TUNNEL], b"application/json; charset=latin-1"), 415
        )

    def test_put_wrong_content_type(self):
        """A body that is not declared application/json is 415."""
        body = self.assertJsonError(self.put([TUNNEL], b"text/plain"), 415)
        self.assertIn("text/plain", body["error"])

    def test_put_no_content_type(self):
        """A PUT without Content-Type is 415."""
        self.assertJsonError(
            self.request("PUT", "/tunnels", json.dumps([TUNNEL]).encode()), 415
        )

    def test_put_not_json(self):
        """A body that is not JSON is 422, and nothing changes."""
        for raw in (b"[{", b"", b"\xff\xfe[]", b"[NaN]", b'[{"a": 1, "a": 2}]'):
            self.assertJsonError(self.put(raw), 422)
        self.assertEqual(self.listen.calls, [])

    def test_put_not_a_list(self):
        """A JSON body that is not a list of objects is 422."""
        self.assertJsonError(self.put({"tunnels": []}), 422, index=None)
        self.assertJsonError(self.put([TUNNEL, 3]), 422, index=1)

    def test_put_invalid_field(self):
        """An invalid field is 400 naming the entry and the field."""
        body = [TUNNEL, dict(TUNNEL, ListenPort=9001, BackEndService="")]
        self.assertJsonError(self.put(body), 400, index=1, field="BackEndService")
        self.assertJsonError(
            self.put([dict(TUNNEL, Colour="red")]), 400, index=0, field="Colour"
        )
        self.assertEqual(self.table.tunnels(), [])

    def test_put_client_not_connected(self):
        """A client that is not connected is accepted (200, no longer 404): the
        socket listens, and the status says the client is not connected."""
        code, _, content = self.put([dict(TUNNEL, ClientId="Nobody")])
        self.assertEqual(code, 200, content)
        self.assertEqual(self.table.tunnels()[0].client_id, "Nobody")
        self.assertEqual(self.listen.calls, [("127.0.0.1", 9000)])
        _, _, content = self.request("GET", "/tunnels/status")
        [status] = json.loads(content)["Tunnels"]
        self.assertEqual(
            status["Clients"],
            [
                {
                    "ClientId": "Nobody",
                    "Connected": False,
                    "Healthy": False,
                    "Reason": "not connected",
                }
            ],
        )
        self.assertEqual(status["Serving"], [])

    def test_tunnels_status_several_clients(self):
        """Each client's state in ClientIds order, and who serves: failover
        serves the first healthy one, round-robin every healthy one."""
        registry = self.api.registry
        session = registry.session_for("TestClient1")
        registry.health_reported(
            "TestClient1",
            session,
            Health({"fooService": False}, {"fooService": "connection refused"}),
        )
        clients = ["TestClient1", "TestClient2", "TestClient3"]
        body = [
            dict(TUNNEL, ClientId=None, ClientIds=clients),
            dict(
                TUNNEL,
                ClientId=None,
                ClientIds=clients,
                ListenPort=9001,
                Balance="round-robin",
            ),
        ]
        body = [{k: v for k, v in t.items() if v is not None} for t in body]
        self.assertEqual(self.put(body)[0], 200)
        _, _, content = self.request("GET", "/tunnels/status")
        failover, round_robin = json.loads(content)["Tunnels"]
        self.assertEqual(
            failover["Clients"],
            [
                {
                    "ClientId": "TestClient1",
                    "Connected": True,
                    "Healthy": False,
                    "Reason": "service fooService unhealthy: connection refused",
                },
                {
                    "ClientId": "TestClient2",
                    "Connected": True,
                    "Healthy": True,
                    "Reason": None,
                },
                {
                    "ClientId": "TestClient3",
                    "Connected": False,
                    "Healthy": False,
                    "Reason": "not connected",
                },
            ],
        )
        self.assertEqual(failover["Serving"], ["TestClient2"])
        self.assertEqual(round_robin["Serving"], ["TestClient2"])
        registry.health_reported("TestClient1", session, Health({}))
        _, _, content = self.request("GET", "/tunnels/status")
        failover, round_robin = json.loads(content)["Tunnels"]
        self.assertEqual(failover["Serving"], ["TestClient1"])
        self.assertEqual(round_robin["Serving"], ["TestClient1", "TestClient2"])
        # GET /tunnels stays the plain list, re-PUT-able as it is.
        _, _, content = self.request("GET", "/tunnels")
        plain = json.loads(content)
        self.assertNotIn("Serving", plain[0])
        self.assertEqual(self.put(plain)[0], 200)

    def test_put_address_in_use(self):
        """A port that is already bound is 409 naming the address."""
        api, table = make_api(real_listen)
        stub = StubTreq(api.app.resource())
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        d = stub.put(
            URL + "/tunnels",
            data=json.dumps([dict(TUNNEL, ListenPort=port)]).encode(),
            headers=JSON,
        )
        stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.json())
        self.assertEqual(response.code, 409)
        self.assertEqual(
            body,
            {
                "error": f"entry 0: address 127.0.0.1:{port} already in use",
                "index": 0,
                "field": "ListenPort",
            },
        )
        self.assertEqual(table.tunnels(), [])

    def test_tunnels_status(self):
        """GET /tunnels/status: the tunnels in force and none left out."""
        self.put([TUNNEL])
        code, headers, content = self.request("GET", "/tunnels/status")
        self.assertEqual(code, 200)
        body = json.loads(content)
        self.assertEqual(list(body), ["Tunnels", "NotRestored"])
        self.assertEqual(
            body["Tunnels"],
            [
                dict(
                    normalised(TUNNEL),
                    Clients=[
                        {
                            "ClientId": "TestClient1",
                            "Connected": True,
                            "Healthy": True,
                            "Reason": None,
                        }
                    ],
                    Serving=["TestClient1"],
                )
            ],
        )
        self.assertEqual(body["NotRestored"], [])

    def test_tunnels_status_after_partial_restore(self):
        """Saved tunnels that could not be bound at start are listed with why;
        GET /tunnels stays the plain list of what is in force."""

        def listen(host, port, factory):
            if port == 9001:
                raise CannotListenError(host, port, OSError(errno.EADDRINUSE, "x"))
            return succeed(FakePort())

        api, table = make_api(listen)
        self.treq = StubTreq(api.app.resource())
        saved = parse_tunnels([dict(TUNNEL, ListenPort=p) for p in (9000, 9001)])
        self.successResultOf(table.restore(saved))
        code, _, content = self.request("GET", "/tunnels/status")
        body = json.loads(content)
        self.assertEqual(
            [{k: t[k] for k in saved[0].to_json()} for t in body["Tunnels"]],
            [saved[0].to_json()],
        )
        self.assertEqual(
            body["NotRestored"],
            [
                {
                    "Index": 1,
                    "Tunnel": saved[1].to_json(),
                    "Error": "entry 1: address 127.0.0.1:9001 already in use",
                    "Field": "ListenPort",
                }
            ],
        )
        code, _, content = self.request("GET", "/tunnels")
        self.assertEqual(json.loads(content), [saved[0].to_json()])

    def test_put_not_saved_is_503(self):
        """A set the server cannot save is 503 with the reason."""

        def apply(tunnels):
            raise TunnelError(503, "not applied: the tunnel set cannot be saved: x")

        api, _ = make_api(apply=apply)
        self.treq = StubTreq(api.app.resource())
        body = self.assertJsonError(self.put([TUNNEL]), 503)
        self.assertIn("cannot be saved", body["error"])

    def test_put_too_large(self):
        """A body over max_body_bytes is 413 and is not applied."""
        api, table = make_api(max_body_bytes=100)
        self.treq = StubTreq(api.app.resource())
        raw = json.dumps([TUNNEL]).encode()
        self.assertGreater(len(raw), 100)
        self.assertJsonError(self.put(raw), 413)
        self.assertEqual(table.tunnels(), [])

    def test_unknown_path(self):
        """An unknown path is 404 with a JSON error naming it."""
        body = self.assertJsonError(self.request("GET", "/nowhere"), 404)
        self.assertIn("/nowhere", body["error"])

    def test_wrong_method(self):
        """A wrong method is 405 with an Allow header."""
        code, headers, _ = answer = self.request("DELETE", "/tunnels")
        self.assertJsonError(answer, 405)
        allowed = headers.getRawHeaders(b"allow")[0].decode().split(", ")
        self.assertEqual(set(allowed), {"GET", "HEAD", "PUT"})
        code, headers, _ = answer = self.request("POST", "/ping")
        self.assertJsonError(answer, 405)
        self.assertNotIn("PUT", headers.getRawHeaders(b"allow")[0].decode())

    def test_internal_error(self):
        """An unexpected exception is 500 without a traceback, and is logged."""

        class Broken(FakeClients):
            def snapshot(self):
                raise ZeroDivisionError("secret detail")

        table = RouteTable(FakeListen(), lambda key: Factory())
        self.treq = StubTreq(ManagementAPI(table, Broken()).app.resource())
        code, _, content = self.request("GET", "/clients")
        self.assertEqual(code, 500)
        self.assertEqual(json.loads(content), {"error": "internal error"})
        self.assertNotIn(b"secret", content)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_no_certificate_forbidden(self):
        """With allowed names set, a request without a certificate is 403."""
        api, _ = make_api(allowed_common_names=["operator"])
        self.treq = StubTreq(api.app.resource())
        for method, path in (("GET", "/ping"), ("GET", "/tunnels"), ("GET", "/x")):
            body = self.assertJsonError(self.request(method, path), 403)
            self.assertIn("client certificate is required", body["error"])
        self.assertJsonError(self.put([TUNNEL]), 403)

    def test_require_identity_forbidden(self):
        """require_tls_identity alone refuses a request without a certificate."""
        api, _ = make_api(require_tls_identity=True)
        self.treq = StubTreq(api.app.resource())
        self.assertJsonError(self.request("GET", "/clients"), 403)


class Raw(Protocol):
    """Sends bytes on connect and collects everything until the close."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)
        # A server that waits for the rest of the body fails the test quickly.
        self.timeout = reactor.callLater(5, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        if self.timeout.active():
            self.timeout.cancel()
        self.done.callback(self.received)


class ServedTestCase(TestCase):
    """Helpers to serve the API on a real loopback port."""

    async def serve(self, api: ManagementAPI, endpoint_factory=None) -> int:
        wrapper = WrappingFactory(management_site(api))
        endpoint = (endpoint_factory or TCP4ServerEndpoint)(
            reactor, 0, interface="127.0.0.1"
        )
        port = await endpoint.listen(wrapper)
        self.addCleanup(self.drain, port, wrapper)
        return port.getHost().port

    async def drain(self, port, wrapper: WrappingFactory) -> None:
        """Stop listening and wait until every served connection is closed."""
        await port.stopListening()
        for _ in range(200):
            if not wrapper.protocols:
                return
            await deferLater(reactor, 0.01, lambda: None)
        for protocol in list(wrapper.protocols):
            protocol.transport.abortConnection()

    async def raw(self, port: int, data: bytes) -> bytes:
        protocol = Raw(data)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        await endpoint.connect(Factory.forProtocol(lambda: protocol))
        return await protocol.done


class BodyLimitTests(ServedTestCase):
    """The Site refuses oversized bodies before buffering them."""

    def setUp(self) -> None:
        self.hits: list[str] = []
        self.api, self.table = make_api(max_body_bytes=1000, limit_hit=self.hits.append)

    async def test_small_body_served(self):
        """A body under the limit is handled normally over a real socket."""
        port = await self.serve(self.api)
        body = json.dumps([TUNNEL]).encode()
        answer = await self.raw(
            port,
            b"PUT /tunnels HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertEqual(len(self.table.tunnels()), 1)

    async def test_declared_length_refused_at_once(self):
        """A Content-Length over the limit is 413 before the body arrives."""
        port = await self.serve(self.api)
        # 10 GB announced, 10 bytes sent: the answer comes without the rest.
        answer = await self.raw(
            port,
            b"PUT /tunnels HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10000000000\r\n\r\n[{}, {}, {",
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertEqual(self.hits, [Limit.MANAGEMENT_BODY])
        self.assertNotIn(b"100 Continue", answer)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Type: application/json", head)
        self.assertIn(b"larger than 1000 bytes", json.loads(body)["error"].encode())
        self.assertEqual(self.table.tunnels(), [])

    async def test_chunked_body_counted(self):
        """A chunked body is 413 as soon as it passes the limit, unfinished."""
        port = await self.serve(self.api)
        chunk = b"400\r\n" + b" " * 0x400 + b"\r\n"
        # Two chunks, no final zero-length chunk: the body never ends.
        answer = await self.raw(
            port,
            b"PUT /tunnels HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk + chunk,
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertEqual(self.table.tunnels(), [])

    async def test_chunked_under_limit(self):
        """A chunked body under the limit is accepted."""
        port = await self.serve(self.api)
        body = json.dumps([TUNNEL]).encode()
        answer = await self.raw(
            port,
            b"PUT /tunnels HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    def test_http11_only(self):
        """The Site offers only http/1.1 in ALPN."""
        self.assertEqual(management_site(self.api).acceptableProtocols(), [b"http/1.1"])


class CertificateTests(ServedTestCase):
    """Authorization by the Common Name of real client certificates."""

    def setUp(self) -> None:
        from tests.certs import test_pki
        from threshold.tls import server_options

        self.pki = test_pki()
        self.options = server_options(
            self.pki.ca_cert, self.pki.server_key, self.pki.server_cert
        )

    async def serve_tls(self, api: ManagementAPI) -> int:
        return await self.serve(
            api,
            lambda r, port, interface: SSL4ServerEndpoint(
                r, port, self.options, interface=interface
            ),
        )

    def client(self, ca: str, cert: str, key: str) -> HTTPClient:
        from threshold.tls import ClientCertPolicy

        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        policy = ClientCertPolicy(ca, key, cert)
        return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    def named(self, name: str) -> HTTPClient:
        return self.client(
            self.pki.ca_cert, self.pki.client_cert(name), self.pki.client_key(name)
        )

    async def test_allowed_name(self):
        """A certificate whose CN is allowed may call the API."""
        api, _ = make_api(allowed_common_names=["operator"])
        port = await self.serve_tls(api)
        response = await self.named("operator").get(f"https://127.0.0.1:{port}/ping")
        self.assertEqual((response.code, await response.content()), (200, b"pong"))

    async def test_other_name_forbidden(self):
        """A valid certificate whose CN is not allowed gets 403 naming the CN."""
        api, table = make_api(allowed_common_names=["operator"])
        port = await self.serve_tls(api)
        response = await self.named("TestClient1").put(
            f"https://127.0.0.1:{port}/tunnels",
            data=json.dumps([TUNNEL]).encode(),
            headers=JSON,
        )
        self.assertEqual(response.code, 403)
        self.assertEqual(
            await response.json(),
            {"error": 'certificate CN "TestClient1" may not use the management API'},
        )
        self.assertEqual(table.tunnels(), [])

    async def test_any_certificate_with_require_identity(self):
        """require_tls_identity accepts any certificate the TLS layer verified."""
        api, _ = make_api(require_tls_identity=True)
        port = await self.serve_tls(api)
        response = await self.named("TestClient2").get(
            f"https://127.0.0.1:{port}/clients"
        )
        self.assertEqual(response.code, 200)
        self.assertIn("TestClient1", await response.json())

    async def test_other_ca_refused(self):
        """A certificate from another CA never reaches the API."""
        api, _ = make_api(allowed_common_names=["TestClient1"])
        port = await self.serve_tls(api)
        client = self.client(
            self.pki.ca_cert, self.pki.other_client_cert, self.pki.other_client_key
        )
        with self.assertRaises(Exception) as cm:
            await client.get(f"https://127.0.0.1:{port}/ping")
        self.assertNotIsInstance(cm.exception, AssertionError)


class SiteLimitTests(SynchronousTestCase):
    """The Site's connection shares and deadlines, in memory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.hits: list[Limit] = []
        api, self.table = make_api(limit_hit=self.hits.append)
        self.limits = ManagementLimits(
            max_pending=3, max_pending_per_source=2, request_timeout=5
        )
        self.site = management_site(api, self.limits, self.clock)

    def connect(self, host: str = "10.0.0.1"):
        address = IPv4Address("TCP", host, 50000)
        protocol = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_first_request_deadline(self):
        """No complete request head within the timeout: closed, then cut."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.hits, [Limit.MANAGEMENT_REQUEST_TIMEOUT])
        self.assertFalse(transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(transport.disconnected)

    def test_request_in_time_is_served(self):
        """A request head in time is served and frees the pending slot."""
        channel, transport = self.connect()
        self.assertEqual(len(self.site.pending), 1)
        channel.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"pong", transport.value())
        self.assertEqual(len(self.site.pending), 0)
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.hits, [])

    def test_per_source_share(self):
        """A source past its share is cut at once; another source is not."""
        self.connect("10.0.0.2")
        self.connect("10.0.0.2")
        refused, transport = self.connect("10.0.0.2")
        self.assertIsInstance(refused, RefusedConnection)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.hits, [Limit.PENDING_MANAGEMENT_PER_SOURCE])
        channel, transport = self.connect("10.0.0.1")
        self.assertFalse(transport.disconnecting)

    def test_newcomer_takes_a_slot_back(self):
        """At the total, a newcomer from a small source cuts the oldest
        connection of the largest one."""
        first, first_transport = self.connect("10.0.0.2")
        self.connect("10.0.0.2")
        self.connect("10.0.0.3")
        channel, transport = self.connect("10.0.0.1")
        self.assertIsInstance(channel, ManagementChannel)
        self.assertTrue(first_transport.disconnected)
        self.assertEqual(self.hits, [Limit.PENDING_MANAGEMENT])
        # Cut connections give their slot back once gone (here: at once).
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.site.pending), 3)

    def test_lost_connection_frees_its_slot(self):
        """A pending connection that goes away frees its slot and timers."""
        channel, transport = self.connect()
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.site.pending), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_413_closes_and_cuts(self):
        """After a 413 the connection is closed and cut after CLOSE_GRACE."""
        api, _ = make_api(max_body_bytes=1024)
        site = management_site(api, self.limits, self.clock)
        address = IPv4Address("TCP", "10.0.0.1", 50000)
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(
            b"PUT /tunnels HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n"
            b"Content-Type: application/json\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(transport.disconnected)
