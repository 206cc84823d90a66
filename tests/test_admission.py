"""Per-source shares of unauthenticated connections, and what a source is."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.addresses import UNKNOWN_SOURCE, source_key, source_of
from threshold.server.admission import Refusal, SourceShares


class SourceKeyTests(SynchronousTestCase):
    def test_ipv4(self):
        """An IPv4 address is its own source."""
        self.assertEqual(source_key("203.0.113.7"), "203.0.113.7")

    def test_ipv4_mapped(self):
        """On a dual-stack socket an IPv4 user counts as the IPv4 address."""
        self.assertEqual(source_key("::ffff:203.0.113.7"), "203.0.113.7")
        self.assertEqual(source_key("::ffff:cb00:7107"), "203.0.113.7")

    def test_ipv6_grouped_by_prefix(self):
        """Addresses of one /64 are one source; another /64 is another."""
        a = source_key("2001:db8:1:2::1")
        self.assertEqual(a, "2001:db8:1:2::/64")
        self.assertEqual(source_key("2001:db8:1:2:ffff:ffff:ffff:ffff"), a)
        self.assertNotEqual(source_key("2001:db8:1:3::1"), a)
        self.assertEqual(source_key("2001:db8:1:2::1", 48), "2001:db8:1::/48")
        self.assertEqual(source_key("2001:db8::1", 128), "2001:db8::1")

    def test_ipv6_zone_dropped(self):
        """A link-local zone does not make a new source."""
        self.assertEqual(source_key("fe80::1%eth0"), "fe80::/64")

    def test_not_an_address(self):
        """A host that is no IP address is kept as it is."""
        self.assertEqual(source_key("localhost"), "localhost")

    def test_twisted_addresses(self):
        """Twisted's address objects; a Unix socket or None is one source."""
        self.assertEqual(source_of(IPv4Address("TCP", "127.0.0.2", 5)), "127.0.0.2")
        self.assertEqual(
            source_of(IPv6Address("TCP", "::ffff:127.0.0.2", 5)), "127.0.0.2"
        )
        self.assertEqual(source_of(IPv6Address("TCP", "::1", 5)), "::/64")
        self.assertEqual(source_of(UNIXAddress(b"/tmp/x")), UNKNOWN_SOURCE)
        self.assertEqual(source_of(None), UNKNOWN_SOURCE)


class SharesTests(SynchronousTestCase):
    def test_per_source_cap(self):
        """A source gets at most its share; others still get in."""
        shares: SourceShares[str] = SourceShares(total=10, per_source=2)
        self.assertTrue(shares.admit("a", "a1").admitted)
        self.assertTrue(shares.admit("a", "a2").admitted)
        refused = shares.admit("a", "a3")
        self.assertFalse(refused.admitted)
        self.assertIs(refused.refusal, Refusal.PER_SOURCE)
        self.assertTrue(shares.admit("b", "b1").admitted)
        self.assertEqual((shares.count("a"), shares.count("b"), len(shares)), (2, 1, 3))

    def test_release(self):
        """A released slot can be taken again; releasing twice is harmless."""
        shares: SourceShares[str] = SourceShares(total=1, per_source=1)
        shares.admit("a", "a1")
        shares.release("a1")
        shares.release("a1")
        shares.release("stranger")
        self.assertEqual(len(shares), 0)
        self.assertEqual(shares.count("a"), 0)
        self.assertTrue(shares.admit("a", "a2").admitted)

    def test_total_cap_without_eviction(self):
        """Without eviction the total is a hard cap."""
        shares: SourceShares[str] = SourceShares(total=2, per_source=0)
        shares.admit("a", "a1")
        shares.admit("a", "a2")
        refused = shares.admit("b", "b1")
        self.assertIs(refused.refusal, Refusal.TOTAL)

    def test_eviction_takes_the_oldest_of_the_largest(self):
        """At the total, a small source takes the oldest slot of the largest."""
        shares: SourceShares[str] = SourceShares(total=4, per_source=3, evict=True)
        for holder in ("a1", "a2", "a3"):
            shares.admit("a", holder)
        shares.admit("b", "b1")
        admission = shares.admit("c", "c1")
        self.assertTrue(admission.admitted)
        self.assertEqual(admission.evicted, "a1")
        self.assertEqual(sorted(shares.holders()), ["a2", "a3", "b1", "c1"])

    def test_no_eviction_between_equals(self):
        """A source as large as the largest (or one short) is refused: a
        swap would only change who is short."""
        shares: SourceShares[str] = SourceShares(total=4, per_source=0, evict=True)
        for holder in ("a1", "a2", "b1", "b2"):
            shares.admit(holder[0], holder)
        self.assertIs(shares.admit("b", "b3").refusal, Refusal.TOTAL)
        shares.release("b2")
        shares.admit("c", "c1")
        # a holds 2, the newcomer's source c holds 1: refused.
        self.assertIs(shares.admit("c", "c2").refusal, Refusal.TOTAL)

    def test_many_sources_cannot_starve_a_newcomer(self):
        """Sources filling the total at their share still leave a way in."""
        shares: SourceShares[str] = SourceShares(total=100, per_source=8, evict=True)
        count = 0
        for source in range(13):
            for n in range(8):
                if shares.admit(f"attacker{source}", f"{source}-{n}").admitted:
                    count += 1
        self.assertEqual(len(shares), 100)
        admission = shares.admit("client", "real")
        self.assertTrue(admission.admitted)
        self.assertIsNotNone(admission.evicted)
        # The attackers refreshing their connections take back from each
        # other, never from the client (it holds the fewest).
        for n in range(200):
            refill = shares.admit(f"attacker{n % 13}", f"again-{n}")
            self.assertNotEqual(refill.evicted, "real")
        self.assertIn("real", shares.holders())
