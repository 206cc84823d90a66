"""The tunnel table: validation, hostname-glob precedence and all-or-nothing apply.

Tunnels are grouped by ``(ListenAddress, ListenPort)``: one listening socket
per group. ``RouteTable.apply`` replaces the whole set at once: it checks
every entry, binds every new socket, and only then switches the table, so a
failure leaves the previous set in force. Groups present before and after an
apply keep their socket, so moving a tunnel refuses no connection.

The parsing and matching functions are pure; ``RouteTable`` receives the
``listen`` function, so this module never imports the reactor.
"""

from __future__ import annotations

import errno
import ipaddress
import re
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

__all__ = [
    "GroupKey",
    "RouteTable",
    "Tunnel",
    "TunnelError",
    "format_address",
    "needs_sni",
    "parse_tunnels",
    "select_route",
]

log = Logger()

GroupKey = tuple[str, int]

MAX_GLOB_LENGTH = 253
MAX_SERVICE_LENGTH = 128

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

# The JSON field names, in the order to_json writes them.
_FIELDS = (
    "ClientId",
    "ListenAddress",
    "ListenPort",
    "ListenHostnameGlob",
    "BackEndService",
    "HaProxyProxyProtocol",
    "HaProxyProxyProtocolVersion",
)
_ACCEPTED_FIELDS = frozenset(_FIELDS) | {"ClientIdentifier"}


class TunnelError(Exception):
    """A tunnel list or an apply was refused; carries the HTTP answer for it."""

    def __init__(
        self,
        status: int,
        message: str,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.index = index
        self.field = field

    def to_json(self) -> dict[str, Any]:
        """The error as the management API's JSON error body."""
        return {"error": self.message, "index": self.index, "field": self.field}

    def __repr__(self) -> str:
        return (
            f"TunnelError({self.status}, {self.message!r}, "
            f"index={self.index!r}, field={self.field!r})"
        )


class _FieldError(Exception):
    """One field is invalid; turned into a TunnelError 400 by the caller."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def format_address(host: str, port: int) -> str:
    """Write ``host:port``, with brackets around an IPv6 address."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_client_id(value: object) -> str:
    if not isinstance(value, str):
        raise _FieldError("ClientId", f"must be a string, not {_type_name(value)}")
    if not value:
        raise _FieldError("ClientId", "must not be empty")
    return value


def _check_address(value: object) -> str:
    if not isinstance(value, str):
        raise _FieldError("ListenAddress", f"must be a string, not {_type_name(value)}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _FieldError(
            "ListenAddress", f"{value!r} is not an IPv4 or IPv6 address"
        ) from None


def _check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _FieldError("ListenPort", f"must be an integer, not {_type_name(value)}")
    if not 1 <= value <= 65535:
        raise _FieldError("ListenPort", f"{value} is not in 1..65535")
    return value


def _check_glob(value: object) -> str:
    if not isinstance(value, str):
        raise _FieldError(
            "ListenHostnameGlob", f"must be a string, not {_type_name(value)}"
        )
    glob = value.lower()
    if glob.endswith("."):
        glob = glob[:-1]
    if glob in ("", "*"):
        return "*"
    if len(glob) > MAX_GLOB_LENGTH:
        raise _FieldError(
            "ListenHostnameGlob", f"longer than {MAX_GLOB_LENGTH} characters"
        )
    if not glob.isascii():
        raise _FieldError(
            "ListenHostnameGlob",
            f"{value!r} is not ASCII: write international names in their "
            "IDNA A-label form (xn--...)",
        )
    labels = glob.split(".")
    for position, label in enumerate(labels):
        if label == "*" and position == 0:
            continue
        if "*" in label:
            raise _FieldError(
                "ListenHostnameGlob",
                f"{value!r}: '*' may only be the whole leftmost label "
                "(as in *.example.com)",
            )
        if not _LABEL.match(label):
            raise _FieldError(
                "ListenHostnameGlob",
                f"{value!r}: label {label!r} is not a DNS label (letters, "
                "digits and inner hyphens, 1 to 63 characters)",
            )
    return glob


def _check_service(value: object) -> str:
    if not isinstance(value, str):
        raise _FieldError(
            "BackEndService", f"must be a string, not {_type_name(value)}"
        )
    if not value:
        raise _FieldError("BackEndService", "must not be empty")
    if len(value) > MAX_SERVICE_LENGTH:
        raise _FieldError(
            "BackEndService", f"longer than {MAX_SERVICE_LENGTH} characters"
        )
    return value


def _check_proxy_protocol(value: object) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(
            "HaProxyProxyProtocol", f"must be true or false, not {_type_name(value)}"
        )
    return value


def _check_proxy_version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (1, 2):
        shown = value if isinstance(value, int | float) else _type_name(value)
        raise _FieldError("HaProxyProxyProtocolVersion", f"must be 1 or 2, not {shown}")
    return value


@dataclass(frozen=True)
class Tunnel:
    """One route: connections to a group, matching a glob, go to a client's service.

    Fields are validated and normalised on construction (address in
    ``ipaddress`` form, glob lowercased without a trailing dot, ``""`` as
    ``"*"``); an invalid field raises ``TunnelError`` (400) naming it.
    """

    client_id: str
    listen_address: str
    listen_port: int
    hostname_glob: str
    backend_service: str
    proxy_protocol: bool = False
    proxy_protocol_version: int = 1

    def __post_init__(self) -> None:
        try:
            normalised = {
                "client_id": _check_client_id(self.client_id),
                "listen_address": _check_address(self.listen_address),
                "listen_port": _check_port(self.listen_port),
                "hostname_glob": _check_glob(self.hostname_glob),
                "backend_service": _check_service(self.backend_service),
                "proxy_protocol": _check_proxy_protocol(self.proxy_protocol),
                "proxy_protocol_version": _check_proxy_version(
                    self.proxy_protocol_version
                ),
            }
        except _FieldError as e:
            raise TunnelError(
                400, f'field "{e.field}": {e.reason}', field=e.field
            ) from None
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def group(self) -> GroupKey:
        """The listening socket this tunnel shares: (address, port)."""
        return (self.listen_address, self.listen_port)

    def to_json(self) -> dict[str, Any]:
        """The tunnel with the management API's field names."""
        return {
            "ClientId": self.client_id,
            "ListenAddress": self.listen_address,
            "ListenPort": self.listen_port,
            "ListenHostnameGlob": self.hostname_glob,
            "BackEndService": self.backend_service,
            "HaProxyProxyProtocol": self.proxy_protocol,
            "HaProxyProxyProtocolVersion": self.proxy_protocol_version,
        }


def _parse_entry(entry: dict[Any, Any]) -> Tunnel:
    for key in entry:
        if key not in _ACCEPTED_FIELDS:
            raise _FieldError(str(key), "unknown field")
    if "ClientId" in entry and "ClientIdentifier" in entry:
        if entry["ClientId"] != entry["ClientIdentifier"]:
            raise _FieldError(
                "ClientIdentifier",
                "differs from ClientId (they are two names for one field)",
            )
    if "ClientId" in entry:
        client_id = _check_client_id(entry["ClientId"])
    elif "ClientIdentifier" in entry:
        try:
            client_id = _check_client_id(entry["ClientIdentifier"])
        except _FieldError as e:
            raise _FieldError("ClientIdentifier", e.reason) from None
    else:
        raise _FieldError("ClientId", "missing")
    if "ListenPort" not in entry:
        raise _FieldError("ListenPort", "missing")
    if "BackEndService" not in entry:
        raise _FieldError("BackEndService", "missing")
    return Tunnel(
        client_id=client_id,
        listen_address=_check_address(entry.get("ListenAddress", "0.0.0.0")),
        listen_port=_check_port(entry["ListenPort"]),
        hostname_glob=_check_glob(entry.get("ListenHostnameGlob", "*")),
        backend_service=_check_service(entry["BackEndService"]),
        proxy_protocol=_check_proxy_protocol(entry.get("HaProxyProxyProtocol", False)),
        proxy_protocol_version=_check_proxy_version(
            entry.get("HaProxyProxyProtocolVersion", 1)
        ),
    )


def _check_duplicates(tunnels: Sequence[Tunnel]) -> None:
    """Refuse two entries with the same group and the same glob."""
    seen: dict[tuple[str, int, str], int] = {}
    for index, tunnel in enumerate(tunnels):
        key = (tunnel.listen_address, tunnel.listen_port, tunnel.hostname_glob)
        if key in seen:
            raise TunnelError(
                400,
                f"duplicate route: entries {seen[key]} and {index} both listen "
                f"on {format_address(*tunnel.group)} with ListenHostnameGlob "
                f'"{tunnel.hostname_glob}"',
                index=index,
                field="ListenHostnameGlob",
            )
        seen[key] = index


def parse_tunnels(body: object) -> list[Tunnel]:
    """Validate a decoded ``PUT /tunnels`` body into tunnels, or raise TunnelError.

    422 when the body is not a list of objects, 400 naming the entry index
    and field for an invalid or unknown field, 400 for two entries with the
    same address, port and glob.
    """
    if not isinstance(body, list):
        raise TunnelError(
            422, f"the body must be a JSON list of tunnels, not {_type_name(body)}"
        )
    tunnels = []
    for index, entry in enumerate(body):
        if not isinstance(entry, dict):
            raise TunnelError(
                422,
                f"entry {index}: must be a JSON object, not {_type_name(entry)}",
                index=index,
            )
        try:
            tunnels.append(_parse_entry(entry))
        except _FieldError as e:
            raise TunnelError(
                400,
                f'entry {index}: field "{e.field}": {e.reason}',
                index=index,
                field=e.field,
            ) from None
    _check_duplicates(tunnels)
    return tunnels


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


def _bind_error(error: CannotListenError, key: GroupKey, index: int) -> TunnelError:
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
        409, f"entry {index}: address {address} {reason}", index=index, field=field
    )


class RouteTable:
    """The tunnels in force, one listening socket per group.

    ``listen(host, port, factory)`` opens a socket (an endpoint's
    ``listen``), ``make_factory(group)`` builds the front-end factory of a
    group (it looks its entries up with ``group()`` at each connection), and
    ``client_connected(client_id)`` says whether a client is connected now.
    """

    def __init__(
        self,
        listen: Callable[[str, int, IProtocolFactory], Deferred[IListeningPort]],
        make_factory: Callable[[GroupKey], IProtocolFactory],
        client_connected: Callable[[str], bool],
    ) -> None:
        self._listen = listen
        self._make_factory = make_factory
        self._client_connected = client_connected
        self._lock = DeferredLock()
        self._tunnels: list[Tunnel] = []
        self._groups: dict[GroupKey, tuple[Tunnel, ...]] = {}
        self._ports: dict[GroupKey, IListeningPort] = {}

    def tunnels(self) -> list[Tunnel]:
        """The tunnels in force, in the order they were applied."""
        return list(self._tunnels)

    def group(self, key: GroupKey) -> tuple[Tunnel, ...]:
        """The entries in force for one group; empty when the group is gone."""
        return self._groups.get(key, ())

    def groups(self) -> dict[GroupKey, tuple[Tunnel, ...]]:
        """All groups in force and their entries."""
        return dict(self._groups)

    def listening_port(self, key: GroupKey) -> IListeningPort | None:
        """The socket of a group, or None when the group is not listening."""
        return self._ports.get(key)

    def apply(
        self, tunnels: list[Tunnel], check_clients: bool = True
    ) -> Deferred[list[Tunnel]]:
        """Replace the whole set, all or nothing; fire with the list now in force.

        Fails with TunnelError (400 duplicate route, 404 client not
        connected, 409 a socket that cannot be bound) leaving the previous
        set in force and its sockets untouched. Applies run one at a time.
        """
        return self._lock.run(
            lambda: Deferred.fromCoroutine(self._apply(list(tunnels), check_clients))
        )

    async def _apply(self, tunnels: list[Tunnel], check_clients: bool) -> list[Tunnel]:
        _check_duplicates(tunnels)
        if check_clients:
            for index, tunnel in enumerate(tunnels):
                if not self._client_connected(tunnel.client_id):
                    raise TunnelError(
                        404,
                        f'entry {index}: client "{tunnel.client_id}" is not connected',
                        index=index,
                        field="ClientId",
                    )

        new_groups: dict[GroupKey, list[Tunnel]] = {}
        first_index: dict[GroupKey, int] = {}
        for index, tunnel in enumerate(tunnels):
            new_groups.setdefault(tunnel.group, []).append(tunnel)
            first_index.setdefault(tunnel.group, index)

        opened: dict[GroupKey, IListeningPort] = {}
        for key in new_groups:
            if key in self._ports:
                continue
            host, port = key
            try:
                opened[key] = await maybeDeferred(
                    self._listen, host, port, self._make_factory(key)
                )
            except CannotListenError as e:
                await self._stop(opened)
                raise _bind_error(e, key, first_index[key]) from None
            except BaseException:
                await self._stop(opened)
                raise
            log.info(
                "tunnel group {address} listening",
                address=format_address(host, port),
            )

        # The switch: everything past this point cannot fail the apply. With
        # endpoints that listen synchronously, the binds and this switch run
        # in one reactor turn, so no connection reaches a new socket before
        # its group is in the table.
        removed = {k: p for k, p in self._ports.items() if k not in new_groups}
        self._groups = {k: tuple(v) for k, v in new_groups.items()}
        self._tunnels = tunnels
        self._ports = {
            k: opened[k] if k in opened else self._ports[k] for k in new_groups
        }
        await self._stop(removed)
        log.info(
            "tunnel table applied: {count} tunnels in {groups} groups",
            count=len(tunnels),
            groups=len(new_groups),
        )
        return list(tunnels)

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
            ports = self._ports
            self._groups = {}
            self._tunnels = []
            self._ports = {}
            await self._stop(ports)

        return self._lock.run(lambda: Deferred.fromCoroutine(close()))
