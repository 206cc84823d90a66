"""UDP tunnels against direct UDP: datagrams per second, loss, latency.

Run from a checkout::

    .venv/bin/python benchmarks/udp_bench.py [--quick] [--size 100]

One run starts a UDP echo service (its own process) and two deployments
of a tunnel server and client under ``twistd`` (``UseTls`` false, and
mutual TLS with certificates from ``threshold.keygen``, as tunnel_bench.py's
two columns), opens a UDP tunnel on each with ``PUT /tunnels``, and from
this process sends paced datagrams (sequence number and send time inside)
at each offered rate, straight to the echo service, then through each
tunnel: the answers received per second, the loss (datagrams sent whose
answer never came within a second of the end), and the round-trip
latency's median and 99th percentile. One flow, then 64 flows sharing the
same rate. Progress goes to stderr, the report (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tunnel_bench import (  # noqa: E402
    BenchError,
    Children,
    Deployment,
    Pki,
    free_port,
    load_average,
    say,
)

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
    s.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, addr = s.recvfrom(65536)
    s.sendto(data, addr)
"""

_STAMP = struct.Struct("!Id")


@dataclass
class Result:
    offered: int
    flows: int
    sent: int
    received: int
    seconds: float
    p50: float
    p99: float

    @property
    def rate(self) -> float:
        return self.received / self.seconds

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else 0.0


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(port: int, rate: int, seconds: float, size: int, flows: int) -> Result:
    """Send ``rate`` datagrams/s for ``seconds`` over ``flows`` sockets; measure."""
    socks = []
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            s.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    pad = b"x" * max(0, size - _STAMP.size)
    rtts: list[float] = []
    seen: set[int] = set()
    total = int(rate * seconds)
    start = time.perf_counter()
    sent = 0

    def drain(timeout: float) -> None:
        ready, _, _ = select.select(socks, [], [], timeout)
        now = time.perf_counter()
        for s in ready:
            while True:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    break
                seq, stamp = _STAMP.unpack_from(data)
                if seq not in seen:
                    seen.add(seq)
                    rtts.append(now - stamp)

    while sent < total:
        due = int((time.perf_counter() - start) * rate) + 1
        while sent < min(due, total):
            s = socks[sent % flows]
            try:
                s.send(_STAMP.pack(sent, time.perf_counter()) + pad)
            except BlockingIOError:
                pass  # the kernel's buffer is full: a loss like any other
            sent += 1
        drain(0.0005)
    elapsed = time.perf_counter() - start
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end and len(seen) < total:
        drain(0.05)
    for s in socks:
        s.close()
    rtts.sort()
    p50 = statistics.median(rtts) if rtts else float("nan")
    p99 = rtts[int(len(rtts) * 0.99) - 1] if len(rtts) >= 100 else float("nan")
    return Result(rate, flows, total, len(seen), elapsed, p50, p99)


def start_tunnel(
    children: Children, workdir: Path, echo_port: int, tls: bool, pki: Pki
) -> tuple:
    name = "udp-tls" if tls else "udp"
    deployment = Deployment(name, tls, workdir, pki, children, echo_port, 4096)
    deployment.start_server()
    deployment.start_client("bench")
    port = free_udp_port()
    body = [
        {
            "ClientId": "bench",
            "ListenAddress": "127.0.0.1",
            "ListenPort": port,
            "BackEndService": "bench",
            "Protocol": "udp",
            # Each run's flows end before the next run opens its own (the
            # gateway's UdpMaxFlowsPerSourceIp counts them all: one source).
            "UdpFlowIdleSeconds": 1,
        }
    ]
    answer = json.loads(deployment.api("PUT", "/tunnels", body))
    if len(answer) != 1:
        raise BenchError(f"PUT /tunnels answered {answer}")
    return deployment, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s per rate")
    parser.add_argument("--size", type=int, default=100, help="datagram bytes")
    parser.add_argument(
        "--rates", default="1000,5000,10000,20000", help="datagrams/s to offer"
    )
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else 3.0
    rates = [int(r) for r in args.rates.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="udp-bench-"))
    children = Children(workdir)
    paths = ("direct", "tunnel", "tunnel+TLS")
    results: dict[str, list[Result]] = {path: [] for path in paths}
    try:
        echo_port = free_port()
        children.start(
            "echo",
            [sys.executable, "-c", ECHO, str(echo_port)],
            line_output=False,
        )
        time.sleep(0.3)
        pki = Pki(workdir / "pki", ["bench"])
        plain, plain_port = start_tunnel(children, workdir, echo_port, False, pki)
        tls, tls_port = start_tunnel(children, workdir, echo_port, True, pki)
        ports = dict(zip(paths, (echo_port, plain_port, tls_port), strict=True))
        time.sleep(0.5)
        for flows in (1, 64):
            for rate in rates:
                for path in paths:
                    say(f"{path}: {flows} flows at {rate}/s ...")
                    result = run_load(ports[path], rate, seconds, args.size, flows)
                    results[path].append(result)
                    time.sleep(1.5)
        plain.stop()
        tls.stop()
    finally:
        children.stop_all()
    load = load_average()
    print(f"UDP, {args.size}-byte datagrams, {seconds:g} s per rate, load {load}")
    print(f"({os.cpu_count()} CPUs; sender and echo on the same host)")
    print()
    print("| flows | offered/s | path | answered/s | loss | p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for row in zip(*(results[path] for path in paths), strict=True):
        for path, r in zip(paths, row, strict=True):
            print(
                f"| {r.flows} | {r.offered} | {path} | {r.rate:,.0f} |"
                f" {r.loss:.2%} | {r.p50 * 1e6:,.0f} µs | {r.p99 * 1e6:,.0f} µs |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
