"""The UDP tunnels' Prometheus metrics: flows, datagrams, drops by reason.

Bytes and flows per tunnel and client are in the common per-tunnel
families (``threshold_tunnel_*``, a UDP tunnel's ``hostname`` label is
``udp:*``); refusals of new flows in ``threshold_public_connections_refused``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from threshold.server.families import single
from threshold.server.stats import UdpDrop, UdpFlowEnd, UdpStats

__all__ = ["UdpCollector"]


class UdpCollector(Collector):
    """Reads :class:`~threshold.server.stats.UdpStats` at each scrape."""

    def __init__(self, stats: UdpStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The UDP families."""
        stats = self.stats
        yield single(
            GaugeMetricFamily,
            "threshold_udp_flows_open",
            "UDP flows open.",
            stats.flows_open,
        )
        yield single(
            CounterMetricFamily,
            "threshold_udp_flows_opened",
            "UDP flows opened (one per user address).",
            stats.flows_opened,
        )
        ended = CounterMetricFamily(
            "threshold_udp_flows_ended",
            "UDP flows ended, by reason.",
            labels=["reason"],
        )
        for end in UdpFlowEnd:
            ended.add_metric([end.value], stats.flows_ended[end])
        yield ended
        datagrams = CounterMetricFamily(
            "threshold_udp_datagrams",
            "UDP datagrams relayed: in (users to services), out (to users).",
            labels=["direction"],
        )
        datagrams.add_metric(["in"], stats.datagrams_in)
        datagrams.add_metric(["out"], stats.datagrams_out)
        yield datagrams
        dropped = CounterMetricFamily(
            "threshold_udp_datagrams_dropped",
            "UDP datagrams dropped by the gateway, by reason.",
            labels=["reason"],
        )
        for drop in UdpDrop:
            dropped.add_metric([drop.value], stats.dropped[drop])
        yield dropped
