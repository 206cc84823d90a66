"""The two ends of the tunnel benchmark's traffic: a backend and a load generator.

``tunnel_bench.py`` runs each as its own process::

    python benchmarks/tunnel_peers.py backend    # prints {"port": N}
    python benchmarks/tunnel_peers.py loadgen    # JSON commands on stdin

Both end when their stdin (a pipe from the benchmark) closes.

The backend is a Twisted service on 127.0.0.1 that speaks a one-line
command protocol, so the same service serves every workload and the tunnel
carries it unchanged. A connection starts with one line:

- ``U`` or ``UH``: upload; the backend counts (``UH``: and hashes) the
  bytes until EOF, answers ``<count> <sha256 or ->`` and closes;
- ``D <n>``: download; the backend sends ``n`` bytes of the shared block
  pattern as fast as backpressure allows, then closes;
- ``E``: echo everything until EOF;
- ``R <n>``: one request of ``n`` bytes, one reply of ``n`` bytes, then the
  backend closes (server closes first, as HTTP/1.0 does).

The load generator uses blocking sockets, one thread per connection (the
threads release the GIL in ``send``/``recv``), so it stays out of the
reactor's way and times each operation with ``perf_counter``. It reads one
JSON command per line and answers one JSON line; see ``OPS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from payload import BLOCK_SIZE, cyclic_digest, make_block

ROOT = Path(__file__).resolve().parent.parent
#: What the backend writes at a time (Twisted sends it in 128 KiB pieces).
DOWN_WRITE = 256 * 1024
HELLO = b"hello"


def raise_nofile() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; return both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0..1) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]


def stdin_is_pipe() -> bool:
    """Whether stdin is a pipe (from the benchmark), not a terminal or file."""
    return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)


# -- backend ------------------------------------------------------------------


def run_backend() -> None:
    """Serve the command protocol on a free loopback port until stdin closes."""
    limits = raise_nofile()
    sys.path.insert(0, str(ROOT))
    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning
    from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    block = make_block()
    pieces = [block[i : i + DOWN_WRITE] for i in range(0, len(block), DOWN_WRITE)]
    reply = bytes(range(256)) * 64

    @implementer(IPushProducer)
    class Source:
        """Writes ``left`` bytes of the block pattern, then closes."""

        def __init__(self, transport: Any, left: int) -> None:
            self.transport = transport
            self.left = left
            self.index = 0
            self.paused = False
            self.stopped = False
            transport.registerProducer(self, True)
            self.resumeProducing()

        def pauseProducing(self) -> None:  # noqa: N802
            self.paused = True

        def resumeProducing(self) -> None:  # noqa: N802
            self.paused = False
            write = self.transport.write
            while not self.paused and not self.stopped and self.left > 0:
                piece = pieces[self.index % len(pieces)]
                self.index += 1
                if len(piece) > self.left:
                    piece = piece[: self.left]
                self.left -= len(piece)
                write(piece)
            if self.left == 0 and not self.stopped:
                self.stopped = True
                self.transport.unregisterProducer()
                self.transport.loseConnection()

        def stopProducing(self) -> None:  # noqa: N802
            self.stopped = True

    @implementer(IHalfCloseableProtocol)
    class Service(Protocol):
        """One connection: a command line, then the workload it names."""

        mode: bytes | None = None
        head = b""
        count = 0
        digest: Any = None
        want = 0
        source: Source | None = None

        def connectionMade(self) -> None:  # noqa: N802
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            mode = self.mode
            if mode == b"E":
                self.transport.write(data)
            elif mode == b"U":
                self.count += len(data)
                if self.digest is not None:
                    self.digest.update(data)
            elif mode == b"R":
                self.count += len(data)
                if self.count >= self.want:
                    self.mode = b"-"
                    self.transport.write(reply[: self.want])
                    self.transport.loseConnection()
            elif mode is None:
                self.head += data
                if b"\n" not in self.head:
                    if len(self.head) > 64:
                        self.transport.abortConnection()
                    return
                line, rest = self.head.split(b"\n", 1)
                self.head = b""
                self.command(line.split())
                if rest:
                    self.dataReceived(rest)

        def command(self, words: list[bytes]) -> None:
            verb = words[0] if words else b""
            if verb in (b"U", b"UH"):
                self.mode = b"U"
                self.digest = hashlib.sha256() if verb == b"UH" else None
            elif verb == b"D" and len(words) == 2:
                self.mode = b"-"
                self.source = Source(self.transport, int(words[1]))
            elif verb == b"E":
                self.mode = b"E"
            elif verb == b"R" and len(words) == 2:
                self.mode = b"R"
                self.want = int(words[1])
            else:
                self.transport.abortConnection()

        def readConnectionLost(self) -> None:  # noqa: N802
            if self.mode == b"U":
                digest = self.digest.hexdigest() if self.digest is not None else "-"
                self.transport.write(f"{self.count} {digest}\n".encode())
            if self.source is None or self.source.stopped:
                self.transport.loseConnection()

        def writeConnectionLost(self) -> None:  # noqa: N802
            pass

        def connectionLost(self, reason: object = None) -> None:  # noqa: N802
            if self.source is not None:
                self.source.stopped = True

    factory = Factory.forProtocol(Service)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")
    print(
        json.dumps({"port": port.getHost().port, "nofile": limits}),
        flush=True,
    )
    if stdin_is_pipe():

        def wait_for_eof() -> None:
            while sys.stdin.buffer.read(4096):
                pass
            reactor.callFromThread(stop)

        def stop() -> None:
            if reactor.running:
                try:
                    reactor.stop()
                except ReactorNotRunning:  # already stopping (SIGTERM)
                    pass

        threading.Thread(target=wait_for_eof, daemon=True).start()
    reactor.run()


# -- load generator -------------------------------------------------------------


class LoadGen:
    """The load generator's operations; each returns a JSON-able dict."""

    def __init__(self) -> None:
        self.block = make_block()
        self.view = memoryview(self.block)
        self.held: list[socket.socket] = []
        self.blocked: list[socket.socket] = []
        self.lock = threading.Lock()

    @staticmethod
    def connect(port: int, timeout: float = 60.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    @staticmethod
    def run_threads(target: Any, count: int, timeout: float) -> list[Any]:
        """Run ``target(i)`` in ``count`` threads; return results or exceptions."""
        results: list[Any] = [None] * count

        def wrap(i: int) -> None:
            try:
                results[i] = target(i)
            except BaseException as e:  # reported, not raised in a thread
                results[i] = e

        threads = [threading.Thread(target=wrap, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise TimeoutError(f"threads still running after {timeout:.0f}s")
        return results

    def op_bulk(self, cmd: dict) -> dict:
        """Move ``bytes`` per connection over ``conns`` connections, timed.

        ``direction`` is ``up`` (to the backend) or ``down``. ``check``
        verifies a SHA-256 of every byte as well as the counts.
        """
        port, conns, size = cmd["port"], cmd["conns"], cmd["bytes"]
        check, up = cmd.get("check", False), cmd["direction"] == "up"
        socks = [self.connect(port, cmd.get("timeout", 120)) for _ in range(conns)]
        barrier = threading.Barrier(conns)

        def download(i: int) -> dict:
            sock = socks[i]
            buf = bytearray(BLOCK_SIZE)
            view = memoryview(buf)
            digest = hashlib.sha256() if check else None
            barrier.wait()
            t0 = time.perf_counter()
            sock.sendall(b"D %d\n" % size)
            got = 0
            first = half = None
            while True:
                n = sock.recv_into(buf)
                if not n:
                    break
                if first is None:
                    first = time.perf_counter()
                got += n
                if digest is not None:
                    digest.update(view[:n])
                if half is None and got * 2 >= size:
                    half = time.perf_counter()
            t1 = time.perf_counter()
            if got != size:
                raise ValueError(f"asked for {size} bytes, got {got}")
            if digest is not None and digest.hexdigest() != cyclic_digest(
                self.block, size
            ):
                raise ValueError(f"SHA-256 of the {size} bytes received differs")
            return {"t0": t0, "t1": t1, "first": first, "half": half}

        def upload(i: int) -> dict:
            sock = socks[i]
            barrier.wait()
            t0 = time.perf_counter()
            sock.sendall(b"UH\n" if check else b"U\n")
            left = size
            view = self.view
            while left:
                piece = view if left >= len(view) else view[:left]
                sock.sendall(piece)
                left -= len(piece)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            t1 = time.perf_counter()
            words = reply.split()
            if len(words) != 2 or int(words[0]) != size:
                raise ValueError(f"sent {size} bytes, backend answered {reply!r}")
            if check and words[1].decode() != cyclic_digest(self.block, size):
                raise ValueError(f"SHA-256 of the {size} bytes sent differs")
            return {"t0": t0, "t1": t1, "first": None, "half": None}

        try:
            results = self.run_threads(
                upload if up else download, conns, cmd.get("timeout", 120)
            )
        finally:
            for sock in socks:
                sock.close()
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        if errors:
            return {"error": "; ".join(errors[:3])}
        t0 = min(r["t0"] for r in results)
        t1 = max(r["t1"] for r in results)
        out = {"elapsed": t1 - t0, "bytes": size * conns}
        if conns == 1 and not up:
            r = results[0]
            out["first_byte"] = r["first"] - r["t0"]
            out["second_half_rate"] = (size - size // 2) / max(
                r["t1"] - r["half"], 1e-9
            )
        return out

    def op_rr(self, cmd: dict) -> dict:
        """Sequential ping-pong of ``size`` bytes on one kept-open connection."""
        size, count, warm = cmd["size"], cmd["count"], cmd.get("warm", 100)
        request = bytes(range(256)) * (size // 256 + 1)
        request = request[:size]
        sock = self.connect(cmd["port"])
        try:
            sock.sendall(b"E\n")
            latencies = []
            for i in range(warm + count):
                t0 = time.perf_counter()
                sock.sendall(request)
                got = 0
                while got < size:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("backend closed during ping-pong")
                    got += len(chunk)
                if i >= warm:
                    latencies.append(time.perf_counter() - t0)
        finally:
            sock.close()
        return {
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "mean": sum(latencies) / len(latencies),
        }

    def op_conn(self, cmd: dict) -> dict:
        """``clients`` threads, each: connect, request, reply, close, again."""
        port, size, seconds = cmd["port"], cmd["size"], cmd["seconds"]
        request = b"R %d\n" % size + b"q" * size
        deadline = time.perf_counter() + seconds
        errors: list[str] = []

        def client(i: int) -> list[float]:
            ttfb = []
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    sock = self.connect(port, 10)
                    try:
                        sock.sendall(request)
                        got = len(sock.recv(65536))
                        first = time.perf_counter()
                        while chunk := sock.recv(65536):
                            got += len(chunk)
                    finally:
                        sock.close()
                    if got != size:
                        raise ValueError(f"reply of {got} bytes, expected {size}")
                except (OSError, ValueError) as e:
                    errors.append(repr(e))
                    if len(errors) > 100:
                        break
                    continue
                ttfb.append(first - t0)
            return ttfb

        t0 = time.perf_counter()
        results = self.run_threads(client, cmd["clients"], seconds + 60)
        elapsed = time.perf_counter() - t0
        failed = [repr(r) for r in results if isinstance(r, BaseException)]
        ttfb = [x for r in results if isinstance(r, list) for x in r]
        if failed or not ttfb:
            return {"error": "; ".join((failed + errors)[:3]) or "no connection"}
        return {
            "rate": len(ttfb) / elapsed,
            "count": len(ttfb),
            "errors": len(errors),
            "first_errors": errors[:3],
            "ttfb_p50": percentile(ttfb, 0.5),
            "ttfb_p99": percentile(ttfb, 0.99),
        }

    def op_hold(self, cmd: dict) -> dict:
        """Open ``count`` more idle connections, each echoed a few bytes."""
        port, count, threads = cmd["port"], cmd["count"], cmd.get("threads", 8)
        errors: list[str] = []
        t0 = time.perf_counter()

        def opener(i: int) -> int:
            mine = count // threads + (1 if i < count % threads else 0)
            opened = failures = 0
            while opened < mine and failures < 20:
                try:
                    sock = self.connect(port, 30)
                except OSError as e:
                    errors.append(f"connect: {e!r}")
                    failures += 1
                    continue
                try:
                    sock.sendall(b"E\n" + HELLO)
                    got = b""
                    while len(got) < len(HELLO):
                        chunk = sock.recv(64)
                        if not chunk:
                            raise ConnectionError("closed before the echo")
                        got += chunk
                except OSError as e:
                    sock.close()
                    errors.append(f"echo: {e!r}")
                    failures += 1
                    continue
                with self.lock:
                    self.held.append(sock)
                opened += 1
            return opened

        results = self.run_threads(opener, threads, cmd.get("timeout", 600))
        failed = [repr(r) for r in results if isinstance(r, BaseException)]
        return {
            "held": len(self.held),
            "elapsed": time.perf_counter() - t0,
            "errors": len(errors) + len(failed),
            "first_errors": (failed + errors)[:3],
        }

    def op_release(self, cmd: dict) -> dict:
        """Close every held connection."""
        held, self.held = self.held, []
        for sock in held:
            sock.close()
        return {"released": len(held)}

    def op_block(self, cmd: dict) -> dict:
        """Ask for a huge download on a connection that is never read."""
        sock = self.connect(cmd["port"])
        sock.sendall(b"D %d\n" % cmd["bytes"])
        self.blocked.append(sock)
        return {"blocked": len(self.blocked)}

    def op_unblock(self, cmd: dict) -> dict:
        """Close the never-read connections."""
        blocked, self.blocked = self.blocked, []
        for sock in blocked:
            sock.close()
        return {"unblocked": len(blocked)}

    def op_limits(self, cmd: dict) -> dict:
        """The open-file limits in force here."""
        return {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}


def run_loadgen() -> None:
    """Answer JSON commands from stdin, one line each, until EOF."""
    raise_nofile()
    gen = LoadGen()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            result = getattr(gen, "op_" + cmd["op"])(cmd)
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    roles = {"backend": run_backend, "loadgen": run_loadgen}
    if len(sys.argv) != 2 or sys.argv[1] not in roles:
        raise SystemExit(f"usage: {sys.argv[0]} backend|loadgen")
    roles[sys.argv[1]]()
