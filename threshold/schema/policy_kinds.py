"""Kinds of the access-policy fields: CIDR lists, rates, named choices.

Pure: no reactor. A CIDR list is checked and compiled once, when its field
is parsed (a ``PUT /tunnels`` entry, the server config): the value kept is
a :class:`CidrList`, which writes back as the list of normalised CIDRs and
matches an address in O(log n) against sorted, merged integer ranges, so a
1,000-entry list costs a bisection per connection, not a scan.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import socket
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from threshold.schema.core import Kind, SchemaError, Wrong, show

__all__ = [
    "CIDR_LIST",
    "EMPTY_CIDRS",
    "MAX_CIDRS",
    "CidrList",
    "Rate",
    "Words",
    "parse_ip",
]

#: Most CIDRs one list may hold (a country's blocks fit; a body of 1 MiB
#: holds about 50,000 anyway).
MAX_CIDRS = 100_000

_V4_MAPPED = 0xFFFF << 32
_V4_MAPPED_MASK = ~0xFFFFFFFF & ((1 << 128) - 1)


def parse_ip(host: str) -> tuple[int, int] | None:
    """``(4, n)`` or ``(6, n)`` for an address; an IPv4-mapped IPv6 is IPv4.

    A zone (``fe80::1%eth0``) is dropped; anything else is None.
    """
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    except OSError:
        pass
    try:
        value = int.from_bytes(
            socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0]), "big"
        )
    except (OSError, ValueError):
        return None
    if value & _V4_MAPPED_MASK == _V4_MAPPED:
        return 4, value & 0xFFFFFFFF
    return 6, value


class _Ranges:
    """Disjoint, sorted ``[start, end]`` integer ranges; membership by bisection."""

    __slots__ = ("starts", "ends")

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [r[0] for r in merged]
        self.ends = [r[1] for r in merged]

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self.starts, value) - 1
        return i >= 0 and value <= self.ends[i]

    def __len__(self) -> int:
        return len(self.starts)


class CidrList:
    """An immutable list of CIDRs: its normalised text and its compiled ranges.

    Equal (and hashing alike) when the texts are equal, so a tunnel entry
    with the same lists compares equal to the one in force.
    """

    __slots__ = ("cidrs", "_v4", "_v6")

    def __init__(self, cidrs: tuple[str, ...]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for text in cidrs:
            net = ipaddress.ip_network(text)
            start, end = int(net.network_address), int(net.broadcast_address)
            (v4 if net.version == 4 else v6).append((start, end))
        self.cidrs = cidrs
        self._v4 = _Ranges(v4)
        self._v6 = _Ranges(v6)

    def matches(self, address: tuple[int, int]) -> bool:
        """Whether a :func:`parse_ip` address falls in one of the CIDRs."""
        version, value = address
        return value in (self._v4 if version == 4 else self._v6)

    def __bool__(self) -> bool:
        return bool(self.cidrs)

    def __len__(self) -> int:
        return len(self.cidrs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CidrList) and other.cidrs == self.cidrs

    def __hash__(self) -> int:
        return hash(self.cidrs)

    def __repr__(self) -> str:
        return f"CidrList({list(self.cidrs)!r})"

    def __deepcopy__(self, memo: dict[int, object]) -> CidrList:
        return self  # immutable


@lru_cache(maxsize=512)
def _compiled(cidrs: tuple[str, ...]) -> CidrList:
    # The same lists come back at every PUT /tunnels and restore.
    return CidrList(cidrs)


EMPTY_CIDRS = _compiled(())


def _normalise_cidr(item: object) -> str:
    """One CIDR in normal form; raise SchemaError saying what is wrong."""
    if not isinstance(item, str) or not item:
        raise Wrong("a CIDR such as 192.0.2.0/24 or 2001:db8::/32", item)
    try:
        net = ipaddress.ip_network(item, strict=True)
    except ValueError as e:
        loose = None
        try:
            loose = ipaddress.ip_network(item, strict=False)
        except ValueError:
            pass
        if loose is not None:
            raise SchemaError(
                f"{show(item)} has host bits set (did you mean"
                f' "{loose.with_prefixlen}"?)'
            ) from None
        raise SchemaError(f"{show(item)} is not a CIDR: {e}") from None
    if isinstance(net, ipaddress.IPv6Network):
        mapped = net.network_address.ipv4_mapped
        if mapped is not None and net.prefixlen >= 96:
            # Sources are matched as IPv4 when mapped: write the rule so too.
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net.with_prefixlen


class _CidrListKind(Kind):
    """A list of IPv4/IPv6 CIDRs (a bare address is a /32 or /128)."""

    expected = "a list of CIDRs"
    doc = "list of CIDRs"

    def check(self, value: object, base_dir: str | None = None) -> CidrList:
        if isinstance(value, CidrList):
            return value
        if not isinstance(value, list | tuple):
            raise self.wrong(value)
        if len(value) > MAX_CIDRS:
            raise SchemaError(f"more than {MAX_CIDRS} CIDRs ({len(value)})")
        texts = []
        for i, item in enumerate(value):
            try:
                texts.append(_normalise_cidr(item))
            except SchemaError as e:
                raise e.within(f"[{i}]") from None
        return _compiled(tuple(texts))

    def to_json(self, value: Any) -> object:
        return list(value.cidrs)


class Rate(Kind):
    """Events per second: a finite number from 0 (off) to ``high``."""

    def __init__(self, high: float, unit: str = "per second") -> None:
        self.high = high
        self.expected = f"a number from 0 (off) to {high:g}"
        self.doc = f"number {unit}, 0: off"

    def check(self, value: object, base_dir: str | None = None) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 <= value <= self.high
        ):
            raise self.wrong(value)
        return float(value)

    def to_json(self, value: Any) -> object:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class Words(Kind):
    """One of a few strings (``QuotaPeriod``: ``"day"`` or ``"month"``)."""

    def __init__(self, *words: str) -> None:
        self.words = words
        quoted = [f'"{w}"' for w in words]
        self.expected = ", ".join(quoted[:-1]) + " or " + quoted[-1]
        self.doc = ", ".join(f"`{q}`" for q in quoted[:-1]) + f" or `{quoted[-1]}`"

    def check(self, value: object, base_dir: str | None = None) -> str:
        if not isinstance(value, str) or value not in self.words:
            raise self.wrong(value)
        return value


CIDR_LIST = _CidrListKind()
