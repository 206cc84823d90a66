"""A tunnel entry of ``PUT /tunnels`` and the state file: fields, validation, JSON.

Pure: no reactor. Each field is declared once on :class:`Tunnel` (the
table in docs/api.md is generated from it) with the validators every other
parser uses, so a service name the stream header would refuse is refused
here too. ``parse_tunnels`` checks a whole body and names the entry and
field of the first error; ``RouteTable`` (routes.py) applies the result.

A tunnel names one or more clients, ``ClientIds`` (1 to 16, no repeat),
balanced by ``Balance`` (:mod:`threshold.server.balance`). The single
``ClientId`` (or ``ClientIdentifier``) of older automation is a list of
one; ``to_json`` writes ``ClientIds`` always and ``ClientId`` too when
there is exactly one client, so old readers keep working and every answer
can be sent back as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threshold.schema import (
    BOOLEAN,
    CLIENT_ID,
    HOST_GLOB,
    IP_ADDRESS,
    PORT,
    SERVICE_NAME,
    Choice,
    Field,
    Kind,
    Schema,
    SchemaError,
    field,
    format_address,
    show,
)
from threshold.schema.kinds import Bytes, Integer, Seconds
from threshold.schema.policy_kinds import CIDR_LIST, EMPTY_CIDRS, CidrList, Rate
from threshold.server.balance import Balance
from threshold.wire.handshake import PROTO_TCP, PROTO_UDP

__all__ = [
    "MAX_CLIENTS_PER_TUNNEL",
    "TUNNEL",
    "UDP_KEY_GLOB",
    "Balance",
    "GroupKey",
    "Tunnel",
    "TunnelError",
    "TunnelKey",
    "check_duplicates",
    "format_address",
    "parse_tunnels",
]

GroupKey = tuple[str, int]
#: A tunnel's identity: (ListenAddress, ListenPort, ListenHostnameGlob).
TunnelKey = tuple[str, int, str]

#: Most clients one tunnel may name.
MAX_CLIENTS_PER_TUNNEL = 16


class _ClientIds(Kind):
    """1 to 16 distinct ClientIds, kept as a tuple."""

    expected = f"a list of 1 to {MAX_CLIENTS_PER_TUNNEL} client ids"
    doc = f"list of 1–{MAX_CLIENTS_PER_TUNNEL} client ids"

    def check(self, value: object, base_dir: str | None = None) -> tuple[str, ...]:
        if not isinstance(value, list | tuple) or not (
            1 <= len(value) <= MAX_CLIENTS_PER_TUNNEL
        ):
            raise self.wrong(value)
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            try:
                CLIENT_ID.check(item)
            except SchemaError as e:
                raise e.within(f"[{i}]") from None
            if item in seen:
                raise SchemaError(
                    f"{show(item)} is listed twice (entries {seen[item]} and {i})",
                    f"[{i}]",
                )
            seen[item] = i
        return tuple(value)

    def to_json(self, value: Any) -> object:
        return list(value)


class _BalanceKind(Kind):
    expected = ", ".join(f'"{m.value}"' for m in Balance)
    doc = "`failover`, `round-robin` or `least-connections`"

    def check(self, value: object, base_dir: str | None = None) -> Balance:
        if isinstance(value, str):
            for mode in Balance:
                if value == mode.value:
                    return mode
        raise self.wrong(value)

    def to_json(self, value: Any) -> object:
        return Balance(value).value


class _ProtocolKind(Kind):
    expected = '"tcp" or "udp"'
    doc = "`tcp` or `udp`"

    def check(self, value: object, base_dir: str | None = None) -> str:
        if value in (PROTO_TCP, PROTO_UDP) and isinstance(value, str):
            return value
        raise self.wrong(value)


CLIENT_IDS = _ClientIds()
BALANCE = _BalanceKind()
PROTOCOL = _ProtocolKind()

#: The glob part of a UDP tunnel's key (counters, metrics, status): not a
#: hostname glob any TCP tunnel can have, so a TCP and a UDP tunnel on the
#: same address and port count apart.
UDP_KEY_GLOB = "udp:*"

#: The single-client name of older automation: read by ``_parse_entry`` into
#: ``ClientIds``, written by ``to_json`` for a tunnel of one client.
_CLIENT_ID = Field(
    "ClientId",
    CLIENT_ID,
    None,
    doc="One client, for a tunnel of one: the same as `ClientIds` with one entry."
    " Written back (with `ClientIds`) when the tunnel has exactly one client."
    " Giving both is allowed only when `ClientIds` is that one client.",
    aliases=("ClientIdentifier",),
    default_doc="",
)


class TunnelError(Exception):
    """A tunnel list or an apply was refused; carries the HTTP answer for it."""

    def __init__(
        self,
        status: int,
        message: str,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.index = index
        self.field = field
        #: The field error behind a 400, if that is what this is.
        self.schema_error: SchemaError | None = None

    @classmethod
    def invalid(cls, error: SchemaError) -> TunnelError:
        """The 400 for a field error (the message names entry and field)."""
        result = cls(400, str(error), error.index, error.field)
        result.schema_error = error
        return result

    def to_json(self) -> dict[str, Any]:
        """The error as the management API's JSON error body."""
        return {"error": self.message, "index": self.index, "field": self.field}

    def __repr__(self) -> str:
        return (
            f"TunnelError({self.status}, {self.message!r}, "
            f"index={self.index!r}, field={self.field!r})"
        )


@dataclass(frozen=True, kw_only=True)
class Tunnel:
    """One route: connections to a group, matching a glob, go to a client's service.

    Fields are validated and normalised on construction (address in
    ``ipaddress`` form, glob lowercased without a trailing dot, ``""`` as
    ``"*"``); an invalid field raises ``TunnelError`` (400) naming it.
    """

    client_ids: tuple[str, ...] = field(
        "ClientIds",
        CLIENT_IDS,
        None,
        default_doc="required (or `ClientId`)",
        doc="The clients that can carry the connections, in order of preference:"
        " each one's `ClientId` (the Common Name of its certificate, or"
        " `ClientId@Domain`). A client need not be connected: while none is"
        " healthy, users are closed (`no_healthy_client`).",
    )
    listen_address: str = field(
        "ListenAddress",
        IP_ADDRESS,
        "0.0.0.0",
        doc='Address of the public socket. Written back in normal form (`"0:0::1"`'
        ' becomes `"::1"`).',
    )
    listen_port: int = field("ListenPort", PORT, doc="Port of the public socket.")
    hostname_glob: str = field(
        "ListenHostnameGlob",
        HOST_GLOB,
        "*",
        doc='Which TLS server names (SNI) this entry takes: `"*"` (or `""`) for'
        " everything, an exact name `www.example.com`, or a wildcard"
        " `*.example.com`. See [Hostname globs](#hostname-globs).",
    )
    backend_service: str = field(
        "BackEndService",
        SERVICE_NAME,
        doc="The service name the client maps to a local address"
        " (`ServiceToLocalAddrMap` in the client config): 1 to 128 printable"
        " characters. The server never names an address on the client's network.",
    )
    proxy_protocol: bool = field(
        "HaProxyProxyProtocol",
        BOOLEAN,
        False,
        doc="Send the HAProxy PROXY protocol header with the user's real address"
        " before the user's bytes.",
    )
    proxy_protocol_version: int = field(
        "HaProxyProxyProtocolVersion",
        Choice(1, 2),
        1,
        doc="PROXY header version: 1 is text, 2 is binary.",
    )
    balance: Balance = field(
        "Balance",
        BALANCE,
        Balance.FAILOVER,
        doc="How new connections are spread over the healthy clients:"
        " `failover` (the first healthy one in `ClientIds` order takes them all,"
        " and takes them again when it is back), `round-robin`, or"
        " `least-connections` (fewest of this tunnel's connections open). See"
        " [Several clients](#several-clients-balance-and-health).",
    )
    # Access policy and fair use: see docs/policy.md.
    allow_source_cidrs: CidrList = field(
        "AllowSourceCidrs",
        CIDR_LIST,
        EMPTY_CIDRS,
        doc="Sources (IPv4/IPv6 CIDRs) that may connect; `[]`: every source. An"
        " IPv4-mapped IPv6 source is matched as IPv4. See docs/policy.md.",
    )
    deny_source_cidrs: CidrList = field(
        "DenySourceCidrs",
        CIDR_LIST,
        EMPTY_CIDRS,
        doc="Sources refused even if allowed (deny wins), closed before any"
        " stream is opened (`denied_source`).",
    )
    new_connection_rate: float | None = field(
        "MaxNewConnectionsPerSecondPerSourceIp",
        Rate(1_000_000),
        None,
        nullable=True,
        doc="New connections per second one source (an IPv6 /64) may open on this"
        " tunnel; more are refused (`rate_limited`). `null`: the gateway's"
        " `DefaultMaxNewConnectionsPerSecondPerSourceIp`; `0`: no limit.",
    )
    new_connection_burst: int = field(
        "NewConnectionBurst",
        Integer(0, 1_000_000),
        0,
        doc="Connections a source may open at once before the rate applies;"
        " `0`: one second's worth (the rate rounded up).",
    )
    bandwidth: int = field(
        "BandwidthBytesPerSecond",
        Bytes(0, 10**12),
        0,
        doc="Bytes per second this tunnel's connections may move together, each"
        " direction on its own, shaped by backpressure (never dropped). `0`: no"
        " limit.",
    )
    bandwidth_burst: int = field(
        "BandwidthBurstBytes",
        Bytes(0, 10**12),
        0,
        doc="Bytes a direction may move at once above the rate; `0`: one"
        " second's worth (`BandwidthBytesPerSecond`).",
    )
    protocol: str = field(
        "Protocol",
        PROTOCOL,
        PROTO_TCP,
        doc="`tcp`: a TCP listener; `udp`: a UDP socket on `ListenPort`, each"
        " user address a flow of datagrams (docs/udp.md). A TCP and a UDP tunnel"
        " may share an address and port. A UDP tunnel takes `ListenHostnameGlob`"
        " `*` only and PROXY protocol version 2 only.",
    )
    udp_flow_idle_seconds: float | None = field(
        "UdpFlowIdleSeconds",
        Seconds(),
        None,
        nullable=True,
        doc="UDP tunnels: a flow ends after this long without a datagram either"
        " way. `null`: the gateway's `UdpFlowIdleSeconds` (30 s).",
    )

    def __post_init__(self) -> None:
        try:
            TUNNEL.validate(self)
            self._check_protocol()
            if self.client_ids is None:
                raise SchemaError(
                    'required field is missing (or give "ClientId" for one client)',
                    "ClientIds",
                )
        except SchemaError as e:
            raise TunnelError.invalid(e) from None

    def _check_protocol(self) -> None:
        if self.protocol == PROTO_TCP:
            if self.udp_flow_idle_seconds is not None:
                raise SchemaError(
                    'applies to UDP tunnels only (give "Protocol": "udp")',
                    "UdpFlowIdleSeconds",
                )
            return
        if self.hostname_glob != "*":
            raise SchemaError(
                'must be "*" for a UDP tunnel: a datagram carries no server name',
                "ListenHostnameGlob",
            )
        if self.proxy_protocol and self.proxy_protocol_version != 2:
            raise SchemaError(
                "must be 2 for a UDP tunnel: PROXY protocol version 1 has no UDP",
                "HaProxyProxyProtocolVersion",
            )

    @property
    def is_udp(self) -> bool:
        """Whether this tunnel relays UDP datagrams (``Protocol`` ``udp``)."""
        return self.protocol == PROTO_UDP

    @property
    def client_id(self) -> str:
        """The first client (the one a failover tunnel prefers)."""
        return self.client_ids[0]

    @property
    def group(self) -> GroupKey:
        """The listening socket this tunnel shares: (address, port)."""
        return (self.listen_address, self.listen_port)

    @property
    def key(self) -> TunnelKey:
        """The tunnel's identity in counters and status: address, port, glob.

        A UDP tunnel's glob is ``UDP_KEY_GLOB``, so that it never equals the
        key of a TCP tunnel on the same address and port.
        """
        if self.protocol == PROTO_UDP:
            return (self.listen_address, self.listen_port, UDP_KEY_GLOB)
        return (self.listen_address, self.listen_port, self.hostname_glob)

    def to_json(self) -> dict[str, Any]:
        """The tunnel with the management API's field names, in table order.

        ``ClientId`` is written too when there is one client, for
        automation that reads only that field.
        """
        body = TUNNEL.to_json(self)
        if len(self.client_ids) != 1:
            return body
        first, *rest = body.items()
        return dict([first, ("ClientId", self.client_ids[0]), *rest])


#: The table of :class:`Tunnel` (checked by its constructor). ``ClientId``
#: is no attribute; the docs list it right after ``ClientIds``.
TUNNEL = Schema(Tunnel, checked_by_init=True, ignored=[_CLIENT_ID])
TUNNEL.fields = (TUNNEL.fields[0], TUNNEL.fields[-1], *TUNNEL.fields[1:-1])


def _type_name(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", list: "a list", dict: "an object"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _single_client(entry: dict[Any, Any]) -> tuple[str, str] | None:
    """The ``ClientId`` (or ``ClientIdentifier``) given: (name used, value)."""
    for name in (_CLIENT_ID.json, *_CLIENT_ID.aliases):
        if name in entry:
            value = entry[name]
            try:
                return name, CLIENT_ID.check(value)
            except SchemaError as e:
                raise e.within(name) from None
    return None


def _parse_entry(entry: dict[Any, Any]) -> Tunnel:
    # Unknown fields, and ClientId against ClientIdentifier, are checked here.
    values, _ = TUNNEL.collect(entry)
    single = _single_client(entry)
    if single is not None and values.get("client_ids") is None:
        values["client_ids"] = (single[1],)
    try:
        tunnel = Tunnel(**values)
    except TunnelError as e:
        assert e.schema_error is not None
        raise TUNNEL.as_given(e.schema_error, entry) from None
    if single is not None and tunnel.client_ids != (single[1],):
        name, value = single
        raise SchemaError(
            f'{show(value)} and "ClientIds" {show(list(tunnel.client_ids))} differ:'
            f' give "ClientIds" alone, or "{name}" equal to its only entry',
            name,
        )
    return tunnel


def check_duplicates(tunnels: Sequence[Tunnel]) -> None:
    """Refuse two entries with the same group and the same glob."""
    seen: dict[tuple[str, int, str], int] = {}
    for index, tunnel in enumerate(tunnels):
        key = tunnel.key
        if key in seen and tunnel.is_udp:
            raise TunnelError(
                400,
                f"duplicate route: entries {seen[key]} and {index} are both UDP"
                f" tunnels on {format_address(*tunnel.group)} (one UDP tunnel per"
                " address and port)",
                index=index,
                field="ListenPort",
            )
        if key in seen:
            raise TunnelError(
                400,
                f"duplicate route: entries {seen[key]} and {index} both listen "
                f"on {format_address(*tunnel.group)} with ListenHostnameGlob "
                f'"{tunnel.hostname_glob}"',
                index=index,
                field="ListenHostnameGlob",
            )
        seen[key] = index


def parse_tunnels(body: object) -> list[Tunnel]:
    """Validate a decoded ``PUT /tunnels`` body into tunnels, or raise TunnelError.

    422 when the body is not a list of objects, 400 naming the entry index
    and field for an invalid or unknown field, 400 for two entries with the
    same address, port and glob.
    """
    if not isinstance(body, list):
        raise TunnelError(
            422, f"the body must be a JSON list of tunnels, not {_type_name(body)}"
        )
    tunnels = []
    for index, entry in enumerate(body):
        if not isinstance(entry, dict):
            raise TunnelError(
                422,
                f"entry {index}: must be a JSON object, not {_type_name(entry)}",
                index=index,
            )
        try:
            tunnels.append(_parse_entry(entry))
        except SchemaError as e:
            raise TunnelError.invalid(e.at(index)) from None
    check_duplicates(tunnels)
    return tunnels
