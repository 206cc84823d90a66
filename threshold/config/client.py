"""The client's settings (``client.json``): one table of fields.

Declared as in :mod:`threshold.config.server`; the fields that name a
server setting (its control port) take their default from there.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from threshold.config.egress import EGRESS_SETTINGS_KIND, EgressSettings
from threshold.config.server import DEBUG_LOG, SERVER
from threshold.schema import (
    BOOLEAN,
    CLIENT_ID,
    HOST,
    SERVICE_MAP,
    SERVICE_NAME,
    FilePath,
    Kind,
    Schema,
    SchemaError,
    Seconds,
    field,
    format_address,
    like,
    show,
)
from threshold.wire.control import health_line_fits

__all__ = [
    "CLIENT",
    "HEALTH_CHECK",
    "MAX_SERVERS",
    "SERVER_ENTRY",
    "TLS_FILES",
    "ClientConfig",
    "HealthCheck",
    "ServerEntry",
    "check_client",
]

#: Gateways one client holds sessions to at once.
MAX_SERVERS = 16

#: The shortest health check interval: a check is a TCP connection to the
#: local service, and every change is a message to every gateway.
MIN_HEALTH_INTERVAL = 1.0


@dataclass(frozen=True, kw_only=True)
class ServerEntry:
    """One gateway of ``Servers``: where to connect, the name TLS checks."""

    host: str = field(
        "Host",
        HOST,
        doc="The gateway to connect to. With TLS its certificate must be valid"
        " for this exact name or IP address.",
    )
    tunnel_control_port: int = like(
        SERVER["tunnel_control_port"],
        json="TunnelControlPort",
        doc="The gateway's `TunnelControlPort`.",
    )

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 in brackets), for log lines and the admin API."""
        return format_address(self.host, self.tunnel_control_port)


@dataclass(frozen=True, kw_only=True)
class HealthCheck:
    """One entry of ``HealthChecks``: how often and how long to try a service."""

    interval_seconds: float = field(
        "IntervalSeconds",
        Seconds(),
        5.0,
        doc="Time between two checks (a TCP connection to the service's local"
        " address); at least 1.",
    )
    timeout_seconds: float = field(
        "TimeoutSeconds",
        Seconds(),
        2.0,
        doc="A check that has not connected within this time fails; at most"
        " `IntervalSeconds`.",
    )


#: The tables of a ``Servers`` entry and of a ``HealthChecks`` entry.
SERVER_ENTRY = Schema(ServerEntry)
HEALTH_CHECK = Schema(HealthCheck)


def _endpoint_key(entry: ServerEntry) -> tuple[str, int]:
    host = entry.host.lower().removesuffix(".")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return host, entry.tunnel_control_port


class _ServerList(Kind):
    """``Servers``: 1 to MAX_SERVERS gateways, none twice."""

    expected = f"a list of 1 to {MAX_SERVERS} objects"
    doc = "list of objects (below)"

    def check(
        self, value: object, base_dir: str | None = None
    ) -> tuple[ServerEntry, ...]:
        if not isinstance(value, list | tuple) or not 0 < len(value) <= MAX_SERVERS:
            raise self.wrong(value)
        entries: list[ServerEntry] = []
        seen: dict[tuple[str, int], int] = {}
        for i, item in enumerate(value):
            entry: ServerEntry = SERVER_ENTRY.parse_entry(item, f"[{i}]", base_dir)
            key = _endpoint_key(entry)
            if key in seen:
                raise SchemaError(
                    f"the gateway {entry.address} is already entry {seen[key]}",
                    f"[{i}]",
                )
            seen[key] = i
            entries.append(entry)
        return tuple(entries)

    def to_json(self, value: Any) -> object:
        if value is None:
            return None
        return [SERVER_ENTRY.to_json(entry) for entry in value]


class _HealthChecks(Kind):
    """``HealthChecks``: service name -> :class:`HealthCheck` (read-only)."""

    expected = 'an object of "service": {"IntervalSeconds": ..., ...}'
    doc = "object (below)"

    def check(
        self, value: object, base_dir: str | None = None
    ) -> Mapping[str, HealthCheck]:
        if not isinstance(value, Mapping):
            raise self.wrong(value)
        checks: dict[str, HealthCheck] = {}
        for service, item in value.items():
            SERVICE_NAME.check_key(service)
            check: HealthCheck = HEALTH_CHECK.parse_entry(item, f".{service}", base_dir)
            if check.interval_seconds < MIN_HEALTH_INTERVAL:
                raise SchemaError(
                    f"{check.interval_seconds:g} is less than"
                    f" {MIN_HEALTH_INTERVAL:g} second",
                    f".{service}.IntervalSeconds",
                )
            if check.timeout_seconds > check.interval_seconds:
                raise SchemaError(
                    f"{check.timeout_seconds:g} is more than"
                    f' "IntervalSeconds" ({check.interval_seconds:g})',
                    f".{service}.TimeoutSeconds",
                )
            checks[service] = check
        return MappingProxyType(checks)

    def to_json(self, value: Any) -> object:
        return {name: HEALTH_CHECK.to_json(check) for name, check in value.items()}


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """The client's settings (``client.json``)."""

    debug_log: bool = like(DEBUG_LOG)
    client_id: str = field(
        "ClientId",
        CLIENT_ID,
        aliases=("ClientIdentifier",),
        doc="This client's name: 1 to 128 ASCII letters, digits, `.`, `_` or `-`"
        " (no `@`, which separates `ClientId@Domain`). With TLS it must match the"
        " certificate's Common Name.",
    )
    server_host: str | None = field(
        "ServerHost",
        HOST,
        None,
        default_doc="required unless `Servers`",
        doc="The server to connect to. With TLS the server's certificate must be"
        " valid for this exact name or IP address. Write IPv6 addresses without"
        ' brackets (`"2001:db8::1"`). Means `Servers` with one entry.',
    )
    server_tunnel_control_port: int = like(
        SERVER["tunnel_control_port"],
        json="ServerTunnelControlPort",
        doc="The server's `TunnelControlPort` (with `ServerHost`).",
    )
    #: The gateways as given in ``Servers``; None when ``ServerHost`` names
    #: the one gateway (see :attr:`gateways` for the list in force).
    servers: tuple[ServerEntry, ...] | None = field(
        "Servers",
        _ServerList(),
        None,
        nullable=True,
        default_doc="`ServerHost`",
        doc="The gateways to hold a session to, all at once, each reconnecting on"
        f' its own: 1 to {MAX_SERVERS} objects `{{"Host": ...,'
        ' "TunnelControlPort": ...}`, none twice. Instead of `ServerHost` and'
        " `ServerTunnelControlPort` (giving both is an error).",
    )
    use_tls: bool = field(
        "UseTls", BOOLEAN, True, doc="Must match the server's `UseTls`."
    )
    ca_certificate_file: str | None = field(
        "CaCertificateFile",
        FilePath(),
        None,
        default_doc="required with TLS",
        doc="PEM file of the CA; the server's certificate must be signed by it.",
    )
    client_tls_key_file: str | None = field(
        "ClientTlsKeyFile",
        FilePath(),
        None,
        default_doc="required with TLS",
        doc="PEM private key of this client (unencrypted; mode 0600).",
    )
    client_tls_certificate_file: str | None = field(
        "ClientTlsCertificateFile",
        FilePath(),
        None,
        default_doc="required with TLS",
        doc="PEM certificate of this client, signed by the CA, Common Name"
        " `ClientId` (or `ClientId@Domain`).",
    )
    #: service name -> (host, port) of the local service it is relayed to.
    service_to_local_addr_map: Mapping[str, tuple[str, int]] = field(
        "ServiceToLocalAddrMap",
        SERVICE_MAP,
        default_doc="required (may be `{}`)",
        doc='Service name → local `"host:port"`. The server can only name a'
        " service; it can never reach an address that is not listed here."
        " Service names are 1 to 128 printable characters. Addresses are"
        ' `"127.0.0.1:8080"`, `"localhost:8080"` or `"[::1]:8080"` (IPv6 in'
        " brackets).",
    )
    # The session settings, as the server's file has them.
    keepalive_interval_seconds: float = like(SERVER["keepalive_interval_seconds"])
    keepalive_timeout_seconds: float = like(SERVER["keepalive_timeout_seconds"])
    max_streams_per_session: int = like(SERVER["max_streams_per_session"])
    max_receive_window_bytes: int = like(SERVER["max_receive_window_bytes"])
    reconnect_initial_delay_seconds: float = field(
        "ReconnectInitialDelaySeconds",
        Seconds(),
        1.0,
        doc="First wait before reconnecting after a failure; the wait grows with"
        " each further failure. Must not exceed `ReconnectMaxDelaySeconds`.",
    )
    reconnect_max_delay_seconds: float = field(
        "ReconnectMaxDelaySeconds",
        Seconds(),
        60.0,
        doc="Longest wait between reconnection attempts.",
    )
    connect_timeout_seconds: float = field(
        "ConnectTimeoutSeconds",
        Seconds(),
        10.0,
        doc="Time allowed for a connection attempt to the server, for the"
        " server's answer to the hello (no answer: the client closes and backs"
        " off as for a refusal), and for each connection to a local service.",
    )
    #: Unix socket of the client's admin API (``PUT /liveconfig``); None: off.
    admin_socket: str | None = field(
        "AdminSocket",
        FilePath(folder_must_exist=True),
        None,
        nullable=True,
        doc="A Unix socket (created mode 0600) for the client's admin API (see below).",
    )
    #: service name -> how to check it; every name is in the service map.
    health_checks: Mapping[str, HealthCheck] = field(
        "HealthChecks",
        _HealthChecks(),
        MappingProxyType({}),
        doc="Services to check, each by a TCP connection to its local address:"
        ' `{"web": {"IntervalSeconds": 5, "TimeoutSeconds": 2}}` (below). Each'
        " name must be in `ServiceToLocalAddrMap`. Every change is reported to"
        " every gateway at once.",
    )
    #: The local SOCKS5 proxy out through a gateway; None: off.
    egress: EgressSettings | None = field(
        "Egress",
        EGRESS_SETTINGS_KIND,
        None,
        nullable=True,
        doc="A local SOCKS5 proxy whose connections go out through a gateway:"
        ' `{"SocksListen": "127.0.0.1:1080"}` (docs/egress.md). The gateway'
        " decides where this client may connect (its `EgressPolicy`).",
    )
    source: str = "client config"

    @property
    def gateways(self) -> tuple[ServerEntry, ...]:
        """The gateways in force: ``Servers``, or the one ``ServerHost`` names."""
        if self.servers:
            return self.servers
        if self.server_host is None:
            return ()
        return (
            ServerEntry(
                host=self.server_host,
                tunnel_control_port=self.server_tunnel_control_port,
            ),
        )


#: The table of :class:`ClientConfig`. ``ServerManagementPort`` was read by
#: nothing; it is still accepted so that older files keep working.
CLIENT = Schema(
    ClientConfig,
    ignored=[
        dataclasses.replace(
            SERVER["management_port"],
            json="ServerManagementPort",
            doc="Ignored (accepted so that older files keep working).",
        )
    ],
)

#: The files TLS needs (checked for reading when ``UseTls``).
TLS_FILES = (
    "ca_certificate_file",
    "client_tls_key_file",
    "client_tls_certificate_file",
)


def check_client(
    values: dict[str, Any], present: set[str], obj: Mapping[str, Any]
) -> None:
    """The rules between fields: one way to name the gateways, checks of
    known services, reconnect delays in order."""
    if "servers" in present:
        for attr in ("server_host", "server_tunnel_control_port"):
            if attr in present:
                name = CLIENT[attr].name
                raise SchemaError(f'give either "Servers" or "{name}", not both', name)
    elif "server_host" not in present:
        raise SchemaError('required field is missing (or give "Servers")', "ServerHost")
    services = values["service_to_local_addr_map"]
    checks = values["health_checks"]
    for name in checks:
        if name not in services:
            raise SchemaError(
                f'service {show(name)} is not in "ServiceToLocalAddrMap"',
                f"HealthChecks.{name}",
            )
    if not health_line_fits(list(checks)):
        raise SchemaError(
            f"the health of {len(checks)} services cannot be reported in one"
            " control message (4096 bytes): check fewer services, or shorter"
            " names",
            "HealthChecks",
        )
    initial = values["reconnect_initial_delay_seconds"]
    longest = values["reconnect_max_delay_seconds"]
    if initial > longest:
        raise SchemaError(
            f"{show(obj.get('ReconnectInitialDelaySeconds'))} is more than"
            f' "ReconnectMaxDelaySeconds" ({longest:g})',
            "ReconnectInitialDelaySeconds",
        )
