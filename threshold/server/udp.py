"""The UDP front end: one socket per UDP tunnel, one flow per user address.

A tunnel entry with ``"Protocol": "udp"`` makes the route table open a UDP
socket on its address and port (:meth:`UdpFrontends.listen`), beside any
TCP listener on the same port. Each user address (ip, port) is a flow
(:mod:`threshold.server.udpflow`): the first datagram from an address
opens one stream on a serving client's session, chosen as for TCP (its
``Balance`` among its healthy clients), after the same checks:

1. the flow caps (``UdpMaxFlowsPerTunnel``, ``UdpMaxFlowsPerSourceIp``,
   sources counted as the TCP caps count them, across UDP tunnels);
2. the access policy (source lists, quota, new-flow rate as the
   new-connection rate: :meth:`~threshold.server.policy.GatewayPolicy.check`);
3. a client whose session can open a stream.

A refused flow's datagram is dropped and counted (the refusal by reason,
the datagram as ``flow_refused``); the next datagram from that address is
checked again. The stream starts with the UDP header line, the PROXY v2
DGRAM header when the tunnel asks for one, then the first datagram, all
in one write (no round trip). Datagrams over ``UdpMaxDatagramBytes`` are
dropped (``oversize``) before anything else. Refusals are logged at most
once a minute per tunnel and reason.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import (
    CannotListenError,
    InvalidAddressError,
    MessageLengthError,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from threshold.logs import observer as log_observer
from threshold.mux.session import SessionClosed, StreamLimitReached
from threshold.server.addresses import DEFAULT_IPV6_PREFIX, source_key
from threshold.server.policy import HitLog
from threshold.server.serving import describe
from threshold.server.stats import Limit, Refusal, UdpDrop, UdpFlowEnd
from threshold.server.udpflow import UdpFlow
from threshold.wire import datagram
from threshold.wire.handshake import PROTO_UDP, encode_stream_header

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUDP

    from threshold.server.frontend import TunnelClients
    from threshold.server.policy import GatewayPolicy
    from threshold.server.routes import RouteTable
    from threshold.server.stats import GatewayStats
    from threshold.server.tunnels import GroupKey, Tunnel, TunnelKey

__all__ = ["UdpFrontend", "UdpFrontends", "UdpLimits"]

log = Logger(observer=log_observer)


#: Kernel buffer asked for a tunnel's socket, each way (capped by the host's
#: net.core.rmem_max/wmem_max): one socket takes every user's datagrams, and
#: the default (about 200 KiB) drops bursts of a few hundred.
SOCKET_BUFFER = 4 * 1024 * 1024


@dataclass(frozen=True)
class UdpLimits:
    """The server config's UDP bounds (docs/udp.md)."""

    idle: float = 30.0
    max_per_tunnel: int = 4096
    max_per_source: int = 64
    max_datagram: int = 65507
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    #: One info line per ended flow (``LogConnections``).
    log_flows: bool = True
    #: Bind with ``SO_REUSEPORT`` (``ReusePort``): gateways on one host share
    #: the port; the kernel keeps each user address on one of them.
    reuse_port: bool = False

    @classmethod
    def from_config(cls, config: Any) -> UdpLimits:
        """The limits of a :class:`~threshold.config.ServerConfig`."""
        return cls(
            idle=config.udp_flow_idle_seconds,
            max_per_tunnel=config.udp_max_flows_per_tunnel,
            max_per_source=config.udp_max_flows_per_source_ip,
            max_datagram=config.udp_max_datagram_bytes,
            ipv6_prefix=config.source_ipv6_prefix_length,
            log_flows=config.log_connections,
            reuse_port=config.reuses_port,
        )


class UdpFrontends:
    """Every UDP socket of one gateway, and the flow counts they share.

    ``reactor`` opens the sockets (``listenUDP``); ``routes`` says which
    tunnel is in force on each; ``clients`` chooses a tunnel's client;
    ``policy`` is the gateway's access policy (None: every flow passes).
    """

    def __init__(
        self,
        reactor: IReactorUDP | None,
        clock: IReactorTime,
        routes: RouteTable | None,
        clients: TunnelClients,
        stats: GatewayStats,
        limits: UdpLimits = UdpLimits(),
        policy: GatewayPolicy | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock
        self.routes = routes
        self.clients = clients
        self.stats = stats
        self.limits = limits
        self.policy = policy
        self.hits = HitLog(clock)
        self.frontends: dict[GroupKey, UdpFrontend] = {}
        self._per_tunnel: Counter[TunnelKey] = Counter()
        self._per_source: Counter[str] = Counter()

    def listen(self, host: str, port: int, key: GroupKey) -> IListeningPort:
        """Open the UDP socket of (host, port): the route table's ``listen_udp``."""
        assert self.reactor is not None
        frontend = UdpFrontend(self, key)
        # One byte more than the largest datagram relayed: a read that fills
        # it was cut by the kernel, so the datagram was oversize.
        size = self.limits.max_datagram + 1
        if self.limits.reuse_port:
            listening = _reuseport_udp(self.reactor, host, port, frontend, size)
        else:
            listening = self.reactor.listenUDP(
                port, frontend, interface=host, maxPacketSize=size
            )
        datagram.set_buffers(listening, SOCKET_BUFFER)
        self.frontends[key] = frontend
        return listening

    def tunnel(self, key: GroupKey) -> Tunnel | None:
        """The UDP tunnel in force on ``key``."""
        return self.routes.udp_tunnel(key) if self.routes is not None else None

    # -- flow counts --------------------------------------------------------

    def admit(self, tunnel: Tunnel, source: str) -> tuple[Refusal, Limit] | None:
        """Count a new flow of ``tunnel`` from ``source``, or say which cap is hit."""
        limits = self.limits
        if self._per_tunnel[tunnel.key] >= limits.max_per_tunnel:
            return Refusal.LIMIT_UDP_FLOWS_TUNNEL, Limit.UDP_FLOWS_PER_TUNNEL
        if self._per_source[source] >= limits.max_per_source:
            return Refusal.LIMIT_UDP_FLOWS_SOURCE_IP, Limit.UDP_FLOWS_PER_SOURCE_IP
        self._per_tunnel[tunnel.key] += 1
        self._per_source[source] += 1
        return None

    def release(self, tunnel: Tunnel, source: str) -> None:
        """A flow of ``tunnel`` from ``source`` ended."""
        for counter, key in (
            (self._per_tunnel, tunnel.key),
            (self._per_source, source),
        ):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def source_flows(self, source: str) -> int:
        """Flows ``source`` (a source key) holds now."""
        return self._per_source[source]


class UdpFrontend(DatagramProtocol):
    """The UDP socket of one tunnel: its flows, by user address."""

    def __init__(self, owner: UdpFrontends, key: GroupKey) -> None:
        self.owner = owner
        self.key = key
        self.clock = owner.clock
        self.stats = owner.stats
        self.max_datagram = owner.limits.max_datagram
        self.log_flows = owner.limits.log_flows
        self.flows: dict[tuple[str, int], UdpFlow] = {}

    def startProtocol(self) -> None:  # noqa: N802
        """The socket is open."""
        self.stats.listening_sockets += 1

    def stopProtocol(self) -> None:  # noqa: N802
        """The socket is closed (tunnel removed, gateway stopping): end its flows."""
        self.stats.listening_sockets -= 1
        for flow in list(self.flows.values()):
            flow.end(UdpFlowEnd.CLOSED)
        if self.owner.frontends.get(self.key) is self:
            del self.owner.frontends[self.key]

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:  # noqa: N802
        """A user's datagram: to its flow, or open one."""
        if len(data) > self.max_datagram:
            self.stats.udp.dropped[UdpDrop.OVERSIZE] += 1
            return
        address = (addr[0], addr[1])
        flow = self.flows.get(address)
        if flow is not None:
            flow.send(data)
            return
        self._open(data, address)

    def send_to_user(self, data: bytes, address: tuple[str, int]) -> bool:
        """Send one datagram from the tunnel's socket; False if it failed."""
        try:
            self.transport.write(data, address)
        except (OSError, MessageLengthError, InvalidAddressError) as e:
            log.debug("UDP send to {address} failed: {why}", address=address, why=e)
            return False
        return True

    def flow_ended(self, flow: UdpFlow) -> None:
        """Forget an ended flow and give its slots back."""
        if self.flows.get(flow.address) is flow:
            del self.flows[flow.address]
        self.owner.release(flow.tunnel, flow.source)
        self.stats.udp.flows_open -= 1
        self.stats.flow_closed(flow.flow)

    # -- opening a flow -----------------------------------------------------

    def _open(self, data: bytes, address: tuple[str, int]) -> None:
        owner = self.owner
        tunnel = owner.tunnel(self.key)
        if tunnel is None:
            self._refuse(Refusal.NO_ROUTE, None, "no UDP tunnel on this address")
            return
        source = source_key(address[0], owner.limits.ipv6_prefix)
        capped = owner.admit(tunnel, source)
        if capped is not None:
            reason, limit = capped
            self.stats.limit_hit(limit)
            self._refuse(reason, tunnel, f"source {source}: {reason.value}")
            return
        try:
            flow = self._start(tunnel, data, address, source)
        except BaseException:
            owner.release(tunnel, source)
            raise
        if flow is None:
            owner.release(tunnel, source)

    def _start(
        self, tunnel: Tunnel, data: bytes, address: tuple[str, int], source: str
    ) -> UdpFlow | None:
        owner = self.owner
        candidates = owner.clients.candidates(tunnel)
        peer = _address(address)
        if owner.policy is not None:
            # Counted and logged by the policy when refused.
            if owner.policy.check(peer, tunnel, candidates) is not None:
                self.stats.udp.dropped[UdpDrop.FLOW_REFUSED] += 1
                return None
        if not candidates:
            self._refuse(
                Refusal.NO_HEALTHY_CLIENT, tunnel, f"no healthy client ({source})"
            )
            return None
        opening = [
            encode_stream_header(
                tunnel.backend_service, PROTO_UDP, proxy_v2=tunnel.proxy_protocol
            )
        ]
        if tunnel.proxy_protocol:
            host = self.transport.getHost()
            opening.append(
                datagram.encode(
                    datagram.build_proxy_v2_dgram(
                        address, (tunnel.listen_address, host.port)
                    )
                )
            )
        opening.append(datagram.encode(data))
        why = ""
        for client_id in candidates:
            session = owner.clients.session_for(client_id)
            if session is None:
                continue
            idle = tunnel.udp_flow_idle_seconds or owner.limits.idle
            flow = UdpFlow(self, tunnel, address, source, idle, self.transport)
            try:
                session.open_stream(flow.peer)
            except StreamLimitReached as e:
                self.stats.limit_hit(Limit.STREAMS_PER_SESSION)
                why = str(e)
                continue
            except SessionClosed as e:
                why = str(e)
                continue
            break
        else:
            self._refuse(
                Refusal.NO_HEALTHY_CLIENT,
                tunnel,
                f"no client of {describe(tunnel)} could open a stream: {why}",
            )
            return None
        self.flows[address] = flow
        flow.opened(self.stats.flow_opened(tunnel.key, client_id), len(data))
        udp = self.stats.udp
        udp.flows_open += 1
        udp.flows_opened += 1
        udp.datagrams_in += 1
        # Header, PROXY header and the first datagram in one Data frame.
        flow.stream.write(b"".join(opening))
        if owner.policy is not None:
            flow.meter = owner.policy.meter(flow, tunnel)  # type: ignore[arg-type]
        log.debug(
            "UDP flow {user} on {group} -> client {client} service {service}"
            " (stream {stream_id})",
            user=flow.user_text(),
            group=flow.tunnel_text(),
            client=client_id,
            service=tunnel.backend_service,
            stream_id=flow.stream.id,
        )
        return flow

    def _refuse(self, reason: Refusal, tunnel: Tunnel | None, why: str) -> None:
        self.stats.refuse(reason)
        self.stats.udp.dropped[UdpDrop.FLOW_REFUSED] += 1
        host, port = self.key
        self.owner.hits.hit(f"UDP tunnel {host}:{port}", reason.value, why)


def _reuseport_udp(
    reactor: Any, host: str, port: int, protocol: DatagramProtocol, size: int
) -> IListeningPort:
    """A UDP socket bound with SO_REUSEPORT, adopted by the reactor.

    ``listenUDP`` has no option for it (as ``listenTCP``: server/reuseport.py).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        # adoptDatagramPort duplicates the descriptor: ours is closed below.
        adopted: IListeningPort = reactor.adoptDatagramPort(
            sock.fileno(), family, protocol, maxPacketSize=size
        )
    except OSError as e:
        raise CannotListenError(host, port, e) from None
    finally:
        sock.close()
    return adopted


def _address(address: tuple[str, int]) -> IPv4Address | IPv6Address:
    host, port = address
    if ":" in host:
        return IPv6Address("UDP", host, port)
    return IPv4Address("UDP", host, port)
