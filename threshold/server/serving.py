"""Which clients receive each tunnel's connections now, kept up to date by events.

The :class:`ServingTable` holds, for every tunnel in force, the state of
each of its clients (connected, healthy for the tunnel's service, why not)
and the clients that receive its new connections (:func:`balance.serving`).
It is computed when something changes, never per connection: when the
route table switches to a new set (:meth:`ServingTable.update`) and when
the registry reports a change of a client (connected, going away, ended,
health reported; :meth:`ServingTable.client_changed`).

Each change of a tunnel's serving clients is logged once::

    tunnel 0.0.0.0:443 web: serving home-b (was home-a: session closed)

and, for a ``failover`` tunnel, counted as a failover when the client
that was serving stops being healthy (session closed, lost or going away,
or its service reported unhealthy), whether another client takes over or
none can. The move back to a preferred client that is healthy again is no
failover, nor is a change made by ``PUT /tunnels``.

The front end asks :meth:`ServingTable.candidates` for a connection's
clients, best first, and :meth:`ServingTable.session_for` for a client's
session; the API and the metrics read :meth:`ServingTable.views`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from threshold.logs import observer as log_observer
from threshold.server.balance import Balance, order, serving
from threshold.server.tunnels import Tunnel, TunnelKey, format_address

if TYPE_CHECKING:
    from threshold.mux.session import MuxSession
    from threshold.server.registry import ClientHealth, ClientRegistry
    from threshold.server.stats import GatewayStats

__all__ = ["ServingTable", "TunnelView", "describe"]

log = Logger(observer=log_observer)

#: Told a failover: the tunnel, who served it, who serves it now, and why.
FailoverListener = Callable[[Tunnel, str, tuple[str, ...], str], None]

#: The reason logged when a PUT /tunnels, not a client, changed the set.
TUNNEL_SET_CHANGED = "tunnel set changed"


@dataclass(frozen=True)
class TunnelView:
    """One tunnel's clients and the ones that receive its connections now."""

    tunnel: Tunnel
    #: Each client of the tunnel, in ClientIds order.
    clients: tuple[ClientHealth, ...]
    #: The healthy ones, in ClientIds order.
    healthy: tuple[str, ...]
    serving: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The status parts of GET /tunnels/status: Clients and Serving."""
        return {
            "Clients": [c.to_json() for c in self.clients],
            "Serving": list(self.serving),
        }


def describe(tunnel: Tunnel) -> str:
    """A tunnel in log lines: ``0.0.0.0:443 web`` (the glob when not ``*``)."""
    address = format_address(*tunnel.group)
    if tunnel.hostname_glob != "*":
        return f"{address} {tunnel.hostname_glob} {tunnel.backend_service}"
    return f"{address} {tunnel.backend_service}"


def _failed_over(before: TunnelView, after: TunnelView) -> bool:
    """Whether a failover tunnel's serving client stopped being healthy.

    A move back to a preferred client that is healthy again is no failover,
    nor is a change made by a new tunnel set.
    """
    if before.tunnel.balance is not Balance.FAILOVER or not before.serving:
        return False
    if after.tunnel.balance is not Balance.FAILOVER:
        return False
    was = before.serving[0]
    return not any(c.client_id == was and c.healthy for c in after.clients)


def _replaced(view: TunnelView, tunnel: Tunnel) -> bool:
    """Whether ``tunnel`` is not the entry ``view`` was computed for.

    The front end passes the route table's own objects: the identity check
    answers at once, the comparison only for a tunnel not in force.
    """
    return view.tunnel is not tunnel and view.tunnel != tunnel


def _names(clients: Sequence[str]) -> str:
    return ", ".join(clients) if clients else "nobody"


class ServingTable:
    """The serving clients of every tunnel in force (a registry listener)."""

    def __init__(self, registry: ClientRegistry, stats: GatewayStats) -> None:
        self.registry = registry
        self.stats = stats
        self._views: dict[TunnelKey, TunnelView] = {}
        #: The tunnels naming each client.
        self._by_client: dict[str, set[TunnelKey]] = {}
        #: Connections given to each tunnel, for the rotations.
        self._turns: dict[TunnelKey, int] = {}
        #: Told each failover: the tunnel, the client that served, the ones
        #: serving now, and why (the event feed).
        self.on_failover: FailoverListener | None = None
        registry.subscribe(self.client_changed)

    # -- events ---------------------------------------------------------------

    def update(self, tunnels: Sequence[Tunnel]) -> None:
        """The route table switched to ``tunnels``: recompute every tunnel.

        A tunnel whose key (address, port, glob) was in force before keeps
        its history: a change of its serving clients is logged (and may be
        a failover); a new tunnel starts quietly.
        """
        old = self._views
        self._views = {}
        self._by_client = {}
        for tunnel in tunnels:
            key = tunnel.key
            for client_id in tunnel.client_ids:
                self._by_client.setdefault(client_id, set()).add(key)
            self._views[key] = view = self._compute(tunnel)
            before = old.get(key)
            if before is not None:
                self._report(before, view, TUNNEL_SET_CHANGED)
        self._turns = {k: n for k, n in self._turns.items() if k in self._views}

    def client_changed(self, client_id: str) -> None:
        """A client's session or health changed: recompute its tunnels."""
        for key in sorted(self._by_client.get(client_id, ())):
            before = self._views[key]
            after = self._compute(before.tunnel)
            self._views[key] = after
            self._report(before, after, None)

    # -- what the front end asks ------------------------------------------------

    def candidates(self, tunnel: Tunnel) -> list[str]:
        """The clients for one new connection of ``tunnel``, best first.

        The first is the choice, the next ones where a reset connection is
        retried. Empty when no client is healthy.
        """
        key = tunnel.key
        view = self._views.get(key)
        if view is None or _replaced(view, tunnel):
            # Not (or no longer) in force: judged on the spot.
            view = self._compute(tunnel)
        if not view.healthy:
            return []
        if tunnel.balance is Balance.FAILOVER:
            return list(view.healthy)
        turn = self._turns.get(key, 0)
        self._turns[key] = turn + 1
        return order(
            tunnel.balance, view.healthy, self.stats.open_per_client(key), turn
        )

    def session_for(self, client_id: str) -> MuxSession | None:
        """The client's session, if connected."""
        return self.registry.session_for(client_id)

    def is_healthy(self, tunnel: Tunnel, client_id: str) -> bool:
        """Whether ``client_id`` may take ``tunnel``'s connections now."""
        view = self._views.get(tunnel.key)
        if view is None or _replaced(view, tunnel):
            view = self._compute(tunnel)
        return client_id in view.healthy

    # -- what the API and metrics read -----------------------------------------

    def view(self, tunnel: Tunnel) -> TunnelView:
        """The state of one tunnel's clients (judged on the spot if not in force)."""
        view = self._views.get(tunnel.key)
        if view is None or _replaced(view, tunnel):
            return self._compute(tunnel)
        return view

    def views(self) -> list[TunnelView]:
        """Every tunnel in force, in no particular order."""
        return list(self._views.values())

    # -- computing --------------------------------------------------------------

    def _compute(self, tunnel: Tunnel) -> TunnelView:
        clients = tuple(
            self.registry.health_for(client_id, tunnel.backend_service)
            for client_id in tunnel.client_ids
        )
        healthy = tuple(c.client_id for c in clients if c.healthy)
        return TunnelView(tunnel, clients, healthy, serving(tunnel.balance, healthy))

    def _report(self, before: TunnelView, after: TunnelView, why: str | None) -> None:
        """Log (and count) a change of the serving clients, if there is one."""
        if before.serving == after.serving:
            return
        tunnel = after.tunnel
        reason = why or self._why(before, after)
        if why is None and _failed_over(before, after):
            self.stats.failovers[tunnel.key] += 1
            if self.on_failover is not None:
                self.on_failover(tunnel, before.serving[0], after.serving, reason)
        log.info(
            "tunnel {tunnel}: serving {now} (was {was}: {why})",
            tunnel=describe(tunnel),
            now=_names(after.serving),
            was=_names(before.serving),
            why=reason,
        )

    @staticmethod
    def _why(before: TunnelView, after: TunnelView) -> str:
        """What made the serving clients change, for the log line."""
        states = {c.client_id: c for c in after.clients}
        left = [c for c in before.serving if c not in after.serving]
        for client_id in left:
            state = states.get(client_id)
            if state is not None and not state.healthy:
                prefix = f"{client_id} " if len(before.serving) > 1 else ""
                return f"{prefix}{state.why}"
        came = [c for c in after.serving if c not in before.serving]
        if came:
            again = " again" if before.serving else ""
            return f"{_names(came)} healthy{again}"
        return TUNNEL_SET_CHANGED
