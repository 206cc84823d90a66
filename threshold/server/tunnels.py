"""A tunnel entry of ``PUT /tunnels`` and the state file: fields, validation, JSON.

Pure: no reactor. ``parse_tunnels`` checks a whole body and names the entry
and field of the first error; ``RouteTable`` (routes.py) applies the result.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GroupKey",
    "Tunnel",
    "TunnelError",
    "format_address",
    "parse_tunnels",
]

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


def check_duplicates(tunnels: Sequence[Tunnel]) -> None:
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
    check_duplicates(tunnels)
    return tunnels
