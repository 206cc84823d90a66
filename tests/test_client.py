"""The client's session in memory: hello, its answer, its state."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.clientkit import HELLO_TIMEOUT, connect, make_settings
from threshold.client.gateway import GatewayLink
from threshold.client.session import (
    ClientSession,
    ControlChannel,
    HelloRefused,
    SessionState,
    session_factory,
)
from threshold.mux.session import MuxSession
from threshold.testing import Collector
from threshold.wire.handshake import MAX_LINE, encode_hello_reply


def _link() -> GatewayLink:
    """A gateway link with a connection attempt under way."""
    link = GatewayLink("server:9056", Clock())
    link.connecting()
    return link


class HelloTests(SynchronousTestCase):
    def test_hello_sent_and_accepted(self):
        """The client says hello with its id and is accepted."""
        c = connect()
        self.assertEqual([h.client_id for h in c.seen], ["TestClient1"])
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertIs(self.successResultOf(c.client.when_ready()), c.client)
        self.assertEqual(c.link.consecutive_refusals, 0)

    def test_hello_refused(self):
        """A refused hello closes the session and counts for backoff."""
        c = connect(reply=encode_hello_reply(False, "nope"))
        self.assertIs(c.client.state, SessionState.CLOSED)
        self.assertTrue(c.session.closed)
        self.assertEqual(c.link.consecutive_refusals, 1)
        failure = self.failureResultOf(c.client.when_ready(), HelloRefused)
        self.assertIn("server refused the hello: nope", str(failure.value))

    def test_accepted_resets_refusals(self):
        """An accepted hello starts the refusal count again from zero."""
        link = GatewayLink("server:9056", Clock())
        link.consecutive_refusals = 4
        c = connect(link=link)
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertEqual(c.link.consecutive_refusals, 0)

    def test_bad_reply(self):
        """An answer that is not a hello reply closes like a refusal."""
        c = connect(reply=b'{"ok": "yes"}\n')
        self.assertIs(c.client.state, SessionState.CLOSED)
        self.assertEqual(c.link.consecutive_refusals, 1)
        failure = self.failureResultOf(c.client.when_ready(), HelloRefused)
        self.assertIn("bad hello reply", str(failure.value))

    def test_overlong_reply(self):
        """An answer longer than a line may be is refused, not buffered."""
        c = connect(reply=b"x" * (MAX_LINE + 1))
        self.assertIs(c.client.state, SessionState.CLOSED)
        failure = self.failureResultOf(c.client.when_ready(), HelloRefused)
        self.assertIn("longer than 4096 bytes", str(failure.value))

    def test_reply_in_pieces(self):
        """An answer that arrives a byte at a time is read whole."""
        settings = make_settings()
        client = ClientSession(settings, _link())
        reader = ControlChannel(client)
        client.state = SessionState.HELLO_SENT
        reader.makeConnection(StringTransport())
        for byte in encode_hello_reply(True):
            reader.dataReceived(bytes([byte]))
        self.assertIs(client.state, SessionState.ACCEPTED)

    def test_stream_from_server_before_hello_refused(self):
        """Streams opened before the hello is accepted are refused."""
        c = connect(reply=b"")
        user = Collector()
        c.server.open_stream(user)
        c.pump.flush()
        self.assertIs(c.client.state, SessionState.HELLO_SENT)
        self.assertEqual(c.session.streams_accepted, 0)
        self.assertIsNotNone(user.lost)

    def test_silent_server_gives_up(self):
        """No answer to the hello within the timeout closes and counts a refusal."""
        c = connect(reply=b"")
        self.assertEqual([h.client_id for h in c.seen], ["TestClient1"])
        c.clock.advance(HELLO_TIMEOUT - 0.1)
        c.pump.flush()
        self.assertFalse(c.session.closed)
        c.clock.advance(0.2)
        c.pump.flush()
        self.assertTrue(c.session.closed)
        self.assertIs(c.client.state, SessionState.CLOSED)
        self.assertEqual(c.link.consecutive_refusals, 1)
        failure = self.failureResultOf(c.client.when_ready(), HelloRefused)
        self.assertIn("no answer to the hello within 10.0s", str(failure.value))

    def test_accepted_cancels_timer(self):
        """Once accepted, the hello timeout no longer runs."""
        c = connect()
        c.clock.advance(HELLO_TIMEOUT + 1)
        c.pump.flush()
        self.assertIs(c.client.state, SessionState.ACCEPTED)
        self.assertFalse(c.session.closed)
        self.assertEqual(c.link.consecutive_refusals, 0)

    def test_connection_lost_before_reply(self):
        """The connection ending before the answer fails ``when_ready()``."""
        c = connect(reply=b"")
        c.server.transport.loseConnection()
        c.pump.flush()
        self.assertIs(c.client.state, SessionState.CLOSED)
        failure = self.failureResultOf(c.client.when_ready(), HelloRefused)
        self.assertIn(
            "connection closed before the hello reply: Connection was closed cleanly",
            str(failure.value),
        )
        # Counted for the backoff once; the hello timer went with the session.
        self.assertEqual(c.link.consecutive_refusals, 1)
        c.clock.advance(HELLO_TIMEOUT + 1)
        self.assertEqual(c.link.consecutive_refusals, 1)

    def test_factory_builds_the_session_protocol(self):
        """The factory's protocol is the MuxSession; its handler the ClientSession."""
        protocol = session_factory(make_settings(), _link()).buildProtocol(None)
        self.assertIsInstance(protocol, MuxSession)
        self.assertIsInstance(protocol.handler, ClientSession)
        self.assertIs(protocol.handler.session, protocol)
        self.assertIs(protocol.handler.state, SessionState.CONNECTING)

    def test_hello_reader_connection_lost_default(self):
        """ControlChannel.connectionLost() works without a reason (the default)."""
        client = ClientSession(make_settings(), _link())
        client.state = SessionState.HELLO_SENT
        reader = ControlChannel(client)
        reader.makeConnection(StringTransport())
        reader.connectionLost()
        self.assertIs(client.state, SessionState.REFUSED)
        self.failureResultOf(client.when_ready(), HelloRefused)

    def test_impossible_transition_refused(self):
        """A state change not in the table is a bug, raised at once."""
        client = ClientSession(make_settings(), _link())
        with self.assertRaises(AssertionError):
            client._move(SessionState.ACCEPTED)

    def test_refusal_then_close_fails_ready_once(self):
        """After a refusal, the session's end leaves the refusal as the reason."""
        c = connect(reply=encode_hello_reply(False, "nope"))
        self.assertTrue(c.session.closed)
        failure = self.failureResultOf(c.client.when_ready(), HelloRefused)
        self.assertIn("refused the hello: nope", str(failure.value))
