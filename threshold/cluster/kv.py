"""etcd v3 values and errors, and their JSON form on etcd's gRPC gateway.

Pure data and codecs, no reactor. The gateway speaks protobuf's JSON
mapping: ``bytes`` fields (keys, values) are base64, 64-bit integers are
decimal strings, and fields holding their default value (0, false, empty,
the first enum member such as the event type PUT) are left out, so every
reader here takes a missing field as its default.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Compacted",
    "Compare",
    "Delete",
    "EtcdError",
    "EtcdUnavailable",
    "Event",
    "EventType",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "MalformedAnswer",
    "Op",
    "Put",
    "Range",
    "RangeResult",
    "TxnResult",
    "as_key",
    "b64",
    "header_revision",
    "int_field",
    "op_json",
    "prefix_end",
]

#: gRPC status codes etcd answers with (the gateway's ``code`` field).
GRPC_NOT_FOUND = 5
GRPC_OUT_OF_RANGE = 11
GRPC_UNAVAILABLE = 14


class EtcdUnavailable(Exception):
    """No endpoint answered: names every endpoint tried and the last error.

    ``outcome_unknown`` is true when a change may have reached etcd before
    the answer was lost (a write is never sent twice, so its caller must
    read to find out).
    """

    def __init__(
        self, endpoints: Sequence[str], last_error: str, outcome_unknown: bool = False
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.last_error = last_error
        self.outcome_unknown = outcome_unknown
        tail = " (the change may have been applied)" if outcome_unknown else ""
        super().__init__(
            f"etcd unavailable at {', '.join(self.endpoints)}: {last_error}{tail}"
        )


class EtcdError(Exception):
    """etcd answered with an error: ``code`` is its gRPC status code."""

    def __init__(self, endpoint: str, code: int | None, message: str) -> None:
        self.endpoint = endpoint
        self.code = code
        self.message = message
        super().__init__(f"etcd at {endpoint}: {message} (code {code})")


class MalformedAnswer(EtcdError):
    """An answer that is not what etcd's gateway sends."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(endpoint, None, f"malformed answer: {message}")


class LeaseNotFound(EtcdError):
    """The lease has expired or was revoked."""

    def __init__(self, endpoint: str, lease_id: int) -> None:
        super().__init__(endpoint, GRPC_NOT_FOUND, f"lease {lease_id} not found")
        self.lease_id = lease_id


class Compacted(Exception):
    """The history asked for is gone: revisions before ``revision`` are compacted.

    A watcher must read the current state again (resync) and watch from the
    revision of that read.
    """

    def __init__(self, revision: int) -> None:
        self.revision = revision
        super().__init__(f"etcd history compacted up to revision {revision}")


def as_key(key: bytes | str) -> bytes:
    """Keys and values are bytes; ``str`` is taken as UTF-8."""
    return key.encode("utf-8") if isinstance(key, str) else key


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``.

    The prefix with its last byte below 0xff incremented (trailing 0xff
    bytes dropped); ``b"\\0"`` (every key from ``prefix`` on) when there is
    no such byte, as etcd's own clients do.
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise ValueError(f"{what} is not base64: {e}") from None


def int_field(obj: Mapping[str, Any], name: str) -> int:
    """A protobuf int64 (a decimal string, or a number) that may be left out."""
    value = obj.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{name} is not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} is not an integer") from None


def _obj(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not an object")
    return value


def _list(obj: Mapping[str, Any], name: str) -> list[Any]:
    value = obj.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"{name} is not a list")
    return value


def header_revision(answer: Mapping[str, Any]) -> int:
    """The store revision in the answer's header."""
    return int_field(_obj(answer.get("header", {}), "header"), "revision")


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd holds it; ``lease`` is 0 when the key has none."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def from_json(cls, raw: object) -> KeyValue:
        kv = _obj(raw, "kv")
        return cls(
            key=_unb64(kv.get("key", ""), "key"),
            value=_unb64(kv.get("value", ""), "value"),
            create_revision=int_field(kv, "create_revision"),
            mod_revision=int_field(kv, "mod_revision"),
            version=int_field(kv, "version"),
            lease=int_field(kv, "lease"),
        )


@dataclass(frozen=True)
class RangeResult:
    """The keys of a read and the store revision it was read at."""

    kvs: tuple[KeyValue, ...]
    revision: int
    more: bool = False

    @property
    def single(self) -> KeyValue | None:
        """The one key of a single-key read, or None when it is absent."""
        return self.kvs[0] if self.kvs else None

    @classmethod
    def from_json(cls, raw: object) -> RangeResult:
        answer = _obj(raw, "range answer")
        kvs = tuple(KeyValue.from_json(kv) for kv in _list(answer, "kvs"))
        return cls(kvs, header_revision(answer), bool(answer.get("more", False)))


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class Event:
    """One change seen by a watch; a DELETE's ``kv`` has only key and revision."""

    type: EventType
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision

    @classmethod
    def from_json(cls, raw: object) -> Event:
        event = _obj(raw, "event")
        name = event.get("type", "PUT")
        try:
            kind = EventType(name)
        except ValueError:
            raise ValueError(f"unknown event type {name!r}") from None
        return cls(kind, KeyValue.from_json(event.get("kv", {})))


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int


class CompareTarget(enum.Enum):
    MOD = "mod_revision"
    CREATE = "create_revision"
    VALUE = "value"


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction (equality only, which is all we need)."""

    key: bytes
    target: CompareTarget
    expected: int | bytes

    @classmethod
    def mod_revision(cls, key: bytes | str, revision: int) -> Compare:
        """The key was last changed at ``revision``."""
        return cls(as_key(key), CompareTarget.MOD, revision)

    @classmethod
    def absent(cls, key: bytes | str) -> Compare:
        """The key does not exist (its create_revision is 0)."""
        return cls(as_key(key), CompareTarget.CREATE, 0)

    @classmethod
    def value(cls, key: bytes | str, value: bytes) -> Compare:
        return cls(as_key(key), CompareTarget.VALUE, value)

    def to_json(self) -> dict[str, Any]:
        expected = self.expected
        field = self.target.value
        encoded = b64(expected) if isinstance(expected, bytes) else str(expected)
        return {
            "key": b64(self.key),
            "target": self.target.name,
            "result": "EQUAL",
            field: encoded,
        }


@dataclass(frozen=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": b64(self.key), "value": b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return body


def key_range(key: bytes, prefix: bool) -> dict[str, Any]:
    """One key, or every key under it as a prefix, in the gateway's JSON."""
    body: dict[str, Any] = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    return body


@dataclass(frozen=True)
class Delete:
    key: bytes
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return key_range(self.key, self.prefix)


@dataclass(frozen=True)
class Range:
    key: bytes
    prefix: bool = False

    def to_json(self) -> dict[str, Any]:
        return key_range(self.key, self.prefix)


Op = Put | Delete | Range

_OP_FIELDS = {
    Put: "request_put",
    Delete: "request_delete_range",
    Range: "request_range",
}


def op_json(op: Op) -> dict[str, Any]:
    return {_OP_FIELDS[type(op)]: op.to_json()}


@dataclass(frozen=True)
class TxnResult:
    """Which branch ran, the revision after it, and what its operations read.

    ``ranges`` holds the answer of each Range operation of the branch that
    ran, in order (the other operations answer only revisions and counts).
    """

    succeeded: bool
    revision: int
    ranges: tuple[RangeResult, ...]

    @classmethod
    def from_json(cls, raw: object) -> TxnResult:
        answer = _obj(raw, "txn answer")
        ranges = []
        for item in _list(answer, "responses"):
            response = _obj(item, "response")
            if "response_range" in response:
                ranges.append(RangeResult.from_json(response["response_range"]))
        return cls(
            bool(answer.get("succeeded", False)),
            header_revision(answer),
            tuple(ranges),
        )
