"""Prometheus metrics of the access policy, read at scrape time.

Refusals per tunnel and client (the gateway-wide counts by reason are
``threshold_public_connections_refused_total``), quota usage per client,
and the time each bandwidth bucket held a direction back. Nothing is
counted for metrics on the hot path: the collector reads the policy's
state (:class:`~threshold.server.policy.GatewayPolicy`) and the gateway's
counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from threshold.server.families import single

if TYPE_CHECKING:
    from threshold.server.policy import GatewayPolicy

__all__ = ["PolicyCollector"]

_TUNNEL = ["listen_address", "listen_port", "hostname"]
_DIRECTIONS = ("upload", "download")


class PolicyCollector(Collector):
    """Refusals, quota usage and bandwidth limiting of one gateway."""

    def __init__(self, policy: GatewayPolicy) -> None:
        self.policy = policy

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Build the metric families from the policy's current state."""
        policy = self.policy
        by_tunnel = CounterMetricFamily(
            "threshold_tunnel_policy_refused",
            "Connections the access policy refused, per tunnel and reason.",
            labels=[*_TUNNEL, "reason"],
        )
        by_client = CounterMetricFamily(
            "threshold_client_policy_refused",
            "Connections the access policy refused, per client and reason.",
            labels=["client_id", "reason"],
        )
        tunnels: dict[tuple[str, str, str, str], int] = {}
        clients: dict[tuple[str, str], int] = {}
        for (key, client_id, reason), count in policy.stats.policy_refused.items():
            address, port, glob = key
            t = (address, str(port), glob, reason.value)
            tunnels[t] = tunnels.get(t, 0) + count
            c = (client_id, reason.value)
            clients[c] = clients.get(c, 0) + count
        for labels, count in sorted(tunnels.items()):
            by_tunnel.add_metric(list(labels), count)
        for labels, count in sorted(clients.items()):
            by_client.add_metric(list(labels), count)
        yield by_tunnel
        yield by_client

        used = GaugeMetricFamily(
            "threshold_quota_used_bytes",
            "Bytes (both directions) a client moved in its current quota period.",
            labels=["client_id"],
        )
        limit = GaugeMetricFamily(
            "threshold_quota_bytes",
            "A client's QuotaBytes per period.",
            labels=["client_id"],
        )
        exceeded = GaugeMetricFamily(
            "threshold_quota_exceeded",
            "1 while a client is over its quota (new connections refused).",
            labels=["client_id"],
        )
        for account in sorted(policy.quota.accounts(), key=lambda a: a.client_id):
            labels = [account.client_id]
            used.add_metric(labels, account.used)
            limit.add_metric(labels, account.limit)
            exceeded.add_metric(labels, 1 if account.view()["QuotaExceeded"] else 0)
        yield used
        yield limit
        yield exceeded

        tunnel_limited = CounterMetricFamily(
            "threshold_tunnel_bandwidth_limited_seconds",
            "Seconds a tunnel's BandwidthBytesPerSecond held a direction back.",
            labels=[*_TUNNEL, "direction"],
        )
        book = policy.bandwidth
        for (address, port, glob), buckets in sorted(book.tunnel_buckets.items()):
            for direction, bucket in zip(_DIRECTIONS, buckets, strict=True):
                tunnel_limited.add_metric(
                    [address, str(port), glob, direction], bucket.limited_seconds()
                )
        yield tunnel_limited
        client_limited = CounterMetricFamily(
            "threshold_client_bandwidth_limited_seconds",
            "Seconds a client's BandwidthBytesPerSecond held a direction back.",
            labels=["client_id", "direction"],
        )
        for client_id, buckets in sorted(book.client_buckets.items()):
            for direction, bucket in zip(_DIRECTIONS, buckets, strict=True):
                client_limited.add_metric(
                    [client_id, direction], bucket.limited_seconds()
                )
        yield client_limited
        yield single(
            GaugeMetricFamily,
            "threshold_rate_limited_sources",
            "(tunnel, source) pairs whose new-connection rate is tracked now.",
            len(policy.limiter),
        )
