"""The gateway's counters: each byte counted once, figures live while flows run."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from threshold.server.stats import (
    GatewayStats,
    HandshakeFailure,
    Limit,
    Refusal,
    Traffic,
)

KEY = ("127.0.0.1", 9000, "*")


class FlowTests(SynchronousTestCase):
    def test_open_flow_bytes_show_while_running(self):
        """An open connection's bytes are in the per-tunnel and per-client figures."""
        stats = GatewayStats()
        flow = stats.flow_opened(KEY, "c1")
        flow.bytes_in += 10
        flow.bytes_out += 3
        self.assertEqual(stats.tunnels, {KEY: Traffic(1, 1, 10, 3)})
        self.assertEqual(stats.clients, {"c1": Traffic(1, 1, 10, 3)})

    def test_closed_flows_add_up_once(self):
        """Closing moves a flow's bytes into the totals, once, even if closed twice."""
        stats = GatewayStats()
        a = stats.flow_opened(KEY, "c1")
        b = stats.flow_opened(KEY, "c2")
        a.bytes_in, a.bytes_out = 5, 7
        b.bytes_in, b.bytes_out = 1, 2
        stats.flow_closed(a)
        stats.flow_closed(a)
        self.assertEqual(stats.tunnels[KEY], Traffic(2, 1, 6, 9))
        self.assertEqual(stats.clients["c1"], Traffic(1, 0, 5, 7))
        self.assertEqual(stats.clients["c2"], Traffic(1, 1, 1, 2))
        stats.flow_closed(b)
        self.assertEqual(stats.tunnels[KEY], Traffic(2, 0, 6, 9))

    def test_snapshot_is_a_copy(self):
        """What a reader gets cannot change the counters."""
        stats = GatewayStats()
        stats.flow_opened(KEY, "c1")
        stats.tunnels[KEY].bytes_in = 99
        self.assertEqual(stats.tunnels[KEY].bytes_in, 0)


class ReasonTests(SynchronousTestCase):
    def test_reasons_counted_by_enum(self):
        """Refusals, limits and handshake failures count by their enum member."""
        stats = GatewayStats()
        stats.refuse(Refusal.NO_ROUTE)
        stats.refuse(Refusal.NO_ROUTE)
        stats.limit_hit(Limit.STREAMS_PER_SESSION)
        stats.handshake_failed(HandshakeFailure.IDENTITY)
        stats.handshake_failed(HandshakeFailure.TIMEOUT)
        self.assertEqual(stats.refused[Refusal.NO_ROUTE], 2)
        self.assertEqual(stats.refused["no_route"], 2)
        self.assertEqual(stats.limits_hit["streams_per_session"], 1)
        self.assertEqual(stats.handshake_failure_count, 2)
