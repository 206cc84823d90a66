"""Egress through the gateway against direct TCP: bulk and connection set-up.

Run from a checkout::

    .venv/bin/python benchmarks/egress_bench.py [--quick] [--size 100]

One run starts a destination on loopback (its own process: an HTTP server
that serves ``--size`` MiB on GET and takes a PUT of any size, and a
banner service that writes one line on accept, as an SMTP server does) and
two deployments of a tunnel server and client under ``twistd``
(``UseTls`` false, and mutual TLS with certificates from
``threshold.keygen``, as udp_bench.py and tunnel_bench.py do). Each client
has ``Egress.SocksListen``; each gateway's ``EgressPolicy`` allows it
``127.0.0.1/32`` (named explicitly: loopback is a special range) on the two
ports. Then, straight to the destination and through each SOCKS5 proxy:

- bulk: ``curl`` (``--socks5-hostname``) downloads and uploads ``--size``
  MiB, ``--rounds`` times each way, interleaved over the paths: MB/s (the
  median of the rounds, bytes over curl's ``time_total``) and the CPU
  seconds per GB of the tunnel's two processes (utime + stime from
  /proc/PID/stat before and after each transfer);
- set-up: ``--connections`` connections one at a time with a small SOCKS5
  client here: the time from sending the CONNECT request to the first byte
  of the banner (direct: from ``connect()``), median and p99, and the
  tunnel's CPU microseconds per connection.

Progress goes to stderr, the report (markdown) to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tunnel_bench import (  # noqa: E402
    GB,
    MB,
    BenchError,
    Child,
    Children,
    Deployment,
    MiB,
    Pki,
    cpu_snapshot,
    cpu_used,
    free_port,
    load_average,
    say,
)

#: The destination: HTTP (GET /blob: SIZE bytes; PUT: read and dropped) on
#: HTTP_PORT and a banner line on BANNER_PORT, each connection in a thread.
DESTINATION = """
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
http_port, banner_port, size = (int(a) for a in sys.argv[1:4])
CHUNK = b"x" * (1 << 20)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        left = size
        while left:
            n = min(left, len(CHUNK))
            self.wfile.write(CHUNK[:n])
            left -= n
    def do_PUT(self):
        left = int(self.headers["Content-Length"])
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                return
            left -= len(data)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")

def banner():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", banner_port))
    s.listen(128)
    while True:
        conn, _ = s.accept()
        conn.sendall(b"220 egress bench\\r\\n")
        conn.close()

threading.Thread(target=banner, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", http_port), Handler).serve_forever()
"""

CLIENT_ID = "bench"
PATHS = ("direct", "tunnel", "tunnel+TLS")


class EgressDeployment(Deployment):
    """A Deployment whose client has a SOCKS5 proxy and whose gateway's
    EgressPolicy allows it the destination's ports on 127.0.0.1."""

    def __init__(self, *args: Any, ports: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socks_port = free_port()
        self.ports = ports

    def _twistd(self, name: str, plugin: str, config: dict) -> Child:
        if plugin == "threshold-server":
            rule = {"Cidr": "127.0.0.1/32", "Ports": ",".join(map(str, self.ports))}
            config["EgressPolicy"] = {CLIENT_ID: [rule]}
        else:
            config["Egress"] = {"SocksListen": f"127.0.0.1:{self.socks_port}"}
        return super()._twistd(name, plugin, config)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BenchError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def socks_first_byte(proxy_port: int, port: int) -> float:
    """Seconds from a SOCKS5 CONNECT to 127.0.0.1:``port`` through the proxy
    on ``proxy_port`` until the destination's first byte arrives."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
        if _recv_exact(s, 2) != b"\x05\x00":
            raise BenchError("the SOCKS5 proxy refused the no-authentication method")
        start = time.perf_counter()
        request = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
        s.sendall(request + port.to_bytes(2, "big"))
        version, reply, _, atyp = _recv_exact(s, 4)
        if version != 5 or reply != 0:
            raise BenchError(f"SOCKS5 CONNECT answered {reply:#04x}")
        _recv_exact(s, {1: 4, 4: 16}.get(atyp, 0) + 2)  # bound address, port
        _recv_exact(s, 1)
        return time.perf_counter() - start


def direct_first_byte(port: int) -> float:
    """Seconds from ``connect()`` to 127.0.0.1:``port`` until its first byte."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        _recv_exact(s, 1)
        return time.perf_counter() - start


def curl(proxy_port: int | None, url: str, upload: Path | None) -> tuple[int, float]:
    """One transfer with curl; (bytes moved, seconds)."""
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null"]
    argv += ["-w", "%{size_download} %{size_upload} %{time_total}"]
    if proxy_port is None:
        argv += ["--noproxy", "*"]
    else:
        argv += ["--socks5-hostname", f"127.0.0.1:{proxy_port}"]
    if upload is not None:
        argv += ["-T", str(upload), "-H", "Expect:"]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        [*argv, url], capture_output=True, text=True, env=env, timeout=300
    )
    if done.returncode != 0:
        raise BenchError(f"curl {url}: {done.stderr.strip()} ({done.returncode})")
    down, up, seconds = done.stdout.split()
    moved = int(float(up)) if upload is not None else int(float(down))
    return moved, float(seconds)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def run(args: argparse.Namespace, workdir: Path, figures: dict[str, Any]) -> None:
    children = Children(workdir)
    size = args.size * MiB
    try:
        http_port, banner_port = free_port(), free_port()
        argv = [sys.executable, "-c", DESTINATION, str(http_port), str(banner_port)]
        children.start("destination", [*argv, str(size)], line_output=False)
        figures["ports"] = [http_port, banner_port]
        upload = workdir / "upload.bin"
        with open(upload, "wb") as f:
            for _ in range(args.size):
                f.write(b"u" * MiB)
        pki = Pki(workdir / "pki", [CLIENT_ID])
        proxies: dict[str, int | None] = {"direct": None}
        groups = {}
        for path, tls in (("tunnel", False), ("tunnel+TLS", True)):
            deployment = EgressDeployment(
                path.replace("+", "-").lower(),
                tls,
                workdir,
                pki,
                children,
                http_port,
                4096,
                ports=[http_port, banner_port],
            )
            deployment.start_server()
            deployment.start_client(CLIENT_ID)
            proxies[path] = deployment.socks_port
            figures["ports"].append(deployment.socks_port)
            groups[path] = deployment.processes(CLIENT_ID)
        url = f"http://127.0.0.1:{http_port}/blob"
        curl(None, url, None)  # the destination is up
        bulk: dict[str, dict[str, list]] = {
            p: {"down": [], "up": [], "cpu_down": [], "cpu_up": []} for p in PATHS
        }
        for round_ in range(args.rounds):
            for way in ("down", "up"):
                for path in PATHS:
                    say(f"round {round_ + 1}: {path} {way} {args.size} MiB ...")
                    before = cpu_snapshot(groups[path]) if path in groups else None
                    moved, seconds = curl(
                        proxies[path], url, upload if way == "up" else None
                    )
                    if moved != size:
                        raise BenchError(f"{path} {way}: {moved} of {size} bytes")
                    bulk[path][way].append(moved / seconds / MB)
                    if before is not None:
                        cpu = sum(cpu_used(before, cpu_snapshot(groups[path])))
                        bulk[path][f"cpu_{way}"].append(cpu / (moved / GB))
        setup: dict[str, dict[str, Any]] = {}
        for path in PATHS:
            say(f"{path}: {args.connections} connections one at a time ...")
            proxy = proxies[path]

            def once(proxy: int | None = proxy) -> float:
                if proxy is None:
                    return direct_first_byte(banner_port)
                return socks_first_byte(proxy, banner_port)

            for _ in range(5):  # warm up
                once()
            before = cpu_snapshot(groups[path]) if path in groups else None
            times = [once() for _ in range(args.connections)]
            entry: dict[str, Any] = {
                "p50": statistics.median(times),
                "p99": percentile(times, 0.99),
            }
            if before is not None:
                cpu = sum(cpu_used(before, cpu_snapshot(groups[path])))
                entry["cpu"] = cpu / args.connections
            setup[path] = entry
        figures["bulk"] = bulk
        figures["setup"] = setup
    finally:
        children.stop_all()
    figures["load"] = load_average()


def _cell(value: float | None, direct: float | None, fmt: str) -> str:
    if value is None:
        return "— | —"
    ratio = f"{value / direct:.2f}×" if direct else "—"
    return f"{fmt.format(value)} | {ratio}"


def report(args: argparse.Namespace, figures: dict[str, Any]) -> list[str]:
    bulk, setup = figures["bulk"], figures["setup"]

    def med(path: str, key: str, scale: float = 1.0) -> float | None:
        values = bulk[path][key]
        return statistics.median(values) * scale if values else None

    rows: list[tuple[str, Any, str]] = [
        ("download, MB/s", lambda p: med(p, "down"), "{:,.0f}"),
        ("upload, MB/s", lambda p: med(p, "up"), "{:,.0f}"),
        ("download, tunnel CPU s/GB", lambda p: med(p, "cpu_down"), "{:.2f}"),
        ("upload, tunnel CPU s/GB", lambda p: med(p, "cpu_up"), "{:.2f}"),
        ("set-up to first byte, p50", lambda p: setup[p]["p50"] * 1e6, "{:,.0f} µs"),
        ("set-up to first byte, p99", lambda p: setup[p]["p99"] * 1e6, "{:,.0f} µs"),
        (
            "tunnel CPU per connection",
            lambda p: setup[p]["cpu"] * 1e6 if "cpu" in setup[p] else None,
            "{:,.0f} µs",
        ),
    ]
    lines = [
        f"Egress, {args.size} MiB each way, {args.rounds} rounds (medians),"
        f" {args.connections} connections one at a time; load {figures['load']}"
        f" ({os.cpu_count()} CPUs; curl, destination and tunnel on one host)",
        "",
        "| figure | direct | tunnel | ratio | tunnel+TLS | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for label, value, fmt in rows:
        direct = value("direct")
        cells = [fmt.format(direct) if direct is not None else "—"]
        cells += [_cell(value(p), direct, fmt) for p in PATHS[1:]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB, 50 connections")
    parser.add_argument("--size", type=int, help="MiB each way (default 100)")
    parser.add_argument("--rounds", type=int, help="bulk rounds (default 3)")
    parser.add_argument("--connections", type=int, help="set-up runs (default 200)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    defaults = (8, 1, 50) if args.quick else (100, 3, 200)
    for name, default in zip(("size", "rounds", "connections"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("curl") is None:
        say("egress_bench: needs curl (apt-get install -y curl)")
        return 2

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    say(f"egress_bench: working directory {workdir}")
    figures: dict[str, Any] = {"workdir": str(workdir)}
    try:
        run(args, workdir, figures)
    except BenchError as e:
        say(f"egress_bench: {e}")
        return 1
    except KeyboardInterrupt:
        say("egress_bench: interrupted; every process it started is stopped")
        return 130
    finally:
        if args.keep:
            say(f"egress_bench: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(report(args, figures)))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
