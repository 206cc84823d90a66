"""Prometheus metrics of the gateway, read from its state at scrape time.

The collector reads two things only: the gateway's counters
(:class:`~threshold.server.stats.GatewayStats`, updated at each event) and
the client registry (who is connected, each session's streams and RTT). It
turns them into metric families when ``GET /metrics`` is scraped, so the hot
path pays nothing for metrics and the figures are exactly what the API and
the logs show.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from threshold.server.policy_metrics import PolicyCollector
from threshold.server.registry import (
    STATE_CLOSED,
    STATE_CONNECTED,
    STATE_ERROR,
    STATE_UNKNOWN,
)
from threshold.server.stats import GatewayStats, HandshakeFailure, Refusal

if TYPE_CHECKING:
    from threshold.server.registry import ClientRecord
    from threshold.server.stats import Traffic

_STATES = (STATE_UNKNOWN, STATE_CONNECTED, STATE_CLOSED, STATE_ERROR)


class ClientRecords(Protocol):
    """What the collector reads of the client registry."""

    def records(self) -> Sequence[ClientRecord]:
        """Every client seen."""
        ...


class _Gateway(Protocol):
    stats: GatewayStats
    registry: ClientRecords


class ServerCollector(Collector):
    """Everything an operator bills, alerts and plans on."""

    def __init__(self, stats: GatewayStats, clients: ClientRecords) -> None:
        self.stats = stats
        self.clients = clients

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Build the metric families from the gateway's current state."""
        stats = self.stats
        records = self.clients.records()

        states = GaugeMetricFamily(
            "threshold_clients", "Clients by current state.", labels=["state"]
        )
        counts = dict.fromkeys(_STATES, 0)
        for record in records:
            counts[record.current_state] = counts.get(record.current_state, 0) + 1
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states

        connected = GaugeMetricFamily(
            "threshold_client_connected",
            "1 while the client's session is up.",
            labels=["client_id"],
        )
        rtt = GaugeMetricFamily(
            "threshold_client_rtt_seconds",
            "Keepalive round trip of the client's session.",
            labels=["client_id"],
        )
        streams = GaugeMetricFamily(
            "threshold_client_streams",
            "Streams open on the client's session.",
            labels=["client_id"],
        )
        sessions = CounterMetricFamily(
            "threshold_client_sessions",
            "Sessions accepted from the client.",
            labels=["client_id"],
        )
        for record in records:
            labels = [record.client_id]
            session = record.session
            connected.add_metric(labels, 1 if session is not None else 0)
            sessions.add_metric(labels, record.connections)
            if session is not None:
                streams.add_metric(labels, len(session.streams))
                if session.rtt is not None:
                    rtt.add_metric(labels, session.rtt)
        yield connected
        yield rtt
        yield streams
        yield sessions

        yield from self._traffic(
            "client",
            ["client_id"],
            [([client_id], t) for client_id, t in stats.clients.items()],
        )
        yield from self._traffic(
            "tunnel",
            ["listen_address", "listen_port", "hostname"],
            [
                ([address, str(port), glob], t)
                for (address, port, glob), t in stats.tunnels.items()
            ],
        )

        yield _one(
            GaugeMetricFamily,
            "threshold_tunnels",
            "Tunnels in force (entries of the table).",
            stats.tunnels_in_force,
        )
        yield _one(
            GaugeMetricFamily,
            "threshold_listening_sockets",
            "Public sockets open (tunnel groups).",
            stats.listening_sockets,
        )
        yield _one(
            GaugeMetricFamily,
            "threshold_tunnels_not_restored",
            "Entries of the state file that could not be restored at start "
            "(until the tunnel set changes).",
            stats.restore_failures,
        )
        yield _one(
            CounterMetricFamily,
            "threshold_public_connections",
            "Internet-user connections accepted on any tunnel socket.",
            stats.accepted,
        )
        yield _one(
            GaugeMetricFamily,
            "threshold_public_connections_open",
            "Internet-user connections open.",
            stats.open,
        )

        refused = CounterMetricFamily(
            "threshold_public_connections_refused",
            "Internet-user connections the gateway closed, by reason: before "
            "relaying, or (limit_idle, limit_first_byte) while relayed but idle.",
            labels=["reason"],
        )
        for reason in Refusal:
            refused.add_metric([reason.value], stats.refused[reason])
        yield refused

        yield _one(
            CounterMetricFamily,
            "threshold_sni_not_tls",
            "Connections on hostname-routed sockets that sent no TLS ClientHello.",
            stats.sni_not_tls,
        )

        handshakes = CounterMetricFamily(
            "threshold_handshake_failures",
            "Tunnel-client handshakes refused, by reason.",
            labels=["reason"],
        )
        for failure in HandshakeFailure:
            handshakes.add_metric([failure.value], stats.handshake_failures[failure])
        yield handshakes

        limits = CounterMetricFamily(
            "threshold_limits_hit", "Times each limit was hit.", labels=["limit"]
        )
        for name, count in sorted(stats.limits_hit.items()):
            limits.add_metric([str(name)], count)
        yield limits

    def _traffic(
        self,
        what: str,
        label_names: list[str],
        rows: list[tuple[list[str], Traffic]],
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        accepted = CounterMetricFamily(
            f"threshold_{what}_connections",
            f"Internet-user connections relayed, per {what}.",
            labels=label_names,
        )
        open_ = GaugeMetricFamily(
            f"threshold_{what}_connections_open",
            f"Internet-user connections open, per {what}.",
            labels=label_names,
        )
        bytes_in = CounterMetricFamily(
            f"threshold_{what}_received_bytes",
            f"Bytes from internet users to the service, per {what}.",
            labels=label_names,
        )
        bytes_out = CounterMetricFamily(
            f"threshold_{what}_sent_bytes",
            f"Bytes from the service to internet users, per {what}.",
            labels=label_names,
        )
        for labels, traffic in rows:
            accepted.add_metric(labels, traffic.accepted)
            open_.add_metric(labels, traffic.open)
            bytes_in.add_metric(labels, traffic.bytes_in)
            bytes_out.add_metric(labels, traffic.bytes_out)
        yield accepted
        yield open_
        yield bytes_in
        yield bytes_out


def _one(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    documentation: str,
    value: float,
) -> GaugeMetricFamily | CounterMetricFamily:
    """A metric with a single, unlabelled sample."""
    metric = family(name, documentation)
    metric.add_metric([], value)
    return metric


def server_registry(server: _Gateway) -> CollectorRegistry:
    """A registry holding the gateway's collector (and nothing global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server.stats, server.registry))
    policy = getattr(server, "policy", None)
    if policy is not None:
        registry.register(PolicyCollector(policy))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)
