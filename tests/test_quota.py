"""Quota accounting in memory: UTC periods, crossing, reset, what is saved."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from threshold.config.policy import ClientPolicy
from threshold.server import statefile
from threshold.server.quota import (
    QuotaAccount,
    QuotaBook,
    QuotaState,
    SavedUsage,
    iso,
    parse_iso,
    period_bounds,
)
from threshold.server.routes import parse_tunnels
from threshold.server.statefile import (
    StateFile,
    StateFileError,
    read_state,
    read_state_file,
    write_state,
)


def at(*parts: int) -> float:
    """A UTC time as seconds since the epoch."""
    return datetime(*parts, tzinfo=UTC).timestamp()


def month(limit: int = 1000, action: str = "refuse-new") -> ClientPolicy:
    return ClientPolicy(
        quota_bytes=limit, quota_period="month", quota_exceeded_action=action
    )


class PeriodTests(SynchronousTestCase):
    def test_month_bounds(self):
        """A month runs from the 1st 00:00 UTC to the next 1st, whatever its length."""
        self.assertEqual(
            period_bounds("month", at(2025, 2, 14, 13, 5)),
            (at(2025, 2, 1), at(2025, 3, 1)),
        )
        self.assertEqual(
            period_bounds("month", at(2024, 2, 29, 23, 59, 59)),
            (at(2024, 2, 1), at(2024, 3, 1)),
        )
        self.assertEqual(
            period_bounds("month", at(2025, 12, 31, 23, 59, 59)),
            (at(2025, 12, 1), at(2026, 1, 1)),
        )

    def test_month_boundary_is_exact(self):
        """The first second of a month belongs to it, the last one before to the old."""
        new = at(2025, 4, 1)
        self.assertEqual(period_bounds("month", new)[0], new)
        self.assertEqual(period_bounds("month", new - 0.001)[1], new)

    def test_day_bounds(self):
        """A day is 00:00 to 00:00 UTC."""
        self.assertEqual(
            period_bounds("day", at(2025, 3, 30, 1, 30)),
            (at(2025, 3, 30), at(2025, 3, 31)),
        )

    def test_unknown_period(self):
        """Only day and month exist."""
        with self.assertRaises(ValueError):
            period_bounds("week", 0.0)

    def test_iso_round_trip(self):
        """Times are written as the API writes them and read back."""
        self.assertEqual(iso(at(2025, 1, 2, 3, 4, 5)), "2025-01-02T03:04:05Z")
        self.assertEqual(parse_iso("2025-01-02T03:04:05Z"), at(2025, 1, 2, 3, 4, 5))
        with self.assertRaises(ValueError):
            parse_iso("2025-01-02 03:04:05")


class AccountTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.crossed: list[QuotaAccount] = []

    def account(self, policy: ClientPolicy, now: float) -> QuotaAccount:
        return QuotaAccount("c", policy, now, self.crossed.append)

    def test_crossing_once(self):
        """Reaching the limit crosses once; more bytes do not cross again."""
        a = self.account(month(1000), at(2025, 5, 10))
        a.add(999, at(2025, 5, 10))
        self.assertFalse(a.exceeded(at(2025, 5, 10)))
        a.add(1, at(2025, 5, 10))
        self.assertTrue(a.exceeded(at(2025, 5, 10)))
        a.add(500, at(2025, 5, 10))
        self.assertEqual(self.crossed, [a])
        self.assertEqual((a.used, a.left), (1500, 0))

    def test_new_month_starts_over(self):
        """At the month's end the count restarts and the client is admitted again."""
        a = self.account(month(100), at(2025, 1, 31, 23, 59))
        a.add(100, at(2025, 1, 31, 23, 59))
        self.assertTrue(a.exceeded(at(2025, 1, 31, 23, 59, 59)))
        self.assertFalse(a.exceeded(at(2025, 2, 1)))
        self.assertEqual(a.used, 0)
        self.assertEqual(a.view()["QuotaPeriodStart"], "2025-02-01T00:00:00Z")
        self.assertEqual(a.view()["QuotaPeriodEnd"], "2025-03-01T00:00:00Z")
        # Bytes after the boundary count to the new month.
        a.add(30, at(2025, 2, 1, 0, 0, 1))
        self.assertEqual(a.used, 30)

    def test_reset(self):
        """A reset starts the current period's count over."""
        a = self.account(month(10), at(2025, 6, 1))
        a.add(50, at(2025, 6, 1))
        a.reset(at(2025, 6, 2))
        self.assertEqual(a.state, QuotaState.WITHIN)
        self.assertEqual(a.view()["QuotaUsedBytes"], 0)
        a.add(10, at(2025, 6, 2))
        self.assertEqual(len(self.crossed), 2)

    def test_restore_only_the_same_period(self):
        """Saved usage of this period is taken; of an older one, not."""
        now = at(2025, 7, 15)
        a = self.account(month(1000), now)
        self.assertFalse(a.restore(SavedUsage("month", at(2025, 6, 1), 900)))
        self.assertFalse(a.restore(SavedUsage("day", at(2025, 7, 15), 900)))
        self.assertEqual(a.used, 0)
        self.assertTrue(a.restore(SavedUsage("month", at(2025, 7, 1), 1200)))
        self.assertEqual(a.used, 1200)
        self.assertTrue(a.exceeded(now))

    def test_raised_limit_readmits(self):
        """A higher QuotaBytes (a new config) brings the client back within."""
        now = at(2025, 7, 15)
        a = self.account(month(100), now)
        a.add(150, now)
        a.set_policy(month(1000), now)
        self.assertFalse(a.exceeded(now))
        a.set_policy(ClientPolicy(quota_bytes=1000, quota_period="day"), now)
        self.assertEqual(a.view()["QuotaPeriodStart"], "2025-07-15T00:00:00Z")

    def test_view(self):
        """The API fields: limit, used, left, period and its bounds."""
        a = self.account(month(1000), at(2025, 2, 3))
        a.add(300, at(2025, 2, 3))
        self.assertEqual(
            a.view(),
            {
                "QuotaBytes": 1000,
                "QuotaUsedBytes": 300,
                "QuotaLeftBytes": 700,
                "QuotaPeriod": "month",
                "QuotaPeriodStart": "2025-02-01T00:00:00Z",
                "QuotaPeriodEnd": "2025-03-01T00:00:00Z",
                "QuotaExceeded": False,
            },
        )


class BookTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(at(2025, 8, 20, 12))
        self.policies = {"q": month(1000)}
        self.crossed: list[str] = []
        self.book = QuotaBook(
            self.clock,
            lambda cid: self.policies.get(cid, ClientPolicy()),
            lambda a: self.crossed.append(a.client_id),
        )

    def test_only_clients_with_a_quota(self):
        """A client without QuotaBytes has no account and null fields."""
        self.assertIsNone(self.book.account("free"))
        self.assertIsNone(self.book.view("free")["QuotaBytes"])
        self.assertIsNone(self.book.reset("free"))
        self.assertEqual(self.book.view("q")["QuotaBytes"], 1000)

    def test_usage_saved_and_restored(self):
        """What a book saves, a new book (a restart) restores, same period only."""
        self.book.account("q").add(400, self.clock.seconds())
        saved = self.book.usage()
        self.assertEqual(saved["q"], SavedUsage("month", at(2025, 8, 1), 400))
        self.assertEqual(
            saved["q"].to_json(),
            {
                "Period": "month",
                "PeriodStart": "2025-08-01T00:00:00Z",
                "UsedBytes": 400,
            },
        )
        other = QuotaBook(self.clock, lambda cid: self.policies[cid], lambda a: None)
        other.restore(saved)
        self.assertEqual(other.view("q")["QuotaUsedBytes"], 400)
        self.clock.advance(30 * 86400)  # into September
        later = QuotaBook(self.clock, lambda cid: self.policies[cid], lambda a: None)
        later.restore(saved)
        self.assertEqual(later.view("q")["QuotaUsedBytes"], 0)

    def test_restore_drops_clients_without_quota(self):
        """Saved usage of a client that has no quota any more is dropped."""
        self.book.restore({"gone": SavedUsage("month", at(2025, 8, 1), 5)})
        self.assertFalse(self.book.known("gone"))
        self.assertEqual(self.book.usage(), {})

    def test_restore_over_limit_refuses(self):
        """A restored count over the limit leaves the client over quota."""
        self.book.restore({"q": SavedUsage("month", at(2025, 8, 1), 1000)})
        self.assertTrue(self.book.account("q").exceeded(self.clock.seconds()))
        self.assertEqual(self.crossed, ["q"])

    def test_version_moves_with_usage(self):
        """The version changes with every count, so idle saves can be skipped."""
        self.book.account("q")
        v = self.book.version
        self.assertEqual(self.book.version, v)
        self.book.account("q").add(1, self.clock.seconds())
        self.assertNotEqual(self.book.version, v)


def at_once(f, *args):
    """A thread runner that runs in the caller's thread."""
    return maybeDeferred(f, *args)


TUNNELS = parse_tunnels([{"ClientId": "a", "ListenPort": 9000, "BackEndService": "s"}])
USAGE = {"a": SavedUsage("month", at(2025, 8, 1), 1234)}


class StateFileTests(SynchronousTestCase):
    """Quota usage kept in the state file, next to the tunnel set."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "state.json")

    def test_round_trip(self):
        """Tunnels and usage read back as written; the file is an object then."""
        write_state(self.path, TUNNELS, USAGE)
        state = read_state_file(self.path)
        self.assertEqual(state.tunnels, TUNNELS)
        self.assertEqual(dict(state.quota), USAGE)
        with open(self.path) as f:
            body = json.load(f)
        self.assertEqual(set(body), {"Tunnels", "QuotaUsage"})
        self.assertEqual(read_state(self.path), TUNNELS)

    def test_without_usage_the_old_form(self):
        """With no usage the file stays the plain list older versions read."""
        write_state(self.path, TUNNELS, {})
        with open(self.path) as f:
            self.assertIsInstance(json.load(f), list)
        self.assertEqual(dict(read_state_file(self.path).quota), {})

    def test_quota_save_keeps_the_tunnels(self):
        """A usage save writes back the set read or saved last, never another."""
        write_state(self.path, TUNNELS)
        state = StateFile(self.path, at_once)
        self.assertEqual(dict(state.load_quota()), {})
        self.successResultOf(state.save_quota(USAGE))
        self.assertEqual(read_state(self.path), TUNNELS)
        self.successResultOf(state.save([]))
        saved = read_state_file(self.path)
        self.assertEqual((saved.tunnels, dict(saved.quota)), ([], USAGE))

    def test_in_order_with_tunnel_saves(self):
        """Usage and tunnel saves run one at a time in the order asked."""
        started: list[tuple] = []
        pending: list[Deferred[None]] = []

        def runner(f, *args):
            started.append(args[1:])
            pending.append(Deferred())
            return pending[-1]

        state = StateFile("unused", runner)
        state.save(TUNNELS)
        state.save_quota(USAGE)
        self.assertEqual(len(started), 1)
        pending[0].callback(None)
        # The usage save carries the set saved just before it.
        self.assertEqual(started[1], (TUNNELS, USAGE))

    def test_failed_tunnel_save_is_not_written_back(self):
        """A tunnel save that failed is not what the next usage save writes."""
        write_state(self.path, TUNNELS)
        state = StateFile(self.path, at_once)
        state.load_quota()

        real = os.fsync

        def broken(*args):
            raise OSError(28, "No space left on device")

        self.patch(statefile.os, "fsync", broken)
        self.failureResultOf(state.save([]), StateFileError)
        self.patch(statefile.os, "fsync", real)
        self.successResultOf(state.save_quota(USAGE))
        self.assertEqual(read_state(self.path), TUNNELS)

    def test_bad_usage_named(self):
        """A damaged QuotaUsage is refused naming the client and what is wrong."""
        good = {
            "Period": "month",
            "PeriodStart": "2025-08-01T00:00:00Z",
            "UsedBytes": 5,
        }
        cases = [
            ({"a": dict(good, Period="week")}, 'QuotaUsage.a": expected "day"'),
            ({"a": dict(good, UsedBytes=-1)}, "expected a byte count"),
            ({"a": dict(good, UsedBytes=True)}, "expected a byte count"),
            ({"a": dict(good, PeriodStart="yesterday")}, "expected a UTC time"),
            ({"a": {"Period": "month"}}, "expected {"),
            ({"a@b": good}, "invalid ClientId"),
            ([], "QuotaUsage: expected an object"),
        ]
        for usage, words in cases:
            with open(self.path, "w") as f:
                json.dump({"Tunnels": [], "QuotaUsage": usage}, f)
            with self.assertRaises(StateFileError, msg=words) as caught:
                read_state_file(self.path)
            self.assertIn(words, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith(self.path))
        with open(self.path, "w") as f:
            json.dump({"Tunnels": [], "Colour": 1}, f)
        with self.assertRaisesRegex(StateFileError, "unknown key"):
            read_state_file(self.path)
        with open(self.path, "w") as f:
            json.dump({"QuotaUsage": {}}, f)
        with self.assertRaisesRegex(StateFileError, "saved state object"):
            read_state_file(self.path)
