"""The gateway's counters, in one object, updated at the event.

One :class:`GatewayStats` per gateway. The front end, the control listener,
the management API and the state-file restore report what happens to it
(a connection accepted, a refusal and its reason, a limit hit, a handshake
failure); the API, the per-connection log line and the Prometheus collector
read it. Reasons are the enums below, whose values are the metric labels.

Bytes are counted once: each relayed connection has a :class:`Flow` whose
``bytes_in``/``bytes_out`` the front end adds each chunk to (one increment,
the only one on the hot path). Per-tunnel and per-client figures are the
totals of closed flows plus the open flows' counts, summed when read, so a
long transfer shows in ``/metrics`` while it runs. A flow retried on
another client (:mod:`threshold.server.retry`) moves to it: it counts as
accepted by both clients, open on and its bytes for the second.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from threshold.server.tunnels import TunnelKey
from threshold.wire.egress import EgressRefusal

__all__ = [
    "Flow",
    "GatewayStats",
    "HandshakeFailure",
    "Limit",
    "Refusal",
    "TunnelKey",
    "Traffic",
    "UdpDrop",
    "UdpFlowEnd",
    "UdpStats",
]

_K = TypeVar("_K")


class Refusal(StrEnum):
    """Why the gateway closed an internet user's connection.

    The values are the ``reason`` label of
    ``threshold_public_connections_refused``. All but the ``limit_idle`` and
    ``limit_first_byte`` ones end a connection before it is relayed.
    """

    #: No tunnel of the group matches the SNI name (or the group is gone).
    NO_ROUTE = "no_route"
    #: No client of the tunnel is healthy (connected, not going away, its
    #: service not reported unhealthy), or none of the healthy ones could
    #: open a stream (session closing, or full). Was ``client_not_connected``.
    NO_HEALTHY_CLIENT = "no_healthy_client"
    #: The tunnel cannot be served (its opening cannot be built) or relaying
    #: into the stream failed; the stream, if opened, is reset.
    TUNNEL_ERROR = "tunnel_error"
    #: No complete ClientHello within SniReadTimeoutSeconds.
    SNI_TIMEOUT = "sni_timeout"
    #: MaxConnectionsPerTunnel reached.
    LIMIT_TUNNEL = "limit_tunnel"
    #: MaxConnectionsPerSourceIp reached.
    LIMIT_SOURCE_IP = "limit_source_ip"
    #: A relayed connection idle for PublicIdleTimeoutSeconds.
    LIMIT_IDLE = "limit_idle"
    #: A relayed connection with no byte either way for
    #: PublicFirstByteTimeoutSeconds.
    LIMIT_FIRST_BYTE = "limit_first_byte"
    #: The source is in a DenySourceCidrs list (gateway, client or tunnel).
    DENIED_SOURCE = "denied_source"
    #: The source is not in a non-empty AllowSourceCidrs list.
    NOT_ALLOWED_SOURCE = "not_allowed_source"
    #: MaxNewConnectionsPerSecondPerSourceIp reached for this tunnel.
    RATE_LIMITED = "rate_limited"
    #: The client is over its QuotaBytes for the period.
    QUOTA_EXCEEDED = "quota_exceeded"
    #: A relayed connection cut: its client went over quota (action "cut").
    QUOTA_CUT = "quota_cut"
    #: UdpMaxFlowsPerTunnel reached: a new UDP flow's datagram dropped.
    LIMIT_UDP_FLOWS_TUNNEL = "limit_udp_flows_tunnel"
    #: UdpMaxFlowsPerSourceIp reached: a new UDP flow's datagram dropped.
    LIMIT_UDP_FLOWS_SOURCE_IP = "limit_udp_flows_source_ip"


class Limit(StrEnum):
    """Limits whose hits are counted (label of ``threshold_limits_hit``)."""

    CONNECTIONS_PER_TUNNEL = "connections_per_tunnel"
    CONNECTIONS_PER_SOURCE_IP = "connections_per_source_ip"
    STREAMS_PER_SESSION = "streams_per_session"
    PENDING_HANDSHAKES = "pending_handshakes"
    PENDING_HANDSHAKES_PER_SOURCE = "pending_handshakes_per_source"
    MANAGEMENT_BODY = "management_body"
    #: MaxPendingManagementConnections(PerSourceIp): connections without a
    #: complete first request; and ManagementRequestTimeoutSeconds.
    PENDING_MANAGEMENT = "pending_management_connections"
    PENDING_MANAGEMENT_PER_SOURCE = "pending_management_connections_per_source"
    MANAGEMENT_REQUEST_TIMEOUT = "management_request_timeout"
    #: A ClientHello over MaxClientHelloBytes, or over the record/read bound.
    CLIENT_HELLO = "client_hello"
    #: MaxNewConnectionsPerSecondPerSourceIp (each refusal).
    NEW_CONNECTION_RATE = "new_connection_rate"
    #: A client's QuotaBytes reached (once per crossing).
    QUOTA = "quota"
    #: A bandwidth bucket started holding a direction back.
    BANDWIDTH = "bandwidth"
    UDP_FLOWS_PER_TUNNEL = "udp_flows_per_tunnel"
    UDP_FLOWS_PER_SOURCE_IP = "udp_flows_per_source_ip"


class HandshakeFailure(StrEnum):
    """Why a tunnel client's hello was refused (``threshold_handshake_failures``)."""

    BAD_HELLO = "bad_hello"
    IDENTITY = "identity"
    SERVER_FULL = "server_full"
    TIMEOUT = "timeout"
    CLOSED = "closed"


class UdpDrop(StrEnum):
    """Why a UDP datagram was dropped (``threshold_udp_datagrams_dropped``)."""

    #: Over UdpMaxDatagramBytes (from a user, or framed by the client).
    OVERSIZE = "oversize"
    #: The flow's stream had no room (its window full): UDP drops, never buffers.
    WINDOW_FULL = "window_full"
    #: Its flow could not be opened (the refusal is counted by reason).
    FLOW_REFUSED = "flow_refused"
    #: The gateway could not send it to the user (socket error).
    SEND_FAILED = "send_failed"


class UdpFlowEnd(StrEnum):
    """Why a UDP flow ended (``threshold_udp_flows_ended``)."""

    #: No datagram either way for UdpFlowIdleSeconds.
    IDLE = "idle"
    #: The client ended the stream: unknown service, its local socket failed,
    #: or the client (its session) went away.
    STREAM_ENDED = "stream_ended"
    #: The client's framing was malformed (the stream is reset) or cut short.
    MALFORMED = "malformed"
    #: The tunnel was removed or the gateway is stopping.
    CLOSED = "closed"
    #: Its client went over quota (action "cut").
    QUOTA_CUT = "quota_cut"


class UdpStats:
    """The UDP front end's counters (flows and datagrams, all UDP tunnels).

    Bytes are counted per tunnel and client on each flow's :class:`Flow`,
    as for TCP connections.
    """

    def __init__(self) -> None:
        #: Flows open now.
        self.flows_open = 0
        #: Flows opened since start.
        self.flows_opened = 0
        #: Datagrams relayed from users to services.
        self.datagrams_in = 0
        #: Datagrams relayed from services to users.
        self.datagrams_out = 0
        self.dropped: Counter[UdpDrop] = Counter()
        self.flows_ended: Counter[UdpFlowEnd] = Counter()


@dataclass(slots=True)
class Traffic:
    """Connections and bytes of one tunnel or one client (a snapshot)."""

    accepted: int = 0
    open: int = 0
    #: Bytes from internet users to the service.
    bytes_in: int = 0
    #: Bytes from the service to internet users.
    bytes_out: int = 0


class Flow:
    """One relayed user connection's byte counts (the only per-chunk counter)."""

    __slots__ = ("tunnel", "client_id", "bytes_in", "bytes_out")

    def __init__(self, tunnel: TunnelKey, client_id: str) -> None:
        self.tunnel = tunnel
        self.client_id = client_id
        #: Bytes from the user to the service.
        self.bytes_in = 0
        #: Bytes from the service to the user.
        self.bytes_out = 0


class EgressFlow:
    """One egress connection's byte counts (``FlowMeter`` reads the same names)."""

    __slots__ = ("client_id", "bytes_in", "bytes_out")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        #: Bytes from the destination to the client.
        self.bytes_in = 0
        #: Bytes from the client to the destination.
        self.bytes_out = 0


@dataclass(slots=True)
class EgressTraffic:
    """One client's egress (docs/egress.md): requests, connections, bytes."""

    #: Egress requests read (each odd stream with a request line).
    requests: int = 0
    #: Connections made to a destination.
    connected: int = 0
    #: Egress streams open now (connecting or relaying).
    open: int = 0
    #: Bytes from the client to destinations.
    bytes_sent: int = 0
    #: Bytes from destinations to the client.
    bytes_received: int = 0
    refused: Counter[EgressRefusal] = field(default_factory=Counter)


class EgressStats:
    """Per-client egress counters; open flows' bytes are summed when read."""

    def __init__(self) -> None:
        self._clients: dict[str, EgressTraffic] = {}
        self._open_flows: set[EgressFlow] = set()

    def _client(self, client_id: str) -> EgressTraffic:
        traffic = self._clients.get(client_id)
        if traffic is None:
            traffic = self._clients[client_id] = EgressTraffic()
        return traffic

    def started(self, client_id: str) -> None:
        """An egress stream opened (it counts against the client's maximum)."""
        traffic = self._client(client_id)
        traffic.requests += 1
        traffic.open += 1

    def open_count(self, client_id: str) -> int:
        """Egress streams of the client open now."""
        traffic = self._clients.get(client_id)
        return traffic.open if traffic is not None else 0

    def refused(self, client_id: str, reason: EgressRefusal) -> None:
        """An egress request refused (or its connection failed), for ``reason``."""
        self._client(client_id).refused[reason] += 1

    def connected(self, client_id: str) -> EgressFlow:
        """A connection to the destination is up: its bytes count from now."""
        self._client(client_id).connected += 1
        flow = EgressFlow(client_id)
        self._open_flows.add(flow)
        return flow

    def ended(self, client_id: str, flow: EgressFlow | None) -> None:
        """An egress stream ended; its bytes join the closed totals."""
        traffic = self._client(client_id)
        traffic.open -= 1
        if flow is not None and flow in self._open_flows:
            self._open_flows.discard(flow)
            traffic.bytes_sent += flow.bytes_out
            traffic.bytes_received += flow.bytes_in

    def view(self, client_id: str) -> dict[str, object]:
        """The client's egress in ``GET /clients`` (``Egress``)."""
        traffic = self.clients.get(client_id) or EgressTraffic()
        return {
            "Requests": traffic.requests,
            "Connections": traffic.connected,
            "Open": traffic.open,
            "SentBytes": traffic.bytes_sent,
            "ReceivedBytes": traffic.bytes_received,
            "Refused": {r.value: traffic.refused[r] for r in EgressRefusal},
        }

    @property
    def clients(self) -> dict[str, EgressTraffic]:
        """Per-client egress, open connections' bytes included (a snapshot)."""
        out = {
            k: EgressTraffic(
                t.requests,
                t.connected,
                t.open,
                t.bytes_sent,
                t.bytes_received,
                Counter(t.refused),
            )
            for k, t in self._clients.items()
        }
        for flow in self._open_flows:
            out[flow.client_id].bytes_sent += flow.bytes_out
            out[flow.client_id].bytes_received += flow.bytes_in
        return out


class GatewayStats:
    """Every counter of the gateway role.

    Written by: the front end (``accepted``, ``open``, flows, refusals,
    ``sni_not_tls``, ``listening_sockets``), everyone who enforces a limit
    (:meth:`limit_hit`), the control listener (:meth:`handshake_failed`),
    the route table's owner (``tunnels_in_force``) and the restore
    (``restore_failures``). Read by the API, logs and metrics.
    """

    def __init__(self) -> None:
        #: Public connections accepted on any tunnel socket.
        self.accepted = 0
        #: Public connections open now (admitted, not yet closed).
        self.open = 0
        #: Connections on hostname-routed sockets that sent no ClientHello.
        self.sni_not_tls = 0
        #: Tunnel sockets listening now.
        self.listening_sockets = 0
        #: Entries of the tunnel table in force.
        self.tunnels_in_force = 0
        #: Entries of the state file that could not be restored, until the
        #: tunnel set changes.
        self.restore_failures = 0
        self.refused: Counter[Refusal] = Counter()
        self.limits_hit: Counter[Limit] = Counter()
        self.handshake_failures: Counter[HandshakeFailure] = Counter()
        #: Times a failover tunnel's serving client stopped being healthy
        #: (see threshold.server.serving).
        self.failovers: Counter[TunnelKey] = Counter()
        #: Connections reset by a client before any byte came back, retried
        #: on another client.
        self.retries: Counter[TunnelKey] = Counter()
        #: Retried connections whose second stream was reset too.
        self.retry_failures: Counter[TunnelKey] = Counter()
        #: Access-policy refusals by (tunnel, client, reason): see policy.py.
        self.policy_refused: Counter[tuple[TunnelKey, str, Refusal]] = Counter()
        #: Told each limit hit and whose it was (the event feed's digest).
        self.on_limit: Callable[[Limit, dict[str, object]], None] | None = None
        #: UDP flows and datagrams (docs/udp.md).
        self.udp = UdpStats()
        #: Egress through the gateway, per client (docs/egress.md).
        self.egress = EgressStats()
        self._open_flows: set[Flow] = set()
        self._tunnels: dict[TunnelKey, Traffic] = {}
        self._clients: dict[str, Traffic] = {}
        #: Open flows per tunnel and client (least-connections reads it).
        self._open_by_client: dict[TunnelKey, Counter[str]] = {}

    # Events

    def refuse(self, reason: Refusal) -> None:
        """The gateway closed a user connection, for ``reason``."""
        self.refused[reason] += 1

    def refuse_by_policy(
        self, reason: Refusal, tunnel: TunnelKey, client_id: str
    ) -> None:
        """The access policy closed a user connection of a tunnel and client."""
        self.refused[reason] += 1
        self.policy_refused[(tunnel, client_id, reason)] += 1

    def limit_hit(self, limit: Limit, **where: object) -> None:
        """A limit was hit once; ``where`` says whose (tunnel, client, source)
        for the event feed, which hears of it through ``on_limit``."""
        self.limits_hit[limit] += 1
        if self.on_limit is not None:
            self.on_limit(limit, where)

    def handshake_failed(self, reason: HandshakeFailure) -> None:
        """A tunnel client's handshake was refused."""
        self.handshake_failures[reason] += 1

    def flow_opened(self, tunnel: TunnelKey, client_id: str) -> Flow:
        """A user connection starts being relayed on a tunnel to a client."""
        flow = Flow(tunnel, client_id)
        self._open_flows.add(flow)
        for traffic in (self._tunnel(tunnel), self._client(client_id)):
            traffic.accepted += 1
            traffic.open += 1
        self._open_by_client.setdefault(tunnel, Counter())[client_id] += 1
        return flow

    def flow_moved(self, flow: Flow, client_id: str) -> None:
        """An open flow was retried on another client: it is that client's now."""
        if flow not in self._open_flows or flow.client_id == client_id:
            return
        old = self._client(flow.client_id)
        old.open -= 1
        new = self._client(client_id)
        new.accepted += 1
        new.open += 1
        self._drop_open(flow)
        flow.client_id = client_id
        self._open_by_client.setdefault(flow.tunnel, Counter())[client_id] += 1

    def open_per_client(self, tunnel: TunnelKey) -> Counter[str]:
        """The tunnel's open connections per client (a live view: do not change)."""
        return self._open_by_client.get(tunnel) or Counter()

    def _drop_open(self, flow: Flow) -> None:
        counts = self._open_by_client.get(flow.tunnel)
        if counts is None:
            return
        counts[flow.client_id] -= 1
        if counts[flow.client_id] <= 0:
            del counts[flow.client_id]
        if not counts:
            del self._open_by_client[flow.tunnel]

    def flow_closed(self, flow: Flow) -> None:
        """A relayed connection ended: its bytes join the closed totals."""
        if flow not in self._open_flows:
            return
        self._open_flows.discard(flow)
        self._drop_open(flow)
        for traffic in (self._tunnel(flow.tunnel), self._client(flow.client_id)):
            traffic.open -= 1
            traffic.bytes_in += flow.bytes_in
            traffic.bytes_out += flow.bytes_out

    # Reading

    @property
    def handshake_failure_count(self) -> int:
        """Tunnel-client handshakes refused, all reasons."""
        return sum(self.handshake_failures.values())

    @property
    def tunnels(self) -> dict[TunnelKey, Traffic]:
        """Per-tunnel traffic, open connections' bytes included (a snapshot)."""
        return self._snapshot(self._tunnels, lambda flow: flow.tunnel)

    @property
    def clients(self) -> dict[str, Traffic]:
        """Per-client traffic, open connections' bytes included (a snapshot)."""
        return self._snapshot(self._clients, lambda flow: flow.client_id)

    def _snapshot(
        self, closed: dict[_K, Traffic], key: Callable[[Flow], _K]
    ) -> dict[_K, Traffic]:
        out = {
            k: Traffic(t.accepted, t.open, t.bytes_in, t.bytes_out)
            for k, t in closed.items()
        }
        for flow in self._open_flows:
            traffic = out[key(flow)]
            traffic.bytes_in += flow.bytes_in
            traffic.bytes_out += flow.bytes_out
        return out

    def _tunnel(self, key: TunnelKey) -> Traffic:
        traffic = self._tunnels.get(key)
        if traffic is None:
            traffic = self._tunnels[key] = Traffic()
        return traffic

    def _client(self, client_id: str) -> Traffic:
        traffic = self._clients.get(client_id)
        if traffic is None:
            traffic = self._clients[client_id] = Traffic()
        return traffic
