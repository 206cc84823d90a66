"""The access policy as logic: CIDR lists, the rate limiter, the checks' order."""

from __future__ import annotations

import ipaddress
import random

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from threshold.config import ConfigError, parse_server_config
from threshold.config.policy import ClientPolicy
from threshold.schema.policy_kinds import CIDR_LIST, parse_ip
from threshold.server.policy import GatewayPolicy, HitLog, PolicySettings
from threshold.server.routes import TunnelError, parse_tunnels
from threshold.server.sources import SourceRateLimiter, source_refusal
from threshold.server.stats import Flow, GatewayStats, Limit, Refusal


def cidrs(*items: str):
    return CIDR_LIST.check(list(items))


def tunnel(**fields):
    entry = {"ListenPort": 9000, "BackEndService": "web"}
    entry.update(fields)
    if "ClientIds" not in entry:
        entry["ClientId"] = "c"
    return parse_tunnels([entry])[0]


def v4(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


def v6(host: str) -> IPv6Address:
    return IPv6Address("TCP", host, 40000)


class CidrTests(SynchronousTestCase):
    def test_normal_form_written_back(self):
        """CIDRs are written back normalised; mapped IPv6 ones as IPv4."""
        t = tunnel(
            DenySourceCidrs=["2001:DB8::/32", "192.0.2.7", "::ffff:198.51.100.0/120"]
        )
        self.assertEqual(
            t.to_json()["DenySourceCidrs"],
            ["2001:db8::/32", "192.0.2.7/32", "198.51.100.0/24"],
        )
        # What GET /tunnels writes, PUT /tunnels takes back unchanged.
        self.assertEqual(parse_tunnels([t.to_json()])[0], t)

    def test_errors_name_entry_and_field(self):
        """A bad CIDR is refused naming the entry, the field and the position."""
        cases = [
            ("DenySourceCidrs", ["10.0.0.0/8", "10.1.2.3/8"], "host bits set"),
            ("AllowSourceCidrs", ["300.0.0.0/8"], "is not a CIDR"),
            ("AllowSourceCidrs", ["10.0.0.0/33"], "is not a CIDR"),
            ("AllowSourceCidrs", [""], "expected a CIDR"),
            ("AllowSourceCidrs", [" 10.0.0.0/8"], "is not a CIDR"),
            ("DenySourceCidrs", "10.0.0.0/8", "expected a list of CIDRs"),
            ("DenySourceCidrs", [7], "expected a CIDR"),
        ]
        for name, value, words in cases:
            entry = {"ClientId": "c", "ListenPort": 1, "BackEndService": "b"}
            with self.assertRaises(TunnelError, msg=name) as caught:
                parse_tunnels([entry, dict(entry, ListenPort=2, **{name: value})])
            error = caught.exception
            self.assertEqual(error.status, 400)
            self.assertEqual(error.index, 1)
            self.assertTrue(error.field.startswith(name), error.field)
            self.assertIn(words, error.message)
            self.assertTrue(error.message.startswith("entry 1: field"), error.message)

    def test_host_bits_suggests_the_network(self):
        """A CIDR with host bits says which one was meant."""
        with self.assertRaises(TunnelError) as caught:
            tunnel(DenySourceCidrs=["192.168.1.77/24"])
        self.assertIn('did you mean "192.168.1.0/24"', caught.exception.message)
        self.assertEqual(caught.exception.field, "DenySourceCidrs[0]")

    def test_matches_as_a_linear_scan_would(self):
        """1,000 random CIDRs match exactly what ip_network membership says."""
        rng = random.Random(15)
        nets = []
        for _ in range(600):
            length = rng.randint(8, 32)
            nets.append(
                ipaddress.ip_network((rng.getrandbits(32), length), strict=False)
            )
        for _ in range(400):
            length = rng.randint(16, 128)
            nets.append(
                ipaddress.ip_network((rng.getrandbits(128), length), strict=False)
            )
        compiled = cidrs(*(str(n) for n in nets))
        self.assertEqual(len(compiled), 1000)
        probes = [ipaddress.ip_address(n.network_address) for n in nets[::7]]
        probes += [ipaddress.IPv4Address(rng.getrandbits(32)) for _ in range(3000)]
        probes += [ipaddress.IPv6Address(rng.getrandbits(128)) for _ in range(500)]
        for probe in probes:
            expected = any(probe in n for n in nets if n.version == probe.version)
            got = compiled.matches(parse_ip(str(probe)))
            self.assertEqual(got, expected, str(probe))

    def test_ipv4_mapped_matched_as_ipv4(self):
        """::ffff:a.b.c.d is matched against IPv4 CIDRs, never IPv6 ones."""
        self.assertEqual(parse_ip("::ffff:192.0.2.1"), parse_ip("192.0.2.1"))
        self.assertTrue(cidrs("192.0.2.0/24").matches(parse_ip("::ffff:192.0.2.1")))
        self.assertFalse(cidrs("::/0").matches(parse_ip("::ffff:192.0.2.1")))
        self.assertTrue(cidrs("::/0").matches(parse_ip("::1")))

    def test_parse_ip(self):
        """Zones are dropped; what is not an address is None."""
        self.assertEqual(parse_ip("fe80::1%eth0"), parse_ip("fe80::1"))
        self.assertEqual(parse_ip("10.0.0.1"), (4, 0x0A000001))
        for bad in ("", "example.com", "10.0.0.256", "1::2::3"):
            self.assertIsNone(parse_ip(bad), bad)

    def test_deny_wins_and_every_allow_list_counts(self):
        """Deny beats allow; each non-empty allow list must hold the source."""
        source = parse_ip("192.0.2.9")
        wide, narrow = cidrs("192.0.2.0/24"), cidrs("192.0.2.9/32")
        none = cidrs()
        self.assertIsNone(source_refusal(source, [none], [wide, none, narrow]))
        self.assertEqual(
            source_refusal(source, [narrow], [wide]), Refusal.DENIED_SOURCE
        )
        self.assertEqual(
            source_refusal(source, [], [wide, cidrs("10.0.0.0/8")]),
            Refusal.NOT_ALLOWED_SOURCE,
        )
        # A peer with no IP address is refused wherever an allow list is set.
        self.assertIsNone(source_refusal(None, [narrow], []))
        self.assertEqual(source_refusal(None, [], [wide]), Refusal.NOT_ALLOWED_SOURCE)


class RateLimiterTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """A source gets its burst at once, then one per 1/rate seconds."""
        limiter = SourceRateLimiter(1024)
        now = 100.0
        results = [limiter.allow("a", 2.0, 3, now) for _ in range(5)]
        self.assertEqual(results, [True, True, True, False, False])
        self.assertTrue(limiter.allow("a", 2.0, 3, now + 0.5))
        self.assertFalse(limiter.allow("a", 2.0, 3, now + 0.6))

    def test_other_sources_untouched(self):
        """One source flooding leaves another's bucket full."""
        limiter = SourceRateLimiter(1024)
        flooded = sum(limiter.allow("flood", 10.0, 10, 0.0) for _ in range(1000))
        self.assertEqual(flooded, 10)
        self.assertTrue(all(limiter.allow("calm", 10.0, 10, 0.0) for _ in range(10)))

    def test_full_buckets_are_dropped(self):
        """A bucket that is full again is forgotten when new keys come."""
        limiter = SourceRateLimiter(1024)
        for i in range(100):
            limiter.allow(i, 1.0, 1, 0.0)
        self.assertEqual(len(limiter), 100)
        limiter.allow("new", 1.0, 1, 10.0)
        self.assertEqual(len(limiter), 1)

    def test_bounded_under_a_flood_of_addresses(self):
        """A million new sources in one second hold at most the bound."""
        limiter = SourceRateLimiter(1024)
        for i in range(1_000_000 // 100):
            limiter.allow(i, 1.0, 5, i / 10000)
        self.assertLessEqual(len(limiter), 1024)
        self.assertGreater(limiter.evicted, 0)


class HitLogTests(SynchronousTestCase):
    def test_once_a_minute_with_the_count(self):
        """The first hit is logged, the next within a minute counted, then said."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        hits = HitLog(clock)
        self.assertTrue(hits.hit("tunnel x", "rate_limited", "from 192.0.2.1"))
        for _ in range(50):
            self.assertFalse(hits.hit("tunnel x", "rate_limited", "again"))
        self.assertTrue(hits.hit("tunnel x", "denied_source", "other reason"))
        clock.advance(60)
        self.assertTrue(hits.hit("tunnel x", "rate_limited", "later"))
        lines = [e for e in events if e.get("subject") == "tunnel x"]
        self.assertEqual(len(lines), 3)
        self.assertIn("50 more", lines[-1]["more"])


class GatewayPolicyTests(SynchronousTestCase):
    def policy(self, **settings) -> GatewayPolicy:
        self.clock = Clock()
        self.clock.advance(1_750_000_000)
        self.stats = GatewayStats()
        return GatewayPolicy(PolicySettings(**settings), self.clock, self.stats)

    def test_nothing_set_admits_all(self):
        """With no policy anywhere every connection passes, nothing counted."""
        policy = self.policy()
        for peer in (v4("192.0.2.1"), v6("::1"), UNIXAddress(None)):
            self.assertIsNone(policy.check(peer, tunnel(), ["c"]))
        self.assertEqual(sum(self.stats.refused.values()), 0)

    def test_lists_of_every_level(self):
        """Gateway, client and tunnel lists all apply, counted per tunnel/client."""
        policy = self.policy(
            default_deny=cidrs("203.0.113.0/24"),
            client_policies={"c": ClientPolicy(deny_source_cidrs=cidrs("192.0.2.66"))},
        )
        t = tunnel(AllowSourceCidrs=["192.0.2.0/24", "2001:db8::/32"])
        cases = [
            ("203.0.113.5", Refusal.DENIED_SOURCE),
            ("192.0.2.66", Refusal.DENIED_SOURCE),
            ("198.51.100.1", Refusal.NOT_ALLOWED_SOURCE),
            ("192.0.2.1", None),
            ("2001:db8::1", None),
            ("::ffff:192.0.2.1", None),
            ("::ffff:203.0.113.5", Refusal.DENIED_SOURCE),
        ]
        for host, reason in cases:
            peer = v6(host) if ":" in host else v4(host)
            denied = policy.check(peer, t, ["c"])
            self.assertEqual(denied.reason if denied else None, reason, host)
        self.assertEqual(self.stats.refused[Refusal.DENIED_SOURCE], 3)
        self.assertEqual(self.stats.refused[Refusal.NOT_ALLOWED_SOURCE], 1)
        self.assertEqual(policy.refused(tunnel=t.key)["denied_source"], 3)
        self.assertEqual(policy.refused(client_id="c")["not_allowed_source"], 1)

    def test_client_policy_filters_candidates(self):
        """A client whose list refuses the source is skipped; the next serves."""
        policy = self.policy(
            client_policies={"a": ClientPolicy(deny_source_cidrs=cidrs("192.0.2.0/24"))}
        )
        t = tunnel(ClientIds=["a", "b"])
        candidates = ["a", "b"]
        self.assertIsNone(policy.check(v4("192.0.2.1"), t, candidates))
        self.assertEqual(candidates, ["b"])
        only = ["a"]
        denied = policy.check(v4("192.0.2.1"), t, only)
        self.assertEqual(denied.reason, Refusal.DENIED_SOURCE)
        self.assertEqual(policy.refused(client_id="a")["denied_source"], 1)

    def test_quota_exceeded_refuses_new(self):
        """A client over its quota gets no new connection."""
        policy = self.policy(client_policies={"c": ClientPolicy(quota_bytes=100)})
        self.assertIsNone(policy.check(v4("192.0.2.1"), tunnel(), ["c"]))
        policy.quota.account("c").add(100, self.clock.seconds())
        denied = policy.check(v4("192.0.2.1"), tunnel(), ["c"])
        self.assertEqual(denied.reason, Refusal.QUOTA_EXCEEDED)
        self.assertEqual(self.stats.limits_hit[Limit.QUOTA], 1)
        policy.reset_quota("c")
        self.assertIsNone(policy.check(v4("192.0.2.1"), tunnel(), ["c"]))

    def test_rate_per_tunnel_and_source(self):
        """The rate applies per (tunnel, source); IPv6 by /64; null: gateway's."""
        policy = self.policy(default_rate=1.0, default_burst=2)
        inherit = tunnel()
        own = tunnel(ListenPort=9001, MaxNewConnectionsPerSecondPerSourceIp=5)
        off = tunnel(ListenPort=9002, MaxNewConnectionsPerSecondPerSourceIp=0)
        peer = v4("192.0.2.1")
        ok = [policy.check(peer, inherit, ["c"]) is None for _ in range(4)]
        self.assertEqual(ok, [True, True, False, False])
        ok = [policy.check(peer, own, ["c"]) is None for _ in range(6)]
        self.assertEqual(ok, [True] * 5 + [False])
        self.assertTrue(all(policy.check(peer, off, ["c"]) is None for _ in range(50)))
        # ::1 and ::2 are one /64 source; another /64 is not.
        results = [policy.check(v6(h), inherit, ["c"]) for h in ("::1", "::2", "::3")]
        self.assertEqual([r is None for r in results], [True, True, False])
        self.assertIsNone(policy.check(v6("2001:db8:0:1::1"), inherit, ["c"]))
        self.assertEqual(self.stats.refused[Refusal.RATE_LIMITED], 4)
        self.assertEqual(self.stats.limits_hit[Limit.NEW_CONNECTION_RATE], 4)

    def test_order_deny_before_rate(self):
        """A denied source does not use up its rate tokens."""
        policy = self.policy(default_rate=1.0, default_burst=1)
        t = tunnel(DenySourceCidrs=["192.0.2.0/24"])
        for _ in range(5):
            denied = policy.check(v4("192.0.2.1"), t, ["c"])
            self.assertEqual(denied.reason, Refusal.DENIED_SOURCE)
        self.assertEqual(len(policy.limiter), 0)


class ConfigTests(SynchronousTestCase):
    def parse(self, **fields):
        return parse_server_config(dict(UseTls=False, **fields), "server.json")

    def test_defaults(self):
        """No policy field: nothing is limited."""
        config = self.parse()
        settings = PolicySettings.from_config(config)
        self.assertFalse(settings.default_deny)
        self.assertEqual(settings.default_rate, 0)
        self.assertEqual(dict(settings.client_policies), {})
        self.assertTrue(settings.default_client.empty)
        self.assertEqual(settings.max_sources, 65536)

    def test_client_policies(self):
        """ClientPolicies maps a ClientId to its policy; others take the default."""
        config = self.parse(
            ClientPolicies={"home-a": {"QuotaBytes": 10**9, "QuotaPeriod": "day"}},
            DefaultClientPolicy={"BandwidthBytesPerSecond": 1000},
        )
        policy = GatewayPolicy(
            PolicySettings.from_config(config), Clock(), GatewayStats()
        )
        self.assertEqual(policy.client_policy("home-a").quota_bytes, 10**9)
        self.assertEqual(policy.client_policy("home-a").bandwidth, 0)
        self.assertEqual(policy.client_policy("other").bandwidth, 1000)

    def test_errors_name_the_field(self):
        """Config mistakes name the client and the field."""
        policies = "ClientPolicies"
        rate = "DefaultMaxNewConnectionsPerSecondPerSourceIp"
        cases = [
            ({policies: {"a": {"QuotaPeriod": "week"}}}, f"{policies}.a.QuotaPeriod"),
            ({policies: {"a": {"Quota": 1}}}, f"{policies}.a"),
            ({policies: {"a": {"QuotaBytes": -1}}}, f"{policies}.a.QuotaBytes"),
            ({policies: {"a@b": {}}}, policies),
            ({policies: []}, policies),
            (
                {"DefaultClientPolicy": {"QuotaExceededAction": "drop"}},
                "DefaultClientPolicy.QuotaExceededAction",
            ),
            ({"DefaultDenySourceCidrs": ["10.0.0.1/8"]}, "DefaultDenySourceCidrs[0]"),
            ({rate: -1}, rate),
            ({"RateLimitMaxSources": 10}, "RateLimitMaxSources"),
        ]
        for fields, name in cases:
            with self.assertRaises(ConfigError, msg=name) as caught:
                self.parse(**fields)
            self.assertEqual(caught.exception.field, name, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith("server.json: field"))


class Transport:
    """A user's transport or a stream: records pauses."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False


class Connection:
    """What the policy sees of a relayed user connection."""

    def __init__(self, client_id: str = "c") -> None:
        self.transport = Transport()
        self.peer = type("StreamEnd", (), {"transport": Transport(), "reading": None})()
        self.flow = Flow(("127.0.0.1", 9000, "*"), client_id)
        self.cut = False

    def give_up(self, abort: bool = False) -> None:
        self.cut = abort


class MeterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = GatewayStats()

    def policy(self, **settings) -> GatewayPolicy:
        return GatewayPolicy(PolicySettings(**settings), self.clock, self.stats)

    def test_no_limit_no_meter(self):
        """Without bandwidth or quota a connection has no meter at all."""
        self.assertIsNone(self.policy().meter(Connection(), tunnel()))

    def test_upload_and_download_paused_apart(self):
        """The user's transport pauses for upload, the stream for download."""
        policy = self.policy()
        conn = Connection()
        meter = policy.meter(conn, tunnel(BandwidthBytesPerSecond=1000))
        conn.flow.bytes_in += 5000
        meter.upload(5000)
        self.assertTrue(conn.transport.paused)
        self.assertFalse(conn.peer.transport.paused)
        conn.flow.bytes_out += 5000
        meter.download(5000)
        self.assertTrue(conn.peer.transport.paused)
        self.clock.advance(5)
        self.assertFalse(conn.transport.paused or conn.peer.transport.paused)
        meter.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_put_changes_the_rate_of_running_connections(self):
        """A new rate for the tunnel applies to its running connections at once."""
        policy = self.policy()
        conn = Connection()
        slow = tunnel(BandwidthBytesPerSecond=100)
        meter = policy.meter(conn, slow)
        meter.upload(1100)  # 1,000 bytes in debt: 10 s at 100 B/s
        self.assertTrue(conn.transport.paused)
        policy.tunnels_applied([tunnel(BandwidthBytesPerSecond=1_000_000)])
        self.clock.advance(0.05)  # a wake-up share of the new rate
        self.assertFalse(conn.transport.paused)
        # Lifting the limit frees them too.
        meter.upload(5_000_000)
        self.assertTrue(conn.transport.paused)
        policy.tunnels_applied([tunnel()])
        self.clock.advance(0.05)  # a wake-up share of the new rate
        self.assertFalse(conn.transport.paused)
        meter.upload(10**9)
        self.assertFalse(conn.transport.paused)
        meter.close()

    def test_quota_cut_cuts_every_running_connection(self):
        """Crossing a quota with "cut" cuts the client's running connections."""
        policy = self.policy(
            client_policies={
                "c": ClientPolicy(quota_bytes=100, quota_exceeded_action="cut")
            }
        )
        first, second = Connection(), Connection()
        meters = [policy.meter(c, tunnel()) for c in (first, second)]
        first.flow.bytes_in += 60
        meters[0].upload(60)
        self.assertFalse(first.cut or second.cut)
        second.flow.bytes_out += 40
        meters[1].download(40)
        self.assertTrue(first.cut and second.cut)
        self.assertEqual(self.stats.refused[Refusal.QUOTA_CUT], 2)
        self.assertEqual(policy.quota.view("c")["QuotaUsedBytes"], 100)

    def test_refuse_new_lets_running_finish(self):
        """With "refuse-new" the running connection goes on past the quota."""
        policy = self.policy(client_policies={"c": ClientPolicy(quota_bytes=100)})
        conn = Connection()
        meter = policy.meter(conn, tunnel())
        conn.flow.bytes_in += 500
        meter.upload(500)
        self.assertFalse(conn.cut)
        self.assertEqual(
            policy.check(v4("192.0.2.1"), tunnel(), ["c"]).reason,
            Refusal.QUOTA_EXCEEDED,
        )
