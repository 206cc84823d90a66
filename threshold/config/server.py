"""The server's settings (``server.json``): one table of fields.

Each field is declared once: JSON name, kind with its bounds, default, doc
(docs/configuration.md's table is generated from it). Session settings
come from :data:`threshold.mux.settings.SESSION`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from threshold.config.cluster import CLUSTER, CLUSTER_KIND, ClusterSettings
from threshold.config.egress import EGRESS_POLICY, NO_EGRESS_POLICY, EgressPolicies
from threshold.config.policy import (
    CLIENT_POLICIES,
    CLIENT_POLICY_KIND,
    NO_CLIENT_POLICIES,
    NO_CLIENT_POLICY,
    ClientPolicy,
)
from threshold.config.webhooks import WEBHOOKS, WebhookSettings
from threshold.mux.settings import SESSION
from threshold.schema import (
    BOOLEAN,
    DOMAIN,
    IP_ADDRESS,
    PORT,
    STRING_LIST,
    Bytes,
    Field,
    FilePath,
    Integer,
    Schema,
    SchemaError,
    Seconds,
    field,
    like,
)
from threshold.schema.policy_kinds import CIDR_LIST, EMPTY_CIDRS, CidrList, Rate
from threshold.wire.clienthello import DEFAULT_MAX_SIZE as _CLIENT_HELLO_DEFAULT

__all__ = [
    "CLUSTER",
    "DEBUG_LOG",
    "SERVER",
    "TLS_FILES",
    "ClusterSettings",
    "ServerConfig",
    "check_server",
]

#: ``DebugLog``, the same in both roles' files.
DEBUG_LOG = Field("DebugLog", BOOLEAN, False, "Log at debug level.")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The server's settings (``server.json``)."""

    debug_log: bool = like(DEBUG_LOG)
    tunnel_control_port: int = field(
        "TunnelControlPort", PORT, 9056, doc="Port that tunnel clients connect to."
    )
    listen_address: str = field(
        "ListenAddress",
        IP_ADDRESS,
        "0.0.0.0",
        doc='Address of the tunnel control listener. `"::"` listens on IPv6 (and'
        " IPv4 on dual-stack hosts).",
    )
    management_port: int = field(
        "ManagementPort",
        PORT,
        9057,
        doc="Port of the management API. Must differ from `TunnelControlPort` when"
        " both listen on the same (or an overlapping wildcard) address.",
    )
    management_listen_address: str = field(
        "ManagementListenAddress",
        IP_ADDRESS,
        "0.0.0.0",
        default_doc='`"0.0.0.0"` with TLS, `"127.0.0.1"` without',
        doc="Address of the management API. Without TLS the API has no"
        " authentication, so it only listens on loopback unless you say otherwise.",
    )
    use_tls: bool = field(
        "UseTls",
        BOOLEAN,
        True,
        doc="Mutual TLS on the tunnel control port and HTTPS with client"
        " certificates on the management API. Turn off only for tests or behind"
        " another secure transport.",
    )
    ca_certificate_file: str | None = field(
        "CaCertificateFile",
        FilePath(),
        None,
        default_doc="required with TLS",
        doc="PEM file of the CA (one or more certificates) that signs client"
        " certificates. Only clients with a certificate from this CA can connect.",
    )
    server_tls_key_file: str | None = field(
        "ServerTlsKeyFile",
        FilePath(),
        None,
        default_doc="required with TLS",
        doc="PEM private key of the server (unencrypted; keep it mode 0600).",
    )
    server_tls_certificate_file: str | None = field(
        "ServerTlsCertificateFile",
        FilePath(),
        None,
        default_doc="required with TLS",
        doc="PEM certificate of the server, signed by the CA, with every name and"
        " IP that clients use as `ServerHost` in its subjectAltName. Certificates"
        " after the first are sent as the chain.",
    )
    domain: str | None = field(
        "Domain",
        DOMAIN,
        None,
        nullable=True,
        doc="When set, a client's certificate Common Name must be `ClientId@Domain`"
        " instead of `ClientId`. No spaces or `@`.",
    )
    state_file: str | None = field(
        "StateFile",
        FilePath(folder_must_exist=True),
        None,
        nullable=True,
        doc="File where the server saves the tunnel set in force, so that it can"
        " be restored after a restart. The directory must exist; the file need"
        " not.",
    )
    management_allowed_common_names: tuple[str, ...] | None = field(
        "ManagementAllowedCommonNames",
        STRING_LIST,
        None,
        nullable=True,
        doc="Certificate Common Names allowed to use the management API. `null`:"
        " any certificate from the CA. `[]`: nobody.",
    )
    handshake_timeout_seconds: float = field(
        "HandshakeTimeoutSeconds",
        Seconds(),
        10.0,
        doc="Time a new control connection has to complete TLS and send its hello.",
    )
    # A session may run without keepalive (0, in tests); a gateway's may not.
    keepalive_interval_seconds: float = like(
        SESSION["keepalive_interval"], kind=Seconds()
    )
    keepalive_timeout_seconds: float = like(SESSION["keepalive_timeout"])
    max_streams_per_session: int = like(SESSION["max_streams"])
    max_receive_window_bytes: int = like(SESSION["max_window"])
    sni_read_timeout_seconds: float = field(
        "SniReadTimeoutSeconds",
        Seconds(),
        10.0,
        doc="Time an internet user has to send a TLS ClientHello on a port routed"
        " by host name.",
    )
    max_client_hello_bytes: int = field(
        "MaxClientHelloBytes",
        Bytes(1024, 65536),
        _CLIENT_HELLO_DEFAULT,
        doc="Most bytes read while looking for the SNI name.",
    )
    max_management_body_bytes: int = field(
        "MaxManagementBodyBytes",
        Bytes(1024),
        1024 * 1024,
        doc="Largest management API request body; larger bodies get 413.",
    )
    max_clients: int = field(
        "MaxClients", Integer(1), 1000, doc="Clients connected at once."
    )
    max_pending_handshakes: int = field(
        "MaxPendingHandshakes",
        Integer(1),
        100,
        doc="Control connections that have not yet completed the hello; more are"
        " closed at once. Bounds what unauthenticated peers can hold.",
    )
    max_pending_handshakes_per_source_ip: int = field(
        "MaxPendingHandshakesPerSourceIp",
        Integer(0),
        8,
        doc="Of those, how many one source address may hold (an IPv6 /64 is one"
        " source); more are closed at once. When all are taken, a newcomer takes"
        " the oldest slot of the source holding the most, so silent connections"
        " cannot lock clients out. `0`: no per-source limit.",
    )
    max_pending_management_connections: int = field(
        "MaxPendingManagementConnections",
        Integer(1),
        64,
        doc="Management API connections that have not yet sent a complete request"
        " head (with TLS: not yet authenticated); more are closed at once, or take"
        " the oldest slot of the source holding the most.",
    )
    max_pending_management_connections_per_source_ip: int = field(
        "MaxPendingManagementConnectionsPerSourceIp",
        Integer(0),
        8,
        doc="Of those, how many one source address may hold; more are closed at"
        " once. Not applied on `ManagementSocket`. `0`: no per-source limit.",
    )
    management_request_timeout_seconds: float = field(
        "ManagementRequestTimeoutSeconds",
        Seconds(),
        10.0,
        doc="Time a new management connection has to complete TLS and send its"
        " first request head; then it is closed. Later requests on a kept-open"
        " connection have the 60 s idle timeout.",
    )
    status_sample_interval_seconds: int = field(
        "StatusSampleIntervalSeconds",
        Integer(1, 600),
        10,
        doc="How often the traffic of each tunnel is sampled for the status"
        " page's charts (`GET /status/history`, the last hour; docs/status-page.md).",
    )
    max_connections_per_tunnel: int = field(
        "MaxConnectionsPerTunnel",
        Integer(0),
        10000,
        doc="Concurrent internet-user connections on one tunnel socket"
        " (`ListenAddress`, `ListenPort`); more are closed at once. `0`: no limit.",
    )
    max_connections_per_source_ip: int = field(
        "MaxConnectionsPerSourceIp",
        Integer(0),
        256,
        doc="Concurrent internet-user connections from one source IP address,"
        " across all tunnels; more are closed at once. `0`: no limit.",
    )
    public_idle_timeout_seconds: float = field(
        "PublicIdleTimeoutSeconds",
        Seconds(zero_ok=True),
        0.0,
        doc="Close an internet-user connection after this long with no bytes"
        " either way. `0` (default): never, so quiet long-lived protocols (SSH,"
        " IMAP IDLE) are not cut; the two limits above bound what idle"
        " connections can hold.",
    )
    public_first_byte_timeout_seconds: float = field(
        "PublicFirstByteTimeoutSeconds",
        Seconds(zero_ok=True),
        30.0,
        doc="Close an internet-user connection when no byte has passed either way"
        " this long after it was routed (a byte from the service counts, so SMTP"
        " and SSH, where the server speaks first, are not cut). Stops idle floods"
        " from holding a client's streams. `0`: never.",
    )
    log_connections: bool = field(
        "LogConnections",
        BOOLEAN,
        True,
        doc="One info line per relayed internet-user connection when it ends:"
        " source, tunnel, client, service, bytes each way, duration, closed or"
        " reset. `false` leaves them to the counters and metrics (refusals and"
        " limits are still logged), for about 20 µs less CPU per connection"
        " (docs/performance.md).",
    )
    # UDP tunnels (docs/udp.md).
    udp_flow_idle_seconds: float = field(
        "UdpFlowIdleSeconds",
        Seconds(),
        30.0,
        doc="A UDP flow (one user address on one UDP tunnel) ends after this long"
        " without a datagram either way; its next datagram opens a new one. 30 s"
        " outlasts WireGuard's 25 s keepalive, and frees a DNS query's flow soon"
        " after its answer. A tunnel's own `UdpFlowIdleSeconds` wins.",
    )
    udp_max_flows_per_tunnel: int = field(
        "UdpMaxFlowsPerTunnel",
        Integer(1, 1_000_000),
        4096,
        doc="UDP flows open at once on one UDP tunnel; a datagram that would open"
        " one more is dropped (`limit_udp_flows_tunnel`).",
    )
    udp_max_flows_per_source_ip: int = field(
        "UdpMaxFlowsPerSourceIp",
        Integer(1, 1_000_000),
        64,
        doc="UDP flows one source (an IPv6 /`SourceIpv6PrefixLength`) may have open"
        " at once, across all UDP tunnels; more are dropped"
        " (`limit_udp_flows_source_ip`).",
    )
    udp_max_datagram_bytes: int = field(
        "UdpMaxDatagramBytes",
        Integer(1, 65535),
        65507,
        doc="Largest UDP datagram relayed, either way (65507: the largest over"
        " IPv4); larger ones are dropped and counted (`oversize`).",
    )
    source_ipv6_prefix_length: int = field(
        "SourceIpv6PrefixLength",
        Integer(1, 128),
        64,
        doc="IPv6 source addresses sharing this many leading bits are one source"
        " for the per-source limits (a /64 is one home). IPv4 addresses, also"
        " when seen IPv4-mapped on a dual-stack listener, count one by one.",
    )
    shutdown_grace_seconds: float = field(
        "ShutdownGraceSeconds",
        Seconds(zero_ok=True),
        10.0,
        doc="On stop (SIGTERM), public listeners close first; running connections"
        " then get this long to finish before the sessions are closed.",
    )
    management_socket: str | None = field(
        "ManagementSocket",
        FilePath(folder_must_exist=True),
        None,
        nullable=True,
        doc="Serve the management API on this Unix socket (created mode 0600)"
        " instead of `ManagementPort`: the file's permissions are the access"
        " control, and nothing listens on the network for management.",
    )
    # Access policy and fair use (docs/policy.md).
    default_allow_source_cidrs: CidrList = field(
        "DefaultAllowSourceCidrs",
        CIDR_LIST,
        EMPTY_CIDRS,
        doc="Sources that may reach any tunnel; `[]`: every source. A tunnel's"
        " and its client's lists must allow the source too. See docs/policy.md.",
    )
    default_deny_source_cidrs: CidrList = field(
        "DefaultDenySourceCidrs",
        CIDR_LIST,
        EMPTY_CIDRS,
        doc="Sources refused on every tunnel (deny wins over any allow list).",
    )
    default_new_connection_rate: float = field(
        "DefaultMaxNewConnectionsPerSecondPerSourceIp",
        Rate(1_000_000),
        0.0,
        doc="New connections per second one source may open on one tunnel, for"
        " tunnels whose `MaxNewConnectionsPerSecondPerSourceIp` is `null`. `0`:"
        " no limit.",
    )
    default_new_connection_burst: int = field(
        "DefaultNewConnectionBurst",
        Integer(0, 1_000_000),
        0,
        doc="The burst that goes with it; `0`: one second's worth.",
    )
    rate_limit_max_sources: int = field(
        "RateLimitMaxSources",
        Integer(1024, 10_000_000),
        65536,
        doc="Most (tunnel, source) pairs whose connection rate is tracked at once"
        " (about 150 bytes each); past it, the least recently seen are forgotten."
        " Bounds memory under a flood of many source addresses.",
    )
    client_policies: Mapping[str, ClientPolicy] = field(
        "ClientPolicies",
        CLIENT_POLICIES,
        NO_CLIENT_POLICIES,
        doc='Per client, across all its tunnels: `{"home-a": {"QuotaBytes": ...}}`'
        " (source lists, bandwidth, quota; see docs/policy.md). A client listed"
        " here has only its entry; others have `DefaultClientPolicy`.",
    )
    default_client_policy: ClientPolicy = field(
        "DefaultClientPolicy",
        CLIENT_POLICY_KIND,
        NO_CLIENT_POLICY,
        doc="The policy of every client not in `ClientPolicies`.",
    )
    quota_save_interval_seconds: float = field(
        "QuotaSaveIntervalSeconds",
        Seconds(),
        10.0,
        doc="How often quota usage is written to the `StateFile` (and at stop);"
        " a crash loses at most this much counting.",
    )
    # The event feed: GET /events and webhooks (docs/events.md).
    event_history_size: int = field(
        "EventHistorySize",
        Integer(10, 1_000_000),
        1000,
        doc="Events kept for resuming (`Last-Event-ID`, `?since=`); an older id"
        " gets a `stream.reset` event naming the oldest kept.",
    )
    max_event_subscribers: int = field(
        "MaxEventSubscribers",
        Integer(1, 10_000),
        32,
        doc="`GET /events` streams open at once; more get 503.",
    )
    max_event_backlog: int = field(
        "MaxEventBacklog",
        Integer(10, 1_000_000),
        1000,
        doc="Events one `GET /events` stream may have waiting for a slow reader;"
        " past it the stream ends with a `stream.cut` event.",
    )
    event_keepalive_seconds: float = field(
        "EventKeepaliveSeconds",
        Seconds(),
        15.0,
        doc="A comment line on every idle `GET /events` stream this often, so"
        " proxies and clients notice a dead link.",
    )
    limit_event_interval_seconds: float = field(
        "LimitEventIntervalSeconds",
        Seconds(),
        10.0,
        doc="`limit.hit` events of one limit: the first at once, then at most one"
        " per interval with the count of hits.",
    )
    webhooks: tuple[WebhookSettings, ...] = field(
        "Webhooks",
        WEBHOOKS,
        (),
        doc='Where the events are also POSTed: `[{"Url": ..., "Events":'
        ' ["client.*"], "SecretFile": ...}]` (docs/events.md).',
    )
    cluster: ClusterSettings | None = field(
        "Cluster",
        CLUSTER_KIND,
        None,
        nullable=True,
        doc="Makes this gateway one of a fleet sharing its tunnel set and client"
        " presence through etcd (docs/cluster.md); without it the gateway works"
        " alone.",
    )
    reuse_port: bool | None = field(
        "ReusePort",
        BOOLEAN,
        None,
        nullable=True,
        default_doc="`true` with `Cluster`, else `false`",
        doc="Bind public tunnel sockets with `SO_REUSEPORT`, so gateways on one"
        " machine share each public port (the kernel spreads users over them).",
    )
    # Egress through the gateway (docs/egress.md).
    egress_policy: EgressPolicies = field(
        "EgressPolicy",
        EGRESS_POLICY,
        NO_EGRESS_POLICY,
        doc="Per client, the destinations it may connect out to through this"
        ' gateway (its SOCKS5 proxy): `{"home-a": [{"Cidr": "0.0.0.0/0", "Ports":'
        ' "25,465,587"}]}`. No entry: no egress. Loopback, private and'
        " link-local destinations only by a rule within their range"
        " (docs/egress.md).",
    )
    max_egress_connections_per_client: int = field(
        "MaxEgressConnectionsPerClient",
        Integer(1, 100_000),
        64,
        doc="Egress connections one client may have open (or connecting) at"
        " once; more are refused (`limit`).",
    )
    egress_connect_timeout_seconds: float = field(
        "EgressConnectTimeoutSeconds",
        Seconds(),
        10.0,
        doc="Time for an egress connection's name lookup and connection to its"
        " destination (`timeout` past it).",
    )
    #: Name of the config file, the prefix of error messages (e.g. from tls).
    source: str = "server config"

    @property
    def reuses_port(self) -> bool:
        """``ReusePort`` in force: as given, else true exactly with ``Cluster``."""
        if self.reuse_port is None:
            return self.cluster is not None
        return self.reuse_port


#: The table of :class:`ServerConfig`.
SERVER = Schema(ServerConfig)

#: The files TLS needs (checked for reading when ``UseTls``).
TLS_FILES = (
    "ca_certificate_file",
    "server_tls_key_file",
    "server_tls_certificate_file",
)


def _addresses_overlap(a: str, b: str) -> bool:
    """Tell whether listeners on ``a`` and ``b`` would claim the same port."""
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ia == ib:
        return True
    for x, y in ((ia, ib), (ib, ia)):
        # "::" is dual-stack on most hosts, so it covers IPv4 addresses too.
        if x.is_unspecified and (x.version == 6 or y.version == 4):
            return True
    return False


def check_server(
    values: dict[str, Any], present: set[str], obj: Mapping[str, Any]
) -> None:
    """The rules between fields: the API's default address, distinct ports."""
    if not values["use_tls"] and "management_listen_address" not in present:
        values["management_listen_address"] = "127.0.0.1"
    if values["tunnel_control_port"] == values["management_port"] and (
        _addresses_overlap(
            values["listen_address"], values["management_listen_address"]
        )
    ):
        raise SchemaError(
            'must differ from "TunnelControlPort" on the same address'
            f" (both are {values['management_port']})",
            "ManagementPort",
        )
