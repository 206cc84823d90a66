"""The JSON configuration files of the threshold server and client.

Fields keep their original PascalCase names in the files and become
snake_case attributes of frozen dataclasses. Any mistake raises
``ConfigError`` with one line naming the file and the field, so a bad
config stops the program at start with a message a person (or a
provisioning tool) can act on.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from threshold.wire import strictjson

__all__ = [
    "CLIENT_ID_PATTERN",
    "ClientConfig",
    "ConfigError",
    "ServerConfig",
    "load_client_config",
    "load_server_config",
    "parse_client_config",
    "parse_host_port",
    "parse_server_config",
]

#: What a ClientId may contain. "@" is excluded because a certificate CN of
#: ``ClientId@Domain`` must split unambiguously.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

_MAX_SERVICE_NAME = 128
# Timeouts and intervals beyond a year are surely a mistake (and huge
# integers would not even convert to float).
_MAX_SECONDS = 365 * 24 * 3600
# A yamux Window Update carries a 32-bit delta.
_MAX_WINDOW = 2**32 - 1
_MIN_WINDOW = 256 * 1024

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming file and field."""


@dataclass(frozen=True)
class ServerConfig:
    """The server's settings (``server.json``)."""

    debug_log: bool = False
    tunnel_control_port: int = 9056
    management_port: int = 9057
    listen_address: str = "0.0.0.0"
    management_listen_address: str = "0.0.0.0"
    use_tls: bool = True
    ca_certificate_file: str | None = None
    server_tls_key_file: str | None = None
    server_tls_certificate_file: str | None = None
    domain: str | None = None
    state_file: str | None = None
    management_allowed_common_names: tuple[str, ...] | None = None
    handshake_timeout_seconds: float = 10.0
    keepalive_interval_seconds: float = 30.0
    keepalive_timeout_seconds: float = 90.0
    max_streams_per_session: int = 4096
    max_receive_window_bytes: int = 16777216
    sni_read_timeout_seconds: float = 10.0
    max_client_hello_bytes: int = 16384
    max_management_body_bytes: int = 1048576
    max_clients: int = 1000
    max_pending_handshakes: int = 100
    #: Concurrent public connections per tunnel group; 0: no limit.
    max_connections_per_tunnel: int = 10000
    #: Concurrent public connections per source IP, all tunnels; 0: no limit.
    max_connections_per_source_ip: int = 256
    #: Close a public connection idle this long; 0: never.
    public_idle_timeout_seconds: float = 0.0
    #: On stop, how long running connections may finish.
    shutdown_grace_seconds: float = 10.0
    #: Serve the management API on this Unix socket instead of ManagementPort.
    management_socket: str | None = None
    #: Name of the config file, the prefix of error messages (e.g. from tls).
    source: str = "server config"


@dataclass(frozen=True)
class ClientConfig:
    """The client's settings (``client.json``)."""

    client_id: str
    server_host: str
    debug_log: bool = False
    server_tunnel_control_port: int = 9056
    server_management_port: int = 9057
    use_tls: bool = True
    ca_certificate_file: str | None = None
    client_tls_key_file: str | None = None
    client_tls_certificate_file: str | None = None
    #: service name -> (host, port) of the local service it is relayed to.
    service_to_local_addr_map: Mapping[str, tuple[str, int]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    keepalive_interval_seconds: float = 30.0
    keepalive_timeout_seconds: float = 90.0
    max_streams_per_session: int = 4096
    max_receive_window_bytes: int = 16777216
    reconnect_initial_delay_seconds: float = 1.0
    reconnect_max_delay_seconds: float = 60.0
    connect_timeout_seconds: float = 10.0
    #: Unix socket of the client's admin API (``PUT /liveconfig``); None: off.
    admin_socket: str | None = None
    source: str = "client config"


def _show(value: object, limit: int = 80) -> str:
    """Render a value as in the JSON file, on one line, cut to ``limit``."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_host(value: str) -> bool:
    """Tell whether ``value`` is an IP address or a DNS host name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return True
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def parse_host_port(value: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[ipv6]:port``; raise ValueError saying why."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("missing host or port")
    if not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        return host, port
    if ":" in host:
        raise ValueError("an IPv6 address must be written in brackets, [::1]:port")
    if not _is_host(host):
        raise ValueError(f"{host!r} is not a host name or IP address")
    return host, port


class _Fields:
    """Typed access to the fields of one config object, for error messages."""

    def __init__(
        self,
        obj: object,
        source: str,
        base_dir: str | None,
        known: tuple[str, ...],
        other: tuple[str, str, tuple[str, ...]] | None = None,
    ) -> None:
        self.source = source
        if not isinstance(obj, dict):
            raise ConfigError(f"{source}: the top level must be a JSON object")
        self.obj: dict[Any, Any] = obj
        self.base_dir = os.path.abspath(base_dir if base_dir is not None else ".")
        for key in obj:
            if key not in known:
                hint = ""
                if other is not None and key in other[2]:
                    hint = f" (a {other[0]} field: is this the {other[1]}?)"
                elif isinstance(key, str):
                    close = difflib.get_close_matches(key, known, n=1)
                    if close:
                        hint = f' (did you mean "{close[0]}"?)'
                raise ConfigError(f"{source}: unknown field {_show(key)}{hint}")

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f'{self.source}: field "{name}": {message}')

    def wrong(self, name: str, expected: str, value: object) -> ConfigError:
        return self.error(name, f"expected {expected}, got {_show(value)}")

    def has(self, name: str) -> bool:
        return name in self.obj

    def _get(self, name: str, default: Any, nullable: bool) -> tuple[bool, Any]:
        """Return (present, value); a null counts as absent when ``nullable``."""
        if name not in self.obj:
            return False, default
        value = self.obj[name]
        if value is None and nullable:
            return False, default
        return True, value

    def boolean(self, name: str, default: bool) -> bool:
        present, value = self._get(name, default, False)
        if present and not isinstance(value, bool):
            raise self.wrong(name, "true or false", value)
        return value

    def integer(
        self, name: str, default: int, low: int, high: int | None = None
    ) -> int:
        present, value = self._get(name, default, False)
        if not present:
            return value
        if high is None:
            expected = f"an integer of at least {low}"
        else:
            expected = f"an integer from {low} to {high}"
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise self.wrong(name, expected, value)
        return value

    def port(self, name: str, default: int) -> int:
        return self.integer(name, default, 1, 65535)

    def seconds(self, name: str, default: float, zero_ok: bool = False) -> float:
        present, value = self._get(name, default, False)
        if not present:
            return float(value)
        if zero_ok:
            expected = f"a number of seconds from 0 (off) to {_MAX_SECONDS}"
        else:
            expected = f"a number of seconds greater than 0 and at most {_MAX_SECONDS}"
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not (0 <= value <= _MAX_SECONDS)
            or (value == 0 and not zero_ok)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise self.wrong(name, expected, value)
        return float(value)

    def string(
        self,
        name: str,
        default: str | None,
        *,
        nullable: bool = False,
        required: bool = False,
    ) -> str | None:
        present, value = self._get(name, default, nullable)
        if not present:
            if required:
                raise self.error(name, "required field is missing")
            return value
        if not isinstance(value, str) or not value:
            what = "a non-empty string" + (" or null" if nullable else "")
            raise self.wrong(name, what, value)
        return value

    def ip_address(self, name: str, default: str) -> str:
        value = self.string(name, default)
        assert value is not None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise self.wrong(name, "an IP address", value) from None

    def path(self, name: str) -> str | None:
        """A file name, resolved against the config file's directory."""
        value = self.string(name, None, nullable=True)
        if value is None:
            return None
        if "\x00" in value:
            raise self.wrong(name, "a file name", value)
        return os.path.normpath(os.path.join(self.base_dir, value))

    def readable_file(self, name: str, required_when: str | None) -> str | None:
        """A file that must exist and be readable (when ``required_when`` holds)."""
        path = self.path(name)
        if required_when is None:
            return path
        if path is None:
            raise self.error(name, f'required when "{required_when}" is true')
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise self.error(name, f"cannot read file {path}: {_oserror(e)}") from None
        return path

    def custom(
        self, name: str, default: Any, check: Callable[[Any], Any], nullable: bool
    ) -> Any:
        present, value = self._get(name, default, nullable)
        if not present:
            return value
        return check(value)


def _oserror(e: OSError) -> str:
    if e.errno is not None and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return str(e)


_SERVER_FIELDS = (
    "DebugLog",
    "TunnelControlPort",
    "ManagementPort",
    "ListenAddress",
    "ManagementListenAddress",
    "UseTls",
    "CaCertificateFile",
    "ServerTlsKeyFile",
    "ServerTlsCertificateFile",
    "Domain",
    "StateFile",
    "ManagementAllowedCommonNames",
    "HandshakeTimeoutSeconds",
    "KeepaliveIntervalSeconds",
    "KeepaliveTimeoutSeconds",
    "MaxStreamsPerSession",
    "MaxReceiveWindowBytes",
    "SniReadTimeoutSeconds",
    "MaxClientHelloBytes",
    "MaxManagementBodyBytes",
    "MaxClients",
    "MaxPendingHandshakes",
    "MaxConnectionsPerTunnel",
    "MaxConnectionsPerSourceIp",
    "PublicIdleTimeoutSeconds",
    "ShutdownGraceSeconds",
    "ManagementSocket",
)

_CLIENT_FIELDS = (
    "DebugLog",
    "ClientId",
    "ClientIdentifier",
    "ServerHost",
    "ServerTunnelControlPort",
    "ServerManagementPort",
    "UseTls",
    "CaCertificateFile",
    "ClientTlsKeyFile",
    "ClientTlsCertificateFile",
    "ServiceToLocalAddrMap",
    "KeepaliveIntervalSeconds",
    "KeepaliveTimeoutSeconds",
    "MaxStreamsPerSession",
    "MaxReceiveWindowBytes",
    "ReconnectInitialDelaySeconds",
    "ReconnectMaxDelaySeconds",
    "ConnectTimeoutSeconds",
    "AdminSocket",
)


def _addresses_overlap(a: str, b: str) -> bool:
    """Tell whether listeners on ``a`` and ``b`` would claim the same port."""
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ia == ib:
        return True
    for x, y in ((ia, ib), (ib, ia)):
        # "::" is dual-stack on most hosts, so it covers IPv4 addresses too.
        if x.is_unspecified and (x.version == 6 or y.version == 4):
            return True
    return False


def parse_server_config(
    obj: object, source: str, base_dir: str | None = None
) -> ServerConfig:
    """Validate a decoded server config; relative paths resolve in ``base_dir``.

    ``base_dir`` defaults to the current directory.
    """
    f = _Fields(
        obj,
        source,
        base_dir,
        _SERVER_FIELDS,
        ("client config", "client's config", _CLIENT_FIELDS),
    )
    use_tls = f.boolean("UseTls", True)
    tls = "UseTls" if use_tls else None
    listen_address = f.ip_address("ListenAddress", "0.0.0.0")
    management_listen_address = f.ip_address(
        "ManagementListenAddress", "0.0.0.0" if use_tls else "127.0.0.1"
    )
    tunnel_control_port = f.port("TunnelControlPort", 9056)
    management_port = f.port("ManagementPort", 9057)
    if tunnel_control_port == management_port and _addresses_overlap(
        listen_address, management_listen_address
    ):
        raise f.error(
            "ManagementPort",
            f'must differ from "TunnelControlPort" on the same address'
            f" (both are {management_port})",
        )

    def common_names(value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise f.wrong(
                "ManagementAllowedCommonNames", "a list of strings or null", value
            )
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise f.wrong(
                    f"ManagementAllowedCommonNames[{i}]", "a non-empty string", item
                )
        return tuple(value)

    domain = f.string("Domain", None, nullable=True)
    if domain is not None and (
        len(domain) > 253 or "@" in domain or not domain.isprintable() or " " in domain
    ):
        raise f.wrong(
            "Domain", 'a domain name (no spaces or "@", at most 253 chars)', domain
        )
    management_socket = f.path("ManagementSocket")
    if management_socket is not None and not os.path.isdir(
        os.path.dirname(management_socket)
    ):
        raise f.error(
            "ManagementSocket",
            f"directory {os.path.dirname(management_socket)} does not exist",
        )
    state_file = f.path("StateFile")
    if state_file is not None and not os.path.isdir(os.path.dirname(state_file)):
        raise f.error(
            "StateFile", f"directory {os.path.dirname(state_file)} does not exist"
        )

    return ServerConfig(
        debug_log=f.boolean("DebugLog", False),
        tunnel_control_port=tunnel_control_port,
        management_port=management_port,
        listen_address=listen_address,
        management_listen_address=management_listen_address,
        use_tls=use_tls,
        ca_certificate_file=f.readable_file("CaCertificateFile", tls),
        server_tls_key_file=f.readable_file("ServerTlsKeyFile", tls),
        server_tls_certificate_file=f.readable_file("ServerTlsCertificateFile", tls),
        domain=domain,
        state_file=state_file,
        management_allowed_common_names=f.custom(
            "ManagementAllowedCommonNames", None, common_names, nullable=True
        ),
        handshake_timeout_seconds=f.seconds("HandshakeTimeoutSeconds", 10),
        keepalive_interval_seconds=f.seconds("KeepaliveIntervalSeconds", 30),
        keepalive_timeout_seconds=f.seconds("KeepaliveTimeoutSeconds", 90),
        max_streams_per_session=f.integer("MaxStreamsPerSession", 4096, 1),
        max_receive_window_bytes=f.integer(
            "MaxReceiveWindowBytes", 16777216, _MIN_WINDOW, _MAX_WINDOW
        ),
        sni_read_timeout_seconds=f.seconds("SniReadTimeoutSeconds", 10),
        max_client_hello_bytes=f.integer("MaxClientHelloBytes", 16384, 1024, 65536),
        max_management_body_bytes=f.integer("MaxManagementBodyBytes", 1048576, 1024),
        max_clients=f.integer("MaxClients", 1000, 1),
        max_pending_handshakes=f.integer("MaxPendingHandshakes", 100, 1),
        max_connections_per_tunnel=f.integer("MaxConnectionsPerTunnel", 10000, 0),
        max_connections_per_source_ip=f.integer("MaxConnectionsPerSourceIp", 256, 0),
        public_idle_timeout_seconds=f.seconds(
            "PublicIdleTimeoutSeconds", 0, zero_ok=True
        ),
        shutdown_grace_seconds=f.seconds("ShutdownGraceSeconds", 10, zero_ok=True),
        management_socket=management_socket,
        source=source,
    )


def _service_map(f: _Fields) -> dict[str, tuple[str, int]]:
    """The ``ServiceToLocalAddrMap`` field: service name -> (host, port)."""
    if not f.has("ServiceToLocalAddrMap"):
        raise f.error("ServiceToLocalAddrMap", "required field is missing")
    raw_map = f.obj["ServiceToLocalAddrMap"]
    if not isinstance(raw_map, dict):
        raise f.wrong(
            "ServiceToLocalAddrMap",
            'an object of "service": "host:port"',
            raw_map,
        )
    services: dict[str, tuple[str, int]] = {}
    for service, address in raw_map.items():
        if (
            not isinstance(service, str)
            or not service
            or len(service) > _MAX_SERVICE_NAME
            or not service.isprintable()
        ):
            raise f.error(
                "ServiceToLocalAddrMap",
                f"invalid service name {_show(service)}: expected 1 to"
                f" {_MAX_SERVICE_NAME} printable characters",
            )
        entry = f"ServiceToLocalAddrMap.{service}"
        if not isinstance(address, str):
            raise f.wrong(entry, '"host:port"', address)
        try:
            services[service] = parse_host_port(address)
        except ValueError as e:
            raise f.error(
                entry, f'expected "host:port", got {_show(address)}: {e}'
            ) from None
    return services


def parse_service_map(raw: object, source: str) -> dict[str, tuple[str, int]]:
    """Validate a ``ServiceToLocalAddrMap`` on its own (the client admin API).

    Errors are :class:`ConfigError` naming the entry, as in a config file.
    """
    f = _Fields(
        {"ServiceToLocalAddrMap": raw}, source, None, ("ServiceToLocalAddrMap",)
    )
    return _service_map(f)


def parse_client_config(
    obj: object, source: str, base_dir: str | None = None
) -> ClientConfig:
    """Validate a decoded client config; relative paths resolve in ``base_dir``.

    ``base_dir`` defaults to the current directory.
    """
    f = _Fields(
        obj,
        source,
        base_dir,
        _CLIENT_FIELDS,
        ("server config", "server's config", _SERVER_FIELDS),
    )

    client_id = None
    for name in ("ClientId", "ClientIdentifier"):
        value = f.string(name, None)
        if value is None:
            continue
        if not CLIENT_ID_PATTERN.fullmatch(value):
            raise f.wrong(
                name,
                '1 to 128 letters, digits, ".", "_" or "-" ("@" is not allowed)',
                value,
            )
        if client_id is not None and value != client_id:
            raise f.error(
                name,
                f'differs from "ClientId" ({_show(value)} and {_show(client_id)});'
                " give only one",
            )
        client_id = value
    if client_id is None:
        raise f.error("ClientId", "required field is missing")

    server_host = f.string("ServerHost", None, required=True)
    assert server_host is not None
    if not _is_host(server_host):
        raise f.wrong("ServerHost", "a host name or IP address", server_host)

    use_tls = f.boolean("UseTls", True)
    tls = "UseTls" if use_tls else None

    services = _service_map(f)
    admin_socket = f.path("AdminSocket")
    if admin_socket is not None and not os.path.isdir(os.path.dirname(admin_socket)):
        raise f.error(
            "AdminSocket", f"directory {os.path.dirname(admin_socket)} does not exist"
        )

    initial_delay = f.seconds("ReconnectInitialDelaySeconds", 1)
    max_delay = f.seconds("ReconnectMaxDelaySeconds", 60)
    if initial_delay > max_delay:
        raise f.error(
            "ReconnectInitialDelaySeconds",
            f"{_show(f.obj.get('ReconnectInitialDelaySeconds'))} is more than"
            f' "ReconnectMaxDelaySeconds" ({max_delay:g})',
        )

    return ClientConfig(
        client_id=client_id,
        server_host=server_host,
        debug_log=f.boolean("DebugLog", False),
        server_tunnel_control_port=f.port("ServerTunnelControlPort", 9056),
        server_management_port=f.port("ServerManagementPort", 9057),
        use_tls=use_tls,
        ca_certificate_file=f.readable_file("CaCertificateFile", tls),
        client_tls_key_file=f.readable_file("ClientTlsKeyFile", tls),
        client_tls_certificate_file=f.readable_file("ClientTlsCertificateFile", tls),
        service_to_local_addr_map=MappingProxyType(services),
        keepalive_interval_seconds=f.seconds("KeepaliveIntervalSeconds", 30),
        keepalive_timeout_seconds=f.seconds("KeepaliveTimeoutSeconds", 90),
        max_streams_per_session=f.integer("MaxStreamsPerSession", 4096, 1),
        max_receive_window_bytes=f.integer(
            "MaxReceiveWindowBytes", 16777216, _MIN_WINDOW, _MAX_WINDOW
        ),
        reconnect_initial_delay_seconds=initial_delay,
        reconnect_max_delay_seconds=max_delay,
        connect_timeout_seconds=f.seconds("ConnectTimeoutSeconds", 10),
        admin_socket=admin_socket,
        source=source,
    )


def _read_json(path: str) -> tuple[object, str]:
    """Read and decode a JSON file; return (value, source name for messages)."""
    source = path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read file: {_oserror(e)}") from None
    try:
        value = strictjson.loads(data, "utf-8-sig")
    except strictjson.NotUtf8 as e:
        raise ConfigError(
            f"{source}: not valid UTF-8 text: byte {e.start} is invalid"
        ) from None
    except strictjson.DuplicateKey as e:
        raise ConfigError(
            f"{source}: field {_show(e.key)} appears more than once"
        ) from None
    except strictjson.JsonError as e:
        raise ConfigError(f"{source}: not valid JSON: {e}") from None
    return value, source


def load_server_config(path: str) -> ServerConfig:
    """Read and validate a server config file."""
    value, source = _read_json(path)
    return parse_server_config(value, source, os.path.dirname(os.path.abspath(path)))


def load_client_config(path: str) -> ClientConfig:
    """Read and validate a client config file."""
    value, source = _read_json(path)
    return parse_client_config(value, source, os.path.dirname(os.path.abspath(path)))
