"""A small etcd v3 client for Twisted, over etcd's JSON gRPC gateway.

Why the gateway and not a gRPC library: etcd serves the same API as
HTTP/JSON on its client port (``/v3/...``, served by etcd 3.4, which
Debian ships, and by every later release; 3.3 and older used
``/v3beta``/``/v3alpha``), so treq, which threshold already uses, is all
it takes, with Twisted's own TLS. The Python etcd3 clients are either
blocking (etcd3, etcd3gw: a thread per watch), asyncio-only (aetcd), or
unmaintained and bound to ``/v3alpha`` (txaioetcd), which etcd 3.4 no
longer serves.

Every call goes to the endpoint that answered last and moves on to the
next one when it cannot be reached. A read, a lease keepalive or revoke
and a watch are sent again to the next endpoint after any failure; a write
only when it surely never left (connection refused or timed out, TLS
handshake failed), so it is never applied twice: when its answer is lost
it fails with ``EtcdUnavailable(outcome_unknown=True)``. Each attempt is
bounded by ``timeout``, so a call fails within ``len(endpoints) *
timeout``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import treq
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IResponse

from threshold.cluster import kv
from threshold.cluster.kv import (
    Compare,
    EtcdError,
    EtcdUnavailable,
    Lease,
    LeaseNotFound,
    MalformedAnswer,
    Op,
    RangeResult,
    TxnResult,
    as_key,
    prefix_end,
)
from threshold.cluster.transport import (
    AttemptTimeout,
    TrackedEndpoints,
    answer_error,
    decode_answer,
    describe,
    never_sent,
    parse_endpoint,
    read_body,
    tls_policy,
)
from threshold.cluster.watch import EventCallback, Watch, WatchBackoff
from threshold.config import ConfigError

__all__ = ["API", "EtcdClient"]

#: The API path prefix (etcd 3.4 and later).
API = "/v3"


class EtcdClient:
    """etcd v3 through its JSON gateway: every method returns a Deferred.

    ``endpoints`` are ``http(s)://host:port`` URLs of the cluster's members;
    ``tls`` is ``(ca_file, cert_file, key_file)``: etcd's certificate must
    chain to the CA and name the endpoint's host, and ours is presented
    for ``--client-cert-auth``. ``timeout`` bounds each attempt.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        reactor: Any,
        tls: tuple[str, str, str] | None = None,
        timeout: float = 5.0,
        *,
        source: str = "config",
    ) -> None:
        if not endpoints:
            raise ConfigError(
                source, "at least one endpoint is needed", "EtcdEndpoints"
            )
        self.endpoints = tuple(parse_endpoint(e, source) for e in endpoints)
        if tls is None and any(e.startswith("https:") for e in self.endpoints):
            raise ConfigError(
                source,
                "https endpoints need EtcdCaCertificateFile, EtcdClientCertificateFile"
                " and EtcdClientKeyFile",
                "EtcdEndpoints",
            )
        self.timeout = timeout
        self._reactor = reactor
        # A new connection per request: a connection etcd closed while idle
        # (a restart) would otherwise fail the next write, which Twisted's
        # pool retries only for idempotent methods and etcd's API is POST.
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        policy = tls_policy(tls, source) if tls is not None else None
        # Connecting gets part of the attempt's time, so a dead host fails
        # as "never sent" and a write can move on to the next endpoint.
        self._endpoints = TrackedEndpoints(reactor, policy, max(timeout / 2, 0.05))
        agent = Agent.usingEndpointFactory(reactor, self._endpoints, pool=self._pool)
        self._http = treq.client.HTTPClient(agent)
        self._preferred = 0
        self._watches: set[Watch] = set()
        self._closed = False

    # -- endpoints ---------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint tried first (the one that answered last)."""
        return self.endpoints[self._preferred]

    def _rotation(self) -> list[str]:
        if self._closed:
            raise EtcdUnavailable(self.endpoints, "the client is closed")
        n = self._preferred
        return list(self.endpoints[n:] + self.endpoints[:n])

    def demote(self, endpoint: str) -> None:
        """Try ``endpoint`` last from now on (it failed)."""
        if self.endpoint == endpoint and len(self.endpoints) > 1:
            self._preferred = (self._preferred + 1) % len(self.endpoints)

    def _promote(self, endpoint: str) -> None:
        self._preferred = self.endpoints.index(endpoint)

    # -- requests ----------------------------------------------------------

    def _post(self, endpoint: str, path: str, body: dict[str, Any]) -> Deferred[Any]:
        return self._http.post(
            endpoint + API + path,
            data=json.dumps(body).encode("ascii"),
            headers={"Content-Type": ["application/json"]},
            unbuffered=True,
        )

    def _timed(self, d: Deferred[Any], seconds: float) -> Deferred[Any]:
        def timed_out(_: object, timeout: float) -> Failure:
            return Failure(AttemptTimeout(timeout))

        return d.addTimeout(seconds, self._reactor, onTimeoutCancel=timed_out)

    async def _attempt(
        self, endpoint: str, path: str, body: dict[str, Any]
    ) -> tuple[int, bytes]:
        response = await self._post(endpoint, path, body)
        return response.code, await read_body(response)

    async def _call(
        self, path: str, body: dict[str, Any], *, idempotent: bool
    ) -> dict[str, Any]:
        last = "no endpoint tried"
        for endpoint in self._rotation():
            attempt = Deferred.fromCoroutine(self._attempt(endpoint, path, body))
            try:
                code, data = await self._timed(attempt, self.timeout)
            except CancelledError:
                raise
            except Exception:
                failure = Failure()
                last = f"{endpoint}: {describe(failure)}"
                if not (idempotent or never_sent(failure)):
                    raise EtcdUnavailable(
                        [endpoint], last, outcome_unknown=True
                    ) from None
                self.demote(endpoint)
                continue
            answer = decode_answer(endpoint, code, data)
            if code == 200:
                self._promote(endpoint)
                return answer
            err = answer_error(endpoint, answer)
            if err.code != kv.GRPC_UNAVAILABLE:
                raise err
            # This member cannot serve (no leader, stopping, overloaded).
            last = f"{endpoint}: {err.message}"
            if not idempotent:
                raise EtcdUnavailable([endpoint], last, outcome_unknown=True)
            self.demote(endpoint)
        raise EtcdUnavailable(self.endpoints, last)

    def _run(
        self,
        path: str,
        body: dict[str, Any],
        parse: Callable[[str, dict[str, Any]], Any],
        *,
        idempotent: bool,
    ) -> Deferred[Any]:
        async def run() -> Any:
            answer = await self._call(path, body, idempotent=idempotent)
            try:
                return parse(self.endpoint, answer)
            except ValueError as e:
                raise MalformedAnswer(self.endpoint, str(e)) from None

        return Deferred.fromCoroutine(run())

    async def open_stream(
        self, path: str, body: dict[str, Any]
    ) -> tuple[str, IResponse]:
        """Open a streaming call (a watch): the endpoint and its response."""
        last = "no endpoint tried"
        for endpoint in self._rotation():
            try:
                response = await self._timed(
                    self._post(endpoint, path, body), self.timeout
                )
            except CancelledError:
                raise
            except Exception:
                last = f"{endpoint}: {describe(Failure())}"
                self.demote(endpoint)
                continue
            if response.code == 200:
                self._promote(endpoint)
                return endpoint, response
            data = await self._timed(read_body(response), self.timeout)
            err = answer_error(endpoint, decode_answer(endpoint, response.code, data))
            if err.code != kv.GRPC_UNAVAILABLE:
                raise err
            last = f"{endpoint}: {err.message}"
            self.demote(endpoint)
        raise EtcdUnavailable(self.endpoints, last)

    # -- the KV API ----------------------------------------------------------

    def get(self, key: bytes | str) -> Deferred[RangeResult]:
        """Read one key: ``result.single`` is its KeyValue or None."""
        body = kv.key_range(as_key(key), prefix=False)
        return self._run("/kv/range", body, _range, idempotent=True)

    def get_prefix(self, prefix: bytes | str) -> Deferred[RangeResult]:
        """Read every key under ``prefix``, in key order, at one revision."""
        body = kv.key_range(as_key(prefix), prefix=True)
        return self._run("/kv/range", body, _range, idempotent=True)

    def put(self, key: bytes | str, value: bytes, lease: int = 0) -> Deferred[int]:
        """Write one key (attached to ``lease`` if not 0); the new revision."""
        body = kv.Put(as_key(key), value, lease).to_json()
        return self._run("/kv/put", body, _revision, idempotent=False)

    def delete(self, key: bytes | str, *, prefix: bool = False) -> Deferred[int]:
        """Delete a key (or every key under a prefix); how many were deleted."""
        body = kv.Delete(as_key(key), prefix).to_json()
        return self._run("/kv/deleterange", body, _deleted, idempotent=False)

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> Deferred[TxnResult]:
        """If every compare holds, run ``success``, else ``failure``; atomically."""
        body = {
            "compare": [c.to_json() for c in compare],
            "success": [kv.op_json(op) for op in success],
            "failure": [kv.op_json(op) for op in failure],
        }
        return self._run("/kv/txn", body, _txn, idempotent=False)

    def compact(self, revision: int, *, physical: bool = False) -> Deferred[None]:
        """Drop the history before ``revision`` (watches from there get Compacted)."""
        body = {"revision": str(revision), "physical": physical}
        return self._run("/kv/compaction", body, _nothing, idempotent=False)

    def status(self) -> Deferred[dict[str, Any]]:
        """The answering member's status (``version``, ``leader``, ...)."""
        return self._run("/maintenance/status", {}, _status, idempotent=True)

    # -- leases --------------------------------------------------------------

    def lease_grant(self, ttl: int) -> Deferred[Lease]:
        """A new lease of ``ttl`` seconds (etcd may raise a tiny TTL)."""
        return self._run("/lease/grant", {"TTL": ttl}, _lease, idempotent=False)

    def lease_keepalive(self, lease_id: int) -> Deferred[int]:
        """Renew the lease: its TTL again; LeaseNotFound once it has expired."""

        def parse(endpoint: str, answer: dict[str, Any]) -> int:
            result = answer.get("result", answer)
            if not isinstance(result, dict):
                raise ValueError("result is not an object")
            if "error" in answer:
                raise answer_error(endpoint, _stream_error(answer))
            ttl = kv.int_field(result, "TTL")
            if ttl <= 0:  # etcd answers an unknown lease with no TTL
                raise LeaseNotFound(endpoint, lease_id)
            return ttl

        body = {"ID": str(lease_id)}
        return self._run("/lease/keepalive", body, parse, idempotent=True)

    def lease_revoke(self, lease_id: int) -> Deferred[None]:
        """End the lease now, deleting its keys; LeaseNotFound if it is gone."""

        async def run() -> None:
            try:
                await self._call(
                    "/lease/revoke", {"ID": str(lease_id)}, idempotent=True
                )
            except EtcdError as e:
                if e.code == kv.GRPC_NOT_FOUND:
                    raise LeaseNotFound(e.endpoint, lease_id) from None
                raise

        return Deferred.fromCoroutine(run())

    # -- watches -------------------------------------------------------------

    def watch(
        self,
        key: bytes | str,
        start_revision: int,
        callback: EventCallback,
        *,
        prefix: bool = True,
        backoff: WatchBackoff | None = None,
        idle_timeout: float | None = None,
    ) -> Watch:
        """Watch ``key`` (a prefix unless ``prefix=False``) from ``start_revision``.

        ``callback(event)`` gets every change in revision order, exactly once,
        across stream ends and etcd restarts (0 means "from now"). See
        :class:`~threshold.cluster.watch.Watch` for ending and errors.
        """
        raw = as_key(key)
        watch = Watch(
            self,
            self._reactor,
            raw,
            prefix_end(raw) if prefix else None,
            start_revision,
            callback,
            backoff=backoff,
            idle_timeout=idle_timeout,
        )
        self._watches.add(watch)
        watch.done.addBoth(self._forget, watch)
        watch.start()
        return watch

    def _forget(self, result: object, watch: Watch) -> object:
        self._watches.discard(watch)
        return result

    def close(self) -> Deferred[None]:
        """Stop every watch, refuse further calls; fires once no connection is left."""
        self._closed = True
        for watch in list(self._watches):
            watch.cancel()
        return self._endpoints.connections.close_all()


def _stream_error(answer: dict[str, Any]) -> dict[str, Any]:
    """A streaming call's error (``{"error": {...}}``) as a unary error answer."""
    inner = answer.get("error")
    if isinstance(inner, dict):
        return {
            "code": inner.get("grpc_code", inner.get("code")),
            "message": inner.get("message"),
        }
    return answer


def _range(endpoint: str, answer: dict[str, Any]) -> RangeResult:
    return RangeResult.from_json(answer)


def _revision(endpoint: str, answer: dict[str, Any]) -> int:
    return kv.header_revision(answer)


def _deleted(endpoint: str, answer: dict[str, Any]) -> int:
    return kv.int_field(answer, "deleted")


def _txn(endpoint: str, answer: dict[str, Any]) -> TxnResult:
    return TxnResult.from_json(answer)


def _nothing(endpoint: str, answer: dict[str, Any]) -> None:
    return None


def _status(endpoint: str, answer: dict[str, Any]) -> dict[str, Any]:
    return answer


def _lease(endpoint: str, answer: dict[str, Any]) -> Lease:
    if answer.get("error"):
        raise EtcdError(endpoint, None, str(answer["error"]))
    return Lease(kv.int_field(answer, "ID"), kv.int_field(answer, "TTL"))
