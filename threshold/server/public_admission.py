"""Whether a new public connection may be served: caps, then the access policy.

One :class:`PublicAdmission` per gateway, shared by every public socket, so a
source is counted once across all tunnels and listeners. Sources are keyed
by :func:`~threshold.server.addresses.source_of`: an IPv4 user on a
dual-stack ``"::"`` listener (``::ffff:a.b.c.d``) is the same source as on
an IPv4 listener, and IPv6 sources are grouped by ``SourceIpv6PrefixLength``.

The front end asks it twice: :meth:`PublicAdmission.admit` when a user
connects (concurrency caps), and :meth:`PublicAdmission.check` once the
tunnel entry is chosen, before any stream is opened (source lists, quota,
new-connection rate: :mod:`threshold.server.policy`). Once relayed,
:meth:`PublicAdmission.meter` gives the connection its meter (bandwidth,
quota) when one applies.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Hashable, MutableSequence
from typing import TYPE_CHECKING

from threshold.server.addresses import DEFAULT_IPV6_PREFIX, source_of
from threshold.server.admission import SourceShares
from threshold.server.policy import Denied, GatewayPolicy, RelayedConnection
from threshold.server.stats import Limit, Refusal
from threshold.server.tunnels import GroupKey

if TYPE_CHECKING:
    from threshold.server.shaping import FlowMeter
    from threshold.server.tunnels import Tunnel

__all__ = ["Denied", "PublicAdmission"]


class PublicAdmission:
    """Concurrent public connections per tunnel group and per source.

    ``max_per_tunnel`` and ``max_per_source`` of 0 mean no limit (the
    connections are still counted). ``policy`` is the gateway's access
    policy; without one every connection passes :meth:`check`.
    """

    def __init__(
        self,
        max_per_tunnel: int = 0,
        max_per_source: int = 0,
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
        policy: GatewayPolicy | None = None,
    ) -> None:
        self.policy = policy
        self.max_per_tunnel = max_per_tunnel
        self.ipv6_prefix = ipv6_prefix
        self._sources: SourceShares[Hashable] = SourceShares(
            sys.maxsize, max_per_source
        )
        self._groups: Counter[GroupKey] = Counter()
        self._group_of: dict[Hashable, GroupKey] = {}

    def admit(self, holder: Hashable, group: GroupKey, peer: object) -> Denied | None:
        """Give ``holder`` (a connection from ``peer``) a slot, or say why not."""
        held = self._groups[group]
        if self.max_per_tunnel and held >= self.max_per_tunnel:
            return Denied(
                Refusal.LIMIT_TUNNEL,
                Limit.CONNECTIONS_PER_TUNNEL,
                f"{held} connections on this tunnel already",
            )
        source = source_of(peer, self.ipv6_prefix)
        if not self._sources.admit(source, holder).admitted:
            return Denied(
                Refusal.LIMIT_SOURCE_IP,
                Limit.CONNECTIONS_PER_SOURCE_IP,
                f"{self._sources.count(source)} connections from {source} already",
            )
        self._groups[group] += 1
        self._group_of[holder] = group
        return None

    def check(
        self,
        connection: RelayedConnection,
        tunnel: Tunnel,
        candidates: MutableSequence[str],
    ) -> Denied | None:
        """The access policy for a connection about to use ``tunnel``.

        Drops from ``candidates`` the clients whose own policy refuses it;
        a refusal is counted and logged, the caller closes the connection.
        """
        policy = self.policy
        if policy is None:
            return None
        return policy.check(connection.transport.getPeer(), tunnel, candidates)

    def meter(self, connection: RelayedConnection, tunnel: Tunnel) -> FlowMeter | None:
        """The meter of a connection just relayed, when a limit applies to it."""
        policy = self.policy
        if policy is None:
            return None
        return policy.meter(connection, tunnel)

    def release(self, holder: Hashable) -> bool:
        """Give ``holder``'s slot back; False if it held none (or already gave it)."""
        group = self._group_of.pop(holder, None)
        if group is None:
            return False
        self._sources.release(holder)
        self._groups[group] -= 1
        if not self._groups[group]:
            del self._groups[group]
        return True

    def source_count(self, source: str) -> int:
        """Connections ``source`` (a source key) holds now."""
        return self._sources.count(source)

    def __len__(self) -> int:
        return len(self._group_of)
