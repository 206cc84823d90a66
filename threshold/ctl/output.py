"""How threshold-ctl prints data: ``--output json`` for scripts, ``table`` for people.

The commands that existed before ``--output`` (``clients``, ``tunnels get``,
``tunnels put``) keep printing JSON unless asked for a table, so scripts
keep working whatever their stdout is; ``status`` and ``doctor`` print a
table unless asked for JSON. Tables fit :data:`WIDTH` columns.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any

#: Columns a table fits in (a classic terminal).
WIDTH = 80
#: Marks a cell cut to make the table fit.
CUT = "..."


class Format(enum.StrEnum):
    """The values of ``--output``."""

    JSON = "json"
    TABLE = "table"


def dump_json(value: Any, compact: bool) -> str:
    """The JSON text of ``value``, indented unless ``compact``, with a newline."""
    return json.dumps(value, indent=None if compact else 2) + "\n"


def cell(value: Any) -> str:
    """A value as a table cell: ``-`` for nothing, one line always."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    return " ".join(text.split())


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    if width <= len(CUT):
        return text[:width]
    return text[: width - len(CUT)] + CUT


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    width: int = WIDTH,
    flexible: Sequence[int] = (),
) -> str:
    """A left-aligned text table no wider than ``width``.

    Columns two spaces apart. When the table is too wide, the ``flexible``
    columns are narrowed first (their cells cut, ending in :data:`CUT`),
    then the widest of the others, until it fits or every column is down
    to its header's width.
    """
    texts = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in texts:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    floor = [max(len(h), len(CUT) + 1) for h in headers]
    while sum(widths) + 2 * (len(widths) - 1) > width:
        spare = [i for i in flexible if widths[i] > floor[i]]
        candidates = spare or range(len(widths))
        widest = max(candidates, key=lambda i: widths[i] - floor[i])
        if widths[widest] <= floor[widest]:
            break
        widths[widest] -= 1
    lines = []
    for row in [list(headers), *texts]:
        parts = [_cut(text, widths[i]).ljust(widths[i]) for i, text in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def human_bytes(count: int | float | None) -> str:
    """A byte count for people: 512 B, 1.5 KB, 12 MB, 3.4 GB (powers of 1000)."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def state_word(state: str | None) -> str:
    """``ClientConnected`` as ``connected``: the API's state names, shorter."""
    if not state:
        return "-"
    word = state.removeprefix("Client")
    return word.lower() if word else state


def tunnel_name(entry: Mapping[str, Any]) -> str:
    """A tunnel as people name it: ``ADDRESS:PORT`` and its glob unless ``*``."""
    address = entry.get("ListenAddress", "")
    if ":" in str(address):
        address = f"[{address}]"
    name = f"{address}:{entry.get('ListenPort')}"
    protocol = entry.get("Protocol") or "tcp"
    if protocol != "tcp":
        name += f"/{protocol}"
    glob = entry.get("ListenHostnameGlob") or "*"
    return name if glob == "*" else f"{name} {glob}"


def client_ids(entry: Mapping[str, Any]) -> list[str]:
    """The tunnel's clients, from ``ClientIds`` (or an older ``ClientId``)."""
    ids = entry.get("ClientIds")
    if isinstance(ids, list):
        return [str(i) for i in ids]
    one = entry.get("ClientId") or entry.get("ClientIdentifier")
    return [str(one)] if one else []


def proxy_word(entry: Mapping[str, Any]) -> str:
    """``v1``/``v2`` when the tunnel sends the PROXY header, ``no`` otherwise."""
    if not entry.get("HaProxyProxyProtocol"):
        return "no"
    return f"v{entry.get('HaProxyProxyProtocolVersion', 1)}"


def tunnels_table(tunnels: Sequence[Mapping[str, Any]]) -> str:
    """``tunnels get``/``put`` as a table: where, which service, which clients."""
    rows = [
        (
            tunnel_name(t),
            t.get("BackEndService"),
            proxy_word(t),
            t.get("Balance"),
            ", ".join(client_ids(t)),
        )
        for t in tunnels
    ]
    if not rows:
        return "no tunnels\n"
    return table(
        ("TUNNEL", "SERVICE", "PROXY", "BALANCE", "CLIENTS"), rows, flexible=(4,)
    )
