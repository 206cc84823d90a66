"""Issue 11, item 7: one source counted once on IPv4 and dual-stack listeners.

On a ``"::"`` listener an IPv4 user appears as ``::ffff:127.0.0.1``; the
per-IP cap used to count that apart from ``127.0.0.1`` on an IPv4 listener,
so one address could hold twice ``MaxConnectionsPerSourceIp``.
"""

from __future__ import annotations

import socket

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.components import missing
from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from threshold.server.stats import Limit, Refusal


def dual_stack_loopback() -> bool:
    """Whether a ``"::"`` socket here accepts IPv4 loopback connections."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            server.bind(("::", 0))
            server.listen(1)
            port = server.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
    except OSError:
        return False
    return True


class DualStackTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_same_user_counted_once_across_listeners(self):
        """127.0.0.1 on "::" and on 127.0.0.1 shares one MaxConnectionsPerSourceIp."""
        if not dual_stack_loopback():
            raise missing("no dual-stack IPv6 loopback on this host")
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        deployment = Deployment(False, self.mktemp(), max_connections_per_source_ip=2)
        self.addCleanup(deployment.stop)
        deployment.start_server()
        deployment.start_client("TestClient1", {"echo": ("127.0.0.1", backend_port)})
        yield deployment.wait_connected("TestClient1")
        dual, v4 = free_port("::"), free_port()
        code, body = yield deployment.put_tunnels(
            [
                tunnel("TestClient1", dual, "echo", ListenAddress="::"),
                tunnel("TestClient1", v4, "echo"),
            ]
        )
        self.assertEqual(code, 200, body)

        via_dual = yield connect_user(dual)
        via_v4 = yield connect_user(v4)
        for user in (via_dual, via_v4):
            user.transport.write(b"ping")
            yield wait_until(lambda user=user: user.data == b"ping", 5, "echo")
        # The dual-stack listener really saw an IPv4-mapped address.
        session = deployment.server.registry.session_for("TestClient1")
        peers = {
            stream.protocol.peer.transport.getPeer().host
            for stream in session.streams.values()
            if stream.id != 1  # the control channel
        }
        self.assertEqual(peers, {"::ffff:127.0.0.1", "127.0.0.1"})
        stats = deployment.server.stats
        self.assertEqual(deployment.server.admission.source_count("127.0.0.1"), 2)
        for port in (dual, v4):
            extra = yield connect_user(port)
            yield extra.done
            self.assertEqual(extra.data, b"")
        self.assertEqual(stats.refused[Refusal.LIMIT_SOURCE_IP], 2)
        self.assertEqual(stats.limits_hit[Limit.CONNECTIONS_PER_SOURCE_IP], 2)
        for user in (via_dual, via_v4):
            user.transport.loseConnection()
            yield user.done
        yield wait_until(
            lambda: len(deployment.server.admission) == 0, 5, "slots to be freed"
        )
