"""Tests for threshold.server.history: the rings behind the status page's charts."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.history import HistorySettings, Sample, TrafficHistory
from threshold.server.stats import GatewayStats, Refusal

WEB = ("0.0.0.0", 443, "*")
SSH = ("0.0.0.0", 22, "*")


class Harness:
    """A history over real GatewayStats, a Clock and a settable tunnel set."""

    def __init__(self, **settings: float) -> None:
        self.clock = Clock()
        self.stats = GatewayStats()
        self.keys = [WEB, SSH]
        self.history = TrafficHistory(
            self.stats, self.clock, lambda: list(self.keys), HistorySettings(**settings)
        )

    def flow(self, key: tuple[str, int, str], received: int, sent: int) -> object:
        """An open connection that moved these bytes (as the front end counts)."""
        self.stats.accepted += 1
        self.stats.open += 1
        flow = self.stats.flow_opened(key, "home")
        flow.bytes_in += received
        flow.bytes_out += sent
        return flow

    def close(self, flow: object) -> None:
        self.stats.open -= 1
        self.stats.flow_closed(flow)  # type: ignore[arg-type]


class SettingsTests(SynchronousTestCase):
    def test_ring_size(self):
        """A ring holds the span's worth of samples, both ends included."""
        self.assertEqual(HistorySettings().ring_size, 361)
        self.assertEqual(HistorySettings(interval=7, span=60).ring_size, 10)

    def test_bad_settings(self):
        """An interval of 0, one longer than the span, a negative bound: refused."""
        for bad in (
            dict(interval=0),
            dict(interval=-1),
            dict(interval=10, span=5),
            dict(max_tunnels=-1),
        ):
            with self.assertRaises(ValueError, msg=str(bad)):
                HistorySettings(**bad)  # type: ignore[arg-type]


class SamplingTests(SynchronousTestCase):
    def test_samples_every_interval_of_the_clock(self):
        """start() samples at once, then once per interval, and stop() stops it."""
        h = Harness(interval=10)
        h.history.start()
        self.assertEqual([s.time for s in h.history.ring(WEB)], [0])
        h.clock.advance(9.9)
        self.assertEqual(len(h.history.ring(WEB)), 1)
        h.clock.advance(0.1)
        h.clock.advance(10)
        self.assertEqual([s.time for s in h.history.ring(WEB)], [0, 10, 20])
        self.assertEqual([s.time for s in h.history.gateway], [0, 10, 20])
        h.history.stop()
        h.clock.advance(100)
        self.assertEqual(len(h.history.ring(WEB)), 3)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_sample_holds_the_counters(self):
        """A sample: connections, open ones and bytes (open flows' too)."""
        h = Harness()
        done = h.flow(WEB, 100, 1000)
        h.close(done)
        h.flow(WEB, 5, 50)
        h.history.sample()
        self.assertEqual(h.history.ring(WEB), [Sample(0, 2, 1, 105, 1050)])
        self.assertEqual(h.history.ring(SSH), [Sample(0, 0, 0, 0, 0)])
        self.assertEqual(h.history.gateway, [Sample(0, 2, 1, 105, 1050)])

    def test_ring_is_bounded(self):
        """Past the span the oldest samples go: the ring keeps ring_size of them."""
        h = Harness(interval=10, span=60)
        h.history.start()
        h.clock.pump([10] * 100)
        ring = h.history.ring(WEB)
        self.assertEqual(len(ring), 7)
        self.assertEqual([s.time for s in ring], [940, 950, 960, 970, 980, 990, 1000])
        self.assertEqual(len(h.history.gateway), 7)
        h.history.stop()

    def test_removed_tunnel_is_dropped(self):
        """A tunnel gone from the set loses its ring; back, it starts anew."""
        h = Harness()
        h.history.sample()
        h.history.sample()
        h.keys = [SSH]
        h.history.sample()
        self.assertEqual(h.history.ring(WEB), [])
        self.assertEqual(len(h.history.ring(SSH)), 3)
        self.assertEqual(
            [t["ListenPort"] for t in h.history.to_json()["Tunnels"]], [22]
        )
        h.keys = [WEB, SSH]
        h.history.sample()
        self.assertEqual(len(h.history.ring(WEB)), 1)

    def test_bounded_number_of_tunnels(self):
        """Only the first max_tunnels tunnels get a ring; the rest are counted."""
        h = Harness(max_tunnels=3)
        h.keys = [("0.0.0.0", port, "*") for port in range(1000, 1010)]
        h.history.sample()
        body = h.history.to_json()
        self.assertEqual([t["ListenPort"] for t in body["Tunnels"]], [1000, 1001, 1002])
        self.assertEqual(body["TunnelsNotSampled"], 7)
        self.assertEqual(h.history.ring(("0.0.0.0", 1005, "*")), [])
        h.keys = h.keys[:2]
        h.history.sample()
        self.assertEqual(h.history.to_json()["TunnelsNotSampled"], 0)

    def test_no_tunnels_at_all(self):
        """max_tunnels 0: the gateway is still sampled, no tunnel is."""
        h = Harness(max_tunnels=0)
        h.history.sample()
        self.assertEqual(h.history.to_json()["Tunnels"], [])
        self.assertEqual(len(h.history.gateway), 1)

    def test_start_twice_is_one_loop(self):
        """A second start() adds no second sampling loop."""
        h = Harness(interval=10)
        h.history.start()
        h.history.start()
        h.clock.advance(10)
        self.assertEqual(len(h.history.ring(WEB)), 2)
        h.history.stop()
        h.history.stop()


class JsonTests(SynchronousTestCase):
    def test_rates(self):
        """Rates per second come from neighbouring samples; the first is null."""
        h = Harness(interval=10)
        h.history.start()
        flow = h.flow(WEB, 1000, 20000)
        h.clock.advance(10)
        flow.bytes_in += 500  # type: ignore[attr-defined]
        h.flow(WEB, 0, 0)
        h.clock.advance(10)
        h.history.stop()
        [web, ssh] = h.history.to_json()["Tunnels"]
        samples = web["Samples"]
        self.assertEqual(samples["Times"], [0, 10, 20])
        self.assertEqual(samples["OpenConnections"], [0, 1, 2])
        self.assertEqual(samples["NewConnectionsPerSecond"], [None, 0.1, 0.1])
        self.assertEqual(samples["ReceivedBytesPerSecond"], [None, 100.0, 50.0])
        self.assertEqual(samples["SentBytesPerSecond"], [None, 2000.0, 0.0])
        self.assertEqual(ssh["Samples"]["ReceivedBytesPerSecond"], [None, 0.0, 0.0])

    def test_current_counters_and_identity(self):
        """Each tunnel names its key and carries its counters as they are now."""
        h = Harness()
        h.history.sample()
        h.flow(WEB, 7, 9)  # after the sample: in the counters, not the ring
        h.stats.refuse(Refusal.NO_HEALTHY_CLIENT)
        body = h.history.to_json()
        web = body["Tunnels"][0]
        self.assertEqual(
            {k: v for k, v in web.items() if k != "Samples"},
            {
                "ListenAddress": "0.0.0.0",
                "ListenPort": 443,
                "ListenHostnameGlob": "*",
                "Connections": 1,
                "OpenConnections": 1,
                "ReceivedBytes": 7,
                "SentBytes": 9,
                "SamplesKept": 1,
            },
        )
        self.assertEqual(web["Samples"]["OpenConnections"], [0])
        gateway = body["Gateway"]
        self.assertEqual(gateway["ReceivedBytes"], 7)
        self.assertEqual(gateway["Refused"], {"no_healthy_client": 1})
        self.assertEqual(body["IntervalSeconds"], 10.0)
        self.assertEqual(body["SpanSeconds"], 3600.0)

    def test_same_clock_twice_has_no_rate(self):
        """Two samples at the same instant give no rate (no division by zero)."""
        h = Harness()
        h.history.sample()
        h.flow(WEB, 10, 10)
        h.history.sample()
        samples = h.history.to_json()["Tunnels"][0]["Samples"]
        self.assertEqual(samples["ReceivedBytesPerSecond"], [None, None])

    def test_duplicate_keys_sampled_once(self):
        """A key listed twice gets one ring."""
        h = Harness()
        h.keys = [WEB, WEB]
        h.history.sample()
        self.assertEqual(len(h.history.to_json()["Tunnels"]), 1)


class AfterTests(SynchronousTestCase):
    """``after``: only the samples a reader does not have yet."""

    def setUp(self) -> None:
        self.h = Harness(interval=10, span=60)
        self.h.history.start()
        self.addCleanup(self.h.history.stop)

    def test_numbers_and_epoch(self):
        """Samples are numbered from 1; the epoch is when the history began."""
        self.h.clock.pump([10, 10])
        body = self.h.history.to_json()
        self.assertEqual(body["Sample"], 3)
        self.assertEqual(body["Epoch"], 0)
        self.assertEqual(body["Gateway"]["SamplesKept"], 3)

    def test_only_later_samples(self):
        """after=N gives the samples numbered past N, rates as in the full ring."""
        self.h.clock.advance(10)
        flow = self.h.flow(WEB, 0, 0)
        self.h.clock.advance(10)
        flow.bytes_in += 1000  # type: ignore[attr-defined]
        self.h.clock.advance(10)
        full = self.h.history.to_json()["Tunnels"][0]["Samples"]
        later = self.h.history.to_json(after=2)["Tunnels"][0]
        self.assertEqual(later["SamplesKept"], 4)
        self.assertEqual(later["Samples"]["Times"], [20, 30])
        for name, column in later["Samples"].items():
            self.assertEqual(column, full[name][2:], name)
        self.assertEqual(later["Samples"]["ReceivedBytesPerSecond"], [0.0, 100.0])
        nothing = self.h.history.to_json(after=4)
        self.assertEqual(nothing["Gateway"]["Samples"]["Times"], [])
        self.assertEqual(nothing["Sample"], 4)
        # A number from before the history (or 0): everything.
        self.assertEqual(self.h.history.to_json(after=0)["Gateway"]["Samples"], {
            k: v for k, v in self.h.history.to_json()["Gateway"]["Samples"].items()
        })  # fmt: skip

    def test_after_past_the_ring(self):
        """A reader further behind than the ring gets the whole ring."""
        self.h.clock.pump([10] * 20)
        body = self.h.history.to_json(after=3)
        self.assertEqual(len(body["Gateway"]["Samples"]["Times"]), 7)
        self.assertEqual(body["Gateway"]["SamplesKept"], 7)

    def test_new_tunnel_after(self):
        """A tunnel added after sample N: all its samples are later than N."""
        self.h.keys = [SSH]
        self.h.clock.advance(10)
        self.h.keys = [SSH, WEB]
        self.h.clock.advance(10)
        self.h.clock.advance(10)
        web = self.h.history.to_json(after=2)["Tunnels"][1]
        self.assertEqual(web["ListenPort"], 443)
        self.assertEqual(web["Samples"]["Times"], [20, 30])
        self.assertEqual(web["SamplesKept"], 2)
        self.assertEqual(web["Samples"]["ReceivedBytesPerSecond"], [None, 0.0])
