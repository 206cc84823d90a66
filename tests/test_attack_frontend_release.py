"""Issue 11, item 5: any failure after open_stream releases everything.

A tunnel whose ``BackEndService`` cannot be encoded in the stream header
(a control character; the schema refuses it now, so these tests build the
entry bypassing validation, as an older state file or a bug could) used to
fail in ``encode_stream_header`` *after* ``open_stream``: every user left a
stream open on both sessions, a CLOSE_WAIT socket and a per-IP slot.
"""

from __future__ import annotations

import socket

from twisted.application.internet import ClientService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.frontendkit import Gateway, entry
from tests.support import Backend, Deployment, free_port, tunnel, wait_until
from threshold.relay import RelayState
from threshold.server.frontend import PublicConnection
from threshold.server.stats import Refusal


def poison(routes, service: str = "web\n") -> None:
    """Give every tunnel in force a service name the schema would refuse."""
    for entries in routes.groups().values():
        for t in entries:
            object.__setattr__(t, "backend_service", service)


class InMemoryTests(SynchronousTestCase):
    def assert_released(self, gateway: Gateway, user: PublicConnection) -> None:
        gateway.pump.flush()
        self.assertTrue(user.transport.ended)
        self.assertIs(user.state, RelayState.CLOSED)
        self.assertEqual(gateway.session.streams, {})
        self.assertEqual(gateway.client.streams, {})
        self.assertEqual(len(gateway.admission), 0)
        self.assertEqual(gateway.stats.open, 0)
        traffic = gateway.stats.tunnels.get(("127.0.0.1", 9000, "*"))
        self.assertEqual(traffic.open if traffic is not None else 0, 0)

    def test_unencodable_service_opens_no_stream(self):
        """The opening is built first: a bad service name opens nothing."""
        gateway = Gateway([entry()])
        poison(gateway.routes)
        for i in range(5):
            user = gateway.connect(peer=("192.0.2.1", 1000 + i), sent=b"GET /")
            self.assert_released(gateway, user)
        self.assertEqual(gateway.accepted, [])
        self.assertEqual(gateway.stats.refused[Refusal.TUNNEL_ERROR], 5)

    def test_failure_after_open_resets_the_stream(self):
        """A failure once the stream exists resets it on both sessions."""
        gateway = Gateway([entry()])

        def broken(self, other, first=()):
            raise RuntimeError("injected")

        self.patch(PublicConnection, "splice", broken)
        user = gateway.connect(sent=b"GET /")
        self.assert_released(gateway, user)
        # The client did see the stream open, then reset.
        self.assertEqual(len(gateway.accepted), 1)
        self.assertIsNotNone(gateway.accepted[0].lost)
        self.assertEqual(gateway.stats.refused[Refusal.TUNNEL_ERROR], 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failure_after_the_flow_is_counted(self):
        """Even after the flow is counted, its counts are closed again."""
        gateway = Gateway([entry()])

        def broken(self):
            raise RuntimeError("injected")

        self.patch(PublicConnection, "arm_quiet_timer", broken)
        user = gateway.connect()
        gateway.pump.flush()
        self.assertTrue(user.transport.ended)
        self.assertEqual(gateway.session.streams, {})
        self.assertEqual(gateway.client.streams, {})
        self.assertEqual(len(gateway.admission), 0)
        key = ("127.0.0.1", 9000, "*")
        self.assertEqual(gateway.stats.tunnels[key].open, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


def _user_sees_close(port: int) -> bytes:
    """Connect, send a request, and read until the gateway closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


def _client_services(service):
    for child in service:
        if isinstance(child, ClientService):
            yield child
        elif hasattr(child, "__iter__"):
            yield from _client_services(child)


class LoopbackTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_fifty_users_leave_nothing_open(self):
        """50 users of a tunnel that cannot be served: all closed, nothing held."""
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        deployment = Deployment(False, self.mktemp())
        self.addCleanup(deployment.stop)
        deployment.start_server()
        client = deployment.start_client(
            "TestClient1", {"web\n": ("127.0.0.1", backend_port)}
        )
        yield deployment.wait_connected("TestClient1")
        port = free_port()
        code, body = yield deployment.put_tunnels([tunnel("TestClient1", port, "web")])
        self.assertEqual(code, 200, body)
        server = deployment.server
        poison(server.routes)
        for _ in range(50):
            answer = yield deferToThread(_user_sees_close, port)
            self.assertEqual(answer, b"")
        yield wait_until(lambda: server.stats.open == 0, 5, "users to be released")
        self.assertEqual(len(server.admission), 0)
        # Only the control channel (stream 1) is left on either session.
        self.assertEqual(list(server.registry.session_for("TestClient1").streams), [1])
        (service,) = list(_client_services(client))
        session = yield service.whenConnected()
        self.assertEqual(list(session.streams), [1])
        self.assertEqual(backend.connections, [])
        self.assertEqual(server.stats.refused[Refusal.TUNNEL_ERROR], 50)
