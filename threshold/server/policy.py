"""Who may connect, how fast, how much: the gateway's access policy.

Checked for each new public connection once its tunnel entry is known and
before any stream is opened (:meth:`GatewayPolicy.check`), in this order:

1. source lists: the gateway's ``DefaultDenySourceCidrs``, the client's
   and the tunnel's ``DenySourceCidrs`` refuse (``denied_source``; deny
   wins); each non-empty allow list (gateway, client, tunnel) must hold
   the source (``not_allowed_source``). An IPv4-mapped IPv6 source is
   matched as IPv4;
2. the client's quota (``quota_exceeded``);
3. the new-connection rate of (tunnel, source), a token bucket per pair
   (``rate_limited``), the source as the per-source caps count it (an
   IPv6 /64 is one source).

The policy is read per connection from the entry in force and the
server config, so a ``PUT /tunnels`` applies to the next connection
without touching a socket. A connection that passes gets a
:class:`~threshold.server.shaping.FlowMeter` when bandwidth or a quota
applies to it (:meth:`GatewayPolicy.meter`), none otherwise.

Every refusal is counted (gateway-wide, per tunnel, per client) in
:class:`~threshold.server.stats.GatewayStats`; the log says it at most once
a minute per tunnel and reason (:class:`HitLog`), not once per connection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from threshold.config.policy import NO_CLIENT_POLICY, ClientPolicy
from threshold.logs import observer as log_observer
from threshold.schema.policy_kinds import EMPTY_CIDRS, CidrList, parse_ip
from threshold.server.addresses import DEFAULT_IPV6_PREFIX, UNKNOWN_SOURCE
from threshold.server.bandwidth import BandwidthBook, tunnel_name
from threshold.server.quota import QuotaAccount, QuotaBook, QuotaKeeper, QuotaStore
from threshold.server.shaping import Bucket, FlowMeter, RelayedConnection
from threshold.server.sources import SourceRateLimiter, source_refusal
from threshold.server.stats import Limit, Refusal

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

    from threshold.server.stats import Flow, GatewayStats
    from threshold.server.tunnels import Tunnel, TunnelKey

__all__ = [
    "CLIENT_VIEW_FIELDS",
    "Denied",
    "GatewayPolicy",
    "HitLog",
    "PolicySettings",
    "RelayedConnection",
]

log = Logger(observer=log_observer)


@dataclass(frozen=True, slots=True)
class Denied:
    """A connection not admitted: the refusal, the limit hit (if any), and why."""

    reason: Refusal
    limit: Limit | None
    why: str


@dataclass(frozen=True, slots=True)
class _Plan:
    """The checks one tunnel entry needs: non-empty lists, its rate."""

    tunnel: Tunnel
    denies: tuple[CidrList, ...]
    allows: tuple[CidrList, ...]
    rate: float
    burst: int

    @property
    def idle(self) -> bool:
        """Nothing to check for this entry itself."""
        return not (self.denies or self.allows or self.rate)


#: Refusals this module makes (the API lists them per tunnel and client).
POLICY_REFUSALS = (
    Refusal.DENIED_SOURCE,
    Refusal.NOT_ALLOWED_SOURCE,
    Refusal.RATE_LIMITED,
    Refusal.QUOTA_EXCEEDED,
    Refusal.QUOTA_CUT,
)


#: The fields :meth:`GatewayPolicy.client_view` adds to a client of ``GET /clients``.
CLIENT_VIEW_FIELDS = frozenset(
    {
        "QuotaBytes",
        "QuotaUsedBytes",
        "QuotaLeftBytes",
        "QuotaPeriod",
        "QuotaPeriodStart",
        "QuotaPeriodEnd",
        "QuotaExceeded",
        "Bandwidth",
        "Refused",
        "Egress",
    }
)


@dataclass(frozen=True)
class PolicySettings:
    """The gateway-wide and per-client parts of the policy (server config)."""

    default_allow: CidrList = EMPTY_CIDRS
    default_deny: CidrList = EMPTY_CIDRS
    default_rate: float = 0.0
    default_burst: int = 0
    client_policies: Mapping[str, ClientPolicy] = field(
        default_factory=lambda: MappingProxyType({})
    )
    default_client: ClientPolicy = NO_CLIENT_POLICY
    max_sources: int = 65536
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    save_interval: float = 10.0

    @classmethod
    def from_config(cls, config: Any) -> PolicySettings:
        """The settings of a :class:`~threshold.config.ServerConfig`."""
        return cls(
            default_allow=config.default_allow_source_cidrs,
            default_deny=config.default_deny_source_cidrs,
            default_rate=config.default_new_connection_rate,
            default_burst=config.default_new_connection_burst,
            client_policies=config.client_policies,
            default_client=config.default_client_policy,
            max_sources=config.rate_limit_max_sources,
            ipv6_prefix=config.source_ipv6_prefix_length,
            save_interval=config.quota_save_interval_seconds,
        )


class HitLog:
    """One log line per subject and reason per minute, with the count since."""

    def __init__(self, clock: IReactorTime, interval: float = 60.0) -> None:
        self.clock = clock
        self.interval = interval
        self._last: dict[tuple[str, str], list[float]] = {}

    def hit(self, subject: str, reason: str, detail: str) -> bool:
        """Note one hit; log it if none was logged for this pair lately."""
        now = self.clock.seconds()
        key = (subject, reason)
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        more = int(entry[1]) if entry is not None else 0
        log.info(
            "{subject}: {reason}: {detail}{more}",
            subject=subject,
            reason=reason,
            detail=detail,
            more=f" ({more} more since the last line)" if more else "",
        )
        self._last[key] = [now, 0]
        if len(self._last) > 10000:
            self._last = {
                k: v for k, v in self._last.items() if now - v[0] < self.interval
            }
        return True


class GatewayPolicy:
    """The access policy of one gateway: checks, buckets, quota accounts."""

    def __init__(
        self,
        settings: PolicySettings,
        clock: IReactorTime,
        stats: GatewayStats,
        store: QuotaStore | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.stats = stats
        self.hits = HitLog(clock)
        self.limiter = SourceRateLimiter(settings.max_sources)
        self.quota = QuotaBook(clock, self.client_policy, self._exceeded)
        #: Saves quota usage to ``store`` (the state file) now and then.
        self.keeper = QuotaKeeper(self.quota, store, clock, settings.save_interval)
        #: What each entry in force needs checked, by id (see _plan).
        self._plans: dict[int, _Plan] = {}
        self._ipv6_shift = 128 - settings.ipv6_prefix
        # Each client's policy when it checks something, else None.
        default = settings.default_client
        self._default_rules: ClientPolicy | None = None if default.empty else default
        self._client_rules: dict[str, ClientPolicy | None] = {
            cid: (None if p.empty else p) for cid, p in settings.client_policies.items()
        }
        #: Whether any client's policy checks anything at all.
        self._client_checks = self._default_rules is not None or any(
            self._client_rules.values()
        )
        #: The buckets of limited tunnels and clients.
        self.bandwidth = BandwidthBook(clock, self.client_policy, self._limiting)
        for client_id in settings.client_policies:
            self.quota.account(client_id)  # shown (and resettable) at once

    def start(self) -> None:
        """Restore the saved quota usage and start saving it."""
        self.keeper.start()

    def stop(self) -> Deferred[None]:
        """Save the quota usage a last time (after the connections ended)."""
        return self.keeper.stop()

    def client_policy(self, client_id: str) -> ClientPolicy:
        """The client's entry of ``ClientPolicies``, else ``DefaultClientPolicy``."""
        policy = self.settings.client_policies.get(client_id)
        return policy if policy is not None else self.settings.default_client

    # -- admission ----------------------------------------------------------

    def check(
        self, peer: object, tunnel: Tunnel, candidates: MutableSequence[str]
    ) -> Denied | None:
        """Whether a new connection from ``peer`` may use ``tunnel``.

        Removes from ``candidates`` the clients whose own policy refuses it
        (their source lists, their quota); refuses when none is left. The
        refusal is counted and logged here; the caller only closes.
        """
        plan = self._plans.get(id(tunnel))
        if plan is None or plan.tunnel is not tunnel:
            plan = self._plan(tunnel)
        if plan.idle and not self._client_checks:
            return None  # nothing to check anywhere: the common case, kept cheap
        host = getattr(peer, "host", None)
        host = host if isinstance(host, str) else None
        address = parse_ip(host) if host is not None else None
        subject = tunnel.client_ids[0]
        reason = source_refusal(address, plan.denies, plan.allows)
        if reason is None and candidates and self._client_checks:
            reason, subject = self._filter_clients(address, candidates, subject)
        if reason is not None:
            return self._refuse(reason, tunnel, subject, host)
        if plan.rate:
            if address is None:
                source: object = UNKNOWN_SOURCE
            elif address[0] == 4:
                source = address
            else:  # an IPv6 source is its /SourceIpv6PrefixLength network
                source = (6, address[1] >> self._ipv6_shift)
            if not self.limiter.allow(
                (tunnel.key, source), plan.rate, plan.burst, self.clock.seconds()
            ):
                self.stats.limit_hit(
                    Limit.NEW_CONNECTION_RATE, tunnel=tunnel.key, source=host
                )
                return self._refuse(Refusal.RATE_LIMITED, tunnel, subject, host)
        return None

    def _plan(self, tunnel: Tunnel) -> _Plan:
        """What to check for ``tunnel``, worked out once per entry in force."""
        settings = self.settings
        rate, burst = tunnel.new_connection_rate, tunnel.new_connection_burst
        if rate is None:
            rate, burst = settings.default_rate, settings.default_burst
        denies = tuple(
            c for c in (settings.default_deny, tunnel.deny_source_cidrs) if c
        )
        allows = tuple(
            c for c in (settings.default_allow, tunnel.allow_source_cidrs) if c
        )
        plan = _Plan(tunnel, denies, allows, rate, burst or max(1, math.ceil(rate)))
        if len(self._plans) > 100_000:
            self._plans.clear()  # entries not in force any more, at worst
        self._plans[id(tunnel)] = plan
        return plan

    def _filter_clients(
        self,
        address: tuple[int, int] | None,
        candidates: MutableSequence[str],
        subject: str,
    ) -> tuple[Refusal | None, str]:
        first: tuple[Refusal, str] | None = None
        now = self.clock.seconds()
        for client_id in list(candidates):
            policy = self._client_rules.get(client_id, self._default_rules)
            if policy is None:
                continue
            reason = source_refusal(
                address, (policy.deny_source_cidrs,), (policy.allow_source_cidrs,)
            )
            if reason is None and policy.quota_bytes:
                account = self.quota.account(client_id)
                if account is not None and account.exceeded(now):
                    reason = Refusal.QUOTA_EXCEEDED
            if reason is not None:
                candidates.remove(client_id)
                if first is None:
                    first = (reason, client_id)
        if candidates or first is None:
            return None, subject
        return first

    def _refuse(
        self, reason: Refusal, tunnel: Tunnel, client_id: str, host: str | None
    ) -> Denied:
        self.stats.refuse_by_policy(reason, tunnel.key, client_id)
        why = f"source {host or 'unknown'}, client {client_id}"
        if reason is not Refusal.QUOTA_EXCEEDED:  # said once when it was crossed
            self.hits.hit(tunnel_name(tunnel.key), reason.value, why)
        return Denied(reason, None, f"{reason.value} ({why})")

    # -- relaying -----------------------------------------------------------

    def meter(self, public: RelayedConnection, tunnel: Tunnel) -> FlowMeter | None:
        """The meter of a connection now relayed, or None when nothing applies."""
        flow = public.flow
        assert flow is not None
        if not tunnel.bandwidth and all(
            self.client_policy(c).empty for c in tunnel.client_ids
        ):
            return None
        up, down = self.bandwidth.directions(public, tunnel, flow.client_id)
        meter = FlowMeter(
            flow,
            self.clock,
            up,
            down,
            self.quota.account(flow.client_id),
            on_cut=lambda: self._cut(public, tunnel, flow),
            rebind=lambda m: self._rebind(m, public, tunnel),
        )
        return meter

    def _rebind(
        self, meter: FlowMeter, public: RelayedConnection, tunnel: Tunnel
    ) -> None:
        for direction in (meter.up, meter.down):
            if direction is not None:
                direction.close()
        meter.up, meter.down = self.bandwidth.directions(
            public, tunnel, meter.client_id
        )
        meter.account = self.quota.account(meter.client_id)

    def _cut(self, public: RelayedConnection, tunnel: Tunnel, flow: Flow) -> None:
        self.stats.refuse_by_policy(Refusal.QUOTA_CUT, tunnel.key, flow.client_id)
        public.give_up(abort=True)

    def _exceeded(self, account: QuotaAccount) -> None:
        self.stats.limit_hit(Limit.QUOTA, client=account.client_id)
        log.warn(
            "client {client_id}: quota of {limit} bytes for the {period} from"
            " {start} reached ({used} used): new connections refused{cut}",
            client_id=account.client_id,
            limit=account.limit,
            period=account.period,
            start=account.view()["QuotaPeriodStart"],
            used=account.used,
            cut=f", {len(account.meters)} running ones cut"
            if account.cut_running
            else "; running ones finish",
        )
        if account.cut_running:
            for meter in list(account.meters):
                meter.cut()

    # -- changes and views --------------------------------------------------

    def tunnels_applied(self, tunnels: Sequence[Tunnel]) -> None:
        """A new tunnel set is in force: plans worked out again, buckets follow."""
        self._plans.clear()
        self.bandwidth.tunnels_applied(tunnels)

    def _limiting(self, name: str, direction: str, bucket: Bucket) -> None:
        self.stats.limit_hit(Limit.BANDWIDTH)
        self.hits.hit(
            name,
            f"bandwidth_{direction}",
            f"{direction} held to {int(bucket.rate)} bytes/s",
        )

    def reset_quota(self, client_id: str) -> QuotaAccount | None:
        """Start a client's quota count over (saved at once); None without one."""
        account = self.quota.reset(client_id)
        if account is not None:
            self.keeper.save()
        return account

    def refused(
        self, tunnel: TunnelKey | None = None, client_id: str | None = None
    ) -> dict[str, int]:
        """Policy refusals by reason, of one tunnel or one client."""
        counts = dict.fromkeys((r.value for r in POLICY_REFUSALS), 0)
        for (key, client, reason), n in self.stats.policy_refused.items():
            if (tunnel is None or key == tunnel) and (
                client_id is None or client == client_id
            ):
                counts[reason.value] += n
        return counts

    def knows(self, client_id: str) -> bool:
        """Whether a quota account exists (or was saved) for the client."""
        return self.quota.known(client_id)

    def client_view(self, client_id: str) -> dict[str, Any]:
        """The policy fields ``GET /clients`` adds to a client."""
        view = self.quota.view(client_id)
        buckets = self.bandwidth.client_buckets.get(client_id)
        view["Bandwidth"] = (
            {"Upload": buckets[0].view(), "Download": buckets[1].view()}
            if buckets is not None
            else None
        )
        view["Refused"] = self.refused(client_id=client_id)
        # Egress through the gateway (docs/egress.md).
        view["Egress"] = self.stats.egress.view(client_id)
        return view

    def tunnel_view(self, tunnel: Tunnel) -> dict[str, Any]:
        """The policy state of one tunnel in force (``GET /tunnels/status``)."""
        buckets = self.bandwidth.tunnel_buckets.get(tunnel.key)
        return {
            "Refused": self.refused(tunnel=tunnel.key),
            "Bandwidth": {"Upload": buckets[0].view(), "Download": buckets[1].view()}
            if buckets is not None
            else None,
        }
