"""Prometheus metrics of the gateway, read from its state at scrape time.

The collector reads three things only: the gateway's counters
(:class:`~threshold.server.stats.GatewayStats`, updated at each event),
the client registry (who is connected, each session's streams and RTT,
the health each client reported) and the serving table (each tunnel's
healthy and serving clients, computed at each change). It
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

from threshold.server.families import single
from threshold.server.policy_metrics import PolicyCollector
from threshold.server.registry import (
    STATE_CLOSED,
    STATE_CONNECTED,
    STATE_ERROR,
    STATE_UNKNOWN,
    user_streams,
)
from threshold.server.stats import GatewayStats, HandshakeFailure, Refusal
from threshold.server.udp_metrics import UdpCollector
from threshold.wire.egress import EgressRefusal

if TYPE_CHECKING:
    from threshold.server.registry import ClientRecord
    from threshold.server.serving import TunnelView
    from threshold.server.stats import Traffic
    from threshold.server.tunnels import TunnelKey

_STATES = (STATE_UNKNOWN, STATE_CONNECTED, STATE_CLOSED, STATE_ERROR)


class ClientRecords(Protocol):
    """What the collector reads of the client registry."""

    def records(self) -> Sequence[ClientRecord]:
        """Every client seen."""
        ...


class TunnelViews(Protocol):
    """What the collector reads of the serving table."""

    def views(self) -> Sequence[TunnelView]:
        """Every tunnel in force, with its clients' states."""
        ...


class _Gateway(Protocol):
    stats: GatewayStats
    registry: ClientRecords
    serving: TunnelViews


_TUNNEL_LABELS = ["listen_address", "listen_port", "hostname"]


def _tunnel_labels(key: TunnelKey) -> list[str]:
    address, port, glob = key
    return [address, str(port), glob]


class ServerCollector(Collector):
    """Everything an operator bills, alerts and plans on."""

    def __init__(
        self,
        stats: GatewayStats,
        clients: ClientRecords,
        serving: TunnelViews | None = None,
    ) -> None:
        self.stats = stats
        self.clients = clients
        self.serving = serving

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
            "Users' streams open on the client's session (not its control stream).",
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
                streams.add_metric(labels, user_streams(session))
                if session.rtt is not None:
                    rtt.add_metric(labels, session.rtt)
        yield connected
        yield rtt
        yield streams
        yield sessions

        health = GaugeMetricFamily(
            "threshold_client_service_healthy",
            "Health the client reported for a service it checks (1 healthy).",
            labels=["client_id", "service"],
        )
        for record in records:
            for service, ok in sorted(record.health.items()):
                health.add_metric([record.client_id, service], 1 if ok else 0)
        yield health
        yield from self._balancing()

        yield from self._traffic(
            "client",
            ["client_id"],
            [([client_id], t) for client_id, t in stats.clients.items()],
        )
        yield from self._traffic(
            "tunnel",
            _TUNNEL_LABELS,
            [(_tunnel_labels(key), t) for key, t in stats.tunnels.items()],
        )

        yield single(
            GaugeMetricFamily,
            "threshold_tunnels",
            "Tunnels in force (entries of the table).",
            stats.tunnels_in_force,
        )
        yield single(
            GaugeMetricFamily,
            "threshold_listening_sockets",
            "Public sockets open (tunnel groups).",
            stats.listening_sockets,
        )
        yield single(
            GaugeMetricFamily,
            "threshold_tunnels_not_restored",
            "Entries of the state file that could not be restored at start "
            "(until the tunnel set changes).",
            stats.restore_failures,
        )
        yield single(
            CounterMetricFamily,
            "threshold_public_connections",
            "Internet-user connections accepted on any tunnel socket.",
            stats.accepted,
        )
        yield single(
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

        yield single(
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
        yield from self._egress()

    def _egress(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Per client: egress requests, connections, refusals, bytes (egress.md)."""
        labels = ["client_id"]
        requests = CounterMetricFamily(
            "threshold_client_egress_requests",
            "Egress requests (odd streams) the client opened.",
            labels=labels,
        )
        connections = CounterMetricFamily(
            "threshold_client_egress_connections",
            "Egress connections made to a destination for the client.",
            labels=labels,
        )
        open_ = GaugeMetricFamily(
            "threshold_client_egress_open",
            "Egress streams of the client open now (connecting or relaying).",
            labels=labels,
        )
        sent = CounterMetricFamily(
            "threshold_client_egress_sent_bytes",
            "Bytes from the client to its egress destinations.",
            labels=labels,
        )
        received = CounterMetricFamily(
            "threshold_client_egress_received_bytes",
            "Bytes from egress destinations to the client.",
            labels=labels,
        )
        refused = CounterMetricFamily(
            "threshold_client_egress_refused",
            "Egress requests refused or whose connection failed, by reason.",
            labels=["client_id", "reason"],
        )
        for client_id, traffic in sorted(self.stats.egress.clients.items()):
            row = [client_id]
            requests.add_metric(row, traffic.requests)
            connections.add_metric(row, traffic.connected)
            open_.add_metric(row, traffic.open)
            sent.add_metric(row, traffic.bytes_sent)
            received.add_metric(row, traffic.bytes_received)
            for reason in EgressRefusal:
                refused.add_metric([client_id, reason.value], traffic.refused[reason])
        yield from (requests, connections, open_, sent, received, refused)

    def _balancing(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Per tunnel and client: healthy, serving; per tunnel: failovers, retries."""
        labels = [*_TUNNEL_LABELS, "client_id"]
        healthy = GaugeMetricFamily(
            "threshold_tunnel_client_healthy",
            "1 while the client can take the tunnel's connections (session up,"
            " the tunnel's service not reported unhealthy).",
            labels=labels,
        )
        serving = GaugeMetricFamily(
            "threshold_tunnel_client_serving",
            "1 while the client receives the tunnel's new connections.",
            labels=labels,
        )
        views = self.serving.views() if self.serving is not None else []
        for view in views:
            tunnel = _tunnel_labels(view.tunnel.key)
            for client in view.clients:
                row = [*tunnel, client.client_id]
                healthy.add_metric(row, 1 if client.healthy else 0)
                serving.add_metric(row, 1 if client.client_id in view.serving else 0)
        yield healthy
        yield serving
        for name, doc, counter in (
            (
                "threshold_failovers",
                "Times a failover tunnel's serving client stopped being healthy"
                " (the move back to a preferred client is not one).",
                self.stats.failovers,
            ),
            (
                "threshold_retries",
                "Connections reset by a client before any byte came back,"
                " retried on another client.",
                self.stats.retries,
            ),
            (
                "threshold_retry_failures",
                "Retried connections reset by the second client too.",
                self.stats.retry_failures,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=_TUNNEL_LABELS)
            for key, count in sorted(counter.items()):
                family.add_metric(_tunnel_labels(key), count)
            yield family

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


def server_registry(server: _Gateway) -> CollectorRegistry:
    """A registry holding the gateway's collector (and nothing global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        ServerCollector(server.stats, server.registry, getattr(server, "serving", None))
    )
    registry.register(UdpCollector(server.stats.udp))
    policy = getattr(server, "policy", None)
    if policy is not None:
        registry.register(PolicyCollector(policy))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)
