"""Tests for webhook delivery logic with Clock and a poster double.

Order, retries with exponential backoff, what is retried and what is not,
the bounded queue and its drop reports, the signature, stop. The real
HTTP path (treq to a Twisted web server on loopback) is in
test_webhooks_http.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from threshold.config import ConfigError
from threshold.config.webhooks import WEBHOOKS, WebhookSettings
from threshold.server.events import EventFeed, EventType
from threshold.server.webhooks import (
    SIGNATURE_HEADER,
    DeliveryState,
    Webhook,
    build_webhooks,
    read_secret,
    sign,
)

T0 = 1_800_000_000.0


class Poster:
    """Records each POST; the test answers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, str], float, Deferred[int]]] = []
        self.cancelled: list[Deferred[int]] = []

    def __call__(
        self, url: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> Deferred[int]:
        d: Deferred[int] = Deferred(self.cancelled.append)
        self.calls.append((url, body, headers, timeout, d))
        return d

    def answer(self, code: int) -> None:
        self.calls[-1][4].callback(code)

    def fail(self, error: Exception) -> None:
        self.calls[-1][4].errback(error)

    def ids(self) -> list[int]:
        return [json.loads(call[1])["id"] for call in self.calls]


def settings(**fields: Any) -> WebhookSettings:
    base: dict[str, Any] = {"Url": "http://127.0.0.1:9/hook?token=s3cret"}
    base.update(fields)
    return WEBHOOKS.check([base])[0]


class DeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.now = T0
        self.feed = EventFeed(self.clock, lambda: self.now)
        self.post = Poster()

    def hook(self, secret: bytes | None = None, **fields: Any) -> Webhook:
        return Webhook(
            settings(**fields),
            self.feed,
            self.clock,
            self.post,
            secret,
            wall_clock=lambda: self.now,
        )

    def emit(
        self, count: int = 1, event_type: str = EventType.CLIENT_CONNECTED
    ) -> None:
        for _ in range(count):
            self.feed.emit(event_type, ClientId="a")

    def test_one_post_at_a_time_in_order(self):
        """Events go one by one, in id order, the body the event's JSON."""
        hook = self.hook()
        self.emit(3)
        self.assertEqual(self.post.ids(), [1])
        url, body, headers, timeout, _ = self.post.calls[0]
        self.assertEqual(url, "http://127.0.0.1:9/hook?token=s3cret")
        self.assertEqual(json.loads(body), self.feed.replay(0).events[0].to_json())
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(headers["X-Threshold-Event"], "client.connected")
        self.assertEqual(headers["X-Threshold-Event-Id"], "1")
        self.assertEqual(timeout, 10.0)
        self.assertNotIn(SIGNATURE_HEADER, headers)
        self.post.answer(200)
        self.post.answer(204)
        self.post.answer(200)
        self.assertEqual(self.post.ids(), [1, 2, 3])
        self.assertEqual((hook.delivered, hook.failed, len(hook.queue)), (3, 0, 0))
        self.assertIs(hook.state, DeliveryState.IDLE)

    def test_event_filter(self):
        """Only the types the Events patterns match are posted."""
        self.hook(Events=["client.*", "tunnel.failover"])
        self.emit(1, EventType.LIMIT_HIT)
        self.emit(1, EventType.TUNNELS_APPLIED)
        self.emit(1, EventType.CLIENT_HEALTH)
        self.assertEqual(self.post.ids(), [3])

    def test_retries_with_exponential_backoff(self):
        """5xx, 429, 408, connection errors: retried after 1, 2, 4, 8... s, capped."""
        hook = self.hook(RetryInitialSeconds=1, RetryMaxSeconds=5, MaxAttempts=6)
        self.emit()
        waits = []
        failures = [
            lambda: self.post.answer(500),
            lambda: self.post.answer(503),
            lambda: self.post.answer(429),
            lambda: self.post.answer(408),
            lambda: self.post.fail(ConnectionRefusedError("nobody")),
        ]
        for fail in failures:
            fail()
            [call] = self.clock.getDelayedCalls()
            waits.append(call.getTime() - self.clock.seconds())
            self.assertIs(hook.state, DeliveryState.BACKING_OFF)
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [1, 2, 4, 5, 5])
        self.assertEqual(
            [c[2]["X-Threshold-Attempt"] for c in self.post.calls],
            ["1", "2", "3", "4", "5", "6"],
        )
        self.post.answer(200)
        self.assertEqual((hook.delivered, hook.retries, hook.failed), (1, 5, 0))

    def test_gives_up_after_max_attempts_and_goes_on(self):
        """Out of tries: counted as failed, the next event goes."""
        hook = self.hook(MaxAttempts=2, RetryInitialSeconds=1)
        self.emit(2)
        self.post.answer(500)
        self.clock.advance(1)
        self.post.answer(500)
        self.assertEqual(hook.failed, 1)
        self.assertEqual(self.post.ids(), [1, 1, 2])

    def test_client_errors_are_not_retried(self):
        """A 4xx (but 408/429) or a 3xx: given up at once."""
        hook = self.hook()
        self.emit(3)
        self.post.answer(400)
        self.post.answer(301)
        self.post.answer(200)
        self.assertEqual(self.post.ids(), [1, 2, 3])
        self.assertEqual((hook.failed, hook.delivered, hook.retries), (2, 1, 0))

    def test_timeout_is_retried(self):
        """The poster's timeout (a cancelled request) is a failed try."""
        from twisted.internet.defer import CancelledError

        hook = self.hook(RetryInitialSeconds=2)
        self.emit()
        self.post.fail(CancelledError())
        self.assertEqual(hook.retries, 1)
        self.clock.advance(2)
        self.assertEqual(len(self.post.calls), 2)

    def test_a_poster_that_raises_is_a_failed_try(self):
        """A poster raising at once does not stop delivery."""

        def broken(*args: Any) -> Deferred[int]:
            raise ValueError("bad URL")

        hook = Webhook(settings(MaxAttempts=1), self.feed, self.clock, broken)
        self.emit(2)
        self.assertEqual(hook.failed, 2)

    def test_bounded_queue_drops_oldest_and_reports(self):
        """Past MaxQueue the oldest waiting event goes; a webhook.dropped event
        tells how many, at most once per interval."""
        hook = self.hook(MaxQueue=3)
        watcher = self.hook(Url="http://127.0.0.1:9/other", Events=["webhook.*"])
        self.emit(6)  # 1 is posting; 2 and 3 are dropped
        self.assertEqual(hook.dropped, 3)
        self.assertEqual([e.id for e in hook.queue], [1, 5, 6])
        self.assertEqual(self.feed.last_id, 6)  # the report comes later
        self.clock.advance(0)
        dropped = self.feed.replay(6).events[0]
        self.assertEqual(dropped.type, "webhook.dropped")
        self.assertEqual(
            dropped.data,
            {
                "Webhook": "http://127.0.0.1:9/hook",
                "Dropped": 3,
                "DroppedTotal": 3,
                "MaxQueue": 3,
            },
        )
        self.assertEqual(json.loads(self.post.calls[-1][1])["type"], "webhook.dropped")
        self.assertEqual(watcher.dropped, 0)
        # More drops within the interval: one report at its end.
        self.emit(5)
        self.clock.advance(0)
        self.assertEqual(self.feed.emitted["webhook.dropped"], 1)
        self.clock.advance(10)
        self.assertEqual(self.feed.emitted["webhook.dropped"], 2)
        self.assertGreater(
            self.feed.replay(self.feed.last_id - 1).events[0].data["Dropped"], 4
        )

    def test_queue_of_one_keeps_the_event_being_posted(self):
        """MaxQueue 1 while posting: the new event is the one dropped."""
        hook = self.hook(MaxQueue=1)
        self.emit(2)
        self.assertEqual([e.id for e in hook.queue], [1])
        self.post.answer(200)
        self.assertEqual(self.post.ids(), [1])
        self.assertEqual(hook.dropped, 1)

    def test_signature(self):
        """t=<time>,v1=HMAC-SHA256(secret, "<t>." + body), fresh at each try."""
        secret = b"k" * 32
        self.hook(secret, RetryInitialSeconds=5)
        self.emit()
        _, body, headers, _, _ = self.post.calls[0]
        expected = hmac.new(secret, b"1800000000." + body, hashlib.sha256).hexdigest()
        self.assertEqual(headers[SIGNATURE_HEADER], f"t=1800000000,v1={expected}")
        self.assertEqual(sign(secret, 1800000000, body), headers[SIGNATURE_HEADER])
        self.post.answer(502)
        self.now += 5
        self.clock.advance(5)
        self.assertTrue(
            self.post.calls[1][2][SIGNATURE_HEADER].startswith("t=1800000005,")
        )

    def test_stop_cancels_everything(self):
        """Stop: the POST in flight abandoned, no timer left, nothing posted after."""
        hook = self.hook()
        self.emit()
        in_flight = self.post.calls[0][4]
        self.feed.close()
        self.assertIs(hook.state, DeliveryState.STOPPED)
        self.assertEqual(self.post.cancelled, [in_flight])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.post.calls), 1)

    def test_stop_while_backing_off(self):
        """A retry waiting is cancelled at stop."""
        hook = self.hook()
        self.emit()
        self.post.answer(500)
        hook.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConfigTests(SynchronousTestCase):
    """The Webhooks config: clear errors, the secret file."""

    def test_label_hides_user_info_and_query(self):
        """Metrics and logs never show a token in the URL."""
        hook = settings(Url="https://user:pw@hooks.example.net:8443/in?token=x")
        self.assertEqual(hook.label, "https://hooks.example.net:8443/in")
        self.assertEqual(settings(Name="ops").label, "ops")

    def test_errors_name_the_field(self):
        """Each bad entry names its index and field."""
        cases = [
            ([{"Url": "ftp://x"}], '"[0].Url"'),
            ([{"Url": "http://x", "Events": []}], '"[0].Events"'),
            ([{"Url": "http://x", "Events": ["Client"]}], '"[0].Events[0]"'),
            ([{"Url": "http://x", "MaxQueue": 0}], '"[0].MaxQueue"'),
            ([{"Url": "http://x"}, {"Uri": "http://y"}], "unknown field"),
            ([{}], "Url"),
            ("http://x", "a list of webhooks"),
            ([{"Url": "http://x"}] * 33, "more than 32"),
        ]
        for value, words in cases:
            with self.assertRaises(ValueError) as caught:
                WEBHOOKS.check(value)
            self.assertIn(words, str(caught.exception), value)

    def test_server_config_field(self):
        """Webhooks in server.json, with the secret file relative to it."""
        from threshold.config import load_server_config

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "server.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "UseTls": False,
                    "Webhooks": [{"Url": "http://127.0.0.1:1/", "SecretFile": "k"}],
                },
                f,
            )
        config = load_server_config(path)
        self.assertEqual(config.webhooks[0].secret_file, os.path.join(folder, "k"))
        with self.assertRaises(ConfigError) as caught:
            build_webhooks(config.webhooks, EventFeed(Clock()), Clock(), Poster())
        self.assertIn("SecretFile", str(caught.exception))
        self.assertIn("cannot read", str(caught.exception))

    def test_read_secret(self):
        """Whitespace stripped; an empty or oversized file refused."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"  key-material\n")
        self.assertEqual(read_secret(path), b"key-material")
        for content in (b"\n \n", b"x" * 5000):
            with open(path, "wb") as f:
                f.write(content)
            with self.assertRaises(ConfigError):
                read_secret(path)


class TapTests(SynchronousTestCase):
    """The server's tap refuses an unreadable SecretFile at start."""

    def test_unreadable_secret_stops_the_start(self):
        from twisted.internet.testing import MemoryReactorClock

        from threshold.config import ServerConfig
        from threshold.tap.server import build_server

        missing = os.path.abspath(self.mktemp())
        config = ServerConfig(
            use_tls=False,
            webhooks=WEBHOOKS.check(
                [{"Url": "http://127.0.0.1:1/", "SecretFile": missing}]
            ),
        )
        with self.assertRaises(ConfigError) as caught:
            build_server(config, MemoryReactorClock())
        self.assertIn(missing, str(caught.exception))
        self.assertIn("Webhooks.SecretFile", str(caught.exception))
