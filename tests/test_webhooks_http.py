"""Webhooks over real HTTP: treq posting to a Twisted web server on loopback.

The receiver checks each body and signature the way docs/events.md tells
receivers to (the ``verify`` function below is the documented one),
answers with the codes a test scripts (500s first, to see the retries),
or holds its answers (to fill the bounded queue, or to time out).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from threshold.config.webhooks import WEBHOOKS
from threshold.server.events import EventFeed, EventType
from threshold.server.webhooks import Webhook, treq_poster

from .support import Backend, Deployment, wait_until

SECRET = b"0123456789abcdef0123456789abcdef"


def verify(secret: bytes, header: str, body: bytes, tolerance: int = 300) -> bool:
    """The receiver's check, as docs/events.md gives it."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    if abs(time.time() - timestamp) > tolerance:
        return False  # too old: a replay
    expected = hmac.new(
        secret, f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


class Receiver(Resource):
    """Records each POST; answers from ``codes`` (then 200), or holds them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[dict[str, Any]] = []
        self.codes: list[int] = []
        self.hold = False
        self.held: list[Any] = []

    def render_POST(self, request: Any) -> Any:  # noqa: N802
        body = request.content.read()
        self.posts.append(
            {
                "body": body,
                "event": json.loads(body),
                "signature": request.getHeader(b"x-threshold-signature"),
                "type": request.getHeader(b"x-threshold-event"),
                "content_type": request.getHeader(b"content-type"),
            }
        )
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.codes.pop(0) if self.codes else 200)
        return b"ok"

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            if not request._disconnected:
                request.setResponseCode(200)
                request.write(b"ok")
                request.finish()


class WebhookHttpTests(TestCase):
    def setUp(self) -> None:
        self.receiver = Receiver()
        self.port = reactor.listenTCP(0, Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.feed = EventFeed(reactor)
        post, close = treq_poster(reactor)
        self.post = post
        self.addCleanup(close)

    def hook(self, **fields: Any) -> Webhook:
        if "Url" not in fields:
            fields["Url"] = f"http://127.0.0.1:{self.port.getHost().port}/hook"
        entry = {
            "RetryInitialSeconds": 0.05,
            "RetryMaxSeconds": 0.2,
            **fields,
        }
        hook = Webhook(
            WEBHOOKS.check([entry])[0], self.feed, reactor, self.post, SECRET
        )
        self.addCleanup(hook.stop)
        return hook

    @inlineCallbacks
    def test_signed_posts_in_order_with_retries_after_500s(self):
        """Two 500s then 200: the event arrives a third time, signed; the next
        events follow in order, each body the event's JSON."""
        hook = self.hook()
        self.receiver.codes = [500, 503]
        self.feed.emit(EventType.CLIENT_CONNECTED, ClientId="home-a")
        self.feed.emit(EventType.CLIENT_HEALTH, ClientId="home-a", Healthy=False)
        yield wait_until(lambda: hook.delivered == 2, 10, "two deliveries")
        ids = [p["event"]["id"] for p in self.receiver.posts]
        self.assertEqual(ids, [1, 1, 1, 2])
        self.assertEqual(hook.retries, 2)
        for post in self.receiver.posts:
            self.assertTrue(verify(SECRET, post["signature"].decode(), post["body"]))
            self.assertEqual(post["content_type"], b"application/json")
        last = self.receiver.posts[-1]
        self.assertEqual(last["type"], b"client.health")
        self.assertEqual(
            last["event"]["data"], {"ClientId": "home-a", "Healthy": False}
        )
        # A forged or altered body fails the check.
        self.assertFalse(verify(b"wrong", last["signature"].decode(), last["body"]))
        self.assertFalse(
            verify(SECRET, last["signature"].decode(), last["body"] + b" ")
        )

    @inlineCallbacks
    def test_bounded_queue_under_a_stuck_receiver(self):
        """A receiver that does not answer: the queue stays at MaxQueue, the
        drops are counted and reported; when it answers, delivery resumes."""
        self.receiver.hold = True
        hook = self.hook(MaxQueue=5, TimeoutSeconds=30)
        for n in range(50):
            self.feed.emit(EventType.LIMIT_HIT, Limit="quota", Count=n)
        self.assertEqual(len(hook.queue), 5)
        self.assertEqual(hook.dropped, 45)
        yield wait_until(lambda: self.feed.emitted["webhook.dropped"] == 1, 5, "report")
        self.receiver.hold = False
        self.receiver.release()
        yield wait_until(lambda: not hook.queue, 10, "queue drained")
        ids = [p["event"]["id"] for p in self.receiver.posts]
        # The first (posted while the others were dropped), the last ones,
        # and the drop report (which, arriving at a full queue, dropped 47).
        self.assertEqual(ids, [1, 48, 49, 50, 51])
        self.assertEqual(hook.dropped, 46)
        self.assertEqual(self.receiver.posts[-1]["event"]["type"], "webhook.dropped")
        self.assertEqual(self.receiver.posts[-1]["event"]["data"]["Dropped"], 45)

    @inlineCallbacks
    def test_a_receiver_too_slow_times_out_and_is_retried(self):
        """No answer within TimeoutSeconds: the try fails and is retried."""
        self.receiver.hold = True
        hook = self.hook(TimeoutSeconds=0.2, MaxAttempts=2)
        self.feed.emit(EventType.CLIENT_CONNECTED, ClientId="a")
        yield wait_until(lambda: hook.failed == 1, 10, "given up")
        self.assertEqual(len(self.receiver.posts), 2)
        self.assertEqual(hook.retries, 1)
        self.receiver.release()

    @inlineCallbacks
    def test_nobody_listening(self):
        """Connection refused: retried, then given up; the gateway goes on."""
        port = self.port.getHost().port
        yield self.port.stopListening()
        hook = self.hook(Url=f"http://127.0.0.1:{port}/", MaxAttempts=3)
        self.feed.emit(EventType.CLIENT_CONNECTED, ClientId="a")
        yield wait_until(lambda: hook.failed == 1, 10, "given up")
        self.assertEqual(hook.retries, 2)


class WebhookDeploymentTests(TestCase):
    """Webhooks configured in server.json: a real gateway posts its events."""

    timeout = 60

    @inlineCallbacks
    def test_gateway_posts_signed_events_and_counts_them(self):
        receiver = Receiver()
        receiver.codes = [500]
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        folder = self.mktemp()
        os.makedirs(folder)
        secret_file = os.path.join(folder, "webhook.key")
        with open(secret_file, "wb") as f:
            f.write(SECRET + b"\n")
        hooks = WEBHOOKS.check(
            [
                {
                    "Url": f"http://127.0.0.1:{port.getHost().port}/in?token=t",
                    "Events": ["client.*"],
                    "SecretFile": secret_file,
                    "RetryInitialSeconds": 0.05,
                }
            ]
        )
        deployment = Deployment(False, folder, webhooks=hooks)
        deployment.start_server()
        self.addCleanup(deployment.stop)
        backend = Backend()
        web = yield backend.start()
        self.addCleanup(backend.stop)
        deployment.start_client("home-a", {"web": ("127.0.0.1", web)})
        yield deployment.wait_connected("home-a")
        yield deployment.put_tunnels([])  # tunnels.applied: not wanted here
        yield wait_until(lambda: len(receiver.posts) == 2, 10, "the retried post")
        first, again = receiver.posts
        self.assertEqual(first["body"], again["body"])
        self.assertEqual(first["event"]["type"], "client.connected")
        self.assertTrue(verify(SECRET, again["signature"].decode(), again["body"]))
        response = yield deployment.http().get(deployment.url("/metrics"))
        text = (yield response.content()).decode()
        label = f'webhook="http://127.0.0.1:{port.getHost().port}/in"'
        self.assertIn(f"threshold_webhook_deliveries_total{{{label}}} 1.0", text)
        self.assertIn(f"threshold_webhook_retries_total{{{label}}} 1.0", text)
        self.assertIn(
            'threshold_events_emitted_total{type="client.connected"} 1.0', text
        )
        self.assertIn(
            'threshold_events_emitted_total{type="tunnels.applied"} 1.0', text
        )
        self.assertIn("threshold_event_subscribers 0.0", text)
