"""One validator per kind of value, shared by every parser of outside input.

Config files, the hello and stream header, ``PUT /tunnels``, the state file
and the client's admin API all check a ClientId, a service name, a host
name, an address or a number of seconds with the objects defined here, so
the rules (and their error messages) cannot drift apart.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from threshold.schema.core import Kind, SchemaError, Wrong, show

__all__ = [
    "BOOLEAN",
    "CLIENT_ID",
    "CLIENT_ID_PATTERN",
    "DOMAIN",
    "HOST",
    "HOST_GLOB",
    "IP_ADDRESS",
    "MAX_SECONDS",
    "MAX_SERVICE_NAME",
    "PORT",
    "SERVICE_MAP",
    "SERVICE_NAME",
    "STRING_LIST",
    "TEXT",
    "Bytes",
    "Choice",
    "FilePath",
    "Integer",
    "Seconds",
    "Text",
    "format_address",
    "is_dns_name",
    "parse_host_port",
]

#: Timeouts and intervals beyond a year are surely a mistake (and huge
#: integers would not even convert to float).
MAX_SECONDS = 365 * 24 * 3600

#: What a ClientId may contain. "@" is excluded because a certificate CN of
#: ``ClientId@Domain`` must split unambiguously; the rule also keeps the
#: name safe as a file name (threshold-keygen).
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

#: Longest service name; keeps a stream header far below its 4 KiB line.
MAX_SERVICE_NAME = 128

MAX_DNS_NAME = 253

# A DNS label: letters, digits and inner hyphens, 1 to 63 characters.
# Resolver names may also hold "_" (container and service names do).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_RESOLVER_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


class Boolean(Kind):
    """JSON ``true`` or ``false``, never 0/1 or a string."""

    expected = "true or false"
    doc = "boolean"

    def check(self, value: object, base_dir: str | None = None) -> bool:
        if not isinstance(value, bool):
            raise self.wrong(value)
        return value


class Integer(Kind):
    """A JSON integer (not a bool, not 9056.0) from ``low`` to ``high``."""

    unit = ""

    def __init__(self, low: int, high: int | None = None) -> None:
        self.low, self.high = low, high
        if high is None:
            self.expected = f"an integer of at least {low}"
            self.doc = f"{self.unit or 'integer'} ≥ {low}"
        else:
            self.expected = f"an integer from {low} to {high}"
            self.doc = f"{self.unit or 'integer'} {low}–{high}"

    def check(self, value: object, base_dir: str | None = None) -> int:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < self.low
            or (self.high is not None and value > self.high)
        ):
            raise self.wrong(value)
        return value


class Bytes(Integer):
    """A size in bytes: an integer with bounds."""

    unit = "bytes"


class Choice(Kind):
    """One of a few integers (``HaProxyProxyProtocolVersion``: 1 or 2)."""

    def __init__(self, *values: int) -> None:
        self.values = values
        words = [str(v) for v in values]
        self.expected = ", ".join(words[:-1]) + " or " + words[-1]
        self.doc = ", ".join(f"`{w}`" for w in words[:-1]) + f" or `{words[-1]}`"

    def check(self, value: object, base_dir: str | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong(value)
        if value not in self.values:
            raise self.wrong(value)
        return value


class Seconds(Kind):
    """A number of seconds (integer or decimal, finite), at most a year.

    ``zero_ok``: 0 is allowed and means "off"; otherwise it must be > 0.
    """

    def __init__(self, zero_ok: bool = False) -> None:
        self.zero_ok = zero_ok
        if zero_ok:
            self.expected = f"a number of seconds from 0 (off) to {MAX_SECONDS}"
            self.doc = "seconds, 0: off"
        else:
            self.expected = (
                f"a number of seconds greater than 0 and at most {MAX_SECONDS}"
            )
            self.doc = "seconds"

    def check(self, value: object, base_dir: str | None = None) -> float:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or (isinstance(value, float) and not math.isfinite(value))
            or not 0 <= value <= MAX_SECONDS
            or (value == 0 and not self.zero_ok)
        ):
            raise self.wrong(value)
        return float(value)


class Text(Kind):
    """A string of ``min_length`` to ``max_length`` characters."""

    def __init__(self, min_length: int = 1, doc: str = "string") -> None:
        self.min_length = min_length
        self.expected = "a non-empty string" if min_length else "a string"
        self.doc = doc

    def check(self, value: object, base_dir: str | None = None) -> str:
        if not isinstance(value, str) or len(value) < self.min_length:
            raise self.wrong(value)
        return value


_NON_EMPTY = Text()


class _ClientId(Kind):
    expected = '1 to 128 letters, digits, ".", "_" or "-" ("@" is not allowed)'
    doc = "client id"

    def check(self, value: object, base_dir: str | None = None) -> str:
        if not isinstance(value, str) or not CLIENT_ID_PATTERN.fullmatch(value):
            raise self.wrong(value)
        return value


class _ServiceName(Kind):
    # str.isprintable() refuses control, format, separator (other than the
    # space) and surrogate characters: nothing that could end the header
    # line or hide in a log line.
    expected = f"1 to {MAX_SERVICE_NAME} printable characters"
    doc = "service name"

    def check(self, value: object, base_dir: str | None = None) -> str:
        if (
            not isinstance(value, str)
            or not 0 < len(value) <= MAX_SERVICE_NAME
            or not value.isprintable()
        ):
            raise self.wrong(value)
        return value

    def check_key(self, value: object) -> str:
        """A service name used as a mapping's key (the error names no field)."""
        try:
            return self.check(value)
        except SchemaError:
            raise SchemaError(
                f"invalid service name {show(value)}: expected {self.expected}"
            ) from None


def is_dns_name(name: str, *, resolver: bool = False) -> bool:
    """Tell whether ``name`` (no trailing dot) is a DNS name of ASCII labels.

    ``resolver``: also allow "_" in labels, as resolvers do for host names
    (not in TLS server names).
    """
    if not name or len(name) > MAX_DNS_NAME:
        return False
    label = _RESOLVER_LABEL if resolver else _LABEL
    return all(label.fullmatch(part) for part in name.split("."))


class _IpAddress(Kind):
    expected = "an IP address"
    doc = "IP address"

    def check(self, value: object, base_dir: str | None = None) -> str:
        text = _NON_EMPTY.check(value)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise self.wrong(value) from None


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        name = value[:-1] if value.endswith(".") else value
        return is_dns_name(name, resolver=True)
    return True


class _Host(Kind):
    expected = "a host name or IP address"
    doc = "host name or IP"

    def check(self, value: object, base_dir: str | None = None) -> str:
        text = _NON_EMPTY.check(value)
        if not _is_host(text):
            raise self.wrong(value)
        return text


class _HostGlob(Kind):
    """``*``, a DNS name, or ``*.`` and a DNS name; lowercased, no final dot."""

    expected = '"*", a DNS name, or "*." and a DNS name'
    doc = "hostname glob"

    def check(self, value: object, base_dir: str | None = None) -> str:
        if not isinstance(value, str):
            raise Wrong("a string", value)
        glob = value.lower()
        if glob.endswith("."):
            glob = glob[:-1]
        if glob in ("", "*"):
            return "*"
        if not glob.isascii():
            raise self._bad(
                value,
                "not ASCII: write international names in their IDNA A-label"
                " form (xn--...)",
            )
        if len(glob) > MAX_DNS_NAME:
            raise self._bad(value, f"longer than {MAX_DNS_NAME} characters")
        name = glob[2:] if glob.startswith("*.") else glob
        for label in name.split("."):
            if "*" in label:
                raise self._bad(
                    value, "'*' may only be the whole leftmost label (*.example.com)"
                )
            if not _LABEL.fullmatch(label):
                raise self._bad(
                    value,
                    f"label {show(label)} is not a DNS label (letters, digits"
                    " and inner hyphens, 1 to 63 characters)",
                )
        return glob

    def _bad(self, value: object, why: str) -> SchemaError:
        return SchemaError(f"expected {self.expected}, got {show(value)}: {why}")


class _Domain(Kind):
    expected = 'a domain name (no spaces or "@", at most 253 chars)'
    doc = "domain name"

    def check(self, value: object, base_dir: str | None = None) -> str:
        text = _NON_EMPTY.check(value)
        if (
            len(text) > MAX_DNS_NAME
            or "@" in text
            or " " in text
            or not text.isprintable()
        ):
            raise self.wrong(value)
        return text


class FilePath(Kind):
    """A file name, resolved against ``base_dir`` (the config file's folder).

    ``folder_must_exist``: the file may be missing, its directory not (a
    socket or a state file the program creates).
    """

    expected = "a file name"
    doc = "file name"

    def __init__(self, folder_must_exist: bool = False) -> None:
        self.folder_must_exist = folder_must_exist

    def check(self, value: object, base_dir: str | None = None) -> str:
        text = _NON_EMPTY.check(value)
        if "\x00" in text:
            raise self.wrong(value)
        base = os.path.abspath(base_dir if base_dir is not None else ".")
        path = os.path.normpath(os.path.join(base, text))
        folder = os.path.dirname(path)
        if self.folder_must_exist and not os.path.isdir(folder):
            raise SchemaError(f"directory {folder} does not exist")
        return path


class _StringList(Kind):
    """A list of non-empty strings, kept as a tuple."""

    expected = "a list of strings"
    doc = "list of strings"

    def check(self, value: object, base_dir: str | None = None) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):
            raise self.wrong(value)
        for i, item in enumerate(value):
            try:
                _NON_EMPTY.check(item)
            except SchemaError as e:
                raise e.within(f"[{i}]") from None
        return tuple(value)

    def to_json(self, value: Any) -> object:
        return None if value is None else list(value)


def format_address(host: str, port: int) -> str:
    """Write ``host:port``, with brackets around an IPv6 address."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


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


class _ServiceMap(Kind):
    """Service name -> ``"host:port"`` of a local service (read-only mapping)."""

    expected = 'an object of "service": "host:port"'
    doc = "object"

    def check(
        self, value: object, base_dir: str | None = None
    ) -> Mapping[str, tuple[str, int]]:
        if not isinstance(value, Mapping):
            raise self.wrong(value)
        services: dict[str, tuple[str, int]] = {}
        for service, address in value.items():
            SERVICE_NAME.check_key(service)
            if isinstance(address, tuple):  # an attribute value, already parsed
                address = format_address(*address)
            if not isinstance(address, str):
                raise Wrong('"host:port"', address, f".{service}")
            try:
                services[service] = parse_host_port(address)
            except ValueError as e:
                raise SchemaError(
                    f'expected "host:port", got {show(address)}: {e}', f".{service}"
                ) from None
        return MappingProxyType(services)

    def to_json(self, value: Any) -> object:
        return {name: format_address(*addr) for name, addr in value.items()}


BOOLEAN = Boolean()
PORT = Integer(1, 65535)
IP_ADDRESS = _IpAddress()
HOST = _Host()
HOST_GLOB = _HostGlob()
CLIENT_ID = _ClientId()
SERVICE_NAME = _ServiceName()
DOMAIN = _Domain()
STRING_LIST = _StringList()
SERVICE_MAP = _ServiceMap()
#: Any string, empty included (free text such as a refusal reason).
TEXT = Text(min_length=0)
