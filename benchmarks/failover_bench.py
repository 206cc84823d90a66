"""Failover time and the users it costs, with real processes on loopback.

A gateway and two home clients (A first in ``ClientIds``, B second, a
``failover`` tunnel) run under ``twistd`` with TLS, each client with a
tagged echo backend (tests/failoverkit.py). Users keep connecting, a few
at a time, each sending bytes and checking every byte of the answer. Then
A's client is ended in one of three ways:

- ``SIGTERM``: a clean close (Go Away, then the TCP close);
- ``SIGKILL``: the process is gone, the kernel resets its connections;
- ``SIGSTOP``: a silent death; only the gateway's keepalive notices
  (interval 1 s, timeout 3 s here).

For each round it records the failover time (from the signal to the first
user served by B after which no user failed) and the users refused (closed
with nothing received) and failed (cut after some bytes) from the signal
on, counting those in flight at the signal. A is brought back after each
round (restarted, or SIGCONT) and waits until it serves again. It prints
the median (and the worst) of ``--rounds`` rounds per way.

    .venv/bin/python benchmarks/failover_bench.py              # about 1.5 min
    .venv/bin/python benchmarks/failover_bench.py --rounds 3 --ways kill
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import inlineCallbacks  # noqa: E402

from tests.failoverkit import (  # noqa: E402
    HOME_A,
    HOME_B,
    Gateway,
    HomeClient,
    Outcome,
    TaggedBackend,
    UserLoop,
    tunnel_entry,
    wait_for,
)
from tests.faultkit import sleep  # noqa: E402
from tests.support import free_port  # noqa: E402

KEEPALIVE = (1.0, 3.0)
WAYS = {"term": signal.SIGTERM, "kill": signal.SIGKILL, "stop": signal.SIGSTOP}
LABELS = {
    "term": "clean close (SIGTERM)",
    "kill": "reset (SIGKILL)",
    "stop": "silent death (SIGSTOP), keepalive 1 s / 3 s",
}


class Bench:
    """One gateway, two clients and their backends, for every round."""

    def __init__(self, directory: str, concurrency: int) -> None:
        self.directory = directory
        self.concurrency = concurrency

    @inlineCallbacks
    def start(self):
        self.backends = {HOME_A: TaggedBackend("A"), HOME_B: TaggedBackend("B")}
        ports = {}
        for client_id, backend in self.backends.items():
            ports[client_id] = yield backend.start()
        self.gateway = Gateway(self.directory, keepalive=KEEPALIVE)
        self.gateway.start()
        yield self.gateway.wait_ready()
        self.clients = {
            cid: HomeClient(
                self.directory, cid, [self.gateway], {"web": ports[cid]}, KEEPALIVE
            )
            for cid in (HOME_A, HOME_B)
        }
        for client in self.clients.values():
            client.start()
        self.port = free_port()
        yield self.gateway.api.put_tunnels([tunnel_entry(self.port, [HOME_A, HOME_B])])
        yield self.serving([HOME_A, HOME_B], connected=True)
        yield self.serving([HOME_A])

    def serving(self, clients: list[str], connected: bool = False):
        @inlineCallbacks
        def check():
            tunnels = yield self.gateway.api.status()
            if connected:
                states = {c["ClientId"]: c["Connected"] for c in tunnels[0]["Clients"]}
                return all(states.get(cid) for cid in clients)
            return tunnels[0]["Serving"] == clients

        return wait_for(check, 30, f"serving {clients}")

    @inlineCallbacks
    def round(self, way: str):
        """One failover of A; return (seconds, refused, failed, later, users).

        ``later``: the users refused or failed that started after the signal.
        """
        a = self.clients[HOME_A].process
        loop = UserLoop(self.port, concurrency=self.concurrency, size=2048)
        loop.start()
        yield wait_for(lambda: len(loop.served_by("A")) >= 20, 10, "users on A")
        since = time.monotonic()
        a.signal(WAYS[way])
        yield wait_for(lambda: len(loop.served_by("B", since)) >= 20, 15, "users on B")
        yield loop.stop()
        takeover = loop.takeover(since, "B")
        if takeover is None:
            takeover = float("inf")
        # Those in flight at the signal count too: they started before it.
        in_flight = [r for r in loop.records if r.start < since <= r.end]
        hit = {id(r) for r in in_flight} | {id(r) for r in loop.bad(since)}
        records = [r for r in loop.records if id(r) in hit]
        refused = sum(1 for r in records if r.outcome is Outcome.REFUSED)
        failed = sum(1 for r in records if r.outcome is Outcome.FAILED)
        later = len(loop.bad(since))
        users = len(loop.served_by("B", since)) + later
        # Bring A back for the next round.
        if way == "stop":
            a.signal(signal.SIGCONT)
        else:
            yield a.wait(10)
            a.start()
        yield self.serving([HOME_A])
        return takeover, refused, failed, later, users

    def stop(self) -> None:
        for client in self.clients.values():
            if client.process.running:
                client.process.signal(signal.SIGCONT)
            client.process.kill()
        self.gateway.process.kill()


@inlineCallbacks
def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per way")
    parser.add_argument("--ways", default="term,kill,stop", help="term,kill,stop")
    parser.add_argument("--concurrency", type=int, default=4, help="users at once")
    parser.add_argument("--keep", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="threshold-failover-")
    bench = Bench(directory, args.concurrency)
    rows = []
    try:
        yield bench.start()
        for way in args.ways.split(","):
            results = []
            for _ in range(args.rounds):
                result = yield bench.round(way)
                results.append(result)
                yield sleep(0.2)
            rows.append((way, results))
    finally:
        bench.stop()
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, True)
    print(
        f"\n{args.rounds} rounds per way, {args.concurrency} users at a time,"
        " 2 KiB each way per user, TLS; median (worst)\n"
    )
    header = (
        "way",
        "failover time",
        "users refused",
        "users failed",
        "of them started after the signal",
        "users/round",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for way, results in rows:
        times = [r[0] * 1000 for r in results]
        refused = [r[1] for r in results]
        failed = [r[2] for r in results]
        later = [r[3] for r in results]
        users = [r[4] for r in results]
        print(
            f"| {LABELS[way]} | {statistics.median(times):.0f} ms ({max(times):.0f})"
            f" | {statistics.median(refused):g} ({max(refused)})"
            f" | {statistics.median(failed):g} ({max(failed)})"
            f" | {statistics.median(later):g} ({max(later)})"
            f" | {statistics.median(users):g} |"
        )


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
