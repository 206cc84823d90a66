"""Per-client policy in the server config: ``ClientPolicies``, ``DefaultClientPolicy``.

A client's policy covers all its tunnels: sources it may be reached from,
the bandwidth its tunnels share, and its traffic quota. One table of
fields (:data:`CLIENT_POLICY`, the docs/policy.md table is generated from
it); ``ClientPolicies`` maps a ClientId to one such object, and a client
not listed there has ``DefaultClientPolicy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from threshold.schema import (
    CLIENT_ID,
    Bytes,
    Kind,
    Schema,
    SchemaError,
    UnknownField,
    field,
    show,
)
from threshold.schema.frozen import FrozenMap
from threshold.schema.policy_kinds import CIDR_LIST, EMPTY_CIDRS, CidrList, Words

__all__ = [
    "CLIENT_POLICIES",
    "CLIENT_POLICY",
    "MAX_CLIENT_POLICIES",
    "NO_CLIENT_POLICIES",
    "NO_CLIENT_POLICY",
    "QUOTA_ACTIONS",
    "QUOTA_PERIODS",
    "ClientPolicy",
    "FrozenMap",
]

#: Values of ``QuotaPeriod`` and ``QuotaExceededAction``.
QUOTA_PERIODS = ("day", "month")
QUOTA_ACTIONS = ("refuse-new", "cut")

#: Most entries of ``ClientPolicies`` (well above ``MaxClients``' default).
MAX_CLIENT_POLICIES = 100_000


@dataclass(frozen=True, kw_only=True)
class ClientPolicy:
    """What one client's tunnels may do together (docs/policy.md)."""

    allow_source_cidrs: CidrList = field(
        "AllowSourceCidrs",
        CIDR_LIST,
        EMPTY_CIDRS,
        doc="Sources that may reach any of the client's tunnels; `[]`: every"
        " source. A tunnel's own list must allow the source too.",
    )
    deny_source_cidrs: CidrList = field(
        "DenySourceCidrs",
        CIDR_LIST,
        EMPTY_CIDRS,
        doc="Sources refused on every tunnel of the client (deny wins).",
    )
    bandwidth: int = field(
        "BandwidthBytesPerSecond",
        Bytes(0, 10**12),
        0,
        doc="Bytes per second all the client's tunnels may move together, each"
        " direction on its own, shaped by backpressure. `0`: no limit.",
    )
    bandwidth_burst: int = field(
        "BandwidthBurstBytes",
        Bytes(0, 10**12),
        0,
        doc="Bytes a direction may move at once above the rate; `0`: one"
        " second's worth.",
    )
    quota_bytes: int = field(
        "QuotaBytes",
        Bytes(0, 2**62),
        0,
        doc="Bytes (both directions summed, counted as the byte metrics count)"
        " the client's tunnels may move per `QuotaPeriod`; `0`: no quota.",
    )
    quota_period: str = field(
        "QuotaPeriod",
        Words(*QUOTA_PERIODS),
        "month",
        doc="The quota's period, on UTC boundaries: a calendar day or month.",
    )
    quota_exceeded_action: str = field(
        "QuotaExceededAction",
        Words(*QUOTA_ACTIONS),
        "refuse-new",
        doc="Over quota, new connections are refused (`quota_exceeded`);"
        " `refuse-new`: running ones finish, `cut`: running ones are cut"
        " (`quota_cut`).",
    )

    def __post_init__(self) -> None:
        CLIENT_POLICY.validate(self)

    @property
    def empty(self) -> bool:
        """Whether this policy limits nothing (no object needed on any path)."""
        return self == NO_CLIENT_POLICY

    def to_json(self) -> dict[str, Any]:
        """The policy with the config file's field names."""
        return CLIENT_POLICY.to_json(self)


#: The table of :class:`ClientPolicy`.
CLIENT_POLICY = Schema(ClientPolicy, checked_by_init=True)

#: The policy that limits nothing (the built-in ``DefaultClientPolicy``).
NO_CLIENT_POLICY = ClientPolicy()


class _ClientPolicyKind(Kind):
    expected = "an object of client policy fields"
    doc = "object (see docs/policy.md)"

    def check(self, value: object, base_dir: str | None = None) -> ClientPolicy:
        if isinstance(value, ClientPolicy):
            return value
        if not isinstance(value, Mapping):
            raise self.wrong(value)
        try:
            policy: ClientPolicy = CLIENT_POLICY.parse(value)
        except UnknownField as e:
            # Named by the caller's field, not as a top-level key.
            raise SchemaError(e.message) from None
        except SchemaError as e:
            raise (e.within(".") if e.field else e) from None
        return policy

    def to_json(self, value: Any) -> object:
        return value.to_json()


#: No client listed.
NO_CLIENT_POLICIES = FrozenMap({})


class _ClientPoliciesKind(Kind):
    expected = 'an object of "ClientId": {client policy}'
    doc = "object (see docs/policy.md)"

    def check(
        self, value: object, base_dir: str | None = None
    ) -> Mapping[str, ClientPolicy]:
        if not isinstance(value, Mapping):
            raise self.wrong(value)
        if len(value) > MAX_CLIENT_POLICIES:
            raise SchemaError(f"more than {MAX_CLIENT_POLICIES} clients")
        policies: dict[str, ClientPolicy] = {}
        for client_id, entry in value.items():
            try:
                CLIENT_ID.check(client_id)
            except SchemaError:
                raise SchemaError(
                    f"invalid ClientId {show(client_id)}: expected {CLIENT_ID.expected}"
                ) from None
            try:
                policies[client_id] = CLIENT_POLICY_KIND.check(entry)
            except SchemaError as e:
                raise e.within(f".{client_id}") from None
        return FrozenMap(policies)

    def to_json(self, value: Any) -> object:
        return {client_id: p.to_json() for client_id, p in value.items()}


CLIENT_POLICY_KIND = _ClientPolicyKind()
CLIENT_POLICIES = _ClientPoliciesKind()
