"""System calls per new connection and per GB through one threshold TLS tunnel.

Run from a checkout (needs strace)::

    .venv/bin/python benchmarks/std_syscalls.py [CHECKOUT] [--workload close|bulk|bulk8]

Starts the tunnel as std_bench does (CHECKOUT's code, default this one),
attaches ``strace -c -f`` to both processes and runs ``ab -c 1 -n 1000``
(``close``: a new connection per request) or ``iperf3 -n 512M`` with 1 or
8 streams; prints the calls per connection or per GB by process, the most
frequent first. Unlike CPU time, these counts do not move with the load
of a shared machine, so they compare two code states on it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import std_tools
import tunnel_bench
from std_services import PAGE, Iperf3Server, Nginx, Threshold, make_pki
from tunnel_bench import Children, say

#: One row of ``strace -c``: % time, seconds, usecs/call, calls, [errors], name.
ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$")


def counts(path: Path) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", nargs="?", type=Path, default=tunnel_bench.ROOT)
    parser.add_argument(
        "--workload", choices=["close", "bulk", "bulk8"], default="close"
    )
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    strace = shutil.which("strace")
    if strace is None:
        print("std_syscalls: needs strace (apt-get install strace)", file=sys.stderr)
        return 1
    tools = std_tools.ensure(["iperf3", "ab", "nginx"], install=False, say=say)
    tunnel_bench.ROOT = args.checkout.resolve()  # Child's PYTHONPATH
    work = Path(tempfile.mkdtemp(prefix="threshold-std-syscalls-"))
    children = Children(work)
    try:
        nginx = Nginx(tools["nginx"], work / "nginx", children)
        nginx.start()
        iperf = Iperf3Server(tools["iperf3"], children)
        iperf.start()
        backends = {"http": nginx.port, "iperf": iperf.port}
        tunnel = Threshold(
            True, work / "tls", children, backends, make_pki(work / "pki")
        )
        tunnel.start()
        server, client = tunnel.processes()
        tracers = [
            subprocess.Popen(
                [
                    strace,
                    "-c",
                    "-f",
                    "-o",
                    str(work / f"{role}.strace"),
                    "-p",
                    str(pid),
                ],
                stderr=subprocess.DEVNULL,
            )
            for role, pid in (("server", server[0]), ("client", client[0]))
        ]
        time.sleep(1)  # strace attached
        if args.workload == "close":
            url = f"http://127.0.0.1:{tunnel.ports['http']}{PAGE}"
            subprocess.run(
                [tools["ab"], "-c", "1", "-n", str(args.connections), url],
                capture_output=True,
                check=True,
            )
            per, unit = args.connections, "connection"
        else:
            streams = "8" if args.workload == "bulk8" else "1"
            port = str(tunnel.ports["iperf"])
            subprocess.run(
                [tools["iperf3"], "-c", "127.0.0.1", "-p", port, "-n", "512M"]
                + ["-P", streams],
                capture_output=True,
                check=True,
            )
            per, unit = 0.512, "GB"
        time.sleep(0.5)
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
        for tracer in tracers:
            tracer.wait()
        print(f"{args.checkout}, {args.workload}:")
        for role in ("server", "client"):
            calls = counts(work / f"{role}.strace")
            top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
            print(
                f"  {role}: {sum(calls.values()) / per:,.1f} calls per {unit}: "
                + ", ".join(f"{name} {n / per:,.1f}" for name, n in top)
            )
        tunnel.stop()
    finally:
        children.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
