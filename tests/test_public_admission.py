"""Per-tunnel and per-source caps of public connections, as pure logic."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.public_admission import PublicAdmission
from threshold.server.stats import Limit, Refusal

GROUP = ("::", 9000)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40000)


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


class SourceTests(SynchronousTestCase):
    def test_ipv6_loopback_grouped_by_prefix(self):
        """::1 and ::2 share the /64 ::/64; with a /128 they are apart."""
        admission = PublicAdmission(max_per_source=1)
        self.assertIsNone(admission.admit("a", GROUP, v6("::1")))
        denied = admission.admit("b", GROUP, v6("::2"))
        self.assertEqual(denied.reason, Refusal.LIMIT_SOURCE_IP)
        self.assertEqual(denied.limit, Limit.CONNECTIONS_PER_SOURCE_IP)
        self.assertIn("::/64", denied.why)
        self.assertEqual(admission.source_count("::/64"), 1)
        apart = PublicAdmission(max_per_source=1, ipv6_prefix=128)
        self.assertIsNone(apart.admit("a", GROUP, v6("::1")))
        self.assertIsNone(apart.admit("b", GROUP, v6("::2")))

    def test_ipv4_mapped_is_ipv4(self):
        """::ffff:127.0.0.1 and 127.0.0.1 are one source, whatever the prefix."""
        admission = PublicAdmission(max_per_source=2, ipv6_prefix=8)
        self.assertIsNone(admission.admit("a", GROUP, v6("::ffff:127.0.0.1")))
        self.assertIsNone(admission.admit("b", ("127.0.0.1", 1), v4("127.0.0.1")))
        self.assertIsNotNone(admission.admit("c", GROUP, v4("127.0.0.1")))
        self.assertIsNone(admission.admit("d", GROUP, v4("127.0.0.2")))
        self.assertEqual(admission.source_count("127.0.0.1"), 2)

    def test_release(self):
        """Releasing frees the slot once; a stranger or a second release: False."""
        admission = PublicAdmission(max_per_tunnel=1, max_per_source=1)
        self.assertIsNone(admission.admit("a", GROUP, v4("192.0.2.1")))
        denied = admission.admit("b", GROUP, v4("192.0.2.2"))
        self.assertEqual(denied.reason, Refusal.LIMIT_TUNNEL)
        self.assertTrue(admission.release("a"))
        self.assertFalse(admission.release("a"))
        self.assertFalse(admission.release("b"))
        self.assertEqual(len(admission), 0)
        self.assertIsNone(admission.admit("b", GROUP, v4("192.0.2.1")))

    def test_no_limits_still_count(self):
        """0 means no limit; connections are still counted (and released)."""
        admission = PublicAdmission()
        for i in range(50):
            self.assertIsNone(admission.admit(i, GROUP, v4("192.0.2.1")))
        self.assertEqual(admission.source_count("192.0.2.1"), 50)

    def test_peer_without_address(self):
        """A peer with no IP (a Unix socket) is one "unknown" source."""
        admission = PublicAdmission(max_per_source=1)
        self.assertIsNone(admission.admit("a", GROUP, UNIXAddress(None)))
        self.assertIsNotNone(admission.admit("b", GROUP, UNIXAddress(None)))
