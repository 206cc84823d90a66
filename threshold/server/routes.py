"""The tunnel table: validation, hostname-glob precedence and all-or-nothing apply.

Tunnels are grouped by ``(ListenAddress, ListenPort)``: one listening socket
per group. ``RouteTable.apply`` replaces the whole set at once: it checks
every entry, binds every new socket, saves the set (when asked), and only
then switches the table, so a failure leaves the previous set in force.
Groups present before and after an apply keep their socket, so moving a
tunnel refuses no connection. ``RouteTable.restore`` is the one partial
path: at start, each group of the saved set that cannot be bound is left
out and reported, and the others serve.

The parsing and matching functions are pure; ``RouteTable`` receives the
``listen`` function, so this module never imports the reactor.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.server.tunnels import (
    GroupKey,
    Tunnel,
    TunnelError,
    check_duplicates,
    format_address,
    parse_tunnels,
)

__all__ = [
    "GroupKey",
    "NotRestored",
    "RouteTable",
    "Tunnel",
    "TunnelError",
    "format_address",
    "needs_sni",
    "parse_tunnels",
    "select_route",
]

log = Logger()


def _normalise_name(name: str) -> str:
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    return name


def _glob_matches(glob: str, name: str) -> bool:
    """Whether a non-``*`` glob matches a normalised name.

    ``*.example.com`` matches any name ending in ``.example.com`` with at
    least one label before it: ``a.example.com`` and ``a.b.example.com``,
    not ``example.com``.
    """
    if not glob.startswith("*."):
        return glob == name
    suffix = glob[1:]
    if not name.endswith(suffix):
        return False
    prefix = name[: -len(suffix)]
    return bool(prefix) and all(prefix.split("."))


def select_route(entries: Sequence[Tunnel], server_name: str | None) -> Tunnel | None:
    """Pick the entry of one group for a connection's SNI name.

    An exact name wins, then the longest matching wildcard, then the ``*``
    entry; with no name or no match, the ``*`` entry; None when none fits.
    Names compare case-insensitively, ignoring a trailing dot. Among equal
    candidates the first entry wins.
    """
    fallback: Tunnel | None = None
    best: Tunnel | None = None
    best_rank = (-1, -1)
    name = _normalise_name(server_name) if server_name else ""
    for entry in entries:
        glob = _normalise_name(entry.hostname_glob) or "*"
        if glob == "*":
            if fallback is None:
                fallback = entry
            continue
        if not name or not _glob_matches(glob, name):
            continue
        rank = (0 if glob.startswith("*.") else 1, len(glob))
        if rank > best_rank:
            best, best_rank = entry, rank
    return best if best is not None else fallback


def needs_sni(entries: Sequence[Tunnel]) -> bool:
    """Whether the group must read the ClientHello before it can route.

    False for a group that is a single ``*`` entry: it forwards at once, so
    protocols where the server speaks first work.
    """
    if len(entries) == 0:
        return False
    if len(entries) == 1:
        return (_normalise_name(entries[0].hostname_glob) or "*") != "*"
    return True


def _bind_error(
    error: CannotListenError, key: GroupKey, index: int, what: str = "address"
) -> TunnelError:
    address = format_address(*key)
    code = getattr(error.socketError, "errno", None)
    if code == errno.EADDRINUSE:
        reason, field = "already in use", "ListenPort"
    elif code == errno.EADDRNOTAVAIL:
        reason, field = "not available on this host", "ListenAddress"
    elif code == errno.EACCES:
        reason = "permission denied (ports below 1024 need privileges)"
        field = "ListenPort"
    else:
        reason, field = f"cannot listen: {error.socketError}", "ListenPort"
    return TunnelError(
        409, f"entry {index}: {what} {address} {reason}", index=index, field=field
    )


@dataclass(frozen=True)
class NotRestored:
    """An entry of the saved set that could not be put back at start."""

    #: The entry's place in the saved list.
    index: int
    tunnel: Tunnel
    error: TunnelError

    def to_json(self) -> dict[str, Any]:
        """The API view: the entry, where it was, and why it is not in force."""
        return {
            "Index": self.index,
            "Tunnel": self.tunnel.to_json(),
            "Error": self.error.message,
            "Field": self.error.field,
        }


#: Saves a set about to be switched in; a failure cancels the apply.
Persist = Callable[[list[Tunnel]], "Deferred[None] | None"]

#: Opens a UDP tunnel's socket on (host, port) for the group (server/udp.py).
ListenUdp = Callable[[str, int, GroupKey], "Deferred[IListeningPort] | IListeningPort"]


class RouteTable:
    """The tunnels in force, one listening socket per group.

    ``listen(host, port, factory)`` opens a socket (an endpoint's
    ``listen``), ``make_factory(group)`` builds the front-end factory of a
    group (it looks its entries up with ``group()`` at each connection), and
    ``on_switch(tunnels)`` is told the set in force each time it changes
    (an apply, a restore, the close), at the switch itself. The clients a
    tunnel names need not be connected: its socket listens all the same.
    """

    def __init__(
        self,
        listen: Callable[[str, int, IProtocolFactory], Deferred[IListeningPort]],
        make_factory: Callable[[GroupKey], IProtocolFactory],
        on_switch: Callable[[list[Tunnel]], object] = lambda tunnels: None,
        listen_udp: ListenUdp | None = None,
    ) -> None:
        self._listen = listen
        self._make_factory = make_factory
        self._on_switch = on_switch
        #: ``listen_udp(host, port, group)`` opens a UDP tunnel's socket
        #: (server/udp.py); None: UDP tunnels cannot be applied (400).
        self._listen_udp = listen_udp
        #: The UDP sockets, by (address, port): their own sockets, so a TCP
        #: and a UDP tunnel may share an address and port.
        self._udp_ports: dict[GroupKey, IListeningPort] = {}
        self._lock = DeferredLock()
        self._tunnels: list[Tunnel] = []
        self._groups: dict[GroupKey, tuple[Tunnel, ...]] = {}
        self._ports: dict[GroupKey, IListeningPort] = {}
        self._not_restored: list[NotRestored] = []
        #: Switches of the set in force since start (apply, restore, close):
        #: the ``Revision`` of ``tunnels.applied`` events and ``GET /server``.
        self.revision = 0
        self._watchers: list[Callable[[list[Tunnel], int], object]] = []

    def watch(self, watcher: Callable[[list[Tunnel], int], object]) -> None:
        """Call ``watcher(tunnels, revision)`` after each switch (the event feed)."""
        self._watchers.append(watcher)

    def tunnels(self) -> list[Tunnel]:
        """The tunnels in force, in the order they were applied."""
        return list(self._tunnels)

    def group(self, key: GroupKey) -> tuple[Tunnel, ...]:
        """The TCP entries in force for one group; empty when the group is gone."""
        return self._groups.get(key, ())

    def udp_tunnel(self, key: GroupKey) -> Tunnel | None:
        """The UDP tunnel in force on (address, port), if any."""
        for tunnel in self._tunnels:
            if tunnel.is_udp and tunnel.group == key:
                return tunnel
        return None

    def udp_port(self, key: GroupKey) -> IListeningPort | None:
        """The UDP socket of (address, port), or None when not listening."""
        return self._udp_ports.get(key)

    def groups(self) -> dict[GroupKey, tuple[Tunnel, ...]]:
        """All groups in force and their entries."""
        return dict(self._groups)

    def listening_port(self, key: GroupKey) -> IListeningPort | None:
        """The socket of a group, or None when the group is not listening."""
        return self._ports.get(key)

    def not_restored(self) -> list[NotRestored]:
        """Saved entries the last restore could not bind (until an apply)."""
        return list(self._not_restored)

    def apply(
        self, tunnels: list[Tunnel], persist: Persist | None = None
    ) -> Deferred[list[Tunnel]]:
        """Replace the whole set, all or nothing; fire with the list now in force.

        Fails with TunnelError (400 duplicate route, 409 a socket that
        cannot be bound), or with whatever ``persist(tunnels)`` raised,
        leaving the previous set in force and its sockets untouched. Applies
        (and so their saves) run one at a time, in the order they were asked
        for.
        """
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._apply(list(tunnels), persist))
        )

    async def _apply(
        self, tunnels: list[Tunnel], persist: Persist | None
    ) -> list[Tunnel]:
        check_duplicates(tunnels)
        new_groups: dict[GroupKey, list[Tunnel]] = {}
        first_index: dict[GroupKey, int] = {}
        new_udp: dict[GroupKey, int] = {}
        for index, tunnel in enumerate(tunnels):
            if tunnel.is_udp:
                self._check_udp(index)
                new_udp[tunnel.group] = index
                continue
            new_groups.setdefault(tunnel.group, []).append(tunnel)
            first_index.setdefault(tunnel.group, index)

        opened: dict[GroupKey, IListeningPort] = {}
        opened_udp: dict[GroupKey, IListeningPort] = {}
        try:
            for key in new_groups:
                if key not in self._ports:
                    opened[key] = await self._bind(key, first_index[key])
            for key, index in new_udp.items():
                if key not in self._udp_ports:
                    opened_udp[key] = await self._bind_udp(key, index)
            # Saved before the switch, so the file never holds a set that is
            # not (or no longer) in force. A connection reaching a new socket
            # meanwhile finds no entry and is closed: that tunnel is not in
            # force until the switch.
            if persist is not None:
                await maybeDeferred(persist, list(tunnels))
        except BaseException:
            await self._stop(opened)
            await self._stop(opened_udp)
            raise

        # The switch: everything past this point cannot fail the apply.
        removed = {k: p for k, p in self._ports.items() if k not in new_groups}
        removed_udp = {k: p for k, p in self._udp_ports.items() if k not in new_udp}
        self._groups = {k: tuple(v) for k, v in new_groups.items()}
        self._tunnels = tunnels
        self._not_restored = []
        self._ports = {
            k: opened[k] if k in opened else self._ports[k] for k in new_groups
        }
        self._udp_ports = {
            k: opened_udp[k] if k in opened_udp else self._udp_ports[k] for k in new_udp
        }
        self._switched()
        await self._stop(removed)
        await self._stop(removed_udp)
        log.info(
            "tunnel table applied: {count} tunnels in {groups} groups",
            count=len(tunnels),
            groups=len(new_groups),
        )
        return list(tunnels)

    def restore(self, tunnels: list[Tunnel]) -> Deferred[list[NotRestored]]:
        """Put a saved set back at start, group by group; fire with what failed.

        Unlike :meth:`apply`, a group whose socket cannot be bound is left
        out (each of its entries logged and reported by
        :meth:`not_restored`) and the other groups serve.
        """
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._restore(list(tunnels)))
        )

    async def _restore(self, tunnels: list[Tunnel]) -> list[NotRestored]:
        groups: dict[GroupKey, list[int]] = {}
        udp: dict[GroupKey, int] = {}
        for index, tunnel in enumerate(tunnels):
            if tunnel.is_udp:
                udp[tunnel.group] = index
            else:
                groups.setdefault(tunnel.group, []).append(index)
        opened_udp: dict[GroupKey, IListeningPort] = {}
        failed_udp: list[NotRestored] = []
        for key, index in udp.items():
            if key in self._udp_ports:
                opened_udp[key] = self._udp_ports[key]
                continue
            try:
                self._check_udp(index)
                opened_udp[key] = await self._bind_udp(key, index)
            except TunnelError as e:
                failed_udp.append(NotRestored(index, tunnels[index], e))
                log.error(
                    "state file entry {index} (UDP, {address}) not restored: {why}",
                    index=index,
                    address=format_address(*key),
                    why=e.message,
                )
        opened: dict[GroupKey, IListeningPort] = {}
        failed: list[NotRestored] = []
        for key, indexes in groups.items():
            if key in self._ports:
                opened[key] = self._ports[key]
                continue
            try:
                opened[key] = await self._bind(key, indexes[0])
            except TunnelError as e:
                for index in indexes:
                    failed.append(NotRestored(index, tunnels[index], e))
                    log.error(
                        "state file entry {index} (client {client_id}, "
                        "{address}) not restored: {why}",
                        index=index,
                        client_id=", ".join(tunnels[index].client_ids),
                        address=format_address(*key),
                        why=e.message,
                    )
        kept = [
            t
            for t in tunnels
            if (t.group in opened_udp if t.is_udp else t.group in opened)
        ]
        failed = sorted([*failed, *failed_udp], key=lambda n: n.index)
        removed = {k: p for k, p in self._ports.items() if k not in opened}
        removed_udp = {k: p for k, p in self._udp_ports.items() if k not in opened_udp}
        new_groups: dict[GroupKey, list[Tunnel]] = {}
        for tunnel in kept:
            if not tunnel.is_udp:
                new_groups.setdefault(tunnel.group, []).append(tunnel)
        self._groups = {k: tuple(v) for k, v in new_groups.items()}
        self._tunnels = kept
        self._ports = opened
        self._udp_ports = opened_udp
        self._not_restored = failed
        self._switched()
        await self._stop(removed)
        await self._stop(removed_udp)
        return list(failed)

    def _switched(self) -> None:
        """Tell ``on_switch`` the set now in force (its failure is only logged)."""
        self.revision += 1
        try:
            self._on_switch(list(self._tunnels))
        except Exception:
            log.failure("tunnel set switched, but telling the front end failed")
        for watcher in self._watchers:
            try:
                watcher(list(self._tunnels), self.revision)
            except Exception:
                log.failure("tunnel set switched, but telling a watcher failed")

    async def _bind(self, key: GroupKey, index: int) -> IListeningPort:
        """Listen for a group; a bind error is a TunnelError naming ``index``."""
        host, port = key
        try:
            listening = await maybeDeferred(
                self._listen, host, port, self._make_factory(key)
            )
        except CannotListenError as e:
            raise _bind_error(e, key, index) from None
        log.info("tunnel group {address} listening", address=format_address(host, port))
        return listening

    def _check_udp(self, index: int) -> None:
        if self._listen_udp is None:
            raise TunnelError(
                400,
                f"entry {index}: this gateway serves no UDP tunnels",
                index=index,
                field="Protocol",
            )

    async def _bind_udp(self, key: GroupKey, index: int) -> IListeningPort:
        """Open a UDP tunnel's socket; a bind error is a TunnelError (409)."""
        assert self._listen_udp is not None
        host, port = key
        try:
            listening = await maybeDeferred(self._listen_udp, host, port, key)
        except CannotListenError as e:
            raise _bind_error(e, key, index, "UDP address") from None
        log.info("UDP tunnel {address} listening", address=format_address(host, port))
        return listening

    async def _stop(self, ports: dict[GroupKey, IListeningPort]) -> None:
        """Stop listening on sockets, logging (not raising) any failure."""

        def failed(failure: Failure, key: GroupKey) -> None:
            log.failure(
                "cannot stop listening on {address}",
                failure,
                address=format_address(*key),
            )

        deferreds = []
        for key, port in ports.items():
            d = maybeDeferred(port.stopListening)
            d.addCallback(
                lambda _, key=key: log.info(
                    "tunnel group {address} closed", address=format_address(*key)
                )
            )
            d.addErrback(failed, key)
            deferreds.append(d)
        if deferreds:
            await gatherResults(deferreds)

    def close(self) -> Deferred[None]:
        """Stop listening everywhere and empty the table."""

        async def close() -> None:
            ports, udp_ports = self._ports, self._udp_ports
            self._groups = {}
            self._tunnels = []
            self._ports = {}
            self._udp_ports = {}
            self._switched()
            await self._stop(ports)
            await self._stop(udp_ports)

        return self._lock.run(lambda: Deferred.fromCoroutine(close()))
