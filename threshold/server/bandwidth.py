"""Bandwidth buckets of limited tunnels and clients, and each connection's share.

A tunnel with ``BandwidthBytesPerSecond`` has two buckets (upload,
download) shared by its connections; a client whose policy has one has
two shared by all its tunnels' connections. :meth:`BandwidthBook.directions`
gives a relayed connection the directions that draw from them
(:mod:`threshold.server.shaping`), or none when nothing limits it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from threshold.server.shaping import Bucket, Direction, RelayedConnection
from threshold.server.tunnels import format_address

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.config.policy import ClientPolicy
    from threshold.server.tunnels import Tunnel, TunnelKey

__all__ = ["UNLIMITED", "BandwidthBook", "tunnel_name"]

#: The rate a bucket gets when its limit is lifted (bytes per second): its
#: connections run free from then on.
UNLIMITED = 10**15


def tunnel_name(key: TunnelKey) -> str:
    """A tunnel in log lines: ``tunnel 0.0.0.0:443 *``."""
    address, port, glob = key
    return f"tunnel {format_address(address, port)} {glob}"


class BandwidthBook:
    """The buckets of limited tunnels and clients.

    ``on_limited(name, direction, bucket)`` is told each time a bucket
    starts holding a direction back.
    """

    def __init__(
        self,
        clock: IReactorTime,
        policy_for: Callable[[str], ClientPolicy],
        on_limited: Callable[[str, str, Bucket], None],
    ) -> None:
        self.clock = clock
        self._policy_for = policy_for
        self._on_limited = on_limited
        #: (tunnel key) -> (upload, download) buckets of limited tunnels.
        self.tunnel_buckets: dict[TunnelKey, tuple[Bucket, Bucket]] = {}
        #: client id -> (upload, download) buckets of limited clients.
        self.client_buckets: dict[str, tuple[Bucket, Bucket]] = {}

    def directions(
        self, public: RelayedConnection, tunnel: Tunnel, client_id: str
    ) -> tuple[Direction | None, Direction | None]:
        """A connection's upload and download, drawing from its buckets."""
        ups: list[Bucket] = []
        downs: list[Bucket] = []
        if tunnel.bandwidth:
            up, down = self._tunnel(tunnel)
            ups.append(up)
            downs.append(down)
        client = self._client(client_id)
        if client is not None:
            ups.append(client[0])
            downs.append(client[1])
        if not ups:
            return None, None

        def stream() -> Any:
            peer = public.peer
            return peer.transport if peer is not None else None

        def user() -> Any:
            return public.transport

        def stream_reading() -> Any:
            # The stream's producer is the relay's stand-in for the user.
            return getattr(public.peer, "reading", None)

        clock = self.clock
        return (
            Direction(clock, tuple(ups), user, stream_reading),
            Direction(clock, tuple(downs), stream, user),
        )

    def tunnels_applied(self, tunnels: Sequence[Tunnel]) -> None:
        """A new tunnel set: its rates apply at once, lifted limits free.

        Connections running on a tunnel whose limit is lifted (or that is
        gone) run free from then on; a changed rate applies to them at once.
        """
        limited = {t.key: t for t in tunnels if t.bandwidth}
        for key in list(self.tunnel_buckets):
            if key not in limited:
                for bucket in self.tunnel_buckets.pop(key):
                    bucket.set_rate(UNLIMITED, UNLIMITED)
        for tunnel in limited.values():
            if tunnel.key in self.tunnel_buckets:
                self._tunnel(tunnel)

    def _tunnel(self, tunnel: Tunnel) -> tuple[Bucket, Bucket]:
        buckets = self.tunnel_buckets.get(tunnel.key)
        rate, burst = tunnel.bandwidth, tunnel.bandwidth_burst
        if buckets is None:
            name = tunnel_name(tunnel.key)
            buckets = self.tunnel_buckets[tunnel.key] = (
                self._bucket(rate, burst, name, "upload"),
                self._bucket(rate, burst, name, "download"),
            )
        elif buckets[0].rate != rate or buckets[0].burst != (burst or rate):
            for bucket in buckets:
                bucket.set_rate(rate, burst)
        return buckets

    def client_pair(self, client_id: str) -> tuple[Bucket, Bucket] | None:
        """The client's (upload, download) buckets; None when it has no limit.

        Egress draws from them too (docs/egress.md).
        """
        return self._client(client_id)

    def _client(self, client_id: str) -> tuple[Bucket, Bucket] | None:
        buckets = self.client_buckets.get(client_id)
        if buckets is None:
            policy = self._policy_for(client_id)
            if not policy.bandwidth:
                return None
            rate, burst = policy.bandwidth, policy.bandwidth_burst
            name = f"client {client_id}"
            buckets = self.client_buckets[client_id] = (
                self._bucket(rate, burst, name, "upload"),
                self._bucket(rate, burst, name, "download"),
            )
        return buckets

    def _bucket(self, rate: int, burst: int, name: str, direction: str) -> Bucket:
        def limited(bucket: Bucket) -> None:
            self._on_limited(name, direction, bucket)

        return Bucket(self.clock, rate, burst, on_limited=limited)
