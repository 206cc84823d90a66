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
and the open connections at that instant; rates per second are worked out
when read, from two neighbouring samples, so nothing is kept twice.
``GET /status/history`` serves :meth:`TrafficHistory.to_json`.
"""

from __future__ import annotations

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

__all__ = ["HistorySettings", "Sample", "TrafficHistory"]

#: The page's charts show this much; a ring keeps no more.
DEFAULT_SPAN = 3600.0
DEFAULT_INTERVAL = 10.0
#: Tunnels with a ring: 64 rings of 361 samples answer in well under 1 MB.
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


def _rate(now: float, before: float, at: float, earlier: float) -> float | None:
    if at <= earlier:
        return None
    # Counters only grow; a drop (there is none today) reads as no traffic.
    return round(max(0.0, now - before) / (at - earlier), 3)


def samples_json(ring: Sequence[Sample]) -> dict[str, list[Any]]:
    """A ring as columns: times, open connections and rates per second.

    The first sample's rates are ``null``: there is nothing before it.
    """
    out: dict[str, list[Any]] = {
        "Times": [],
        "OpenConnections": [],
        "NewConnectionsPerSecond": [],
        "ReceivedBytesPerSecond": [],
        "SentBytesPerSecond": [],
    }
    previous: Sample | None = None
    for sample in ring:
        out["Times"].append(round(sample.time, 3))
        out["OpenConnections"].append(sample.open)
        for name, attr in (
            ("NewConnectionsPerSecond", "accepted"),
            ("ReceivedBytesPerSecond", "received"),
            ("SentBytesPerSecond", "sent"),
        ):
            rate = None
            if previous is not None:
                rate = _rate(
                    getattr(sample, attr),
                    getattr(previous, attr),
                    sample.time,
                    previous.time,
                )
            out[name].append(rate)
        previous = sample
    return out


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
        self._rings: dict[TunnelKey, deque[Sample]] = {}
        self._gateway: deque[Sample] = deque(maxlen=self.settings.ring_size)
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
        traffic = self.stats.tunnels
        keys = list(dict.fromkeys(self._tunnels()))
        limit = self.settings.max_tunnels
        kept, self.not_sampled = keys[:limit], max(0, len(keys) - limit)
        # Tunnels gone from the set (or past the bound) lose their ring.
        self._rings = {k: self._rings.get(k) or self._new_ring() for k in kept}
        for key, ring in self._rings.items():
            t = traffic.get(key)
            if t is None:
                ring.append(Sample(now, 0, 0, 0, 0))
            else:
                ring.append(Sample(now, t.accepted, t.open, t.bytes_in, t.bytes_out))
        self._gateway.append(
            Sample(
                now,
                self.stats.accepted,
                self.stats.open,
                sum(t.bytes_in for t in traffic.values()),
                sum(t.bytes_out for t in traffic.values()),
            )
        )

    def _new_ring(self) -> deque[Sample]:
        return deque(maxlen=self.settings.ring_size)

    def ring(self, key: TunnelKey) -> list[Sample]:
        """One tunnel's samples, oldest first ([] when it has no ring)."""
        return list(self._rings.get(key, ()))

    @property
    def gateway(self) -> list[Sample]:
        """The gateway's samples, oldest first."""
        return list(self._gateway)

    def to_json(self) -> dict[str, Any]:
        """``GET /status/history``: the rings, with the counters right now."""
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
                    "Samples": samples_json(ring),
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
            "Samples": samples_json(self._gateway),
        }
        return {
            "Now": round(self.clock.seconds(), 3),
            "IntervalSeconds": self.settings.interval,
            "SpanSeconds": self.settings.span,
            "Gateway": gateway,
            "Tunnels": tunnels,
            "TunnelsNotSampled": self.not_sampled,
        }
