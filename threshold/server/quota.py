"""Traffic quotas per client and period: accounting, periods, what is saved.

A client whose policy has ``QuotaBytes`` gets a :class:`QuotaAccount`:
the bytes its tunnels moved in the current period (a UTC day or month),
both directions summed. The account is fed from the flows' own byte
counters (:class:`~threshold.server.stats.Flow`, the ones the metrics
sum): a connection's meter adds what each flow's ``bytes_in + bytes_out``
grew by, so quota usage is exactly what ``threshold_client_received_bytes``
and ``threshold_client_sent_bytes`` grew by over the period.

Crossing ``QuotaBytes`` moves the account to EXCEEDED (one log line per
period): new connections are refused (``quota_exceeded``), and with the
action ``cut`` the running ones are cut. A new period, or
``POST /clients/{id}/quota/reset``, moves it back.

:class:`QuotaBook` holds the accounts; its :meth:`~QuotaBook.usage` is
what a :class:`QuotaStore` keeps across restarts (the state file when the
gateway runs alone; a fleet's shared store later), and
:meth:`~QuotaBook.restore` puts it back. Time is the injected clock's
``seconds()`` (wall-clock time on the reactor).
"""

from __future__ import annotations

import calendar
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from threshold.logs import observer as log_observer

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

    from threshold.config.policy import ClientPolicy

__all__ = [
    "QuotaAccount",
    "QuotaBook",
    "QuotaKeeper",
    "QuotaState",
    "QuotaStore",
    "SavedUsage",
    "iso",
    "parse_iso",
    "period_bounds",
]

log = Logger(observer=log_observer)


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The UTC period (``"day"`` or ``"month"``) holding ``now``: [start, end)."""
    t = datetime.fromtimestamp(now, UTC)
    if period == "day":
        start = datetime(t.year, t.month, t.day, tzinfo=UTC)
        return start.timestamp(), start.timestamp() + 86400.0
    if period != "month":
        raise ValueError(f"unknown quota period {period!r}")
    start = datetime(t.year, t.month, 1, tzinfo=UTC)
    days = calendar.monthrange(t.year, t.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400.0


def iso(t: float) -> str:
    """``t`` as the API writes times: UTC, seconds, ``Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def parse_iso(text: str) -> float:
    """The inverse of :func:`iso`; ValueError for anything else."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


class QuotaState(enum.Enum):
    """Where a client is against its quota in the current period."""

    WITHIN = "within"
    EXCEEDED = "exceeded"


@dataclass(frozen=True, slots=True)
class SavedUsage:
    """One client's usage as kept across restarts."""

    period: str
    period_start: float
    used: int

    def to_json(self) -> dict[str, Any]:
        """The state file's form."""
        return {
            "Period": self.period,
            "PeriodStart": iso(self.period_start),
            "UsedBytes": self.used,
        }


class Metered(Protocol):
    """A running connection counted against an account (a FlowMeter)."""

    def cut(self) -> None:
        """Close the connection: its client went over quota with ``cut``."""
        ...


class QuotaAccount:
    """One client's usage in the current period, and what crossing does.

    ``meters`` are the client's running metered connections (cut with the
    action ``cut``). ``on_exceeded(account)`` is told once per crossing.
    """

    def __init__(
        self,
        client_id: str,
        policy: ClientPolicy,
        now: float,
        on_exceeded: Callable[[QuotaAccount], None],
    ) -> None:
        self.client_id = client_id
        self.limit = policy.quota_bytes
        self.period = policy.quota_period
        self.cut_running = policy.quota_exceeded_action == "cut"
        self.start, self.end = period_bounds(self.period, now)
        self.used = 0
        self.state = QuotaState.WITHIN
        self.meters: set[Metered] = set()
        self.exceeded_count = 0
        self._on_exceeded = on_exceeded
        #: Bumped at every change, so a save can be skipped when idle.
        self.version = 0

    def set_policy(self, policy: ClientPolicy, now: float) -> None:
        """Follow a changed policy (a new limit applies to the next byte)."""
        self.limit = policy.quota_bytes
        self.cut_running = policy.quota_exceeded_action == "cut"
        if policy.quota_period != self.period:
            self.period = policy.quota_period
            self.start, self.end = period_bounds(self.period, now)
        self._check()

    def current(self, now: float) -> QuotaAccount:
        """This account, rolled over to a new period if ``now`` is past its end."""
        if now >= self.end:
            self.start, self.end = period_bounds(self.period, now)
            self.used = 0
            self.version += 1
            if self.state is QuotaState.EXCEEDED:
                self.state = QuotaState.WITHIN
                log.info(
                    "client {client_id}: new quota period from {start}; connections"
                    " admitted again",
                    client_id=self.client_id,
                    start=iso(self.start),
                )
        return self

    def exceeded(self, now: float) -> bool:
        """Whether the client is over quota now (new connections are refused)."""
        return self.current(now).state is QuotaState.EXCEEDED

    def add(self, count: int, now: float) -> None:
        """``count`` more bytes moved by one of the client's connections."""
        self.current(now)
        self.used += count
        self.version += 1
        if self.state is QuotaState.WITHIN and self.used >= self.limit:
            self._check()

    def _check(self) -> None:
        if self.state is QuotaState.WITHIN and self.limit and self.used >= self.limit:
            self.state = QuotaState.EXCEEDED
            self.exceeded_count += 1
            self._on_exceeded(self)
        elif self.state is QuotaState.EXCEEDED and self.used < self.limit:
            self.state = QuotaState.WITHIN

    def reset(self, now: float) -> None:
        """Start the current period's count over."""
        self.current(now)
        self.used = 0
        self.version += 1
        self.state = QuotaState.WITHIN

    def restore(self, saved: SavedUsage) -> bool:
        """Take a saved usage if it is of this period; False if it is stale."""
        if saved.period != self.period or saved.period_start != self.start:
            return False
        self.used = max(self.used, saved.used)
        self._check()
        return True

    @property
    def left(self) -> int:
        """Bytes left in the period (0 when over)."""
        return max(0, self.limit - self.used)

    def saved(self) -> SavedUsage:
        """What is kept across restarts."""
        return SavedUsage(self.period, self.start, self.used)

    def view(self) -> dict[str, Any]:
        """The fields ``GET /clients`` and the reset answer show."""
        return {
            "QuotaBytes": self.limit,
            "QuotaUsedBytes": self.used,
            "QuotaLeftBytes": self.left,
            "QuotaPeriod": self.period,
            "QuotaPeriodStart": iso(self.start),
            "QuotaPeriodEnd": iso(self.end),
            "QuotaExceeded": self.state is QuotaState.EXCEEDED,
        }


#: The quota fields of a client without a quota.
NO_QUOTA_VIEW: dict[str, Any] = {
    "QuotaBytes": None,
    "QuotaUsedBytes": None,
    "QuotaLeftBytes": None,
    "QuotaPeriod": None,
    "QuotaPeriodStart": None,
    "QuotaPeriodEnd": None,
    "QuotaExceeded": False,
}


class QuotaStore(Protocol):
    """Where usage is kept across restarts (the state file; etcd in a fleet)."""

    def load_quota(self) -> Mapping[str, SavedUsage]:
        """The usage saved last (empty when none)."""
        ...

    def save_quota(self, usage: Mapping[str, SavedUsage]) -> Deferred[None]:
        """Keep ``usage``; saves happen in the order asked."""
        ...


class QuotaBook:
    """The accounts of every client with a quota.

    ``policy_for(client_id)`` gives a client's policy; ``on_exceeded`` is
    told of each crossing (the gateway logs it, counts it, and cuts the
    running connections when the action says so).
    """

    def __init__(
        self,
        clock: IReactorTime,
        policy_for: Callable[[str], ClientPolicy],
        on_exceeded: Callable[[QuotaAccount], None],
    ) -> None:
        self.clock = clock
        self._policy_for = policy_for
        self._on_exceeded = on_exceeded
        self._accounts: dict[str, QuotaAccount] = {}
        #: Saved usage of clients whose account does not exist yet.
        self._pending: dict[str, SavedUsage] = {}

    def account(self, client_id: str) -> QuotaAccount | None:
        """The client's account (made on first use), or None without a quota."""
        account = self._accounts.get(client_id)
        if account is not None:
            return account
        policy = self._policy_for(client_id)
        if not policy.quota_bytes:
            return None
        now = self.clock.seconds()
        account = QuotaAccount(client_id, policy, now, self._on_exceeded)
        saved = self._pending.pop(client_id, None)
        if saved is not None:
            account.restore(saved)
        self._accounts[client_id] = account
        return account

    def known(self, client_id: str) -> bool:
        """Whether there is (or was saved) an account for the client."""
        return client_id in self._accounts or client_id in self._pending

    def accounts(self) -> list[QuotaAccount]:
        """Every account, rolled to the current period (for metrics)."""
        now = self.clock.seconds()
        return [a.current(now) for a in self._accounts.values()]

    def view(self, client_id: str) -> dict[str, Any]:
        """The client's quota fields for the API."""
        account = self.account(client_id)
        if account is None:
            return dict(NO_QUOTA_VIEW)
        return account.current(self.clock.seconds()).view()

    def reset(self, client_id: str) -> QuotaAccount | None:
        """Start the client's count over; None if it has no quota."""
        account = self.account(client_id)
        if account is None:
            return None
        was = account.used
        account.reset(self.clock.seconds())
        log.info(
            "client {client_id}: quota usage reset ({was} bytes used before)",
            client_id=client_id,
            was=was,
        )
        return account

    def restore(self, saved: Mapping[str, SavedUsage]) -> None:
        """Put saved usage back: for each client with a quota now, this period's."""
        for client_id, usage in saved.items():
            existing = self._accounts.get(client_id)
            if existing is not None:
                existing.restore(usage)
                continue
            self._pending[client_id] = usage
            if self.account(client_id) is None:
                # No quota now: the saved count means nothing any more.
                del self._pending[client_id]

    def usage(self) -> dict[str, SavedUsage]:
        """What to keep across a restart."""
        now = self.clock.seconds()
        kept = dict(self._pending)
        for client_id, account in self._accounts.items():
            kept[client_id] = account.current(now).saved()
        return kept

    @property
    def version(self) -> int:
        """Changes when any usage changed (a save can be skipped otherwise)."""
        return sum(a.version for a in self._accounts.values()) + len(self._accounts)


class QuotaKeeper:
    """Keeps a book's usage in a store: restored at start, saved every
    ``interval`` seconds (when it changed) and at stop.

    The store writes off the reactor thread and in order with the tunnel
    set (:class:`~threshold.server.statefile.StateFile`); a failed save is
    logged and tried again at the next interval.
    """

    def __init__(
        self,
        book: QuotaBook,
        store: QuotaStore | None,
        clock: IReactorTime,
        interval: float = 10.0,
    ) -> None:
        self.book = book
        self.store = store
        self.interval = interval
        self._loop = LoopingCall(self.save)
        self._loop.clock = clock
        self._saved_version: int | None = None

    def start(self) -> None:
        """Put the saved usage back and start saving."""
        if self.store is None:
            return
        self.book.restore(self.store.load_quota())
        self._saved_version = self.book.version
        self._loop.start(self.interval, now=False)

    def save(self) -> Deferred[None]:
        """Save the usage now if it changed since the last save."""
        if self.store is None:
            return succeed(None)
        version = self.book.version
        if version == self._saved_version:
            return succeed(None)

        def saved(_: object) -> None:
            self._saved_version = version

        def failed(failure: Any) -> None:
            log.error("cannot save quota usage: {why}", why=str(failure.value))

        d = self.store.save_quota(self.book.usage())
        d.addCallbacks(saved, failed)
        return d

    def stop(self) -> Deferred[None]:
        """Stop the timer and save what is left (the last counts)."""
        if self._loop.running:
            self._loop.stop()
        return self.save()
