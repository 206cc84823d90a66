"""What the access policy costs a new connection: a 1,000-entry deny list and a rate.

``python benchmarks/policy_bench.py [SECONDS] [WORKERS] [ROUNDS]`` measures:

1. the admission check alone, in this process
   (:meth:`threshold.server.policy.GatewayPolicy.check`): nanoseconds per
   call with no policy, with a 1,000-entry ``DenySourceCidrs`` (IPv4 and
   IPv6 CIDRs; the sources are never in it, so every call bisects the
   whole list), and with the list and a ``MaxNewConnectionsPerSecondPerSourceIp``
   over 10,000 distinct sources (one token bucket each);
2. new connections per second through one gateway (``twistd
   threshold-server``, plaintext), one client and the example backend, on
   three tunnels of the same gateway in the same run: two with no policy
   (their difference is the noise of the run), one with the 1,000-entry
   deny list and a rate limit high enough never to refuse (so it does all
   its work). WORKERS processes connect, send a line, read the answer and
   close, for SECONDS on each tunnel in turn, ROUNDS times (the order
   rotating); prints the medians, their ratios, and the gateway's CPU time
   per connection on each.

Everything shares this machine's cores (load, client, backend, gateway):
the ratio is the figure to read, not the absolute rate.
"""

from __future__ import annotations

import importlib.machinery
import ipaddress
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
example = importlib.machinery.SourceFileLoader(
    "example_cluster", os.path.join(ROOT, "example", "cluster")
).load_module()

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from threshold.server.policy import GatewayPolicy, PolicySettings  # noqa: E402
from threshold.server.stats import GatewayStats  # noqa: E402
from threshold.server.tunnels import parse_tunnels  # noqa: E402

CLIENT = "bench"


def deny_list(count: int = 1000, seed: int = 15) -> list[str]:
    """``count`` CIDRs (3 IPv4 to 1 IPv6), none holding 127.0.0.0/8 or 10.0.0.0/8."""
    rng = random.Random(seed)
    cidrs: list[str] = []
    while len(cidrs) < count:
        if len(cidrs) % 4 == 3:
            net = ipaddress.ip_network((rng.getrandbits(128), 48), strict=False)
        else:
            net = ipaddress.ip_network((rng.getrandbits(32), 24), strict=False)
            first = int(net.network_address) >> 24
            if first in (10, 127):
                continue
        cidrs.append(str(net))
    return cidrs


def entry(port: int, **policy: object) -> dict[str, object]:
    return {
        "ClientId": CLIENT,
        "ListenAddress": "127.0.0.1",
        "ListenPort": port,
        "BackEndService": "web",
        "HaProxyProxyProtocol": True,
        **policy,
    }


LIMITED = {
    "DenySourceCidrs": deny_list(),
    "MaxNewConnectionsPerSecondPerSourceIp": 1_000_000,
    "NewConnectionBurst": 1_000_000,
}


def time_checks(calls: int = 100_000, repeat: int = 5) -> dict[str, float]:
    """Nanoseconds per GatewayPolicy.check call, the best of ``repeat`` runs."""
    sources = [
        IPv4Address("TCP", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 4000)
        for i in range(10_000)
    ]
    cases = {
        "no policy": entry(1),
        "1,000-entry deny list": entry(1, DenySourceCidrs=LIMITED["DenySourceCidrs"]),
        "deny list + rate limit": entry(1, **LIMITED),
    }
    results = {}
    for name, fields in cases.items():
        tunnel = parse_tunnels([fields])[0]
        runs = []
        for _ in range(repeat):
            clock = Clock()
            policy = GatewayPolicy(PolicySettings(), clock, GatewayStats())
            check = policy.check
            start = time.perf_counter()
            for i in range(calls):
                if check(sources[i % 10_000], tunnel, [CLIENT]) is not None:
                    raise AssertionError(f"{name}: refused")
            runs.append((time.perf_counter() - start) / calls * 1e9)
        results[name] = min(runs)  # the least disturbed by the rest of the box
    return results


def worker(port: int, seconds: float, counts: multiprocessing.Queue) -> None:
    done = failed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"hi\n")
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
            if answer.startswith(b"backend"):
                done += 1
            else:
                failed += 1
        except OSError:
            failed += 1
    counts.put((done, failed))


def load(port: int, seconds: float, workers: int) -> tuple[float, int]:
    counts: multiprocessing.Queue = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=worker, args=(port, seconds, counts))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    results = [counts.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway(work: str) -> tuple[int, int, int, int]:
    """Backend, gateway, client: (management port, plain, plain again, limited)."""
    ex = example
    port_file = os.path.join(work, "backend.port")
    ex.start(
        "backend",
        [ex.PYTHON, os.path.join(ex.EXAMPLE, "backend.py"), "--port-file", port_file],
        work,
    )
    ex.wait("backend", lambda: os.path.exists(port_file) and os.path.getsize(port_file))
    backend = int(open(port_file).read())
    control, management = ex.free_port(), ex.free_port()
    server = os.path.join(work, "server.json")
    with open(server, "w") as f:
        json.dump(
            {
                "UseTls": False,
                "ListenAddress": "127.0.0.1",
                "TunnelControlPort": control,
                "ManagementPort": management,
                # The load comes from one address: no per-source cap here.
                "MaxConnectionsPerSourceIp": 0,
            },
            f,
        )
    ex.start(
        "gateway",
        [ex.TWISTD, "-n", "--pidfile=", "threshold-server", "-c", server],
        work,
    )
    ex.wait("gateway", lambda: ex.api(management, "GET", "/ping")[0] == 200)
    client = os.path.join(work, "client.json")
    with open(client, "w") as f:
        json.dump(
            {
                "ClientId": CLIENT,
                "UseTls": False,
                "ServerHost": "127.0.0.1",
                "ServerTunnelControlPort": control,
                "ServiceToLocalAddrMap": {"web": f"127.0.0.1:{backend}"},
            },
            f,
        )
    ex.start(
        "client",
        [ex.TWISTD, "-n", "--pidfile=", "threshold-client", "-c", client],
        work,
    )
    ex.wait(
        "client",
        lambda: (
            ex.api(management, "GET", "/clients")[2].get(CLIENT, {}).get("CurrentState")
            == "ClientConnected"
        ),
    )
    plain, again, limited = ex.free_port(), ex.free_port(), ex.free_port()
    status, _, body = ex.api(
        management,
        "PUT",
        "/tunnels",
        [entry(plain), entry(again), entry(limited, **LIMITED)],
    )
    assert status == 200, body
    return management, plain, again, limited


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    checks = time_checks()
    work = tempfile.mkdtemp(prefix="threshold-policy-bench-")
    names = ("no policy", "no policy again", "deny list + rate")
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    failures = 0
    try:
        management, *ports = gateway(work)
        pid = example.procs["gateway"].pid
        time.sleep(0.5)
        # Two identical tunnels show the noise; the order rotates each round,
        # so a drift of the machine's load hits every tunnel alike.
        runs = list(zip(names, ports, strict=True))
        for round_ in range(rounds):
            shift = round_ % len(runs)
            for name, port in runs[shift:] + runs[:shift]:
                before = cpu_seconds(pid)
                rate, failed = load(port, seconds, workers)
                used = cpu_seconds(pid) - before
                failures += failed
                rates[name].append(rate)
                cpu[name].append(used / max(1.0, rate * seconds) * 1e6)
        _, _, clients = example.api(management, "GET", "/clients")
        refused = clients[CLIENT]["Refused"]
    finally:
        example.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(f"cores: {os.cpu_count()}, load workers: {workers}, {seconds:g}s x {rounds}")
    print("admission check alone (GatewayPolicy.check, ns per call, best of 5):")
    for name, ns in checks.items():
        print(f"  {name:24s} {ns:8.0f} ns")
    base = statistics.median(rates["no policy"])
    print(
        "through the gateway (new connections/s, median; gateway CPU per connection):"
    )
    for name in rates:
        median = statistics.median(rates[name])
        print(
            f"  {name:18s} {median:6.0f} /s ({median / base:.3f}x)"
            f"  {statistics.median(cpu[name]):6.0f} us CPU"
            f"   runs: {', '.join(f'{r:.0f}' for r in rates[name])}"
        )
    refusals = sum(refused.values())
    print(f"failed connections: {failures}; refused by the policy: {refusals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
