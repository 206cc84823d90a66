"""Mutual TLS refusals, management authorization, and hot swaps on loopback."""

from __future__ import annotations

import os

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.ssl import (
    Certificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tests.support import Backend, Deployment, connect_user, free_port, tunnel
from threshold.server.stats import HandshakeFailure


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


class RefusalTests(TestCase):
    """Clients and API callers the server must not let in."""

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.deployment = Deployment(
            True, self.mktemp(), management_allowed_common_names=("operator",)
        )
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        yield sleep(0)

    @inlineCallbacks
    def test_client_certificate_from_another_ca(self):
        """A client certificate not signed by the CA never gets connected."""
        pki = self.deployment.pki
        self.deployment.start_client(
            "TestClient1",
            {},
            client_tls_key_file=pki.other_client_key,
            client_tls_certificate_file=pki.other_client_cert,
        )
        yield sleep(1.0)
        self.assertFalse(self.deployment.server.registry.is_connected("TestClient1"))
        self.assertEqual(self.deployment.server.registry.snapshot(), {})

    @inlineCallbacks
    def test_client_id_not_matching_certificate(self):
        """A hello whose clientId differs from the certificate's CN is refused."""
        pki = self.deployment.pki
        self.deployment.start_client(
            "TestClient2",
            {},
            client_tls_key_file=pki.client_key("TestClient1"),
            client_tls_certificate_file=pki.client_cert("TestClient1"),
        )
        server = self.deployment.server
        for _ in range(200):
            if server.stats.handshake_failures[HandshakeFailure.IDENTITY]:
                break
            yield sleep(0.01)
        failures = server.stats.handshake_failures
        self.assertGreaterEqual(failures[HandshakeFailure.IDENTITY], 1)
        self.assertFalse(server.registry.is_connected("TestClient2"))
        self.assertFalse(server.registry.is_connected("TestClient1"))

    @inlineCallbacks
    def test_server_with_wrong_name_refused_by_client(self):
        """The client refuses a server whose certificate does not match its name."""
        self.deployment.start_client("TestClient1", {}, server_host="127.0.0.2")
        yield sleep(1.0)
        self.assertFalse(self.deployment.server.registry.is_connected("TestClient1"))

    @inlineCallbacks
    def test_api_without_client_certificate(self):
        """The management API refuses a TLS connection with no certificate."""
        pki = self.deployment.pki
        with open(pki.ca_cert, "rb") as f:
            ca = Certificate.loadPEM(f.read())

        @implementer(IPolicyForHTTPS)
        class NoClientCert:
            def creatorForNetloc(self, hostname, port):
                return optionsForClientTLS(
                    hostname.decode(), trustRoot=trustRootFromCertificates([ca])
                )

        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent(reactor, contextFactory=NoClientCert(), pool=pool))
        with self.assertRaises(Exception) as caught:
            yield client.get(self.deployment.url("/ping"))
        self.assertIn("SSL", repr(caught.exception) + str(caught.exception))
        yield pool.closeCachedConnections()

    @inlineCallbacks
    def test_tunnel_client_certificate_may_not_manage(self):
        """A tunnel client's certificate gets 403 from the management API."""
        code, body = yield self.deployment.get_json("/tunnels", cert_name="TestClient1")
        self.assertEqual(code, 403)
        self.assertIn("TestClient1", body["error"])
        code, body = yield self.deployment.get_json("/tunnels")
        self.assertEqual((code, body), (200, []))


class HotSwapTests(TestCase):
    """Moving a tunnel between clients refuses no connection."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.backend_a = Backend(echo=True)
        self.backend_b = Backend(echo=True)
        port_a = yield self.backend_a.start()
        port_b = yield self.backend_b.start()
        self.addCleanup(self.backend_a.stop)
        self.addCleanup(self.backend_b.stop)
        self.deployment = Deployment(False, self.mktemp())
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client("TestClient1", {"web": ("127.0.0.1", port_a)})
        self.deployment.start_client("TestClient2", {"web": ("127.0.0.1", port_b)})
        yield self.deployment.wait_connected("TestClient1")
        yield self.deployment.wait_connected("TestClient2")

    @inlineCallbacks
    def test_swap_under_a_stream_of_connections(self):
        """Connections before, during and after the swap all complete."""
        port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient1", port, "web")]
        )
        self.assertEqual(code, 200, body)
        listening = self.deployment.server.routes.listening_port(("127.0.0.1", port))
        results = []
        stop = []

        @inlineCallbacks
        def users():
            i = 0
            while not stop:
                user = yield connect_user(port)
                payload = os.urandom(2000) + str(i).encode()
                user.transport.write(payload)
                user.transport.loseWriteConnection()
                results.append((user, payload))
                i += 1
                yield sleep(0.005)

        loops = [users(), users(), users()]
        yield sleep(0.3)
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient2", port, "web")]
        )
        self.assertEqual(code, 200, body)
        yield sleep(0.3)
        stop.append(True)
        yield gatherResults(loops)
        for user, payload in results:
            yield user.done
            self.assertEqual(user.data, payload)
        self.assertIs(
            self.deployment.server.routes.listening_port(("127.0.0.1", port)), listening
        )
        self.assertGreater(len(self.backend_a.connections), 0)
        self.assertGreater(len(self.backend_b.connections), 0)
        self.assertEqual(
            len(self.backend_a.connections) + len(self.backend_b.connections),
            len(results),
        )
