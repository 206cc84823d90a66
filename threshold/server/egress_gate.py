"""The gateway's egress gate: the policy in force, lookups, connections out.

:class:`EgressGate` serves the odd streams clients open after the hello
(:class:`~threshold.server.egress.EgressStream` does the talking): it
says whether a client may connect out now, looks names up
(:func:`getaddrinfo_resolver`: the system's resolver in a thread),
connects to IP addresses only, and charges the client's quota and
bandwidth buckets (docs/egress.md).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from threshold.config.egress import NO_EGRESS_POLICY, ClientEgress
from threshold.logs import observer as log_observer
from threshold.server.egress import EgressStream
from threshold.server.shaping import Direction, FlowMeter
from threshold.wire.egress import EgressRefusal

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTCP, IReactorTime

    from threshold.relay import RelayEnd
    from threshold.server.policy import GatewayPolicy
    from threshold.server.stats import GatewayStats

__all__ = ["EgressGate", "EgressSettings", "Resolver", "getaddrinfo_resolver"]

log = Logger(observer=log_observer)

#: ``resolve(host, port)``: the IP addresses of a name, in the order to try.
Resolver = Callable[[str, int], "Deferred[list[str]]"]


def _addresses(infos: list[Any]) -> list[str]:
    seen: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            host = sockaddr[0].split("%", 1)[0]
            if host not in seen:
                seen.append(host)
    return seen


def getaddrinfo_resolver(host: str, port: int) -> Deferred[list[str]]:
    """The addresses of ``host`` from the system's resolver, in a thread."""
    d = deferToThread(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    d.addCallback(_addresses)
    return d


@dataclass(frozen=True)
class EgressSettings:
    """What the gate needs from the server config."""

    #: ``EgressPolicy``: ClientId -> its rules; empty: egress is off.
    policies: Mapping[str, ClientEgress] = field(
        default_factory=lambda: NO_EGRESS_POLICY
    )
    max_per_client: int = 64
    connect_timeout: float = 10.0

    @classmethod
    def from_config(cls, config: Any) -> EgressSettings:
        """The settings of a :class:`~threshold.config.ServerConfig`."""
        return cls(
            policies=config.egress_policy,
            max_per_client=config.max_egress_connections_per_client,
            connect_timeout=config.egress_connect_timeout_seconds,
        )


class _OneShot(Factory):
    noisy = False

    def __init__(self, protocol: RelayEnd) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> RelayEnd:  # noqa: N802
        return self._protocol


class EgressGate:
    """The gateway's egress: the policy in force, connections, counters.

    ``reactor`` connects out (and is the clock); ``resolve`` looks names
    up (:func:`getaddrinfo_resolver` by default); ``policy`` holds the
    clients' quota accounts and bandwidth buckets.
    """

    def __init__(
        self,
        settings: EgressSettings,
        reactor: Any,
        stats: GatewayStats,
        policy: GatewayPolicy | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.reactor: IReactorTCP = reactor
        self.clock: IReactorTime = reactor
        self.stats = stats
        self.policy = policy
        self.resolve: Resolver = resolve or getaddrinfo_resolver
        self._logged: dict[tuple[str, EgressRefusal], float] = {}

    def stream(self, client_id: str) -> EgressStream:
        """The protocol of an odd stream the client opened."""
        return EgressStream(self, client_id)

    @property
    def connect_timeout(self) -> float:
        """``EgressConnectTimeoutSeconds``: the lookup and the connection."""
        return self.settings.connect_timeout

    def rules(self, client_id: str) -> ClientEgress:
        """The client's ``EgressPolicy`` entry."""
        return self.settings.policies[client_id]

    def admit(self, client_id: str) -> tuple[EgressRefusal, str] | None:
        """Whether the client may connect out now (before looking at where)."""
        settings = self.settings
        if not settings.policies:
            return EgressRefusal.DISABLED, "egress is not enabled on this gateway"
        if client_id not in settings.policies:
            return (
                EgressRefusal.NO_POLICY,
                f"client {client_id} has no EgressPolicy entry",
            )
        # This stream is counted already.
        if self.stats.egress.open_count(client_id) > settings.max_per_client:
            return (
                EgressRefusal.LIMIT,
                f"{settings.max_per_client} egress connections open"
                " (MaxEgressConnectionsPerClient)",
            )
        if self.policy is not None:
            account = self.policy.quota.account(client_id)
            if account is not None and account.exceeded(self.clock.seconds()):
                return EgressRefusal.QUOTA_EXCEEDED, "the client is over its quota"
        return None

    def connect(
        self, host: str, port: int, target: RelayEnd, timeout: float
    ) -> Deferred[Any]:
        """Connect to the IP address ``host`` (never a name: no second lookup)."""
        endpoint = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        return endpoint(self.reactor, host, port, timeout=max(timeout, 0.001)).connect(
            _OneShot(target)
        )

    def meter(self, stream: EgressStream, target: RelayEnd) -> FlowMeter | None:
        """The stream's quota and bandwidth charge, None when nothing applies.

        Bytes towards the client draw from its upload bucket (the direction
        of its tunnels' users' bytes), bytes out from its download bucket.
        """
        policy = self.policy
        flow = stream.flow
        if policy is None or flow is None:
            return None
        account = policy.quota.account(stream.client_id)
        buckets = policy.bandwidth.client_pair(stream.client_id)
        if account is None and buckets is None:
            return None
        out = back = None
        if buckets is not None:
            toward_client, away = buckets
            out = Direction(
                self.clock, (away,), lambda: stream.transport, lambda: target.transport
            )
            back = Direction(
                self.clock,
                (toward_client,),
                lambda: target.transport,
                lambda: stream.transport,
            )
        return FlowMeter(flow, self.clock, out, back, account, on_cut=stream.cut)  # type: ignore[arg-type]

    def quiet_log(self, client_id: str, reason: EgressRefusal, why: str) -> None:
        """Log a refusal a client may repeat fast: once a minute per reason."""
        now = self.clock.seconds()
        key = (client_id, reason)
        last = self._logged.get(key)
        if last is not None and now - last < 60:
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged[key] = now
        log.info(
            "egress {client_id}: refused ({reason}): {why}"
            " (logged at most once a minute)",
            client_id=client_id,
            reason=reason.value,
            why=why,
        )
