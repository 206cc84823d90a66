"""Figures for the cluster store on a real etcd (not a test; run by hand).

    .venv/bin/python -m tests.etcd_bench [--tls] [--rounds N]

Prints: etcd start time (until a KV read answers), put -> watch event
latency (median and 95th percentile of N puts, one at a time), and the
time to write and read back a 1,000-tunnel document through the store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

from tests.etcdkit import EtcdProcess
from threshold.cluster.etcd import EtcdClient
from threshold.cluster.kv import Event
from threshold.cluster.store import ClusterStore, encode


def _tunnels(n: int) -> list[dict[str, object]]:
    return [
        {
            "ClientId": f"client{i % 50}",
            "ListenAddress": "0.0.0.0",
            "ListenPort": 10000 + i,
            "ListenHostnameGlob": f"host{i}.example.org",
            "BackEndService": f"service{i}",
            "HaProxyProxyProtocol": True,
        }
        for i in range(n)
    ]


async def _run(reactor: Any, tls: bool, rounds: int) -> None:
    directory = tempfile.mkdtemp(prefix="threshold-etcd-bench-")
    try:
        starts = []
        for i in range(3):
            etcd = EtcdProcess(os.path.join(directory, str(i)), tls=tls)
            os.makedirs(etcd.directory)
            starts.append(etcd.start())
            if i < 2:
                etcd.kill()
        print(f"etcd start: {', '.join(f'{s * 1000:.0f} ms' for s in starts)}")
        client = EtcdClient(
            [etcd.url], reactor, tls=etcd.tls.client() if etcd.tls else None
        )
        latencies: list[float] = []
        arrived: list[defer.Deferred[None]] = []

        def on_event(event: Event) -> None:
            arrived.pop(0).callback(None)

        watch = client.watch("/bench/", 0, on_event)
        while watch.state.value != "watching":
            await task.deferLater(reactor, 0.01, lambda: None)
        for i in range(rounds):
            d: defer.Deferred[None] = defer.Deferred()
            arrived.append(d)
            began = time.perf_counter()
            await client.put(f"/bench/{i}", b"x" * 100)
            await d
            latencies.append(time.perf_counter() - began)
        latencies.sort()
        p95 = latencies[int(len(latencies) * 0.95) - 1]
        print(
            f"put -> watch event: median {statistics.median(latencies) * 1000:.1f} ms,"
            f" p95 {p95 * 1000:.1f} ms ({rounds} puts)"
        )
        store = ClusterStore(client, reactor, "/bench-store/")
        document = _tunnels(1000)
        size = len(encode(document))
        times = []
        revision = 0
        for _ in range(5):
            began = time.perf_counter()
            revision = await store.write_tunnels(document, revision)
            read = await store.read_tunnels()
            times.append(time.perf_counter() - began)
            assert read.document == document
        print(
            f"1,000-tunnel document ({size / 1024:.0f} KiB): write + read"
            f" median {statistics.median(times) * 1000:.1f} ms (5 rounds)"
        )
        await client.close()
        etcd.kill()
    finally:
        shutil.rmtree(directory, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls", action="store_true", help="mutual TLS to etcd")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    task.react(lambda r: defer.Deferred.fromCoroutine(_run(r, args.tls, args.rounds)))


if __name__ == "__main__":
    main()
