"""Which client of a tunnel takes a new connection: the balance modes.

Pure: no reactor, no registry. The caller passes the tunnel's healthy
clients in ``ClientIds`` order (see :mod:`threshold.server.serving`) and,
for ``least-connections``, the tunnel's open connections per client; it
keeps one turn counter per tunnel for the rotations.

- ``failover``: the first healthy client in list order takes every new
  connection; when an earlier client is healthy again it takes them again.
- ``round-robin``: the healthy clients in turn.
- ``least-connections``: the healthy client with the fewest of this
  tunnel's connections open; among equals, in turn (as nginx's
  ``least_conn`` and HAProxy's ``leastconn`` do), so short connections
  that close before the next one arrives are spread too.

:func:`order` returns every healthy client, best first: the first is the
choice, the second is where a connection is retried (see
:mod:`threshold.server.retry`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

__all__ = ["Balance", "order", "serving"]


class Balance(StrEnum):
    """A tunnel's ``Balance`` (the values are the API's)."""

    FAILOVER = "failover"
    ROUND_ROBIN = "round-robin"
    LEAST_CONNECTIONS = "least-connections"


def serving(mode: Balance, healthy: Sequence[str]) -> tuple[str, ...]:
    """The clients that receive new connections now.

    Failover: the first healthy one (none if none is); the other modes:
    every healthy one.
    """
    if mode is Balance.FAILOVER:
        return tuple(healthy[:1])
    return tuple(healthy)


def _rotated(healthy: Sequence[str], turn: int) -> list[str]:
    start = turn % len(healthy)
    return [*healthy[start:], *healthy[:start]]


def order(
    mode: Balance,
    healthy: Sequence[str],
    open_counts: Mapping[str, int] | None = None,
    turn: int = 0,
) -> list[str]:
    """The candidates for one new connection, best first.

    ``healthy`` are the tunnel's healthy clients in list order,
    ``open_counts`` its open connections per client (absent: 0), ``turn``
    how many connections this tunnel was given before (the caller counts).
    Empty when no client is healthy.
    """
    if not healthy:
        return []
    if mode is Balance.FAILOVER:
        return list(healthy)
    rotated = _rotated(healthy, turn)
    if mode is Balance.ROUND_ROBIN:
        return rotated
    counts = open_counts or {}
    # sorted() is stable: equals keep the rotation's order.
    return sorted(rotated, key=lambda client: counts.get(client, 0))
