"""The JSON configuration files of the threshold server and client.

Fields keep their original PascalCase names in the files and become
snake_case attributes of frozen dataclasses; each field is declared once,
in :mod:`threshold.config.server` or :mod:`threshold.config.client` (the
tables of docs/configuration.md are generated from those declarations).
Any mistake raises ``ConfigError`` with one line naming the file and the
field, so a bad config stops the program at start with a message a person
(or a provisioning tool) can act on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from threshold.config import client, server
from threshold.config.client import CLIENT, ClientConfig
from threshold.config.server import SERVER, ServerConfig
from threshold.schema import Schema, SchemaError, UnknownField, parse_host_port
from threshold.wire import strictjson

__all__ = [
    "CLIENT",
    "SERVER",
    "ClientConfig",
    "ConfigError",
    "ServerConfig",
    "load_client_config",
    "load_server_config",
    "parse_client_config",
    "parse_host_port",
    "parse_server_config",
    "parse_service_map",
]


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line naming file and field.

    ``source`` (the file), ``field`` (the JSON name; None when the problem
    is the whole file) and ``message`` (what is wrong with it) are data, so
    that tools can put the error in their own words.
    """

    def __init__(
        self, source: str, message: str | None = None, field: str | None = None
    ) -> None:
        if message is None:  # the older form: the whole line
            source, message = "", source
            line = message
        elif field is None:
            line = f"{source}: {message}"
        else:
            line = f'{source}: field "{field}": {message}'
        super().__init__(line)
        self.source = source
        self.message = message
        self.field = field
        self.line = line

    @classmethod
    def from_schema(cls, source: str, error: SchemaError) -> ConfigError:
        """The ConfigError for a field error of the file ``source``."""
        result = cls(source, error.message, error.field)
        result.line = f"{source}: {error}"
        result.args = (result.line,)
        return result

    def __str__(self) -> str:
        return self.line


def _oserror(e: OSError) -> str:
    if e.errno is not None and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return str(e)


@contextmanager
def _errors(source: str) -> Iterator[None]:
    try:
        yield
    except SchemaError as e:
        raise ConfigError.from_schema(source, e) from None


def _check_tls_files(
    schema: Schema, values: dict[str, Any], attrs: tuple[str, ...]
) -> None:
    """With TLS each file must be given and readable, before any port opens."""
    if not values["use_tls"]:
        return
    for attr in attrs:
        path, name = values[attr], schema[attr].name
        if path is None:
            raise SchemaError('required when "UseTls" is true', name)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise SchemaError(f"cannot read file {path}: {_oserror(e)}", name) from None


def _parse(role: str, obj: object, source: str, base_dir: str | None) -> Any:
    """Check every field of a decoded file, then the rules between fields."""
    schema, check, tls_files = _ROLES[role]
    other = "client" if role == "server" else "server"
    with _errors(source):
        if not isinstance(obj, dict):
            raise SchemaError("the top level must be a JSON object")
        try:
            values, present = schema.collect(obj, base_dir)
        except UnknownField as e:
            if e.key not in _ROLES[other][0].names:
                raise
            raise UnknownField(
                e.key, f" (a {other} config field: is this the {other}'s config?)"
            ) from None
        check(values, present, obj)
        _check_tls_files(schema, values, tls_files)
        return schema.build(obj, dict(values, source=source))


# Per role: the table, the rules between its fields, the files TLS needs.
_ROLES = {
    "server": (SERVER, server.check_server, server.TLS_FILES),
    "client": (CLIENT, client.check_client, client.TLS_FILES),
}


def parse_server_config(
    obj: object, source: str, base_dir: str | None = None
) -> ServerConfig:
    """Validate a decoded server config; relative paths resolve in ``base_dir``.

    ``base_dir`` defaults to the current directory.
    """
    config: ServerConfig = _parse("server", obj, source, base_dir)
    return config


def parse_client_config(
    obj: object, source: str, base_dir: str | None = None
) -> ClientConfig:
    """Validate a decoded client config; relative paths resolve in ``base_dir``.

    ``base_dir`` defaults to the current directory.
    """
    config: ClientConfig = _parse("client", obj, source, base_dir)
    return config


def parse_service_map(raw: object, source: str) -> dict[str, tuple[str, int]]:
    """Validate a ``ServiceToLocalAddrMap`` on its own (the client admin API).

    Errors are :class:`ConfigError` naming the entry, as in a config file.
    """
    spec = CLIENT["service_to_local_addr_map"]
    with _errors(source):
        return dict(spec.check(raw, spec.name, None))


def _read_json(path: str) -> object:
    """Read and decode a JSON file, or raise ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read file: {_oserror(e)}") from None
    try:
        return strictjson.loads(data, "utf-8-sig")
    except strictjson.NotUtf8 as e:
        raise ConfigError(
            path, f"not valid UTF-8 text: byte {e.start} is invalid"
        ) from None
    except strictjson.DuplicateKey as e:
        raise ConfigError(path, "appears more than once", e.key) from None
    except strictjson.JsonError as e:
        raise ConfigError(path, f"not valid JSON: {e}") from None


def load_server_config(path: str) -> ServerConfig:
    """Read and validate a server config file."""
    value = _read_json(path)
    return parse_server_config(value, path, os.path.dirname(os.path.abspath(path)))


def load_client_config(path: str) -> ClientConfig:
    """Read and validate a client config file."""
    value = _read_json(path)
    return parse_client_config(value, path, os.path.dirname(os.path.abspath(path)))
