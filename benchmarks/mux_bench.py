"""Throughput of the yamux session layer against plain TCP, over loopback.

Run from a checkout::

    .venv/bin/python benchmarks/mux_bench.py [--seconds N] [--size MB]

Each measurement runs a receiver and a sender in two separate processes
(this same script in another role), each with its own Twisted reactor,
joined by real loopback TCP. The workloads:

- bulk, 1 stream: ``--size`` MiB in 64 KiB writes (what a relay writes: a
  Twisted TCP read is at most 64 KiB) through one mux stream;
- bulk, 16 streams: the same total split over 16 concurrent streams of one
  mux session;
- small writes: 64-byte writes through one stream for ``--seconds``.

Each is measured the same way over plain TCP, the baseline: 1 or 16 TCP
connections between the same two processes, with the same writes. Every
run checks the byte counts; the first run of each pair is a warm-up that
also checks a SHA-256 of everything received and is left out of the
figures. The median of ``--repeat`` runs is printed, with its ratio to the
baseline and the CPU seconds each process spent per GB moved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from payload import cyclic_digest, make_block

from threshold.mux.interfaces import StreamAcceptor

ROOT = Path(__file__).resolve().parent.parent
BULK_WRITE = 64 * 1024
SMALL_WRITE = 64
MB = 1_000_000
GB = 1_000_000_000


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- child processes --------------------------------------------------------


def run_receiver(args: argparse.Namespace) -> None:
    """Accept connections, count (and hash) bytes, report each on FIN."""
    sys.path.insert(0, str(ROOT))
    from twisted.internet import reactor
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    from threshold.mux.session import MuxSession

    state = {"reports": 0, "connections": 0, "bytes": 0, "cpu0": 0.0}

    def connection_made() -> None:
        if not state["connections"] and not state["reports"]:
            state["cpu0"] = cpu_seconds()
        state["connections"] += 1

    def connection_lost() -> None:
        state["connections"] -= 1
        if state["reports"] >= args.streams and state["connections"] == 0:
            cpu = cpu_seconds() - state["cpu0"]
            print(json.dumps({"cpu": cpu, "bytes": state["bytes"]}), flush=True)
            reactor.stop()

    @implementer(IHalfCloseableProtocol)
    class Sink(Protocol):
        """Counts a stream's (or a TCP connection's) bytes; reports on FIN."""

        def __init__(self, tcp: bool) -> None:
            self.tcp = tcp
            self.count = 0
            self.digest = hashlib.sha256() if args.hash else None

        def connectionMade(self) -> None:  # noqa: N802
            if self.tcp:
                connection_made()

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            self.count += len(data)
            if self.digest is not None:
                self.digest.update(data)

        def readConnectionLost(self) -> None:  # noqa: N802
            report = {
                "bytes": self.count,
                "sha256": self.digest.hexdigest() if self.digest else None,
            }
            self.transport.write(json.dumps(report).encode() + b"\n")
            self.transport.loseConnection()
            state["reports"] += 1
            state["bytes"] += self.count

        def writeConnectionLost(self) -> None:  # noqa: N802
            pass

        def connectionLost(self, reason: object = None) -> None:  # noqa: N802
            if self.tcp:
                connection_lost()

    class Session(MuxSession):
        """A session whose streams are sinks, counted as one connection."""

        def __init__(self) -> None:
            super().__init__(
                client=False,
                clock=reactor,
                handler=StreamAcceptor(lambda stream: Sink(tcp=False)),
            )

        def connectionMade(self) -> None:  # noqa: N802
            connection_made()
            super().connectionMade()

        def connectionLost(self, reason: object = None) -> None:  # noqa: N802
            super().connectionLost(reason)
            connection_lost()

    if args.transport == "mux":
        factory = Factory.forProtocol(Session)
    else:
        factory = Factory.forProtocol(lambda: Sink(tcp=True))
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(json.dumps({"port": port.getHost().port}), flush=True)
    reactor.run()


def run_sender(args: argparse.Namespace) -> None:
    """Connect, send the workload on every stream, time it to the reports."""
    sys.path.insert(0, str(ROOT))
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
    from twisted.internet.protocol import Protocol
    from zope.interface import implementer

    from threshold.mux.session import MuxSession

    block = make_block()
    pieces = [block[i : i + args.write] for i in range(0, len(block), args.write)]
    timing = {"t0": 0.0, "cpu0": 0.0, "t1": 0.0, "cpu1": 0.0}

    @implementer(IHalfCloseableProtocol, IPushProducer)
    class Source(Protocol):
        """Writes the workload as fast as backpressure allows, then FIN."""

        def __init__(self) -> None:
            self.sent = 0
            self.writes = 0
            self.paused = False
            self.finished = False
            self.pumping = False
            self.reply = b""
            self.report: dict | None = None
            self.deadline = 0.0
            self.done: Deferred[None] = Deferred()

        def begin(self) -> None:
            self.transport.registerProducer(self, True)
            self.pump()

        def pauseProducing(self) -> None:  # noqa: N802
            self.paused = True

        def resumeProducing(self) -> None:  # noqa: N802
            self.paused = False
            self.pump()

        def stopProducing(self) -> None:  # noqa: N802
            self.finished = True

        def pump(self) -> None:
            if self.pumping or self.finished:
                return
            self.pumping = True
            try:
                self._pump()
            finally:
                self.pumping = False

        def _pump(self) -> None:
            write = self.transport.write
            count = len(pieces)
            size = args.write
            budget = 4096
            while not self.paused:
                if args.bytes:
                    left = args.bytes - self.sent
                    if left <= 0:
                        return self.finish()
                    piece = pieces[self.writes % count]
                    if left < size:
                        piece = piece[:left]
                elif self.writes % 256 == 0 and time.perf_counter() >= self.deadline:
                    return self.finish()
                else:
                    piece = pieces[self.writes % count]
                write(piece)
                self.sent += len(piece)
                self.writes += 1
                budget -= 1
                if budget == 0:
                    # Let the reactor run: a consumer that never pauses
                    # must not starve the reading side.
                    reactor.callLater(0, self.pump)
                    return

        def finish(self) -> None:
            self.finished = True
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            self.reply += data
            if self.report is None and b"\n" in self.reply:
                self.report = json.loads(self.reply.split(b"\n", 1)[0])
                timing["t1"] = time.perf_counter()
                timing["cpu1"] = cpu_seconds()
                self.done.callback(None)

        def readConnectionLost(self) -> None:  # noqa: N802
            pass

        def writeConnectionLost(self) -> None:  # noqa: N802
            pass

        def connectionLost(self, reason) -> None:  # noqa: N802
            if not self.done.called:
                self.done.errback(reason)

    @inlineCallbacks
    def main():
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", args.port)
        sources = [Source() for _ in range(args.streams)]
        session = None
        if args.transport == "mux":
            session = MuxSession(
                client=True, clock=reactor, handler=StreamAcceptor(lambda stream: None)
            )
            yield connectProtocol(endpoint, session)
            for source in sources:
                session.open_stream(source)
        else:
            for source in sources:
                yield connectProtocol(endpoint, source)
        deadline = time.perf_counter() + args.seconds
        timing["t0"] = time.perf_counter()
        timing["cpu0"] = cpu_seconds()
        for source in sources:
            source.deadline = deadline
            source.begin()
        outcome = yield DeferredList([s.done for s in sources], consumeErrors=True)
        failures = [str(f.value) for ok, f in outcome if not ok]
        for source in sources:
            report = source.report or {}
            if report.get("bytes") != source.sent:
                failures.append(f"sent {source.sent} bytes, receiver got {report}")
            elif args.hash and report["sha256"] != cyclic_digest(block, source.sent):
                failures.append(f"SHA-256 differs after {source.sent} bytes")
        if session is not None:
            closed = session.when_closed()
            session.go_away()
            yield closed
        print(
            json.dumps(
                {
                    "ok": not failures,
                    "failures": failures,
                    "elapsed": timing["t1"] - timing["t0"],
                    "cpu": timing["cpu1"] - timing["cpu0"],
                    "bytes": sum(s.sent for s in sources),
                    "writes": sum(s.writes for s in sources),
                }
            ),
            flush=True,
        )

    def run() -> None:
        d = main()
        d.addErrback(lambda f: print(json.dumps({"ok": False, "error": str(f)})))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()


# -- the orchestrator ---------------------------------------------------------


@dataclass
class Run:
    """One measured run: the sender's and the receiver's figures."""

    elapsed: float
    bytes: int
    writes: int
    sender_cpu: float
    receiver_cpu: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.elapsed

    @property
    def writes_per_s(self) -> float:
        return self.writes / self.elapsed


def child(role: str, *extra: str) -> list[str]:
    """The command line of a child process in ``role``."""
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *extra]


def measure(
    transport: str,
    streams: int,
    write: int,
    total: int,
    seconds: float,
    hash_: bool,
    profile: str | None = None,
) -> Run:
    """Run one receiver/sender pair and return its figures."""
    common = ["--transport", transport, "--streams", str(streams)]
    if hash_:
        common.append("--hash")
    if profile:
        common += ["--profile", profile]
    receiver = subprocess.Popen(
        child("receiver", *common), stdout=subprocess.PIPE, text=True
    )
    try:
        port = json.loads(receiver.stdout.readline())["port"]
        per_stream = total // streams if total else 0
        sender = subprocess.run(
            child(
                "sender",
                *common,
                "--port",
                str(port),
                "--write",
                str(write),
                "--bytes",
                str(per_stream),
                "--seconds",
                str(seconds),
            ),
            stdout=subprocess.PIPE,
            text=True,
            timeout=300,
            check=True,
        )
        sent = json.loads(sender.stdout.strip().splitlines()[-1])
        received = json.loads(receiver.stdout.readline())
        receiver.wait(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if not sent.get("ok"):
        raise SystemExit(f"{transport} run failed its checks: {sent}")
    if received["bytes"] != sent["bytes"]:
        raise SystemExit(
            f"{transport}: receiver counted {received['bytes']} bytes, "
            f"sender sent {sent['bytes']}"
        )
    return Run(
        sent["elapsed"],
        sent["bytes"],
        sent["writes"],
        sent["cpu"],
        received["cpu"],
    )


@dataclass
class Workload:
    """A workload measured over both transports."""

    name: str
    streams: int
    write: int
    total: int
    seconds: float
    rate: str  # "mb" or "writes"


def median_run(runs: list[Run]) -> dict:
    """Median of each figure over ``runs``."""
    return {
        "mb_per_s": statistics.median(r.mb_per_s for r in runs),
        "writes_per_s": statistics.median(r.writes_per_s for r in runs),
        "sender_cpu_per_gb": statistics.median(
            r.sender_cpu / (r.bytes / GB) for r in runs
        ),
        "receiver_cpu_per_gb": statistics.median(
            r.receiver_cpu / (r.bytes / GB) for r in runs
        ),
        "runs": [round(r.mb_per_s, 1) for r in runs],
    }


def orchestrate(args: argparse.Namespace) -> None:
    """Measure every workload over mux and TCP, print the table."""
    total = args.size * (1 << 20)
    workloads = [
        Workload("bulk, 1 stream", 1, BULK_WRITE, total, 0.0, "mb"),
        Workload("bulk, 16 streams", 16, BULK_WRITE, total, 0.0, "mb"),
        Workload("64 B writes, 1 stream", 1, SMALL_WRITE, 0, args.seconds, "writes"),
    ]
    started = time.perf_counter()
    table = []
    for workload in workloads:
        figures = {}
        for transport in ("mux", "tcp"):
            runs = []
            for i in range(args.repeat + 1):
                run = measure(
                    transport,
                    workload.streams,
                    workload.write,
                    workload.total,
                    workload.seconds,
                    hash_=i == 0,
                    profile=args.profile,
                )
                if i:
                    runs.append(run)
            figures[transport] = median_run(runs)
            print(
                f"  {workload.name} over {transport}: MB/s per run "
                f"{figures[transport]['runs']}",
                file=sys.stderr,
                flush=True,
            )
        table.append((workload, figures))
    elapsed = time.perf_counter() - started
    print_table(table, args, elapsed)


def print_table(table: list, args: argparse.Namespace, elapsed: float) -> None:
    """Print the medians and ratios."""
    print()
    print(
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, {platform.system()}"
    )
    print(
        f"median of {args.repeat} runs (after a checked warm-up run), "
        f"MB = 10^6 bytes; --size {args.size} MiB, --seconds {args.seconds}"
    )
    header = f"{'workload':<24}{'mux':>28}{'TCP baseline':>28}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for workload, fig in table:
        mux, tcp = fig["mux"], fig["tcp"]
        if workload.rate == "writes":
            cells = [
                f"{f['writes_per_s'] / 1000:.0f}k writes/s ({f['mb_per_s']:.1f} MB/s)"
                for f in (mux, tcp)
            ]
            ratio = mux["writes_per_s"] / tcp["writes_per_s"]
        else:
            cells = [f"{f['mb_per_s']:.0f} MB/s" for f in (mux, tcp)]
            ratio = mux["mb_per_s"] / tcp["mb_per_s"]
        print(f"{workload.name:<24}{cells[0]:>28}{cells[1]:>28}{ratio:>8.2f}")
    print()
    print("CPU seconds per GB moved (sender / receiver)")
    header = f"{'workload':<24}{'mux':>28}{'TCP baseline':>28}"
    print(header)
    print("-" * len(header))
    for workload, fig in table:
        cells = [
            f"{f['sender_cpu_per_gb']:.2f} / {f['receiver_cpu_per_gb']:.2f}"
            for f in (fig["mux"], fig["tcp"])
        ]
        print(f"{workload.name:<24}{cells[0]:>28}{cells[1]:>28}")
    print()
    print(f"total time {elapsed:.0f}s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (the child roles' ones are internal)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        help="duration of each small-write run (default 1)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=1024,
        help="MiB sent in each bulk run, over 1 or 16 streams (default 1024)",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="measured runs per figure (default 5)"
    )
    parser.add_argument(
        "--role", choices=("sender", "receiver"), help=argparse.SUPPRESS
    )
    parser.add_argument("--transport", choices=("mux", "tcp"), help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=int, default=BULK_WRITE, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hash", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a cProfile file per child process into DIR (slows runs)",
    )
    args = parser.parse_args(argv)
    if args.role is None and (args.size < 1 or args.repeat < 1 or args.seconds <= 0):
        parser.error("--size, --repeat and --seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the role asked for; by default, the whole benchmark."""
    args = parse_args(argv)
    if args.role is None:
        orchestrate(args)
        return
    run = run_receiver if args.role == "receiver" else run_sender
    if not args.profile:
        run(args)
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.runcall(run, args)
    name = f"{args.role}-{args.transport}-{args.streams}-{args.write}-{os.getpid()}"
    profiler.dump_stats(str(Path(args.profile) / f"{name}.prof"))


if __name__ == "__main__":
    main()
