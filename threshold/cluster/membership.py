"""Keys that live as long as their owner: written under one kept-alive lease.

A gateway's presence records and apply status are such keys: when the
gateway dies, its lease expires after ``ttl`` seconds and etcd deletes
them all. ``LeasedRecords`` holds what etcd should contain (``desired``)
and writes the differences one at a time, in order, so a put and a later
delete of one key can never land the other way round, and a burst of
changes to one key costs one write of its latest value. Memory stays
bounded by the number of keys.

When etcd cannot be reached the records wait (state DEGRADED) and are
written when it answers again; when the lease is found expired (etcd was
out of reach for longer than the TTL) a new lease is granted and every
record is written again. The lease is renewed every ``ttl / 3`` seconds,
as etcd's own clients do.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.cluster.kv import (
    GRPC_NOT_FOUND,
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
)

__all__ = ["LeasedRecords", "RecordsState"]

log = Logger()


class RecordsState(enum.Enum):
    STARTING = "starting"  # no lease yet
    LIVE = "live"  # lease held, etcd answering
    DEGRADED = "degraded"  # etcd unreachable or the lease lost: retrying
    STOPPED = "stopped"


def _lease_lost(e: Exception) -> bool:
    return isinstance(e, LeaseNotFound) or (
        isinstance(e, EtcdError) and e.code == GRPC_NOT_FOUND
    )


class LeasedRecords:
    """Keys under one lease, mirrored from ``desired`` to etcd.

    ``clear_prefixes`` are deleted once, when the first lease is granted:
    the keys a previous run of the same owner left under its own lease.
    """

    def __init__(
        self,
        client: Any,
        reactor: Any,
        ttl: int,
        clear_prefixes: Sequence[bytes] = (),
    ) -> None:
        if ttl < 2:
            raise ValueError("the lease TTL must be at least 2 seconds")
        self._client = client
        self._reactor = reactor
        self.ttl = ttl
        self._clear = list(clear_prefixes)
        self.desired: dict[bytes, bytes] = {}
        #: Keys whose value in etcd may differ from ``desired`` (ordered).
        self._dirty: dict[bytes, None] = {}
        self.lease_id: int | None = None
        self.state = RecordsState.STARTING
        self.last_error: str | None = None
        #: Leases granted (more than one: a lease was lost and replaced).
        self.leases = 0
        self._work: Deferred[None] | None = None
        self._keepalive: Deferred[int] | None = None
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    # -- what the owner says -------------------------------------------------

    def set(self, key: bytes, value: bytes) -> None:
        """etcd should hold ``key`` = ``value`` under the lease."""
        if self.desired.get(key) != value:
            self.desired[key] = value
            self._dirty[key] = None
            self._kick()

    def remove(self, key: bytes) -> None:
        if key in self.desired:
            del self.desired[key]
            self._dirty[key] = None
            self._kick()

    @property
    def pending(self) -> int:
        """Changes not yet written."""
        return len(self._dirty)

    def start(self) -> None:
        """Grant the lease and write; renew from now on. Never fails."""
        self._loop.start(self.ttl / 3, now=False)
        self._kick()

    def stop(self) -> Deferred[None]:
        """Stop renewing and revoke the lease: etcd drops every record now."""
        if self.state is RecordsState.STOPPED:
            return succeed(None)
        self.state = RecordsState.STOPPED
        if self._loop.running:
            self._loop.stop()
        for d in (self._work, self._keepalive):
            if d is not None:
                d.cancel()
        lease, self.lease_id = self.lease_id, None
        if lease is None:
            return succeed(None)

        async def revoke() -> None:
            try:
                await self._client.lease_revoke(lease)
            except (EtcdError, EtcdUnavailable) as e:
                # Expired already, or unreachable: it expires within the TTL.
                log.info("etcd lease {lease} not revoked: {e}", lease=lease, e=e)

        return Deferred.fromCoroutine(revoke())

    # -- writing ---------------------------------------------------------------

    def _kick(self) -> None:
        if self._work is None and self.state is not RecordsState.STOPPED:
            work = Deferred.fromCoroutine(self._write_all())
            self._work = work
            # Runs at once when the writer finished without waiting.
            work.addBoth(self._work_done)

    def _work_done(self, result: None | Failure) -> None:
        self._work = None
        if isinstance(result, Failure) and not result.check(CancelledError):
            log.failure("etcd records: writer failed", result)

    def _degraded(self, e: Exception) -> None:
        if self.state is not RecordsState.STOPPED:
            self.state = RecordsState.DEGRADED
            self.last_error = str(e)

    async def _write_all(self) -> None:
        if self.lease_id is None and not await self._grant():
            return
        while self._dirty and self.lease_id is not None:
            key = next(iter(self._dirty))
            value = self.desired.get(key)
            lease = self.lease_id
            try:
                if value is None:
                    await self._client.delete(key)
                else:
                    await self._client.put(key, value, lease)
            except (EtcdError, EtcdUnavailable) as e:
                self._degraded(e)
                if _lease_lost(e) and self.lease_id == lease:
                    self.lease_id = None
                    if await self._grant():
                        continue
                return
            if self.desired.get(key) == value:
                self._dirty.pop(key, None)
        if self.state is not RecordsState.STOPPED:
            self.state = RecordsState.LIVE
            self.last_error = None

    async def _grant(self) -> bool:
        """A new lease; every record must then be written again under it."""
        try:
            lease = await self._client.lease_grant(self.ttl)
            for prefix in self._clear:
                await self._client.delete(prefix, prefix=True)
        except (EtcdError, EtcdUnavailable) as e:
            self._degraded(e)
            return False
        self._clear = []
        self.lease_id = lease.id
        self.leases += 1
        for key in self.desired:
            self._dirty[key] = None
        return True

    def _tick(self) -> None:
        if self.lease_id is None or self._dirty:
            self._kick()
        if self.lease_id is not None and self._keepalive is None:
            self._keepalive = self._client.lease_keepalive(self.lease_id)
            self._keepalive.addBoth(self._renewed, self.lease_id)

    def _renewed(self, result: int | Failure, lease: int) -> None:
        self._keepalive = None
        if self.state is RecordsState.STOPPED:
            return
        if not isinstance(result, Failure):
            if self.state is RecordsState.DEGRADED:
                self._kick()  # etcd is back: write what waits
            return
        e = result.value
        if isinstance(e, CancelledError):
            return
        if _lease_lost(e) and self.lease_id == lease:
            log.info("etcd lease {lease} expired; granting a new one", lease=lease)
            self.lease_id = None
            self._degraded(e)
            self._kick()
        elif isinstance(e, EtcdError | EtcdUnavailable):
            self._degraded(e)
        else:
            log.failure("etcd lease keepalive failed", result)
