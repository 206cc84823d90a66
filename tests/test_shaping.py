"""Bandwidth shaping by backpressure, in memory (Clock): buckets, pause, resume."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.shaping import (
    Bucket,
    Direction,
    FlowMeter,
    burst_of,
    consumer_holds,
)
from threshold.server.stats import Flow


class Producer:
    """A sending side: records pause/resume, as a TCP transport would act."""

    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self) -> None:  # noqa: N802
        self.calls.append("stop")


class Consumer:
    """The other side; ``producerPaused`` as Twisted's FileDescriptor sets it."""

    producerPaused = False


class Sender:
    """Feeds a direction as fast as its producer lets it, chunk by chunk."""

    def __init__(self, clock: Clock, direction: Direction, producer: Producer) -> None:
        self.clock = clock
        self.direction = direction
        self.producer = producer
        self.sent = 0

    def run(self, seconds: float, chunk: int = 65536, step: float = 0.001) -> None:
        """Read a chunk whenever the producer is not paused, for ``seconds``."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            while not self.producer.paused and self.clock.seconds() < end:
                self.sent += chunk
                self.direction.moved(chunk)
            self.clock.advance(step)


def within(case: SynchronousTestCase, value: float, target: float, share: float):
    """Assert ``value`` is within ``share`` (a fraction) of ``target``."""
    case.assertLessEqual(abs(value - target), target * share, f"{value} vs {target}")


def direction(
    clock: Clock, *buckets: Bucket, consumer: object = None
) -> tuple[Direction, Producer]:
    producer = Producer()
    held = consumer if consumer is not None else Consumer()
    return Direction(clock, buckets, lambda: producer, lambda: held), producer


class BucketTests(SynchronousTestCase):
    def test_burst_default_is_one_second(self):
        """BandwidthBurstBytes 0 means one second's worth of the rate."""
        self.assertEqual(burst_of(1000, 0), 1000)
        self.assertEqual(burst_of(1000, 64), 64)
        bucket = Bucket(Clock(), 1000)
        self.assertEqual(bucket.burst, 1000)

    def test_debt_and_refill(self):
        """A take past the tokens is debt; time refills up to the burst only."""
        clock = Clock()
        bucket = Bucket(clock, 1000, 500)
        self.assertFalse(bucket.take(500, clock.seconds()))
        self.assertTrue(bucket.take(1, clock.seconds()))
        clock.advance(10)
        self.assertFalse(bucket.in_debt(clock.seconds()))
        self.assertEqual(bucket.tokens, 500)

    def test_rate_change_reschedules_waiters(self):
        """A higher rate wakes a waiting direction sooner than the old rate would."""
        clock = Clock()
        bucket = Bucket(clock, 1000, 1000)
        d, producer = direction(clock, bucket)
        d.moved(2000)  # 1000 bytes of debt: 1 s at the old rate
        self.assertTrue(producer.paused)
        bucket.set_rate(100_000, 1000)
        clock.advance(0.05)
        self.assertFalse(producer.paused)


class DirectionTests(SynchronousTestCase):
    def test_pause_then_resume_by_timer(self):
        """In debt, the producer pauses; it resumes when the tokens are back."""
        clock = Clock()
        bucket = Bucket(clock, 1000, 1000)
        d, producer = direction(clock, bucket)
        d.moved(600)
        self.assertEqual(producer.calls, [])
        d.moved(600)  # 200 in debt
        self.assertEqual(producer.calls, ["pause"])
        self.assertTrue(d.waiting)
        self.assertTrue(bucket.limiting)
        clock.advance(0.1)
        self.assertTrue(producer.paused)  # 100 of debt left
        clock.advance(0.12)  # and the wake-up share (20 bytes)
        self.assertEqual(producer.calls, ["pause", "resume"])
        self.assertFalse(d.waiting)
        self.assertFalse(bucket.limiting)
        self.assertAlmostEqual(bucket.limited_seconds(), 0.22, places=6)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_limit_no_pause(self):
        """Within the tokens nothing is paused and no timer is set."""
        clock = Clock()
        d, producer = direction(clock, Bucket(clock, 10_000))
        for _ in range(100):
            d.moved(100)
            clock.advance(0.01)
        self.assertEqual(producer.calls, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_rate_exact_over_ten_seconds(self):
        """A sender as fast as allowed moves rate x time + burst, within a chunk."""
        clock = Clock()
        rate = 1_000_000
        d, producer = direction(clock, Bucket(clock, rate, 65536))
        sender = Sender(clock, d, producer)
        sender.run(10.0)
        expected = rate * 10 + 65536
        self.assertLessEqual(abs(sender.sent - expected), 2 * 65536)

    def test_two_buckets_the_tighter_wins(self):
        """A direction drawing from a tunnel and a client bucket gets the lower rate."""
        clock = Clock()
        tunnel = Bucket(clock, 1_000_000, 10_000)
        client = Bucket(clock, 200_000, 10_000)
        d, producer = direction(clock, tunnel, client)
        sender = Sender(clock, d, producer)
        sender.run(5.0, chunk=8192)
        within(self, sender.sent / 5.0, 200_000, 0.02)

    def test_shared_client_bucket_splits_the_rate(self):
        """Two connections of one client share its rate; neither starves."""
        clock = Clock()
        shared = Bucket(clock, 400_000, 8192)
        d1, p1 = direction(clock, shared)
        d2, p2 = direction(clock, shared)
        s1, s2 = Sender(clock, d1, p1), Sender(clock, d2, p2)
        end = clock.seconds() + 5.0
        while clock.seconds() < end:
            for s in (s1, s2):
                if not s.producer.paused:
                    s.sent += 4096
                    s.direction.moved(4096)
            clock.advance(0.001)
        total = s1.sent + s2.sent
        within(self, total / 5.0, 400_000, 0.03)
        # Neither starves (the one resumed first reads first, so not 50/50).
        self.assertGreater(min(s1.sent, s2.sent) / total, 0.3)

    def test_directions_independent(self):
        """Upload held back does not hold download, which has its own bucket."""
        clock = Clock()
        up, down = Bucket(clock, 1000), Bucket(clock, 1000)
        du, pu = direction(clock, up)
        dd, pd = direction(clock, down)
        du.moved(5000)
        self.assertTrue(pu.paused)
        dd.moved(500)
        self.assertFalse(pd.paused)

    def test_consumer_holding_is_not_overridden(self):
        """When tokens return while the consumer holds the producer, no resume."""
        clock = Clock()
        consumer = Consumer()
        d, producer = direction(clock, Bucket(clock, 1000, 1000), consumer=consumer)
        d.moved(1500)
        self.assertEqual(producer.calls, ["pause"])
        consumer.producerPaused = True  # the other side's buffer filled meanwhile
        clock.advance(1.0)
        self.assertEqual(producer.calls, ["pause"])
        self.assertFalse(d.waiting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_consumer_resume_in_debt_pauses_again(self):
        """A consumer that resumes a producer still in debt: paused at the next read."""
        clock = Clock()
        d, producer = direction(clock, Bucket(clock, 1000, 1000))
        d.moved(1500)
        producer.resumeProducing()  # the consumer drained and resumed it
        d.moved(100)
        self.assertTrue(producer.paused)
        self.assertEqual(producer.calls, ["pause", "resume", "pause"])
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_close_forgets_the_timer(self):
        """A connection ending while held leaves no timer behind."""
        clock = Clock()
        bucket = Bucket(clock, 1000)
        d, producer = direction(clock, bucket)
        d.moved(5000)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        d.close()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(bucket.limiting)

    def test_producer_gone(self):
        """A direction whose producer is gone (stream closed) pauses nothing."""
        clock = Clock()
        d = Direction(clock, (Bucket(clock, 10),), lambda: None, lambda: None)
        d.moved(100)
        clock.advance(100)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_recent_rate(self):
        """The recent rate is the bytes of the last whole second."""
        clock = Clock()
        clock.advance(100)
        bucket = Bucket(clock, 10**9)
        bucket.take(300, clock.seconds())
        clock.advance(0.5)
        bucket.take(200, clock.seconds())
        self.assertEqual(bucket.recent_rate(), 0)
        clock.advance(0.6)
        self.assertEqual(bucket.recent_rate(), 500)
        clock.advance(2)
        self.assertEqual(bucket.recent_rate(), 0)

    def test_consumer_holds(self):
        """Both ways a consumer says it holds its producer are read."""

        class Reading:
            paused = True

        self.assertTrue(consumer_holds(Reading()))
        c = Consumer()
        self.assertFalse(consumer_holds(c))
        c.producerPaused = True
        self.assertTrue(consumer_holds(c))
        self.assertFalse(consumer_holds(None))


class Account:
    """A quota account stand-in: records what it was fed."""

    def __init__(self) -> None:
        self.added: list[int] = []
        self.meters: set[object] = set()

    def add(self, count: int, now: float) -> None:
        self.added.append(count)


class FlowMeterTests(SynchronousTestCase):
    def test_counts_from_the_flow(self):
        """The account gets the growth of the flow's counters, first bytes too."""
        clock = Clock()
        flow = Flow(("127.0.0.1", 9000, "*"), "c")
        flow.bytes_in = 517  # a ClientHello read before the stream
        account = Account()
        meter = FlowMeter(flow, clock, None, None, account, on_cut=lambda: None)
        self.assertEqual(account.added, [517])
        self.assertIn(meter, account.meters)
        flow.bytes_in += 100
        meter.upload(100)
        flow.bytes_out += 40
        meter.download(40)
        self.assertEqual(account.added, [517, 100, 40])
        meter.close()
        self.assertNotIn(meter, account.meters)
        meter.close()
        self.assertEqual(sum(account.added), flow.bytes_in + flow.bytes_out)

    def test_cut_once(self):
        """cut() closes through on_cut, and not after the meter closed."""
        cuts = []
        flow = Flow(("127.0.0.1", 9000, "*"), "c")
        meter = FlowMeter(
            flow, Clock(), None, None, None, on_cut=lambda: cuts.append(1)
        )
        meter.cut()
        meter.close()
        meter.cut()
        self.assertEqual(cuts, [1])

    def test_moved_flow_rebinds(self):
        """A flow moved to another client (a retry) rebinds the meter once."""
        flow = Flow(("127.0.0.1", 9000, "*"), "a")
        seen = []
        meter = FlowMeter(
            flow, Clock(), None, None, None, lambda: None, rebind=seen.append
        )
        meter.upload(1)
        flow.client_id = "b"
        meter.upload(1)
        meter.download(1)
        self.assertEqual(seen, [meter])
        self.assertEqual(meter.client_id, "b")
