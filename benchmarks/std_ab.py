"""std_bench's per-connection figures for two or more checkouts, interleaved.

Run from any checkout::

    .venv/bin/python benchmarks/std_ab.py /tmp/a /tmp/b [--reps 6]
    .venv/bin/python benchmarks/std_ab.py /tmp/b /tmp/b:LogConnections=false

A checkout may carry server.json fields after a colon (``Name=JSON``,
comma-separated), to compare settings of one code state.

One threshold TLS tunnel per checkout (as std_bench starts it, each
checkout's own code), all up at once, with one nginx and one iperf3;
then ``--reps`` times, each tunnel in turn: wrk ``Connection: close`` and
keep-alive (tunnel CPU per request, by process), ab -c 1 new-connection
and keep-alive p50, and one iperf3 upload (CPU per GB). Prints the median
of the reps for each checkout. Interleaving short runs is what makes two
code states comparable on a shared machine whose load moves: compare the
CPU figures, rates move with the load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import std_tools
import tunnel_bench
from std_bench import Bench, Settings
from std_services import Iperf3Server, Nginx, Threshold, make_pki
from tunnel_bench import Children, load_average, say


def parse_checkout(arg: str) -> tuple[Path, dict[str, Any]]:
    """``DIR`` or ``DIR:Name=JSON,Name=JSON``: the checkout and server fields."""
    path, _, fields = arg.partition(":")
    extra: dict[str, Any] = {}
    for item in filter(None, fields.split(",")):
        name, _, value = item.partition("=")
        extra[name] = json.loads(value)
    return Path(path), extra


#: The workloads ``--workloads`` names, in the order they run.
WORKLOADS: dict[str, Any] = {
    "close": lambda b, t: b.http(t, True),
    "ka": lambda b, t: b.http(t, False),
    "new_p50": lambda b, t: b.sequential(t, False),
    "ka_p50": lambda b, t: b.sequential(t, True),
    "bulk1": lambda b, t: b.bulk(t, 1, False),
    "bulk8": lambda b, t: b.bulk(t, 8, False),
}
DEFAULT_WORKLOADS = "close,ka,new_p50,ka_p50,bulk1"


def run(
    checkouts: list[str], reps: int, seconds: int, workloads: list[str]
) -> list[dict[str, Any]]:
    """Every checkout's figures (``runs``), measured in turn."""
    tools = std_tools.ensure(["iperf3", "wrk", "ab", "nginx"], install=False, say=say)
    workdir = Path(tempfile.mkdtemp(prefix="threshold-std-ab-"))
    children = Children(workdir)
    all_figures: list[dict[str, Any]] = []
    try:
        nginx = Nginx(tools["nginx"], workdir / "nginx", children)
        nginx.start()
        iperf = Iperf3Server(tools["iperf3"], children)
        iperf.start()
        backends = {"http": nginx.port, "iperf": iperf.port}
        pki = make_pki(workdir / "pki")
        settings = Settings(1, seconds, None, seconds, 1000, 2000)
        benches = []
        for n, arg in enumerate(checkouts):
            checkout, fields = parse_checkout(arg)
            # Child starts twistd with PYTHONPATH=tunnel_bench.ROOT.
            tunnel_bench.ROOT = checkout.resolve()
            tunnel = Threshold(
                True, workdir / f"tls{n}", children, backends, pki, fields
            )
            figures: dict[str, Any] = {"runs": {}, "errors": [], "retries": []}
            bench = Bench(tools, settings, iperf, workdir, figures)
            started = tunnel.start()
            bench.record(tunnel.name, "ready", started["ready"])
            rss = [started["rss_server"], started["rss_client"]]
            bench.record(tunnel.name, "rss", rss)
            benches.append((bench, tunnel))
            all_figures.append(figures)
        for rep in range(reps):
            say(f"rep {rep + 1} of {reps}")
            for bench, tunnel in benches:
                for name in workloads:
                    WORKLOADS[name](bench, tunnel)
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return all_figures


def summary(figures: dict[str, Any]) -> dict[str, Any]:
    runs = figures["runs"]["threshold TLS"]
    out: dict[str, Any] = {}
    for key, values in runs.items():
        if values and isinstance(values[0], list):
            out[key] = [statistics.median(v[i] for v in values) for i in range(2)]
        else:
            out[key] = statistics.median(values)
    return out


def line(result: dict[str, Any]) -> str:
    s, c = result.get("close_cpu", [0, 0])
    ks, kc = result.get("ka_cpu", [0, 0])
    gs, gc = result.get("cpu_bulk1_up", [0, 0])
    g8s, g8c = result.get("cpu_bulk8_up", [0, 0])
    return (
        f"new conn CPU {s + c:.0f} µs ({s:.0f} + {c:.0f}); keep-alive {ks + kc:.0f}"
        f" µs ({ks:.0f} + {kc:.0f}); p50 new {result.get('new_p50', 0):.2f} ms,"
        f" ka {result.get('ka_p50', 0):.2f} ms; {gs + gc:.2f} s/GB"
        f" ({gs:.2f} + {gc:.2f}; 8 streams {g8s + g8c:.2f});"
        f" bulk {result.get('bulk1_up', 0):.2f} / {result.get('bulk8_up', 0):.2f}"
        " Gbit/s;"
        f" close {result.get('close_rate', 0):.0f}/s;"
        f" RSS {result['rss'][0] / 1e6:.0f} + {result['rss'][1] / 1e6:.0f} MB;"
        f" ready {result['ready']:.2f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkouts", nargs="+", help="DIR or DIR:Name=JSON,...")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument(
        "--workloads",
        default=DEFAULT_WORKLOADS,
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default: %(default)s)",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    load = load_average()
    workloads = [w.strip() for w in args.workloads.split(",")]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    figures = run(args.checkouts, args.reps, args.seconds, workloads)
    results = [summary(f) for f in figures]
    print(f"load average {load} at start, {load_average()} at end")
    for checkout, result in zip(args.checkouts, results, strict=True):
        print(f"{checkout}: {line(result)}")
    if args.json:
        out = {str(c): r for c, r in zip(args.checkouts, results, strict=True)}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
