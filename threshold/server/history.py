"""The last hour of traffic, per tunnel and for the gateway: the status page's charts.

A :class:`TrafficHistory` takes a sample of the gateway's counters
(:class:`~threshold.server.stats.GatewayStats`) every ``interval`` seconds
of the server's clock and keeps, per tunnel in force and for the gateway
as a whole, a ring of the last ``span`` seconds of them. Memory is bounded:
at most ``max_tunnels`` tunnels are sampled (the first ones of the set in
force; the others are counted as not sampled), each ring holds
``span / interval + 1`` samples, and a tunnel that leaves the set loses its
ring at the next sample (one that comes back starts a new one).

A sample holds cumulative counters (connections accepted, bytes each way)
and the open connections at that instant; the rates per second since the
sample before, and the API's columns, are worked out as it is taken, so a
read only copies lists. Samples are numbered: a reader that has them up to
number N asks only for the later ones (``GET /status/history?after=N``),
which keeps a page's polls small. ``GET /status/history`` serves
:meth:`TrafficHistory.to_json`.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.internet.task import LoopingCall

from threshold.server.tunnels import TunnelKey

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.server.stats import GatewayStats, Traffic

__all__ = ["COLUMNS", "HistorySettings", "Ring", "Sample", "TrafficHistory"]

#: The page's charts show this much; a ring keeps no more.
DEFAULT_SPAN = 3600.0
DEFAULT_INTERVAL = 10.0
#: Tunnels with a ring: 64 full rings of 361 samples are about 0.9 MB of
#: JSON (a poll with ``after`` a few kB).
DEFAULT_MAX_TUNNELS = 64


@dataclass(frozen=True)
class HistorySettings:
    """How often to sample, how far back to keep, how many tunnels."""

    interval: float = DEFAULT_INTERVAL
    span: float = DEFAULT_SPAN
    max_tunnels: int = DEFAULT_MAX_TUNNELS

    def __post_init__(self) -> None:
        if not 0 < self.interval <= self.span:
            raise ValueError(f"interval {self.interval} not within (0, {self.span}]")
        if self.max_tunnels < 0:
            raise ValueError(f"max_tunnels {self.max_tunnels} is negative")

    @property
    def ring_size(self) -> int:
        """Samples per ring: the span's worth, both ends included."""
        return math.ceil(self.span / self.interval) + 1


class Sample(NamedTuple):
    """The counters at one instant (cumulative but ``open``)."""

    time: float
    accepted: int
    open: int
    received: int
    sent: int


def _rate(now: int, before: int, at: float, earlier: float) -> float | None:
    if at <= earlier:
        return None
    # Counters only grow; a drop (there is none today) reads as no traffic.
    return round(max(0, now - before) / (at - earlier), 3)


#: The columns of a ring in the API, in order.
COLUMNS = (
    "Times",
    "OpenConnections",
    "NewConnectionsPerSecond",
    "ReceivedBytesPerSecond",
    "SentBytesPerSecond",
)


class Ring:
    """One series: its samples, and the API's columns worked out as each
    arrives (so a read copies lists and computes nothing).

    Every sample carries the history's sample number, so a reader that has
    the samples up to number N asks for the ones after it
    (:meth:`to_json` with ``after``).
    """

    def __init__(self, size: int) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)
        self.numbers: deque[int] = deque(maxlen=size)
        self.columns: dict[str, deque[Any]] = {
            name: deque(maxlen=size) for name in COLUMNS
        }

    def __len__(self) -> int:
        return len(self.samples)

    def append(self, number: int, sample: Sample) -> None:
        """Add sample ``number``; its rates are since the one before."""
        previous = self.samples[-1] if self.samples else None
        self.samples.append(sample)
        self.numbers.append(number)
        columns = self.columns
        columns["Times"].append(round(sample.time, 3))
        columns["OpenConnections"].append(sample.open)
        for name, attr in (
            ("NewConnectionsPerSecond", 1),
            ("ReceivedBytesPerSecond", 3),
            ("SentBytesPerSecond", 4),
        ):
            rate = None
            if previous is not None:
                rate = _rate(sample[attr], previous[attr], sample.time, previous.time)
            columns[name].append(rate)

    def to_json(self, after: int | None = None) -> dict[str, list[Any]]:
        """The columns, oldest first; with ``after``, only later samples.

        The first sample's rates are ``null``: there is nothing before it.
        """
        # Numbers grow by one per sample, so the later ones are a suffix.
        skip = 0
        if after is not None and self.numbers:
            skip = min(len(self.numbers), max(0, after - self.numbers[0] + 1))
        return {
            name: list(itertools.islice(column, skip, None))
            for name, column in self.columns.items()
        }


def _counters(traffic: Traffic | None) -> dict[str, int]:
    if traffic is None:
        return {"Connections": 0, "OpenConnections": 0, "ReceivedBytes": 0,
                "SentBytes": 0}  # fmt: skip
    return {
        "Connections": traffic.accepted,
        "OpenConnections": traffic.open,
        "ReceivedBytes": traffic.bytes_in,
        "SentBytes": traffic.bytes_out,
    }


class TrafficHistory:
    """Rings of samples per tunnel in force and for the gateway.

    ``tunnels`` gives the keys of the tunnels in force, in order; ``stats``
    the counters. :meth:`start` samples at once and then every interval.
    """

    def __init__(
        self,
        stats: GatewayStats,
        clock: IReactorTime,
        tunnels: Callable[[], Sequence[TunnelKey]],
        settings: HistorySettings | None = None,
    ) -> None:
        self.stats = stats
        self.clock = clock
        self.settings = settings or HistorySettings()
        self._tunnels = tunnels
        self._rings: dict[TunnelKey, Ring] = {}
        self._gateway = Ring(self.settings.ring_size)
        #: Samples taken since start: the number of the last one.
        self.taken = 0
        #: When the history started (the clock's time): a reader that saw
        #: another epoch (the server restarted) starts over.
        self.epoch = round(clock.seconds(), 3)
        #: Tunnels in force past max_tunnels at the last sample.
        self.not_sampled = 0
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        """Sample now and every interval of the clock."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self.clock
        self._loop.start(self.settings.interval, now=True)

    def stop(self) -> None:
        """Stop sampling (the rings are kept)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def sample(self) -> None:
        """Take one sample of every tunnel in force and of the gateway."""
        now = self.clock.seconds()
        self.taken += 1
        number = self.taken
        traffic = self.stats.tunnels
        keys = list(dict.fromkeys(self._tunnels()))
        limit = self.settings.max_tunnels
        kept, self.not_sampled = keys[:limit], max(0, len(keys) - limit)
        # Tunnels gone from the set (or past the bound) lose their ring.
        self._rings = {k: self._rings.get(k) or self._new_ring() for k in kept}
        for key, ring in self._rings.items():
            t = traffic.get(key)
            if t is None:
                ring.append(number, Sample(now, 0, 0, 0, 0))
            else:
                sample = Sample(now, t.accepted, t.open, t.bytes_in, t.bytes_out)
                ring.append(number, sample)
        self._gateway.append(
            number,
            Sample(
                now,
                self.stats.accepted,
                self.stats.open,
                sum(t.bytes_in for t in traffic.values()),
                sum(t.bytes_out for t in traffic.values()),
            ),
        )

    def _new_ring(self) -> Ring:
        return Ring(self.settings.ring_size)

    def ring(self, key: TunnelKey) -> list[Sample]:
        """One tunnel's samples, oldest first ([] when it has no ring)."""
        ring = self._rings.get(key)
        return list(ring.samples) if ring is not None else []

    @property
    def gateway(self) -> list[Sample]:
        """The gateway's samples, oldest first."""
        return list(self._gateway.samples)

    def to_json(self, after: int | None = None) -> dict[str, Any]:
        """``GET /status/history``: the rings, with the counters right now.

        With ``after`` (a sample number), each ring has only the samples
        taken after it; ``SamplesKept`` still says how many it holds, so a
        reader that adds the new ones to what it had keeps that many.
        """
        traffic = self.stats.tunnels
        tunnels = []
        for key, ring in self._rings.items():
            address, port, glob = key
            tunnels.append(
                {
                    "ListenAddress": address,
                    "ListenPort": port,
                    "ListenHostnameGlob": glob,
                    **_counters(traffic.get(key)),
                    "SamplesKept": len(ring),
                    "Samples": ring.to_json(after),
                }
            )
        gateway = {
            "Connections": self.stats.accepted,
            "OpenConnections": self.stats.open,
            "ReceivedBytes": sum(t.bytes_in for t in traffic.values()),
            "SentBytes": sum(t.bytes_out for t in traffic.values()),
            "Refused": {
                reason.value: count
                for reason, count in sorted(self.stats.refused.items())
            },
            "SamplesKept": len(self._gateway),
            "Samples": self._gateway.to_json(after),
        }
        return {
            "Now": round(self.clock.seconds(), 3),
            "Epoch": self.epoch,
            "Sample": self.taken,
            "IntervalSeconds": self.settings.interval,
            "SpanSeconds": self.settings.span,
            "Gateway": gateway,
            "Tunnels": tunnels,
            "TunnelsNotSampled": self.not_sampled,
        }
