"""A tunnel entry of ``PUT /tunnels`` and the state file: fields, validation, JSON.

Pure: no reactor. Each field is declared once on :class:`Tunnel` (the
table in docs/api.md is generated from it) with the validators every other
parser uses, so a service name the stream header would refuse is refused
here too. ``parse_tunnels`` checks a whole body and names the entry and
field of the first error; ``RouteTable`` (routes.py) applies the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threshold.schema import (
    BOOLEAN,
    CLIENT_ID,
    HOST_GLOB,
    IP_ADDRESS,
    PORT,
    SERVICE_NAME,
    Choice,
    Schema,
    SchemaError,
    field,
    format_address,
)

__all__ = [
    "TUNNEL",
    "GroupKey",
    "Tunnel",
    "TunnelError",
    "check_duplicates",
    "format_address",
    "parse_tunnels",
]

GroupKey = tuple[str, int]


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
        #: The field error behind a 400, if that is what this is.
        self.schema_error: SchemaError | None = None

    @classmethod
    def invalid(cls, error: SchemaError) -> TunnelError:
        """The 400 for a field error (the message names entry and field)."""
        result = cls(400, str(error), error.index, error.field)
        result.schema_error = error
        return result

    def to_json(self) -> dict[str, Any]:
        """The error as the management API's JSON error body."""
        return {"error": self.message, "index": self.index, "field": self.field}

    def __repr__(self) -> str:
        return (
            f"TunnelError({self.status}, {self.message!r}, "
            f"index={self.index!r}, field={self.field!r})"
        )


@dataclass(frozen=True, kw_only=True)
class Tunnel:
    """One route: connections to a group, matching a glob, go to a client's service.

    Fields are validated and normalised on construction (address in
    ``ipaddress`` form, glob lowercased without a trailing dot, ``""`` as
    ``"*"``); an invalid field raises ``TunnelError`` (400) naming it.
    """

    client_id: str = field(
        "ClientId",
        CLIENT_ID,
        aliases=("ClientIdentifier",),
        doc="The client that carries the connections: its `ClientId` (the Common"
        " Name of its certificate, or `ClientId@Domain`).",
    )
    listen_address: str = field(
        "ListenAddress",
        IP_ADDRESS,
        "0.0.0.0",
        doc='Address of the public socket. Written back in normal form (`"0:0::1"`'
        ' becomes `"::1"`).',
    )
    listen_port: int = field("ListenPort", PORT, doc="Port of the public socket.")
    hostname_glob: str = field(
        "ListenHostnameGlob",
        HOST_GLOB,
        "*",
        doc='Which TLS server names (SNI) this entry takes: `"*"` (or `""`) for'
        " everything, an exact name `www.example.com`, or a wildcard"
        " `*.example.com`. See [Hostname globs](#hostname-globs).",
    )
    backend_service: str = field(
        "BackEndService",
        SERVICE_NAME,
        doc="The service name the client maps to a local address"
        " (`ServiceToLocalAddrMap` in the client config): 1 to 128 printable"
        " characters. The server never names an address on the client's network.",
    )
    proxy_protocol: bool = field(
        "HaProxyProxyProtocol",
        BOOLEAN,
        False,
        doc="Send the HAProxy PROXY protocol header with the user's real address"
        " before the user's bytes.",
    )
    proxy_protocol_version: int = field(
        "HaProxyProxyProtocolVersion",
        Choice(1, 2),
        1,
        doc="PROXY header version: 1 is text, 2 is binary.",
    )

    def __post_init__(self) -> None:
        try:
            TUNNEL.validate(self)
        except SchemaError as e:
            raise TunnelError.invalid(e) from None

    @property
    def group(self) -> GroupKey:
        """The listening socket this tunnel shares: (address, port)."""
        return (self.listen_address, self.listen_port)

    def to_json(self) -> dict[str, Any]:
        """The tunnel with the management API's field names."""
        return TUNNEL.to_json(self)


#: The table of :class:`Tunnel` (checked by its constructor).
TUNNEL = Schema(Tunnel, checked_by_init=True)


def _type_name(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", list: "a list", dict: "an object"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _parse_entry(entry: dict[Any, Any]) -> Tunnel:
    values, _ = TUNNEL.collect(entry)
    try:
        return Tunnel(**values)
    except TunnelError as e:
        assert e.schema_error is not None
        raise TUNNEL.as_given(e.schema_error, entry) from None


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
        except SchemaError as e:
            raise TunnelError.invalid(e.at(index)) from None
    check_duplicates(tunnels)
    return tunnels
