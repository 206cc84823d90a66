"""A user-space delay line: a TCP relay that behaves like a long, narrow link.

Usage::

    .venv/bin/python benchmarks/delayline.py --mbit 100 \\
        --line 127.0.0.1:9056,20 --line 127.0.0.1:8080,100

Each ``--line TARGET,RTT_MS`` listens on a free loopback port and relays
every accepted connection to ``TARGET``. Once everything listens, one JSON
line goes to stdout: ``{"ports": [...]}``, in the order of the lines. The
process ends on SIGTERM, or when its stdin is a pipe and closes (so it never
outlives the benchmark that started it).

Each direction of each connection is modelled as a link: a bottleneck of
``--mbit`` with a FIFO queue, then a propagation delay of half the round
trip. A chunk read from one side leaves the bottleneck once the chunks
before it have (``len / rate`` each) and is written to the other side half
a round trip later. The relay stops reading while the queue holds more than
``--queue-ms`` of bottleneck time (default: one round trip's worth, a
common buffer size), so a sender is held back as a full link would hold it
back, and the relay's memory stays bounded.

What this does not model: the relay acknowledges what it reads at once, so
the end points' TCP sees a loopback connection, not the long path: their
congestion control and window auto-tuning never see the delay (the direct
path gets the link rate as soon as it has something to send, with no slow
start), and a new connection's handshake costs no round trip. Flow control
that travels end to end *through* the relay, such as yamux Window Updates
inside a tunnel, does see the full delay. No loss, no reordering.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import stat
import sys

#: Largest piece scheduled as one unit; smaller pieces pace more smoothly.
PIECE = 16 * 1024
#: Kernel receive buffer of the relay's sockets: kept small so the queue
#: that matters is the modelled one, not the kernel's.
SOCKET_BUFFER = 64 * 1024


class LinkParams:
    """Rate (bytes/s), one-way delay (s) and queue limit (bytes) of a link."""

    def __init__(self, mbit: float, rtt_ms: float, queue_ms: float | None) -> None:
        if mbit <= 0 or rtt_ms < 0:
            raise ValueError("--mbit must be positive and the RTT not negative")
        self.rate = mbit * 1e6 / 8
        self.delay = rtt_ms / 2000
        queue_s = (rtt_ms if queue_ms is None else queue_ms) / 1000
        self.queue = max(int(self.rate * queue_s), 2 * PIECE)


class Direction:
    """One direction of a relayed connection: bottleneck, queue, delay."""

    def __init__(self, loop: asyncio.AbstractEventLoop, link: LinkParams) -> None:
        self.loop = loop
        self.link = link
        self.src: Side | None = None
        self.dst: Side | None = None
        self.items: collections.deque[tuple[float, bytes]] = collections.deque()
        self.free_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.queue_timer: asyncio.TimerHandle | None = None
        self.queue_full = False
        self.dst_full = False
        self.src_eof = False
        self.done = False

    def feed(self, data: bytes) -> None:
        """Bytes read from the source: queue them at the bottleneck."""
        if self.done:
            return
        now = self.loop.time()
        rate = self.link.rate
        free = max(now, self.free_at)
        for i in range(0, len(data), PIECE):
            piece = data[i : i + PIECE]
            free += len(piece) / rate
            self.items.append((free + self.link.delay, piece))
        self.free_at = free
        if self.timer is None:
            self._schedule()
        backlog = (free - now) * rate
        if backlog > self.link.queue and not self.queue_full:
            self.queue_full = True
            self._update_reading()
            self.queue_timer = self.loop.call_at(
                free - self.link.queue / rate, self._queue_drained
            )

    def eof(self) -> None:
        """The source sent EOF (or went away): deliver what is queued, then EOF."""
        self.src_eof = True
        if not self.items and self.timer is None:
            self._finish()

    def drop(self) -> None:
        """The destination is gone: forget the queue and stop reading."""
        self.items.clear()
        for timer in (self.timer, self.queue_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.queue_timer = None
        self.done = True

    def dst_paused(self, paused: bool) -> None:
        """The destination's write buffer is full (True) or drained (False)."""
        self.dst_full = paused
        self._update_reading()

    def _queue_drained(self) -> None:
        self.queue_timer = None
        self.queue_full = False
        self._update_reading()

    def _update_reading(self) -> None:
        src = self.src
        if src is not None and src.transport is not None and not src.lost:
            if self.queue_full or self.dst_full:
                src.transport.pause_reading()
            else:
                src.transport.resume_reading()

    def _schedule(self) -> None:
        self.timer = self.loop.call_at(self.items[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        now = self.loop.time()
        ready = []
        items = self.items
        # Timers fire a little late; take what is due within half a ms.
        while items and items[0][0] <= now + 0.0005:
            ready.append(items.popleft()[1])
        dst = self.dst
        if ready and dst is not None and dst.transport is not None and not dst.lost:
            dst.transport.write(b"".join(ready))
        if items:
            self._schedule()
        elif self.src_eof:
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        dst = self.dst
        if dst is None or dst.transport is None or dst.lost:
            return
        if dst.out.done or not dst.transport.can_write_eof():
            dst.transport.close()
        else:
            dst.transport.write_eof()
        if self.src is not None:
            self.src.maybe_close()


class Side(asyncio.Protocol):
    """One socket of a relayed connection."""

    def __init__(self, out: Direction, inn: Direction) -> None:
        self.out = out  # this side is the source
        self.inn = inn  # this side is the destination
        out.src = self
        inn.dst = self
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.out.feed(data)

    def eof_received(self) -> bool:
        self.out.eof()
        self.maybe_close()
        return True

    def pause_writing(self) -> None:
        self.inn.dst_paused(True)

    def resume_writing(self) -> None:
        self.inn.dst_paused(False)

    def maybe_close(self) -> None:
        """Close once both directions through this socket are finished."""
        if self.out.src_eof and self.inn.done and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.out.eof()
        self.inn.drop()


class Relay(asyncio.Protocol):
    """The accepted side: connect to the target, then relay both ways."""

    def __init__(self, line: Line) -> None:
        self.line = line
        loop = asyncio.get_running_loop()
        self.up = Direction(loop, line.link)  # accepted side -> target
        self.down = Direction(loop, line.link)  # target -> accepted side
        self.side = Side(self.up, self.down)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.side.connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._connect(transport))

    async def _connect(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.line.target
        try:
            await loop.create_connection(lambda: Side(self.down, self.up), host, port)
        except OSError as e:
            print(f"delayline: cannot connect to {host}:{port}: {e}", file=sys.stderr)
            transport.close()
            return
        if not self.side.lost:
            transport.resume_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.side.data_received(data)

    def eof_received(self) -> bool:
        return self.side.eof_received()

    def pause_writing(self) -> None:
        self.side.pause_writing()

    def resume_writing(self) -> None:
        self.side.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.side.connection_lost(exc)


class Line:
    """One listening port and where it relays to."""

    def __init__(self, target: tuple[str, int], link: LinkParams) -> None:
        self.target = target
        self.link = link


def parse_line(text: str, mbit: float, queue_ms: float | None) -> Line:
    """``HOST:PORT,RTT_MS`` into a Line."""
    try:
        target, rtt = text.rsplit(",", 1)
        host, port = target.rsplit(":", 1)
        return Line((host, int(port)), LinkParams(mbit, float(rtt), queue_ms))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--line {text!r}: expected HOST:PORT,RTT_MS ({e})"
        ) from None


async def serve(lines: list[Line]) -> None:
    """Listen for every line, print the ports, run until stdin closes."""
    loop = asyncio.get_running_loop()
    ports = []
    for line in lines:
        server = await loop.create_server(
            lambda line=line: Relay(line), "127.0.0.1", 0, backlog=1024
        )
        ports.append(server.sockets[0].getsockname()[1])
    print(json.dumps({"ports": ports}), flush=True)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(0))
    watch_parent(loop, stop)
    await stop


def watch_parent(loop: asyncio.AbstractEventLoop, stop: asyncio.Future) -> None:
    """End when stdin, a pipe from the parent, closes: the parent is gone."""
    fd = sys.stdin.fileno()
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return

    def readable() -> None:
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            if not stop.done():
                stop.set_result(0)

    loop.add_reader(fd, readable)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the delay lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mbit", type=float, default=100.0, help="bottleneck rate (default 100)"
    )
    parser.add_argument(
        "--queue-ms",
        type=float,
        default=None,
        help="bottleneck queue in ms of link time (default: one RTT)",
    )
    parser.add_argument(
        "--line",
        action="append",
        required=True,
        metavar="HOST:PORT,RTT_MS",
        help="relay a new loopback port to HOST:PORT over RTT_MS (repeatable)",
    )
    args = parser.parse_args(argv)
    lines = [parse_line(text, args.mbit, args.queue_ms) for text in args.line]
    asyncio.run(serve(lines))


if __name__ == "__main__":
    main()
