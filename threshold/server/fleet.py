"""The gateway in a fleet: the tunnel set and client presence in etcd.

With ``Cluster`` configured (docs/cluster.md), ``PUT /tunnels`` writes the
validated set to etcd conditioned on the revision it replaces
(:meth:`Fleet.put`) and answers once this gateway has applied it; every
gateway, this one included, applies the sets its watch reports through
``RouteTable.apply`` (all or nothing on each gateway, in revision order,
never one twice) and reports what it applied as its status in etcd. The
set applied is kept in the StateFile and its revision in a file beside it
(``<StateFile>.revision``), so a gateway restarted while etcd is down
serves its last set and resumes the watch after it. Presence: each client
holding a session here has a key under this gateway's lease.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from threshold.cluster.kv import EtcdError, EtcdUnavailable
from threshold.cluster.store import (
    ClusterStore,
    Conflict,
    GatewayRecords,
    InvalidDocument,
    TunnelSet,
)
from threshold.logs import observer as log_observer
from threshold.server.fleet_metrics import FleetCollector
from threshold.server.tunnels import TunnelError, parse_tunnels

if TYPE_CHECKING:
    from threshold.cluster.mirror import Mirror
    from threshold.server.service import TunnelServer
    from threshold.server.tunnels import Tunnel

__all__ = [
    "APPLY_TIMEOUT",
    "Fleet",
    "FleetCollector",
    "FleetError",
    "parse_if_match",
    "read_revision",
    "revision_path",
]

log = Logger(observer=log_observer)

#: How long a PUT waits for this gateway's watch to apply what it wrote.
APPLY_TIMEOUT = 15.0
#: How many failed revisions are remembered for late PUT answers.
RECENT_FAILURES = 16
#: Seconds between checks of etcd's state (and of presence, when the
#: registry cannot tell changes).
TICK = 1.0


class FleetError(TunnelError):
    """A PUT refused or not confirmed; the body names the revisions."""

    def __init__(self, status: int, message: str, **revisions: int) -> None:
        super().__init__(status, message)
        self.revisions = revisions

    def to_json(self) -> dict[str, Any]:
        body = super().to_json()
        body.update(self.revisions)
        return body


def revision_path(state_file: str) -> str:
    """Where the revision of the set in the state file is kept."""
    return state_file + ".revision"


def read_revision(state_file: str | None) -> int:
    """The revision saved beside the state file (0: none, or unreadable)."""
    if state_file is None:
        return 0
    try:
        with open(revision_path(state_file), encoding="utf-8") as f:
            value = json.load(f).get("Revision", 0)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, AttributeError) as e:
        log.error(
            "{path}: unreadable ({why}); the set is read from etcd",
            path=revision_path(state_file),
            why=str(e),
        )
        return 0
    return value if isinstance(value, int) and value >= 0 else 0


def _write_revision(path: str, revision: int) -> None:
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"Revision": revision}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def parse_if_match(raw: bytes | None) -> int | None:
    """The revision an ``If-Match`` header names (``"7"`` or ``7``)."""
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit() or len(text) > 19:
        raise TunnelError(
            400, f'If-Match must be a revision from the ETag ("7"), not {raw!r}'
        )
    return int(text)


class Fleet(Service):
    """This gateway's part of the fleet: the watch, the writes, presence."""

    def __init__(
        self,
        server: TunnelServer,
        store: ClusterStore,
        gateway_id: str,
        reactor: Any,
        *,
        ttl: int = 10,
        applied_revision: int = 0,
        apply_timeout: float = APPLY_TIMEOUT,
        run_in_thread: Callable[..., Deferred[Any]] = deferToThread,
    ) -> None:
        self.server = server
        self.store = store
        self.gateway_id = gateway_id
        self._reactor = reactor
        self._ttl = ttl
        self._run = run_in_thread
        self.apply_timeout = apply_timeout
        #: The revision of the set in force here (0: none from etcd yet).
        self.applied_revision = applied_revision
        #: The newest revision seen, and why it is not in force (if it is not).
        self.latest_revision = applied_revision
        #: The newest revision whose apply has finished, well or not.
        self.handled_revision = applied_revision
        #: Why recent revisions failed here (a PUT may ask after the fact).
        self._recent_failures: dict[int, TunnelError] = {}
        self.errors: list[dict[str, Any]] = []
        self.apply_failures = 0
        #: Sets from etcd applied here since start (a resync applies none twice).
        self.applies = 0
        self.records: GatewayRecords | None = None
        self._tunnels: Mirror | None = None
        self._presence: Mirror | None = None
        self._statuses: Mirror | None = None
        self._present: set[str] = set()
        self._waiters: list[tuple[int, Deferred[int]]] = []
        self._subscribed = False
        self._poll: LoopingCall | None = None
        self._polling = False
        self._was_up: bool | None = None
        # RouteTable.apply of some versions refuses tunnels of absent clients.
        self._check_clients_option = "check_clients" in (
            inspect.signature(server.routes.apply).parameters
        )

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        self.records = self.store.gateway(self.gateway_id, self._ttl)
        self.records.start()
        self._report()
        subscribe = getattr(self.server.registry, "subscribe", None)
        self._polling = subscribe is None
        if subscribe is not None and not self._subscribed:
            self._subscribed = True
            subscribe(self._client_changed)
        self._sync_presence()
        self._poll = LoopingCall(self._tick)
        self._poll.clock = self._reactor
        self._poll.start(TICK, now=False)
        self._presence = self.store.watch_presence(lambda update: None)
        self._statuses = self.store.watch_statuses(lambda update: None)
        self._tunnels = self.store.watch_tunnels(
            self._on_set,
            applied_revision=self.applied_revision,
            on_invalid=self._invalid,
        )

    def stopService(self) -> Deferred[None] | None:  # noqa: N802
        Service.stopService(self)
        poll, self._poll = self._poll, None
        if poll is not None and poll.running:
            poll.stop()
        for mirror in (self._tunnels, self._presence, self._statuses):
            if mirror is not None:
                mirror.stop()
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(FleetError(503, "the gateway is stopping"))
        records, self.records = self.records, None
        self._present.clear()
        return records.stop() if records is not None else None

    def _tick(self) -> None:
        if self._polling:
            self._sync_presence()
        up = self.etcd_up
        if up == self._was_up or (self._was_up is None and up):
            self._was_up = up
            return
        self._was_up = up
        if up:
            log.info("cluster: etcd reachable again; watching the tunnel set")
        else:
            why = self._tunnels.last_error if self._tunnels else None
            log.warn(
                "cluster: etcd unreachable ({why}); serving revision {revision},"
                " PUT /tunnels answers 503 until it is back",
                why=why or "no watch",
                revision=self.applied_revision,
            )

    @property
    def etcd_up(self) -> bool:
        """Whether this gateway's watch of the tunnel set is up now."""
        return self._tunnels is not None and self._tunnels.connected

    # -- applying what the watch reports ---------------------------------------

    def _on_set(self, tunnel_set: TunnelSet) -> None:
        if tunnel_set.document is None:
            log.error(
                "cluster: the tunnel set key was deleted; keeping revision"
                " {revision} in force",
                revision=self.applied_revision,
            )
            return
        revision = tunnel_set.revision
        self.latest_revision = max(self.latest_revision, revision)
        try:
            tunnels = parse_tunnels(tunnel_set.document)
        except TunnelError as e:
            self._failed(revision, e)
            return
        options: dict[str, Any] = {"persist": self._persist(revision)}
        if self._check_clients_option:
            # Every gateway listens for every tunnel of the fleet, whichever
            # gateway its clients are connected to.
            options["check_clients"] = False
        d = self.server.routes.apply(tunnels, **options)
        d.addCallbacks(
            self._applied, self._failed_apply, (revision,), None, (revision,)
        )

    def _persist(self, revision: int) -> Callable[[list[Tunnel]], Deferred[None]]:
        state = self.server.state

        async def save(tunnels: list[Tunnel]) -> None:
            if state is None:
                return
            try:
                # The set first, then its revision: a crash between the two
                # re-applies the same set, never skips a newer one.
                await state.save(tunnels)
                await self._run(_write_revision, revision_path(state.path), revision)
            except Exception as e:
                raise TunnelError(503, f"the tunnel set cannot be saved: {e}") from e

        return lambda tunnels: Deferred.fromCoroutine(save(tunnels))

    def _applied(self, tunnels: list[Tunnel], revision: int) -> None:
        self.server._applied(tunnels)
        self.applies += 1
        self.applied_revision = revision
        self.errors = []
        log.info(
            "cluster: revision {revision} applied ({count} tunnels)",
            revision=revision,
            count=len(tunnels),
        )
        self._report()
        self.handled_revision = max(self.handled_revision, revision)
        self._settle(revision, None)

    def _failed_apply(self, failure: Any, revision: int) -> None:
        error = failure.value
        if not isinstance(error, TunnelError):
            log.failure(
                "cluster: applying revision {revision} failed",
                failure,
                revision=revision,
            )
            error = TunnelError(500, f"internal error: {error}")
        self._failed(revision, error)

    def _failed(self, revision: int, error: TunnelError) -> None:
        self.apply_failures += 1
        self.errors = [error.to_json()]
        log.error(
            "cluster: revision {revision} not applied on this gateway: {why};"
            " revision {applied} stays in force",
            revision=revision,
            why=error.message,
            applied=self.applied_revision,
        )
        self._report()
        self.handled_revision = max(self.handled_revision, revision)
        self._recent_failures[revision] = error
        while len(self._recent_failures) > RECENT_FAILURES:
            del self._recent_failures[min(self._recent_failures)]
        self._settle(revision, error)

    def _invalid(self, error: InvalidDocument) -> None:
        self.latest_revision = max(self.latest_revision, error.revision)
        self._failed(error.revision, TunnelError(422, str(error)))

    def _report(self) -> None:
        if self.records is None:
            return
        self.records.set_status(self.status())

    def status(self) -> dict[str, Any]:
        """This gateway's apply status, as kept in etcd."""
        return {
            "Revision": self.applied_revision,
            "LatestRevision": self.latest_revision,
            "Errors": list(self.errors),
            "Tunnels": len(self.server.routes.tunnels()),
            # Entries of the local copy a restart could not bind (until the
            # next set applies).
            "NotRestored": len(self.server.routes.not_restored()),
        }

    def _settle(self, revision: int, error: TunnelError | None) -> None:
        """Answer the PUTs waiting for ``revision`` (or an older one)."""
        keep = []
        for wanted, d in self._waiters:
            if wanted > revision:
                keep.append((wanted, d))
            elif error is not None and wanted == revision:
                d.errback(self._not_applied(revision, error))
            else:
                d.callback(revision)
        self._waiters = keep

    def _not_applied(self, revision: int, error: TunnelError) -> FleetError:
        return FleetError(
            error.status,
            f"written at revision {revision} but not applied on this"
            f" gateway: {error.message}",
            Revision=revision,
            AppliedRevision=self.applied_revision,
        )

    def wait_applied(self, revision: int) -> Deferred[int]:
        """Fires once this gateway has dealt with ``revision`` (or a newer one)."""
        if self.handled_revision >= revision:
            # The watch may report a set before the write's answer arrives.
            error = self._recent_failures.get(revision)
            if error is not None:
                return fail(self._not_applied(revision, error))
            return succeed(self.applied_revision)
        d: Deferred[int] = Deferred()
        self._waiters.append((revision, d))

        def late(failure: Any, timeout: float) -> None:
            failure.trap(TimeoutError)
            raise FleetError(
                504,
                f"written at revision {revision}; this gateway has not applied it"
                f" within {timeout:g}s (is its etcd watch down?)",
                Revision=revision,
                AppliedRevision=self.applied_revision,
            )

        d.addTimeout(self.apply_timeout, self._reactor)
        d.addErrback(late, self.apply_timeout)
        return d

    # -- PUT /tunnels ----------------------------------------------------------

    def put(
        self, tunnels: list[Tunnel], if_match: bytes | None
    ) -> Deferred[tuple[list[Tunnel], int]]:
        """Write a validated set; fire once applied here: (set in force, revision)."""

        async def put() -> tuple[list[Tunnel], int]:
            named = parse_if_match(if_match)
            expected = self.applied_revision if named is None else named
            document = [t.to_json() for t in tunnels]
            try:
                revision = await self.store.write_tunnels(document, expected)
            except Conflict as e:
                raise self._conflict(e, named is not None) from None
            except EtcdUnavailable as e:
                tail = (
                    " (the new set may have been applied: GET /tunnels to see)"
                    if e.outcome_unknown
                    else "; the set was not written"
                )
                raise FleetError(
                    503, f"etcd is unavailable: {e.last_error}{tail}"
                ) from None
            except EtcdError as e:
                raise FleetError(503, f"etcd refused the write: {e}") from None
            log.info(
                "cluster: tunnel set written at revision {revision}", revision=revision
            )
            await self.wait_applied(revision)
            return self.server.routes.tunnels(), self.applied_revision

        return Deferred.fromCoroutine(put())

    def _conflict(self, e: Conflict, if_match: bool) -> FleetError:
        if if_match:
            return FleetError(
                412,
                f"If-Match names revision {e.expected_revision}, the tunnel set is at"
                f" revision {e.current_revision}",
                CurrentRevision=e.current_revision,
            )
        return FleetError(
            409,
            f"the tunnel set changed: it is at revision {e.current_revision}, this"
            f" gateway applied {e.expected_revision}; GET /tunnels and PUT again"
            " (with If-Match to base it on a revision)",
            CurrentRevision=e.current_revision,
        )

    def etag(self) -> bytes:
        """The ``ETag`` of the set in force here: its revision, quoted."""
        return f'"{self.applied_revision}"'.encode("ascii")

    # -- presence --------------------------------------------------------------

    def _client_changed(self, client_id: str) -> None:
        self._sync_presence()

    def _sync_presence(self) -> None:
        """Tell etcd the clients that connected or left since the last call."""
        records = self.records
        if records is None:
            return
        now = {r.client_id: r for r in self.server.registry.records() if r.session}
        for client_id, record in now.items():
            if client_id not in self._present:
                self._present.add(client_id)
                view = record.to_json()
                details = {k: view.get(k) for k in ("Peer", "ConnectedSince")}
                records.client_connected(client_id, details)
        for client_id in self._present - now.keys():
            self._present.discard(client_id)
            records.client_disconnected(client_id)

    def clients(self, local: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``GET /clients`` in a fleet: the local view plus every gateway's clients."""
        fleet = self.store.presence(self._presence.kvs) if self._presence else {}
        # This gateway's own part is what it holds now, not what etcd was told.
        for gateways in fleet.values():
            gateways.pop(self.gateway_id, None)
        for client_id in self._present:
            fleet.setdefault(client_id, {})[self.gateway_id] = {}
        for client_id, gateways in fleet.items():
            body = local.get(client_id)
            if body is None:
                if not gateways:
                    continue
                body = {"ClientId": client_id, "CurrentState": "ClientConnected"}
                local[client_id] = body
            body["Gateways"] = sorted(gateways)
        for body in local.values():
            body.setdefault("Gateways", [])
        return dict(sorted(local.items()))

    def statuses(self) -> dict[str, Any]:
        """Every live gateway's apply status (this one's as it is now)."""
        found = self.store.statuses(self._statuses.kvs) if self._statuses else {}
        found[self.gateway_id] = self.status()
        return dict(sorted(found.items()))
