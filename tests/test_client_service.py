"""The client's reconnecting service in memory: backoff on refusals, Go Away on stop."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.clientkit import HELLO_TIMEOUT, GatewayEndpoint, make_settings
from threshold.client.gateway import GatewayLink
from threshold.client.service import reconnecting_service
from threshold.client.session import SessionState
from threshold.mux.session import GoAwayReceived
from threshold.wire.handshake import encode_hello_reply


def start(reply: bytes) -> tuple:
    clock = Clock()
    settings = make_settings(clock=clock)
    endpoint = GatewayEndpoint(clock, reply)
    link = GatewayLink("server:9056", clock)
    service = reconnecting_service(
        settings,
        link,
        endpoint,
        clock,
        initial_delay=1.0,
        max_delay=60.0,
        jitter=lambda: 0,
    )
    service.startService()
    return settings, endpoint, service


class ReconnectTests(SynchronousTestCase):
    def test_refusals_back_off(self):
        """Each refused hello in a row doubles the wait before the next try."""
        settings, endpoint, service = start(encode_hello_reply(False, "no"))
        endpoint.run(16)
        times = endpoint.attempts
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # 2, 4, 8 s: without counting refusals every gap would be 2 s, since
        # each connection itself succeeded.
        self.assertEqual([round(g) for g in gaps], [2, 4, 8])
        self.assertEqual(service.link.consecutive_refusals, 4)
        self.successResultOf(service.stopService())

    def test_silent_gateway_backs_off_too(self):
        """A gateway that never answers the hello counts as a refusal."""
        settings, endpoint, service = start(b"")
        endpoint.run(HELLO_TIMEOUT + 3)
        # Given up at 10 s, tried again 2 s later.
        self.assertEqual(endpoint.attempts, [0, HELLO_TIMEOUT + 2])
        self.assertEqual(service.link.consecutive_refusals, 1)
        endpoint.run(HELLO_TIMEOUT)
        self.assertEqual(service.link.consecutive_refusals, 2)
        self.successResultOf(service.stopService())

    def test_accepted_session_held(self):
        """An accepted session is held: no further attempts."""
        settings, endpoint, service = start(encode_hello_reply(True))
        endpoint.run(30)
        self.assertEqual(len(endpoint.attempts), 1)
        session = self.successResultOf(service.whenConnected())
        self.assertIs(session.handler.state, SessionState.ACCEPTED)
        stopped = service.stopService()
        endpoint.run(1)
        self.successResultOf(stopped)

    def test_stop_says_go_away(self):
        """Stopping the service ends the session with Go Away."""
        settings, endpoint, service = start(encode_hello_reply(True))
        endpoint.run(1)
        closed = endpoint.gateways[0].when_closed()
        stopped = service.stopService()
        endpoint.run(1)
        self.assertIsInstance(self.successResultOf(closed), GoAwayReceived)
        self.successResultOf(stopped)
        self.assertEqual(len(endpoint.attempts), 1)
