"""Egress in the config files: the server's ``EgressPolicy``, the client's ``Egress``.

``EgressPolicy`` maps a ClientId to its rules; a rule allows destinations
in ``Cidr`` on ``Ports`` (``"25,465,587"``, ``"1000-2000"``). No entry,
no egress. Addresses of the special ranges (:data:`SPECIAL_RANGES`:
loopback, private, link-local, CGNAT, unspecified, multicast, ...) are
allowed only by a rule that names them **explicitly**: a rule whose
``Cidr`` lies entirely within that special range (``127.0.0.0/8`` or
``127.0.0.1/32`` reach loopback; ``0.0.0.0/0`` or ``96.0.0.0/3`` do not).
Pure: no reactor; the rules are compiled once, when the config is read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from threshold.schema import (
    CLIENT_ID,
    Kind,
    Schema,
    SchemaError,
    UnknownField,
    Wrong,
    field,
    format_address,
    parse_host_port,
    show,
)
from threshold.schema.frozen import FrozenMap
from threshold.schema.policy_kinds import CIDR_LIST, parse_ip

__all__ = [
    "EGRESS_POLICY",
    "EGRESS_RULE",
    "EGRESS_SETTINGS",
    "MAX_EGRESS_RULES",
    "NO_EGRESS_POLICY",
    "SPECIAL_RANGES",
    "ClientEgress",
    "EgressPolicies",
    "EgressRule",
    "EgressSettings",
    "PortSet",
    "special_range",
]

#: Most rules one client may have.
MAX_EGRESS_RULES = 1000

#: Destinations a rule reaches only when its Cidr lies within the range.
SPECIAL_RANGES: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network", 0.0.0.0 (unspecified)
    "10.0.0.0/8",  # RFC 1918
    "100.64.0.0/10",  # shared address space (CGNAT)
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local (cloud metadata services)
    "172.16.0.0/12",  # RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation
    "192.168.0.0/16",  # RFC 1918
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation
    "203.0.113.0/24",  # documentation
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, 255.255.255.255 (broadcast)
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::/96",  # IPv4-compatible (deprecated)
    "64:ff9b::/96",  # NAT64: an IPv4 address behind a translator
    "64:ff9b:1::/48",  # local-use NAT64
    "100::/64",  # discard
    "2001:db8::/32",  # documentation
    "2002::/16",  # 6to4: an IPv4 address inside
    "fc00::/7",  # unique local (ULA)
    "fe80::/10",  # link-local
    "fec0::/10",  # site-local (deprecated)
    "ff00::/8",  # multicast
)

_SPECIAL = [
    (net.version, int(net.network_address), int(net.broadcast_address), text)
    for text in SPECIAL_RANGES
    for net in (ipaddress.ip_network(text),)
]


def special_range(address: tuple[int, int]) -> str | None:
    """The special range (of :data:`SPECIAL_RANGES`) holding a :func:`parse_ip`
    address, the most specific one; None for an ordinary address."""
    version, value = address
    found: tuple[int, str] | None = None
    for v, start, end, text in _SPECIAL:
        if v == version and start <= value <= end:
            size = end - start
            if found is None or size < found[0]:
                found = (size, text)
    return None if found is None else found[1]


class PortSet:
    """Ports and ranges, ``"25,465,587"`` or ``"1000-2000"`` (immutable)."""

    __slots__ = ("text", "ranges")

    def __init__(self, text: str, ranges: tuple[tuple[int, int], ...]) -> None:
        self.text = text
        self.ranges = ranges

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(lo <= port <= hi for lo, hi in self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortSet) and other.ranges == self.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __repr__(self) -> str:
        return f"PortSet({self.text!r})"


def _port(text: str, item: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise SchemaError(f"{show(item)} is not a port from 1 to 65535")
    return int(text)


class _Ports(Kind):
    expected = 'ports and ranges such as "25,465,587" or "1000-2000"'
    doc = 'string of ports and ranges, `"25,587,1000-2000"`'

    def check(self, value: object, base_dir: str | None = None) -> PortSet:
        if isinstance(value, PortSet):
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.wrong(value)
        ranges = []
        for item in value.split(","):
            item = item.strip()
            lo_text, dash, hi_text = item.partition("-")
            lo = _port(lo_text.strip(), item)
            hi = _port(hi_text.strip(), item) if dash else lo
            if lo > hi:
                raise SchemaError(f"range {show(item)} ends before it starts")
            ranges.append((lo, hi))
        text = ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)
        return PortSet(text, tuple(sorted(ranges)))

    def to_json(self, value: Any) -> object:
        return value.text


class _Cidr(Kind):
    expected = "a CIDR such as 0.0.0.0/0, 127.0.0.0/8 or 2001:db8::/32"
    doc = "CIDR (a bare address is a /32 or /128)"

    def check(self, value: object, base_dir: str | None = None) -> str:
        try:
            cidrs = CIDR_LIST.check([value])
        except SchemaError as e:
            raise SchemaError(e.message) from None
        text: str = cidrs.cidrs[0]
        return text


@dataclass(frozen=True, kw_only=True)
class EgressRule:
    """One rule of a client's ``EgressPolicy``: destinations and their ports."""

    cidr: str = field(
        "Cidr",
        _Cidr(),
        doc="Destination addresses the rule allows. Loopback, private, link-local"
        " and the other special ranges only when it lies within one of them"
        " (docs/egress.md).",
    )
    ports: PortSet = field(
        "Ports",
        _Ports(),
        doc='Destination ports the rule allows: `"25,465,587"`, `"1000-2000"`.',
    )

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cidr)
        start, end = int(net.network_address), int(net.broadcast_address)
        object.__setattr__(self, "_range", (net.version, start, end))
        within = None
        for v, s, e, text in _SPECIAL:
            if v == net.version and s <= start and end <= e:
                if within is None or e - s < within[0]:
                    within = (e - s, text)
        object.__setattr__(self, "_special", None if within is None else within[1])

    @property
    def special(self) -> str | None:
        """The special range this rule names explicitly (lies within), if any."""
        special: str | None = self.__dict__["_special"]
        return special

    def allows(self, address: tuple[int, int], port: int, special: str | None) -> bool:
        """Whether the rule allows ``address`` (:func:`parse_ip` form) on ``port``.

        ``special`` is :func:`special_range` of the address: such an address
        is allowed only by a rule within that same range.
        """
        version, start, end = self.__dict__["_range"]
        if address[0] != version or not start <= address[1] <= end:
            return False
        if port not in self.ports:
            return False
        if special is None:
            return True
        rule_special = self.special
        if rule_special is None:
            return False
        # The address's range must hold the rule (a rule in a smaller
        # special range inside it, such as 0.0.0.0/8's 0.0.0.0/32, too).
        return _holds(special, rule_special)

    def to_json(self) -> dict[str, Any]:
        """The rule with the config file's field names."""
        return EGRESS_RULE.to_json(self)


def _holds(outer: str, inner: str) -> bool:
    a, b = ipaddress.ip_network(outer), ipaddress.ip_network(inner)
    return a.version == b.version and b.subnet_of(a)  # type: ignore[arg-type]


EGRESS_RULE = Schema(EgressRule)


class ClientEgress:
    """One client's rules, matched in order (the first that allows wins)."""

    __slots__ = ("rules",)

    def __init__(self, rules: tuple[EgressRule, ...]) -> None:
        self.rules = rules

    def allowing(self, host: str, port: int) -> EgressRule | None:
        """The first rule allowing the IP address ``host`` on ``port``, if any."""
        address = parse_ip(host)
        if address is None:
            return None
        special = special_range(address)
        for rule in self.rules:
            if rule.allows(address, port, special):
                return rule
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClientEgress) and other.rules == self.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __repr__(self) -> str:
        return f"ClientEgress({list(self.rules)!r})"


class EgressPolicies(FrozenMap[ClientEgress]):
    """``EgressPolicy``: ClientId -> its rules (read-only, copies as itself)."""

    __slots__ = ()


#: What an ``EgressPolicy`` rule must be, in its errors.
_RULE_EXPECTED = 'an object {"Cidr": ..., "Ports": ...}'

#: No client may connect out (the default).
NO_EGRESS_POLICY = EgressPolicies({})


class _EgressPolicyKind(Kind):
    expected = 'an object of "ClientId": [{"Cidr": ..., "Ports": ...}, ...]'
    doc = "object (see docs/egress.md)"

    def check(self, value: object, base_dir: str | None = None) -> EgressPolicies:
        if isinstance(value, EgressPolicies):
            return value
        if not isinstance(value, Mapping):
            raise self.wrong(value)
        policies: dict[str, ClientEgress] = {}
        for client_id, rules in value.items():
            try:
                CLIENT_ID.check(client_id)
            except SchemaError:
                raise SchemaError(
                    f"invalid ClientId {show(client_id)}: expected {CLIENT_ID.expected}"
                ) from None
            where = f".{client_id}"
            if not isinstance(rules, list | tuple):
                raise Wrong("a list of rules", rules, where)
            if len(rules) > MAX_EGRESS_RULES:
                raise SchemaError(f"more than {MAX_EGRESS_RULES} rules", where)
            policies[client_id] = ClientEgress(
                tuple(
                    EGRESS_RULE.parse_entry(r, f"{where}[{i}]", expected=_RULE_EXPECTED)
                    for i, r in enumerate(rules)
                )
            )
        return EgressPolicies(policies)

    def to_json(self, value: Any) -> object:
        return {
            client_id: [rule.to_json() for rule in egress.rules]
            for client_id, egress in value.items()
        }


EGRESS_POLICY = _EgressPolicyKind()


# -- the client's side ------------------------------------------------------


class _ListenAddress(Kind):
    expected = 'an address "host:port" such as "127.0.0.1:1080"'
    doc = 'address `"host:port"`'

    def check(self, value: object, base_dir: str | None = None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        if not isinstance(value, str):
            raise self.wrong(value)
        try:
            host, port = parse_host_port(value)
        except ValueError as e:
            raise SchemaError(f"{show(value)}: {e}") from None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise SchemaError(
                    f"{show(value)}: listen on an IP address (or localhost)"
                ) from None
        return host, port

    def to_json(self, value: Any) -> object:
        return format_address(*value)


@dataclass(frozen=True, kw_only=True)
class EgressSettings:
    """The client's ``Egress``: a local SOCKS5 proxy out through a gateway."""

    socks_listen: tuple[str, int] = field(
        "SocksListen",
        _ListenAddress(),
        doc='Where the SOCKS5 proxy listens, `"127.0.0.1:1080"` (no'
        " authentication: anyone who can reach it connects out as this client;"
        " keep it on loopback).",
    )


EGRESS_SETTINGS = Schema(EgressSettings)


class _EgressSettingsKind(Kind):
    expected = 'an object {"SocksListen": "host:port"}'
    doc = "object (see docs/egress.md)"

    def check(self, value: object, base_dir: str | None = None) -> EgressSettings:
        if isinstance(value, EgressSettings):
            return value
        if not isinstance(value, Mapping):
            raise self.wrong(value)
        try:
            settings: EgressSettings = EGRESS_SETTINGS.parse(value)
        except UnknownField as e:
            raise SchemaError(e.message, "") from None
        except SchemaError as e:
            raise e.within(".") from None
        return settings

    def to_json(self, value: Any) -> object:
        return None if value is None else EGRESS_SETTINGS.to_json(value)


EGRESS_SETTINGS_KIND = _EgressSettingsKind()
