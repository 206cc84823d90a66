"""Fault injection for tests/test_faults.py: processes, a relay, backends.

- :class:`TwistdProcess` runs ``twistd -n threshold-server|client`` as a
  real subprocess that a test can signal or kill (and always kills in
  its cleanup).
- :class:`FreezableRelay` forwards TCP connections to a target; it can
  freeze the connections it holds (nothing passes either way, no FIN, no
  RST: a silent network drop) and refuse new ones, while later connections
  are forwarded normally.
- :class:`ModeBackend` is a local service whose behaviour each connection
  picks with its first line: ``echo``, ``sink`` (never reads again) or
  ``source TOTAL [CHUNK INTERVAL_MS]`` (sends bytes, fast or slowly, and
  records them so the receiver can be checked byte for byte).
- :class:`Pump` writes to a transport as fast as backpressure allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def sha(data: bytes) -> str:
    """SHA-256 of ``data``, hex (short to print, exact to compare)."""
    return hashlib.sha256(data).hexdigest()


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on the real reactor."""
    return deferLater(reactor, seconds, lambda: None)


def write_buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in its write buffer (user space)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


# -- subprocesses --------------------------------------------------------------


class TwistdProcess:
    """``twistd -n --pidfile= <role> -c <config>`` as a subprocess.

    Output goes to ``<directory>/<name>.log`` (shown by :meth:`log_tail`
    when an assertion fails). :meth:`kill` is meant for ``addCleanup``.
    """

    def __init__(self, role: str, config: dict[str, Any], directory: str, name: str):
        self.role = role
        self.directory = directory
        self.name = name
        self.config_path = os.path.join(directory, f"{name}.json")
        self.log_path = os.path.join(directory, f"{name}.log")
        with open(self.config_path, "w") as f:
            json.dump(config, f)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the process (again, after it exited)."""
        assert self.process is None or self.process.poll() is not None
        self.starts += 1
        env = dict(os.environ, PYTHONPATH=ROOT)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", self.role, "-c", self.config_path],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process (this process only, by its pid)."""
        assert self.process is not None
        self.process.send_signal(signum)

    @inlineCallbacks
    def wait(self, timeout: float):
        """Poll without blocking the reactor; return the exit status."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not exit within {timeout}s\n{self.log_tail()}"
                )
            yield sleep(0.01)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's output, for failure messages."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


# -- a relay that can freeze ------------------------------------------------------


class _RelaySide(Protocol):
    """One socket of a relayed pair; forwards to the other side."""

    other: _RelaySide | None = None

    def __init__(self, pair: _RelayPair) -> None:
        self.pair = pair
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.pair.frozen:
            # Nothing passes once frozen (reading is stopped, so this is
            # only what a read in progress delivered).
            return
        if self.other is not None:
            self.other.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.pair.lost(self, reason)
        self.done.callback(None)


class _RelayPair:
    """An accepted connection and its outgoing twin."""

    def __init__(self, relay: FreezableRelay) -> None:
        self.relay = relay
        self.frozen = False
        self.inside: _RelaySide = _Accepted(self)
        self.outside: _RelaySide | None = None
        self.sides = [self.inside]
        self.connecting: Deferred[Any] | None = None

    def connect(self) -> None:
        # As twisted.protocols.portforward: read nothing until the other
        # side is up.
        self.inside.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.target_port)
        outside = _RelaySide(self)
        self.connecting = endpoint.connect(_Once(outside))
        self.connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, outside: _RelaySide) -> None:
        self.connecting = None
        self.outside = outside
        self.sides.append(outside)
        if not self.inside.transport.connected:
            outside.transport.abortConnection()
            return
        outside.other, self.inside.other = self.inside, outside
        # Backpressure both ways, so the relay itself never buffers much.
        self.inside.transport.registerProducer(outside.transport, True)
        outside.transport.registerProducer(self.inside.transport, True)
        self.inside.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self.connecting = None
        if self.inside.transport.connected:
            self.inside.transport.abortConnection()

    def freeze(self) -> None:
        """Stop both directions; keep both sockets open, send no FIN/RST."""
        self.frozen = True
        for side in self.sides:
            transport = side.transport
            if transport is None or not transport.connected:
                continue
            # Unregister first: a drained buffer would otherwise resume the
            # other side's reading.
            transport.unregisterProducer()
            transport.stopReading()
            transport.stopWriting()

    def lost(self, side: _RelaySide, reason: Failure) -> None:
        if self.frozen:
            return  # a frozen link passes no close either
        other = side.other
        if other is not None and other.transport.connected:
            other.transport.unregisterProducer()
            if reason.check(ConnectionDone):
                other.transport.loseConnection()
            else:
                other.transport.abortConnection()

    def abort(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        for side in self.sides:
            if side.transport is not None and side.transport.connected:
                side.transport.abortConnection()


class _Once(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        return self._protocol


class _RelayFactory(Factory):
    def __init__(self, relay: FreezableRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802
        relay = self.relay
        pair = _RelayPair(relay)
        relay.pairs.append(pair)
        return pair.inside


class _Accepted(_RelaySide):
    def connectionMade(self) -> None:  # noqa: N802
        relay = self.pair.relay
        relay.accepted += 1
        if relay.refuse_new:
            relay.refused += 1
            self.transport.abortConnection()
            return
        self.pair.connect()


class FreezableRelay:
    """A TCP relay on 127.0.0.1 to ``target_port``, for network faults."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.pairs: list[_RelayPair] = []
        self.accepted = 0
        self.refused = 0
        #: When true, new connections are reset at once (server unreachable).
        self.refuse_new = False
        self.port: Any = None

    @inlineCallbacks
    def start(self):
        """Listen on a free port; return it."""
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            _RelayFactory(self)
        )
        return self.port.getHost().port

    def freeze(self) -> int:
        """Freeze every connection open now; return how many."""
        live = [p for p in self.pairs if not p.frozen and p.outside is not None]
        for pair in live:
            pair.freeze()
        return len(live)

    @inlineCallbacks
    def stop(self):
        """Stop listening, abort every connection, wait until all are gone."""
        if self.port is not None:
            yield self.port.stopListening()
        waits = []
        for pair in self.pairs:
            pair.abort()
            waits.extend(side.done for side in pair.sides if side.transport)
        yield DeferredList(waits)


# -- backends and users ---------------------------------------------------------


@implementer(IPushProducer)
class Pump:
    """Write ``data`` (or endless bytes) to a transport, obeying backpressure.

    Registered as the transport's streaming producer; after the last byte
    it unregisters and, with ``half_close``, half-closes.
    """

    CHUNK = 64 * 1024

    def __init__(
        self,
        transport: Any,
        data: bytes | None,
        half_close: bool = True,
        record: bool = False,
    ) -> None:
        self.transport = transport
        self.data = memoryview(data) if data is not None else None
        self.half_close = half_close
        self.record = record
        self.sent = 0
        self.chunks: list[bytes] = []
        self.paused = False
        self.stopped = False
        self.done: Deferred[int] = Deferred()
        self._endless = random.Random(7).randbytes(self.CHUNK)

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        while not self.paused and not self.stopped:
            if self.data is None:
                chunk = self._endless
            else:
                chunk = bytes(self.data[self.sent : self.sent + self.CHUNK])
                if not chunk:
                    self._finish()
                    return
            self.sent += len(chunk)
            if self.record:
                self.chunks.append(chunk)
            self.transport.write(chunk)

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True

    def _finish(self) -> None:
        self.stopped = True
        self.transport.unregisterProducer()
        if self.half_close:
            self.transport.loseWriteConnection()
        self.done.callback(self.sent)


@implementer(IHalfCloseableProtocol)
class ModeConnection(Protocol):
    """A backend connection; its first line says what to do."""

    def __init__(self, backend: ModeBackend) -> None:
        self.backend = backend
        self.line = b""
        self.mode: str | None = None
        self.received = 0
        self.pump: Pump | None = None
        self._tick: Any = None
        self.sent_chunks: list[bytes] = []
        self.lost: Failure | None = None
        self.done: Deferred[ModeConnection] = Deferred()

    @property
    def sent(self) -> bytes:
        if self.pump is not None:
            return b"".join(self.pump.chunks)
        return b"".join(self.sent_chunks)

    @property
    def sent_count(self) -> int:
        if self.pump is not None:
            return self.pump.sent
        return sum(len(c) for c in self.sent_chunks)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += len(data)
        if self.mode == "echo":
            self.transport.write(data)
            return
        if self.mode is not None:
            return
        self.line += data
        if b"\n" not in self.line:
            return
        line, rest = self.line.split(b"\n", 1)
        words = line.decode().split()
        self.mode = words[0]
        if self.mode == "echo":
            # Echo with backpressure: reading stops while the echo is full.
            self.transport.registerProducer(self.transport, True)
            if rest:
                self.transport.write(rest)
        elif self.mode == "sink":
            self.transport.pauseProducing()
        elif self.mode == "source":
            total = int(words[1])
            if len(words) == 2:
                data_ = random.Random(total).randbytes(total) if total else None
                self.pump = Pump(self.transport, data_, half_close=False, record=True)
                self.pump.done.addCallback(lambda _: self.transport.loseConnection())
                self.pump.start()
            else:
                self._slow(total, int(words[2]), int(words[3]) / 1000)
        else:
            self.transport.abortConnection()

    def _slow(self, total: int, chunk: int, interval: float) -> None:
        rng = random.Random(chunk)

        def tick() -> None:
            self._tick = None
            left = total - self.sent_count if total else chunk
            if left <= 0:
                self.transport.loseConnection()
                return
            data = rng.randbytes(min(chunk, left))
            self.sent_chunks.append(data)
            self.transport.write(data)
            self._tick = reactor.callLater(interval, tick)

        tick()

    def readConnectionLost(self) -> None:  # noqa: N802
        if self.mode == "echo":
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        pass

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        self.lost = reason
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        if self.pump is not None:
            self.pump.stopped = True
        self.done.callback(self)


class ModeBackend:
    """A local service on loopback whose connections pick their mode."""

    def __init__(self) -> None:
        self.connections: list[ModeConnection] = []
        self.port: Any = None

    @inlineCallbacks
    def start(self):
        """Listen on a free port; return it."""

        def build() -> ModeConnection:
            connection = ModeConnection(self)
            self.connections.append(connection)
            return connection

        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        return self.port.getHost().port

    def abort_all(self) -> Deferred[Any]:
        """Abort every open connection; fires when all are gone."""
        for connection in self.connections:
            if connection.lost is None and connection.transport.connected:
                connection.transport.abortConnection()
        return DeferredList([c.done for c in self.connections])

    @inlineCallbacks
    def stop(self):
        yield self.abort_all()
        if self.port is not None:
            yield self.port.stopListening()
