"""The client's settings (``client.json``): one table of fields.

Declared as in :mod:`threshold.config.server`; the fields that name a
server setting (its control port) take their default from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from threshold.config.server import DEBUG_LOG, SERVER
from threshold.schema import (
    BOOLEAN,
    CLIENT_ID,
    HOST,
    SERVICE_MAP,
    FilePath,
    Schema,
    SchemaError,
    Seconds,
    field,
    like,
    show,
)

__all__ = ["CLIENT", "TLS_FILES", "ClientConfig", "check_client"]


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
    server_host: str = field(
        "ServerHost",
        HOST,
        doc="The server to connect to. With TLS the server's certificate must be"
        " valid for this exact name or IP address. Write IPv6 addresses without"
        ' brackets (`"2001:db8::1"`).',
    )
    server_tunnel_control_port: int = like(
        SERVER["tunnel_control_port"],
        json="ServerTunnelControlPort",
        doc="The server's `TunnelControlPort`.",
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
    source: str = "client config"


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
    """The rules between fields: reconnect delays in order."""
    initial = values["reconnect_initial_delay_seconds"]
    longest = values["reconnect_max_delay_seconds"]
    if initial > longest:
        raise SchemaError(
            f"{show(obj.get('ReconnectInitialDelaySeconds'))} is more than"
            f' "ReconnectMaxDelaySeconds" ({longest:g})',
            "ReconnectInitialDelaySeconds",
        )
