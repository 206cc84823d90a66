"""The standard benchmark's report: medians of the rounds, a markdown table.

Pure functions of the figures ``std_bench.py`` collects (``figures["runs"]``:
path -> figure -> one value per round, a pair [server, client] for the
per-process ones), so they are tested without running anything.
"""

from __future__ import annotations

import statistics
from typing import Any

#: The columns, in order.
PATHS = ("direct", "haproxy", "ssh -R", "threshold", "threshold TLS")
#: The column of ``std_bench.py --before DIR``: threshold TLS with DIR's code.
BEFORE = "threshold TLS before"

#: (key, label, unit of the cell, ratio against direct?)
ROWS = [
    ("bulk1_up", "1 stream bulk, upload, Gbit/s", "gbit", True),
    ("bulk1_down", "1 stream bulk, download (-R), Gbit/s", "gbit", True),
    ("bulk8_up", "8 streams bulk (-P 8), upload, Gbit/s", "gbit", True),
    ("bulk8_down", "8 streams bulk, download, Gbit/s", "gbit", True),
    ("cpu_gb_1", "tunnel CPU s per GB, 1 stream, up / down", "pair", False),
    ("cpu_gb_8", "tunnel CPU s per GB, 8 streams, up / down", "pair", False),
    ("ka_rate", "HTTP keep-alive req/s (16 conns)", "k", True),
    ("ka_cpu", "tunnel CPU µs per keep-alive request", "int", False),
    ("close_rate", "new connections/s (`Connection: close`, 16 at once)", "k", True),
    ("close_cpu", "tunnel CPU µs per new connection", "int", False),
    ("new_p50", "one at a time: new-connection p50, ms", "ms", True),
    ("ka_p50", "one at a time: keep-alive request p50, ms", "ms", True),
    ("rss", "RSS after start, MB: server + client", "rss", False),
    ("ready", "ready after start, s", "s", False),
]


def medians(runs: dict[str, list]) -> dict[str, Any]:
    """Median over the rounds of each figure; pairs element-wise."""
    out: dict[str, Any] = {}
    for key, values in runs.items():
        if key == "phases" or not values:
            continue
        if isinstance(values[0], list):
            out[key] = [statistics.median(v[i] for v in values) for i in range(2)]
        else:
            out[key] = statistics.median(values)
    # CPU per GB: "up / down", each the sum of server and client.
    for streams in (1, 8):
        up, down = out.get(f"cpu_bulk{streams}_up"), out.get(f"cpu_bulk{streams}_down")
        if up and down:
            out[f"cpu_gb_{streams}"] = [sum(up), sum(down)]
    for key in ("ka_cpu", "close_cpu"):
        if key in out:
            out[key + "_split"] = out[key]
            out[key] = sum(out[key])
    return out


def cell(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "gbit":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    if unit == "k":
        return f"{value / 1000:.1f}k" if value >= 10000 else f"{value / 1000:.2f}k"
    if unit == "int":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"
    if unit == "s":
        return f"{value:.2f}"
    if unit == "pair":
        return " / ".join(f"{v:.2f}" for v in value)
    if unit == "rss":
        server, client = (v / 1e6 for v in value)
        return f"{server:.0f}" if not client else f"{server:.0f} + {client:.0f}"
    raise ValueError(unit)


def table(figures: dict[str, Any]) -> list[str]:
    """The markdown table: medians, and ratios to direct where they mean something."""
    paths = [p for p in (*PATHS, BEFORE) if p in figures["medians"]]
    lines = [
        "| figure | " + " | ".join(paths) + " |",
        "|---|" + "---|" * len(paths),
    ]
    direct = figures["medians"].get("direct", {})
    for key, label, unit, ratio in ROWS:
        cells = []
        for path in paths:
            value = figures["medians"][path].get(key)
            text = cell(value, unit)
            if ratio and path != "direct" and value and direct.get(key):
                text += f" ({value / direct[key]:.2f}×)"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def report(figures: dict[str, Any], out=print) -> None:
    info = figures["info"]
    out(f"threshold with operators' tools, {info['date']}")
    out(f"command: {info['command']} (checkout {info['revision']})")
    out(f"machine: {info['cpus']}, {info['system']}, Python {info['python']}")
    for name, text in info.get("versions", {}).items():
        out(f"  {name}: {text}")
    out(
        f"load average (1, 5, 15 min): {info['load_start']} at start, "
        f"{info.get('load_end', '?')} at end; {info.get('seconds', 0):.0f} s; "
        f"median of {info['rounds']} round(s); ratio = path / direct"
    )
    out("")
    for line in table(figures):
        out(line)
    split = []
    for path, m in figures["medians"].items():
        if "close_cpu_split" in m:
            srv, cli = m["close_cpu_split"]
            ka_srv, ka_cli = m.get("ka_cpu_split", [0, 0])
            split.append(
                f"  {path}: server {srv:.0f} µs + client {cli:.0f} µs per new "
                f"connection; {ka_srv:.0f} + {ka_cli:.0f} µs per keep-alive request"
            )
    if split:
        out("")
        out("CPU per request by process (ssh -R: sshd, all its processes / ssh):")
        for line in split:
            out(line)
    if figures.get("retries"):
        out("")
        out(f"iperf3 runs tried again ({len(figures['retries'])}), e.g.:")
        for e in figures["retries"][:3]:
            out(f"  {e}")
    if figures.get("errors"):
        out("")
        out(f"errors ({len(figures['errors'])}):")
        for e in figures["errors"][:20]:
            out(f"  {e}")
    if figures.get("profile"):
        out("")
        out(figures["profile"])
