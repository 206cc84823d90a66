"""Prometheus metrics of the server, read from its state at scrape time.

Nothing is counted twice: the front end, the registry and the sessions keep
plain counters as they work (an attribute increment per relayed chunk), and
this collector turns them into metric families when ``GET /metrics`` is
scraped. So the hot path pays nothing for metrics, and the figures are
exactly the state the API shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from threshold.server.service import (
    STATE_CLOSED,
    STATE_CONNECTED,
    STATE_ERROR,
    STATE_UNKNOWN,
)

if TYPE_CHECKING:
    from threshold.server.frontend import Traffic
    from threshold.server.service import TunnelServer

#: The text format's content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_STATES = (STATE_UNKNOWN, STATE_CONNECTED, STATE_CLOSED, STATE_ERROR)


class ServerCollector(Collector):
    """Everything an operator bills, alerts and plans on."""

    def __init__(self, server: TunnelServer) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Build the metric families from the server's current state."""
        server = self.server
        stats = server.stats
        records = server.registry.records()

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
            len(server.routes.tunnels()),
        )
        yield _one(
            GaugeMetricFamily,
            "threshold_listening_sockets",
            "Public sockets open (tunnel groups).",
            len(server.routes.groups()),
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
            "Internet-user connections closed without being relayed, by reason.",
            labels=["reason"],
        )
        refused.add_metric(["no_route"], stats.refused_no_route)
        refused.add_metric(["client_not_connected"], stats.refused_no_client)
        refused.add_metric(["sni_timeout"], stats.sni_timeouts)
        for which, count in sorted(stats.refused_limit.items()):
            refused.add_metric([f"limit_{which}"], count)
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
        for reason in ("bad_hello", "identity", "server_full", "timeout", "closed"):
            handshakes.add_metric(
                [reason], server.handshake_failure_reasons.get(reason, 0)
            )
        yield handshakes

        limits = CounterMetricFamily(
            "threshold_limits_hit", "Times each limit was hit.", labels=["limit"]
        )
        for name, count in sorted(server.limits_hit.items()):
            limits.add_metric([name], count)
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


def server_registry(server: TunnelServer) -> CollectorRegistry:
    """A registry holding the server's collector (and nothing global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)
