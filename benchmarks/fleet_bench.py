"""New connections per second through a shared public port: one gateway or two.

``python benchmarks/fleet_bench.py [SECONDS] [WORKERS]`` starts etcd, the
example backend, one client and one gateway, then two gateways of a fleet
sharing the public port with ``SO_REUSEPORT`` (the client holds a session
to each), and runs the same load loop against each layout: WORKERS
processes each connecting, sending a line, reading the answer and
closing, for SECONDS. Prints connections/s for both. Everything runs on
this machine, so the load loop, the client and the backend share the
cores with the gateways: the figure says how much a second gateway adds
on this box, not on a dedicated one.
"""

from __future__ import annotations

import importlib.machinery
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
example = importlib.machinery.SourceFileLoader(
    "example_cluster", os.path.join(ROOT, "example", "cluster")
).load_module()


def worker(port: int, seconds: float, counts: multiprocessing.Queue) -> None:
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"hi\n")
                while s.recv(4096):
                    pass
            done += 1
        except OSError:
            pass
    counts.put(done)


def load(port: int, seconds: float, workers: int) -> float:
    counts: multiprocessing.Queue = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=worker, args=(port, seconds, counts))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    total = sum(counts.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def run(layout: int, work: str, seconds: float, workers: int) -> float:
    ex = example
    etcd_port, peer_port = ex.free_port(), ex.free_port()
    tag = f"l{layout}"
    ex.start(
        f"etcd-{tag}",
        [
            shutil.which("etcd"),
            f"--name={tag}",
            f"--data-dir={work}/{tag}.etcd",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster={tag}=http://127.0.0.1:{peer_port}",
            "--log-level=warn",
        ],
        work,
    )
    ex.wait("etcd", lambda: ex.etcd_healthy(etcd_port))
    port_file = os.path.join(work, f"{tag}.backend.port")
    ex.start(
        f"backend-{tag}",
        [ex.PYTHON, os.path.join(ex.EXAMPLE, "backend.py"), "--port-file", port_file],
        work,
    )
    ex.wait("backend", lambda: os.path.getsize(port_file) > 0)
    backend = int(open(port_file).read())
    gateways = []
    for i in range(layout):
        control, management = ex.free_port(), ex.free_port()
        path = os.path.join(work, f"{tag}.gw{i}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "UseTls": False,
                    "ListenAddress": "127.0.0.1",
                    "TunnelControlPort": control,
                    "ManagementPort": management,
                    "Cluster": {
                        "EtcdEndpoints": [f"http://127.0.0.1:{etcd_port}"],
                        "GatewayId": f"gw{i}",
                        "KeyPrefix": f"/{tag}/",
                    },
                },
                f,
            )
        ex.start(
            f"{tag}-gw{i}",
            [ex.TWISTD, "-n", "--pidfile=", "threshold-server", "-c", path],
            work,
        )
        gateways.append((control, management))
    for _, management in gateways:
        ex.wait("gateway", lambda m=management: ex.api(m, "GET", "/ping")[0] == 200)
    client = os.path.join(work, f"{tag}.client.json")
    with open(client, "w") as f:
        json.dump(
            {
                "ClientId": "home",
                "UseTls": False,
                "Servers": [
                    {"Host": "127.0.0.1", "TunnelControlPort": c} for c, _ in gateways
                ],
                "ServiceToLocalAddrMap": {"web": f"127.0.0.1:{backend}"},
            },
            f,
        )
    ex.start(
        f"{tag}-client",
        [ex.TWISTD, "-n", "--pidfile=", "threshold-client", "-c", client],
        work,
    )
    first = gateways[0][1]
    ex.wait(
        "client on every gateway",
        lambda: (
            len(ex.api(first, "GET", "/clients")[2].get("home", {}).get("Gateways", []))
            == layout
        ),
    )
    public = ex.free_port()
    status, _, body = ex.api(
        first,
        "PUT",
        "/tunnels",
        [
            {
                "ClientId": "home",
                "ListenAddress": "127.0.0.1",
                "ListenPort": public,
                "BackEndService": "web",
                "HaProxyProxyProtocol": True,
            }
        ],
    )
    assert status == 200, body
    time.sleep(0.5)
    rate = load(public, seconds, workers)
    for name in [n for n in ex.procs if n.endswith(tag) or n.startswith(tag)]:
        proc = ex.procs.pop(name)
        proc.terminate()
        proc.wait(10)
    return rate


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    work = tempfile.mkdtemp(prefix="threshold-fleet-bench-")
    try:
        one = run(1, work, seconds, workers)
        two = run(2, work, seconds, workers)
    finally:
        example.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(f"cores: {os.cpu_count()}, load workers: {workers}, {seconds:g}s each")
    print(f"one gateway : {one:8.1f} new connections/s")
    print(f"two gateways: {two:8.1f} new connections/s ({two / one:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
