"""The fleet's shared state in etcd, as the gateways use it.

Key layout, under the configured ``KeyPrefix`` (default ``/threshold/``;
every value is UTF-8 JSON):

``<KeyPrefix>tunnels``
    The whole tunnel set as one JSON document (what ``PUT /tunnels``
    accepted). Its ``mod_revision`` is the set's revision: a write names
    the revision it replaces and loses to any write in between
    (:class:`Conflict`); 0 means "no set written yet".
``<KeyPrefix>gateways/<GatewayId>/status``
    What that gateway applied: ``{"revision": N, "errors": [...]}`` or
    whatever JSON object the gateway reports.
``<KeyPrefix>presence/<GatewayId>/<ClientId>``
    One key per client holding a session to that gateway; the value is the
    gateway's details about the session.

A gateway's status and presence keys are written under one lease of that
gateway, kept alive while it runs (:class:`GatewayRecords`): when the
gateway dies they disappear within the lease's TTL, so the fleet's view
holds live gateways only. GatewayId and ClientId are ``[A-Za-z0-9._-]``,
1 to 128 characters, so a ``/`` can never shift the layout.

Nothing here knows threshold.server: documents go in and come out as plain
JSON-able values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from threshold.cluster.kv import (
    Compare,
    KeyValue,
    Put,
    Range,
    as_key,
)
from threshold.cluster.membership import LeasedRecords, RecordsState
from threshold.cluster.mirror import Mirror, Update
from threshold.cluster.watch import WatchBackoff
from threshold.schema import CLIENT_ID_PATTERN
from threshold.wire import strictjson

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "ClusterStore",
    "Conflict",
    "GatewayRecords",
    "InvalidDocument",
    "TunnelSet",
    "decode",
    "encode",
]

DEFAULT_KEY_PREFIX = "/threshold/"


class Conflict(Exception):
    """The tunnel set changed since the revision the write was based on."""

    def __init__(self, expected_revision: int, current_revision: int) -> None:
        self.expected_revision = expected_revision
        self.current_revision = current_revision
        super().__init__(
            f"the tunnel set is at revision {current_revision}, not {expected_revision}"
        )


class InvalidDocument(Exception):
    """A key holds something that is not JSON (written by another tool)."""

    def __init__(self, key: bytes, revision: int, reason: str) -> None:
        self.key = key
        self.revision = revision
        self.reason = reason
        super().__init__(
            f"{key.decode('utf-8', 'replace')} at revision {revision}:"
            f" not JSON: {reason}"
        )


@dataclass(frozen=True)
class TunnelSet:
    """The tunnel document and its revision (None and 0 when none is written)."""

    document: Any
    revision: int


def encode(document: Any) -> bytes:
    """The stored form of a JSON-able value (compact, keys in order given)."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def decode(kv: KeyValue) -> Any:
    """The JSON value of a key; InvalidDocument when it holds something else."""
    try:
        return strictjson.loads(kv.value)
    except strictjson.JsonError as e:
        raise InvalidDocument(kv.key, kv.mod_revision, str(e)) from None


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not CLIENT_ID_PATTERN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-128 of A-Z a-z 0-9 . _ -")
    return value


class ClusterStore:
    """The tunnel set, apply statuses and presence of a fleet, in etcd."""

    def __init__(
        self,
        client: Any,
        reactor: Any,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        backoff: WatchBackoff | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        if not key_prefix.endswith("/"):
            raise ValueError(f"KeyPrefix {key_prefix!r} must end with /")
        self.client = client
        self._reactor = reactor
        self.prefix = as_key(key_prefix)
        self._backoff = backoff
        self._idle_timeout = idle_timeout

    # -- keys ------------------------------------------------------------------

    @property
    def tunnels_key(self) -> bytes:
        return self.prefix + b"tunnels"

    def gateways_prefix(self) -> bytes:
        return self.prefix + b"gateways/"

    def status_key(self, gateway_id: str) -> bytes:
        gateway = check_id(gateway_id, "GatewayId")
        return self.gateways_prefix() + gateway.encode() + b"/status"

    def presence_prefix(self, gateway_id: str | None = None) -> bytes:
        if gateway_id is None:
            return self.prefix + b"presence/"
        return (
            self.prefix
            + b"presence/"
            + check_id(gateway_id, "GatewayId").encode()
            + b"/"
        )

    def presence_key(self, gateway_id: str, client_id: str) -> bytes:
        client = check_id(client_id, "ClientId")
        return self.presence_prefix(gateway_id) + client.encode()

    def parse_presence_key(self, key: bytes) -> tuple[str, str] | None:
        """``(gateway_id, client_id)`` of a presence key, None for another key."""
        head = self.presence_prefix()
        if not key.startswith(head):
            return None
        parts = key[len(head) :].decode("utf-8", "replace").split("/")
        return (parts[0], parts[1]) if len(parts) == 2 else None

    def parse_status_key(self, key: bytes) -> str | None:
        head = self.gateways_prefix()
        if not (key.startswith(head) and key.endswith(b"/status")):
            return None
        gateway = key[len(head) : -len(b"/status")].decode("utf-8", "replace")
        return gateway if "/" not in gateway else None

    # -- the tunnel set --------------------------------------------------------

    def read_tunnels(self) -> Deferred[TunnelSet]:
        """The tunnel set now (InvalidDocument if the key holds no JSON)."""

        async def read() -> TunnelSet:
            result = await self.client.get(self.tunnels_key)
            kv = result.single
            return TunnelSet(None, 0) if kv is None else self.tunnel_set(kv)

        return Deferred.fromCoroutine(read())

    def tunnel_set(self, kv: KeyValue) -> TunnelSet:
        return TunnelSet(decode(kv), kv.mod_revision)

    def write_tunnels(self, document: Any, expected_revision: int) -> Deferred[int]:
        """Replace the set written at ``expected_revision``: the new revision.

        One transaction: it writes only if the set is still at
        ``expected_revision`` (0: none written yet), else it fails with
        :class:`Conflict` naming the current revision. Never a lost update.
        """
        key = self.tunnels_key
        value = encode(document)
        if expected_revision:
            condition = Compare.mod_revision(key, expected_revision)
        else:
            condition = Compare.absent(key)

        async def write() -> int:
            result = await self.client.txn([condition], [Put(key, value)], [Range(key)])
            if result.succeeded:
                return result.revision
            current = result.ranges[0].single if result.ranges else None
            raise Conflict(expected_revision, current.mod_revision if current else 0)

        return Deferred.fromCoroutine(write())

    def watch_tunnels(
        self,
        on_set: Callable[[TunnelSet], object],
        *,
        applied_revision: int = 0,
        on_invalid: Callable[[InvalidDocument], object] | None = None,
    ) -> Mirror:
        """Call ``on_set`` with each new tunnel set, in order, once each.

        Sets at or below ``applied_revision`` (what this gateway applied
        before, e.g. from its local copy) are not reported; a deleted key
        is reported as ``TunnelSet(None, 0)``. After compaction or an etcd
        outage the set is read again and reported only if it changed.
        """
        last = [applied_revision]

        def update(update: Update) -> None:
            if self.tunnels_key not in update.changes:
                return
            kv = update.changes[self.tunnels_key]
            if kv is None:
                if last[0] != 0:
                    last[0] = 0
                    on_set(TunnelSet(None, 0))
                return
            if kv.mod_revision <= last[0]:
                return
            last[0] = kv.mod_revision
            try:
                tunnel_set = self.tunnel_set(kv)
            except InvalidDocument as e:
                if on_invalid is not None:
                    on_invalid(e)
                return
            on_set(tunnel_set)

        return self._mirror(self.tunnels_key, update, prefix=False)

    # -- the fleet -------------------------------------------------------------

    def read_statuses(self) -> Deferred[dict[str, Any]]:
        """Every live gateway's apply status: ``{GatewayId: status}``."""

        async def read() -> dict[str, Any]:
            result = await self.client.get_prefix(self.gateways_prefix())
            return self.statuses({kv.key: kv for kv in result.kvs})

        return Deferred.fromCoroutine(read())

    def statuses(self, kvs: dict[bytes, KeyValue]) -> dict[str, Any]:
        """The statuses among ``kvs`` (a read, or a mirror's copy)."""
        found = {}
        for key, kv in kvs.items():
            gateway = self.parse_status_key(key)
            if gateway is not None:
                found[gateway] = _json_or_error(kv)
        return found

    def read_presence(self) -> Deferred[dict[str, dict[str, Any]]]:
        """The fleet's clients: ``{ClientId: {GatewayId: details}}``."""

        async def read() -> dict[str, dict[str, Any]]:
            result = await self.client.get_prefix(self.presence_prefix())
            return self.presence({kv.key: kv for kv in result.kvs})

        return Deferred.fromCoroutine(read())

    def presence(self, kvs: dict[bytes, KeyValue]) -> dict[str, dict[str, Any]]:
        """The presence among ``kvs`` (a read, or a mirror's copy)."""
        found: dict[str, dict[str, Any]] = {}
        for key, kv in sorted(kvs.items()):
            names = self.parse_presence_key(key)
            if names is not None:
                gateway, client = names
                found.setdefault(client, {})[gateway] = _json_or_error(kv)
        return found

    def watch_presence(self, on_update: Callable[[Update], object]) -> Mirror:
        """A live copy of every presence key (``store.presence(mirror.kvs)``)."""
        return self._mirror(self.presence_prefix(), on_update, prefix=True)

    def watch_statuses(self, on_update: Callable[[Update], object]) -> Mirror:
        """A live copy of every gateway's status (``store.statuses(mirror.kvs)``)."""
        return self._mirror(self.gateways_prefix(), on_update, prefix=True)

    def _mirror(
        self, key: bytes, on_update: Callable[[Update], object], *, prefix: bool
    ) -> Mirror:
        mirror = Mirror(
            self.client,
            self._reactor,
            key,
            on_update,
            prefix=prefix,
            backoff=self._backoff,
            idle_timeout=self._idle_timeout,
        )
        mirror.start()
        return mirror

    def gateway(self, gateway_id: str, ttl: int = 10) -> GatewayRecords:
        """This gateway's status and presence keys (call ``start()``)."""
        return GatewayRecords(self, gateway_id, ttl)


def _json_or_error(kv: KeyValue) -> Any:
    try:
        return decode(kv)
    except InvalidDocument as e:
        return {"error": str(e)}


class GatewayRecords:
    """One gateway's apply status and its clients' presence, under its lease."""

    def __init__(self, store: ClusterStore, gateway_id: str, ttl: int) -> None:
        self.gateway_id = check_id(gateway_id, "GatewayId")
        self._store = store
        self.records = LeasedRecords(
            store.client,
            store._reactor,
            ttl,
            clear_prefixes=[
                store.presence_prefix(gateway_id),
                store.status_key(gateway_id),
            ],
        )

    @property
    def state(self) -> RecordsState:
        return self.records.state

    def start(self) -> None:
        self.records.start()

    def stop(self) -> Deferred[None]:
        """Revoke the lease: this gateway's records disappear now."""
        return self.records.stop()

    def client_connected(self, client_id: str, details: Any) -> None:
        self.records.set(
            self._store.presence_key(self.gateway_id, client_id), encode(details)
        )

    def client_disconnected(self, client_id: str) -> None:
        self.records.remove(self._store.presence_key(self.gateway_id, client_id))

    def set_status(self, status: Any) -> None:
        """Report what this gateway applied (revision, errors)."""
        self.records.set(self._store.status_key(self.gateway_id), encode(status))
