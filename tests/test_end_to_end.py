"""The whole flow on real loopback sockets: server, client, backend, user."""

from __future__ import annotations

import hashlib
import os

from proxyprotocol.v1 import ProxyProtocolV1
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)


class FlowMixin:
    """The same flow with and without TLS."""

    use_tls = False
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.backend = Backend(echo=True)
        self.backend_port = yield self.backend.start()
        self.deployment = Deployment(self.use_tls, self.mktemp())
        self.addCleanup(self.backend.stop)
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client(
            "TestClient1", {"fooService": ("127.0.0.1", self.backend_port)}
        )
        yield self.deployment.wait_connected("TestClient1")

    @inlineCallbacks
    def test_clients_state(self):
        """GET /clients shows the connected client and its states."""
        code, clients = yield self.deployment.get_json("/clients")
        self.assertEqual(code, 200)
        self.assertEqual(clients["TestClient1"]["CurrentState"], "ClientConnected")
        self.assertEqual(clients["TestClient1"]["LastState"], "ClientUnknown")

    @inlineCallbacks
    def test_user_reaches_service_with_proxy_header(self):
        """A user's bytes reach the service after a PROXY v1 header naming it."""
        port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient1", port, "fooService", proxy=True)]
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(body[0]["ListenPort"], port)
        code, listed = yield self.deployment.get_json("/tunnels")
        self.assertEqual(listed, body)

        user = yield connect_user(port)
        payload = os.urandom(700_000)
        user.transport.write(payload)
        user.transport.loseWriteConnection()
        yield user.done
        backend = self.backend.connections[-1]
        data = backend.data
        line_end = data.index(b"\r\n") + 2
        result = ProxyProtocolV1().unpack(data[:line_end])
        (src_ip, src_port), (dst_ip, dst_port) = result.source, result.dest
        user_address = user.host
        self.assertEqual((str(src_ip), src_port), ("127.0.0.1", user_address.port))
        self.assertEqual((str(dst_ip), dst_port), ("127.0.0.1", port))
        self.assertEqual(
            hashlib.sha256(data[line_end:]).digest(), hashlib.sha256(payload).digest()
        )
        # The backend echoed everything, PROXY line included, then closed.
        self.assertEqual(user.data, data)

    @inlineCallbacks
    def test_server_speaks_first(self):
        """With only '*', nothing is read first: the backend's greeting arrives."""
        greeter = Backend(echo=False, greeting=b"220 hello\r\n")
        greeter_port = yield greeter.start()
        self.addCleanup(greeter.stop)
        yield self.deployment.stop_client("TestClient1")
        self.deployment.start_client(
            "TestClient1", {"smtp": ("127.0.0.1", greeter_port)}
        )
        yield self.deployment.wait_connected("TestClient1")
        port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient1", port, "smtp")]
        )
        self.assertEqual(code, 200, body)
        user = yield connect_user(port)
        yield wait_until(lambda: user.data == b"220 hello\r\n", what="greeting")
        user.transport.loseConnection()
        yield user.done

    @inlineCallbacks
    def test_unknown_service_closes_user(self):
        """A service the client does not know resets; the user is closed."""
        port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient1", port, "noSuchService")]
        )
        self.assertEqual(code, 200, body)
        user = yield connect_user(port)
        user.transport.write(b"hello")
        yield user.done
        self.assertEqual(user.data, b"")
        self.assertEqual(self.backend.connections, [])

    @inlineCallbacks
    def test_many_concurrent_users_each_reach_their_own(self):
        """Concurrent connections each get their own bytes back, none crossed."""
        port = free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient1", port, "fooService")]
        )
        self.assertEqual(code, 200, body)
        users = []
        payloads = []
        for i in range(40):
            user = yield connect_user(port)
            payload = os.urandom(1000 + i * 997)
            user.transport.write(payload)
            user.transport.loseWriteConnection()
            users.append(user)
            payloads.append(payload)
        for user, payload in zip(users, payloads, strict=True):
            yield user.done
            self.assertEqual(user.data, payload)

    @inlineCallbacks
    def test_reconnect_after_server_restart(self):
        """The client reconnects by itself after the server restarts."""
        yield self.deployment.stop_server()
        yield deferLater(reactor, 0.2, lambda: None)
        self.deployment.start_server()
        yield self.deployment.wait_connected("TestClient1")

    @inlineCallbacks
    def test_reconnect_after_connection_cut(self):
        """The client reconnects after its connection is cut."""
        session = self.deployment.server.registry.session_for("TestClient1")
        session.transport.abortConnection()
        yield wait_until(
            lambda: (
                self.deployment.server.registry.session_for("TestClient1")
                not in (None, session)
            ),
            what="a new session",
        )


class PlainFlowTests(FlowMixin, TestCase):
    """Without TLS."""

    use_tls = False


class TlsFlowTests(FlowMixin, TestCase):
    """With mutual TLS."""

    use_tls = True


class StateFileTests(TestCase):
    """Tunnels survive a server restart through the state file."""

    timeout = 30

    @inlineCallbacks
    def test_tunnels_restored_before_clients_return(self):
        """After a restart the tunnel listens at once and works again."""
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        state = os.path.abspath(self.mktemp())
        deployment = Deployment(False, self.mktemp(), state_file=state)
        self.addCleanup(deployment.stop)
        deployment.start_server()
        deployment.start_client("TestClient1", {"web": ("127.0.0.1", backend_port)})
        yield deployment.wait_connected("TestClient1")
        port = free_port()
        code, body = yield deployment.put_tunnels([tunnel("TestClient1", port, "web")])
        self.assertEqual(code, 200, body)
        self.assertTrue(os.path.exists(state))

        yield deployment.stop_client("TestClient1")
        yield deployment.stop_server()
        deployment.start_server()
        # Listening again before any client is back.
        self.assertIsNotNone(
            deployment.server.routes.listening_port(("127.0.0.1", port))
        )
        code, listed = yield deployment.get_json("/tunnels")
        self.assertEqual(listed, body)
        deployment.start_client("TestClient1", {"web": ("127.0.0.1", backend_port)})
        yield deployment.wait_connected("TestClient1")
        user = yield connect_user(port)
        user.transport.write(b"after restart")
        user.transport.loseWriteConnection()
        yield user.done
        self.assertEqual(user.data, b"after restart")


class Ipv6ControlTests(TestCase):
    """The control connection and the API over IPv6 loopback, with TLS."""

    timeout = 30

    @inlineCallbacks
    def test_tls_over_ipv6(self):
        """A client dials [::1] with TLS, verifying the server's IP address."""
        import socket

        try:
            with socket.socket(socket.AF_INET6) as s:
                s.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback here")
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        deployment = Deployment(
            True,
            self.mktemp(),
            listen_address="::1",
            tunnel_control_port=free_port("::1"),
        )
        self.addCleanup(deployment.stop)
        deployment.control_port = deployment.server_config.tunnel_control_port
        deployment.start_server()
        deployment.start_client(
            "TestClient1", {"web": ("127.0.0.1", backend_port)}, server_host="::1"
        )
        yield deployment.wait_connected("TestClient1")
        peer = deployment.server.registry.snapshot()["TestClient1"]["Peer"]
        self.assertTrue(peer.startswith("[::1]:"), peer)
        port = free_port()
        code, body = yield deployment.put_tunnels([tunnel("TestClient1", port, "web")])
        self.assertEqual(code, 200, body)
        user = yield connect_user(port)
        user.transport.write(b"over v6")
        user.transport.loseWriteConnection()
        yield user.done
        self.assertEqual(user.data, b"over v6")
