"""Tests for threshold.server.balance: the balance modes on plain values."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.balance import Balance, order, serving

CLIENTS = ["home-a", "home-b", "home-c", "home-d"]

healthy_sets = st.lists(
    st.sampled_from(CLIENTS), min_size=1, max_size=4, unique=True
).map(lambda picked: [c for c in CLIENTS if c in picked])


def spread(counts: Counter[str], clients: list[str], total: int) -> float:
    """The largest distance from an even share, as a fraction of it."""
    even = total / len(clients)
    return max(abs(counts[c] - even) for c in clients) / even


class FailoverTests(SynchronousTestCase):
    def test_first_healthy_serves(self):
        """Failover: the first healthy client in list order, the rest behind."""
        self.assertEqual(order(Balance.FAILOVER, ["a", "b", "c"]), ["a", "b", "c"])
        self.assertEqual(serving(Balance.FAILOVER, ["a", "b", "c"]), ("a",))

    def test_every_turn_the_same(self):
        """Failover ignores the turn and the counts."""
        for turn in range(5):
            self.assertEqual(
                order(Balance.FAILOVER, ["a", "b"], {"a": 100}, turn)[0], "a"
            )

    def test_failover_and_return(self):
        """When the first falls out the next serves; when it is back it serves."""
        self.assertEqual(serving(Balance.FAILOVER, ["b", "c"]), ("b",))
        self.assertEqual(order(Balance.FAILOVER, ["b", "c"]), ["b", "c"])
        self.assertEqual(serving(Balance.FAILOVER, ["a", "b", "c"]), ("a",))

    def test_nobody_healthy(self):
        """No healthy client: no candidate, nobody serving, in every mode."""
        for mode in Balance:
            self.assertEqual(order(mode, [], {}, 3), [])
            self.assertEqual(serving(mode, []), ())

    def test_values_are_the_api(self):
        """The modes' names are the API's."""
        self.assertEqual(
            [m.value for m in Balance],
            ["failover", "round-robin", "least-connections"],
        )


class RoundRobinTests(SynchronousTestCase):
    def test_rotation(self):
        """Round-robin: each turn starts one client further, every client listed."""
        picks = [order(Balance.ROUND_ROBIN, ["a", "b", "c"], None, t) for t in range(4)]
        self.assertEqual(
            picks,
            [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]],
        )

    def test_serving_is_every_healthy(self):
        """Every healthy client receives traffic."""
        self.assertEqual(serving(Balance.ROUND_ROBIN, ["a", "c"]), ("a", "c"))
        self.assertEqual(serving(Balance.LEAST_CONNECTIONS, ["b"]), ("b",))

    @given(healthy_sets)
    def test_thousand_picks_even(self, healthy):
        """1,000 picks over the healthy clients: each within 10% of even."""
        counts = Counter(
            order(Balance.ROUND_ROBIN, healthy, None, t)[0] for t in range(1000)
        )
        self.assertEqual(set(counts), set(healthy))
        self.assertLessEqual(spread(counts, healthy, 1000), 0.1)

    @given(healthy_sets, st.integers(0, 10**6))
    def test_candidates_are_the_healthy(self, healthy, turn):
        """Every mode lists each healthy client once, and nothing else."""
        for mode in Balance:
            self.assertEqual(sorted(order(mode, healthy, {}, turn)), sorted(healthy))


class LeastConnectionsTests(SynchronousTestCase):
    def test_fewest_first(self):
        """The client with the fewest open connections comes first."""
        self.assertEqual(
            order(Balance.LEAST_CONNECTIONS, ["a", "b", "c"], {"a": 3, "b": 1, "c": 2}),
            ["b", "c", "a"],
        )

    def test_ties_in_turn(self):
        """Equal counts are taken in turn, so short connections spread too."""
        firsts = [
            order(Balance.LEAST_CONNECTIONS, ["a", "b"], {"a": 1, "b": 1}, t)[0]
            for t in range(4)
        ]
        self.assertEqual(firsts, ["a", "b", "a", "b"])

    def test_absent_counts_are_zero(self):
        """A client without a count has none open."""
        self.assertEqual(
            order(Balance.LEAST_CONNECTIONS, ["a", "b"], {"a": 2}, 0), ["b", "a"]
        )

    @given(healthy_sets, st.integers(0, 50))
    def test_thousand_held_connections_even(self, healthy, seed):
        """1,000 connections held open: each client within 10% of even."""
        counts: Counter[str] = Counter()
        for t in range(1000):
            counts[order(Balance.LEAST_CONNECTIONS, healthy, counts, t + seed)[0]] += 1
        self.assertLessEqual(spread(counts, healthy, 1000), 0.1)

    def test_sequential_short_connections_alternate(self):
        """Connections closed at once: in turn, not all on the first client."""
        counts = Counter(
            order(Balance.LEAST_CONNECTIONS, ["a", "b"], {}, t)[0] for t in range(1000)
        )
        self.assertEqual(counts, {"a": 500, "b": 500})
