"""The retry of a connection a client resets before any byte came back.

In memory (tests/frontendkit.py): the first client's service refuses (its
stream is reset), the next healthy client gets exactly the same bytes and
the user sees nothing; what already came back, what outgrew the copy, a
second reset and a session that died are not retried.
"""

from __future__ import annotations

from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.frontendkit import Gateway, Refusing, Service, entry
from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from threshold.mux.settings import INITIAL_WINDOW
from threshold.relay import RelayState
from threshold.server.retry import (
    MOVES,
    REPLAY_LIMIT,
    Replay,
    ReplayState,
    StreamSide,
    UserReading,
)
from threshold.testing import Collector

KEY = ("127.0.0.1", 9000, "*")
HEADER = b'{"service":"web"}\n'


class Held(Collector):
    """A client's service that answers or refuses when the test says."""

    def answer(self, data: bytes) -> None:
        self.transport.write(data)

    def refuse(self) -> None:
        self.transport.abortConnection()


def gateway(*accepts, balance: str = "failover", **more) -> Gateway:
    """Clients a, b, c... each serving its streams with its ``accept``."""
    names = "abcdefgh"[: len(accepts)]
    gw = Gateway([entry(ClientIds=list(names), Balance=balance, **more)], clients=())
    for name, accept in zip(names, accepts, strict=True):
        gw.add_client(name, accept)
    return gw


class RetryTests(SynchronousTestCase):
    def test_refused_then_served_by_the_next(self):
        """a resets at once: b gets the same bytes, the user gets b's answer."""
        gw = gateway(lambda s: Refusing(), lambda s: Service())
        user = gw.connect(sent=b"GET / HTTP/1.0\r\n\r\n")
        a, b = gw.sides["a"], gw.sides["b"]
        self.assertEqual(len(a.accepted), 1)
        self.assertIsNotNone(a.accepted[0].lost)
        [served] = b.accepted
        self.assertEqual(served.data, HEADER + b"GET / HTTP/1.0\r\n\r\n")
        self.assertFalse(user.transport.ended)
        served.transport.write(b"HTTP/1.0 200 OK\r\n\r\n")
        gw.flush()
        self.assertEqual(user.transport.value(), b"HTTP/1.0 200 OK\r\n\r\n")
        self.assertEqual(gw.stats.retries[KEY], 1)
        self.assertEqual(gw.stats.retry_failures[KEY], 0)
        self.assertEqual(user.flow.client_id, "b")
        clients = gw.stats.clients
        self.assertEqual((clients["a"].accepted, clients["a"].open), (1, 0))
        self.assertEqual((clients["b"].accepted, clients["b"].open), (1, 1))
        self.assertEqual(gw.stats.open_per_client(KEY), {"b": 1})
        self.assertEqual(gw.stats.tunnels[KEY].accepted, 1)

    def test_bytes_after_the_open_replayed_in_order(self):
        """Everything sent before the reset, in pieces, reaches b in order,
        and what follows the retry goes to b too."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Service())
        user = gw.connect(sent=b"one ")
        user.dataReceived(b"two ")
        gw.flush()
        user.dataReceived(b"three ")
        gw.flush()
        self.assertEqual(held[0].data, HEADER + b"one two three ")
        held[0].refuse()
        gw.flush()
        user.dataReceived(b"four")
        gw.flush()
        [served] = gw.sides["b"].accepted
        self.assertEqual(served.data, HEADER + b"one two three four")
        self.assertEqual(user.bytes_in, len(b"one two three four"))
        # The user's transport is fed by the new stream now.
        self.assertIs(user.transport.producer, user.peer.transport)
        self.assertIn(user.peer.transport.id, gw.sides["b"].session.streams)

    def test_proxy_header_replayed(self):
        """The PROXY header goes to the second client as it went to the first."""
        held: list[Held] = []
        gw = gateway(
            lambda s: held.append(Held()) or held[-1],
            lambda s: Service(),
            HaProxyProxyProtocol=True,
        )
        gw.connect(sent=b"hi")
        first = held[0].data
        self.assertIn(b"PROXY TCP4 203.0.113.9 127.0.0.1 51000 9000\r\n", first)
        held[0].refuse()
        gw.flush()
        self.assertEqual(gw.sides["b"].accepted[0].data, first)

    def test_user_eof_replayed(self):
        """A user that already sent its EOF: the replay ends with it."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Held())
        user = gw.connect(sent=b"request")
        user.readConnectionLost()
        gw.flush()
        self.assertTrue(held[0].read_closed)
        held[0].refuse()
        gw.flush()
        [served] = gw.sides["b"].accepted
        self.assertEqual(served.data, HEADER + b"request")
        self.assertTrue(served.read_closed)
        self.assertIs(user.state, RelayState.READ_SHUT)

    def test_answered_stream_not_retried(self):
        """A stream that sent a byte back is not retried: the reset goes on."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Service())
        user = gw.connect(sent=b"GET /")
        held[0].answer(b"H")
        gw.flush()
        held[0].refuse()
        gw.flush()
        self.assertEqual(user.transport.value(), b"H")
        self.assertTrue(user.transport.ended)
        self.assertEqual(gw.sides["b"].accepted, [])
        self.assertEqual(gw.stats.retries[KEY], 0)

    def test_eof_back_not_retried(self):
        """The client's EOF before any byte counts as an answer."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Service())
        user = gw.connect(sent=b"GET /")
        held[0].transport.loseWriteConnection()
        gw.flush()
        held[0].refuse()
        gw.flush()
        self.assertTrue(user.transport.ended)
        self.assertEqual(gw.sides["b"].accepted, [])

    def test_copy_bounded(self):
        """Past REPLAY_LIMIT bytes no copy is kept, and a reset goes on."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Service())
        user = gw.connect(sent=b"x" * (REPLAY_LIMIT - len(HEADER)))
        self.assertTrue(user.replay.holding)
        user.dataReceived(b"y")
        gw.flush()
        self.assertIs(user.replay.state, ReplayState.DONE)
        held[0].refuse()
        gw.flush()
        self.assertTrue(user.transport.ended)
        self.assertEqual(gw.sides["b"].accepted, [])
        self.assertEqual(gw.stats.retries[KEY], 0)

    def test_copy_at_the_bound_replayed(self):
        """Exactly REPLAY_LIMIT bytes (header included) are still replayed."""
        gw = gateway(lambda s: Refusing(), lambda s: Service())
        body = b"x" * (REPLAY_LIMIT - len(HEADER))
        user = gw.connect(sent=body)
        [served] = gw.sides["b"].accepted
        self.assertEqual(served.data, HEADER + body)
        self.assertFalse(user.transport.ended)
        self.assertEqual(REPLAY_LIMIT, INITIAL_WINDOW)

    def test_retried_once(self):
        """a and b both reset: the user is reset, c is never tried."""
        gw = gateway(lambda s: Refusing(), lambda s: Refusing(), lambda s: Service())
        user = gw.connect(sent=b"GET /")
        self.assertTrue(user.transport.ended)
        self.assertEqual(len(gw.sides["a"].accepted), 1)
        self.assertEqual(len(gw.sides["b"].accepted), 1)
        self.assertEqual(gw.sides["c"].accepted, [])
        self.assertEqual(gw.stats.retries[KEY], 1)
        self.assertEqual(gw.stats.retry_failures[KEY], 1)
        self.assertEqual(gw.stats.open, 0)
        self.assertEqual(gw.stats.open_per_client(KEY), {})
        self.assertEqual(len(gw.admission), 0)

    def test_single_client_keeps_no_copy(self):
        """With no other healthy client nothing is kept; a reset goes on."""
        gw = gateway(lambda s: Refusing())
        user = gw.connect(sent=b"GET /")
        self.assertIsNone(user.replay)
        self.assertTrue(user.transport.ended)
        self.assertEqual(gw.stats.retries[KEY], 0)

    def test_other_client_unhealthy_since(self):
        """The retry goes to a client healthy now: b turned unhealthy meanwhile."""
        held: list[Held] = []
        gw = gateway(
            lambda s: held.append(Held()) or held[-1],
            lambda s: Service(),
            lambda s: Service(),
        )
        gw.connect(sent=b"GET /")
        gw.report("b", web=False)
        held[0].refuse()
        gw.flush()
        self.assertEqual(gw.sides["b"].accepted, [])
        self.assertEqual(gw.sides["c"].accepted[0].data, HEADER + b"GET /")

    def test_no_other_session_left(self):
        """No other client can take it any more: the reset goes on."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Service())
        user = gw.connect(sent=b"GET /")
        gw.disconnect("b")
        held[0].refuse()
        gw.flush()
        self.assertTrue(user.transport.ended)
        self.assertEqual(gw.stats.retries[KEY], 0)

    def test_session_death_not_retried(self):
        """A session that ends under the stream is no refusal: not retried."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Service())
        user = gw.connect(sent=b"GET /")
        gw.disconnect("a")
        self.assertTrue(user.transport.ended)
        self.assertEqual(gw.sides["b"].accepted, [])
        self.assertEqual(gw.stats.retries[KEY], 0)

    def test_round_robin_retries_on_the_next_in_turn(self):
        """Round-robin: the retry goes to the next client of this turn."""
        gw = gateway(
            lambda s: Refusing(),
            lambda s: Service(),
            lambda s: Service(),
            balance="round-robin",
        )
        gw.connect(sent=b"1")  # turn 0: a, retried on b
        self.assertEqual([len(gw.sides[c].accepted) for c in "abc"], [1, 1, 0])
        self.assertEqual(gw.stats.retries[KEY], 1)

    def test_user_closing_meanwhile_not_retried(self):
        """A user gone before the reset: nothing retried, nothing left open."""
        held: list[Held] = []
        gw = gateway(lambda s: held.append(Held()) or held[-1], lambda s: Service())
        user = gw.connect(sent=b"GET /")
        user.transport.abortConnection()
        gw.flush()
        self.assertEqual(gw.sides["b"].accepted, [])
        self.assertEqual(gw.stats.open, 0)
        held[0].refuse()
        gw.flush()
        self.assertEqual(gw.sides["b"].accepted, [])
        self.assertEqual(gw.sides["a"].session.streams, {})
        self.assertEqual(gw.stats.retries[KEY], 0)


class ReplayTests(SynchronousTestCase):
    """The copy on its own."""

    def test_moves(self):
        """Holding, then retried or done; done is final."""
        self.assertEqual(set(MOVES), set(ReplayState))
        self.assertEqual(MOVES[ReplayState.DONE], frozenset())
        replay = Replay([b"h"], ["b"])
        self.assertRaises(AssertionError, replay._move, ReplayState.HOLDING)

    def test_keeps_until_answered(self):
        """A copy of what was sent, until the first answer."""
        replay = Replay([b"head", b""], ["b"], limit=10)
        replay.sent(b"12")
        self.assertEqual(replay.take(), [b"head", b"12"])
        self.assertIs(replay.state, ReplayState.RETRIED)
        replay.sent(b"more")
        replay.answered()
        self.assertIs(replay.state, ReplayState.DONE)

    def test_limit(self):
        """More than the limit drops the copy; the opening alone may be too much."""
        replay = Replay([b"12345"], ["b"], limit=6)
        replay.sent(b"6")
        self.assertTrue(replay.holding)
        replay.sent(b"7")
        self.assertIs(replay.state, ReplayState.DONE)
        self.assertFalse(Replay([b"1234567"], ["b"], limit=6).holding)


class UserReadingTests(SynchronousTestCase):
    """The user's transport as a stream's producer, detachable."""

    def test_forwards_while_attached(self):
        transport = StringTransport()
        reading = UserReading(transport)
        reading.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        reading.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        reading.stopProducing()
        self.assertEqual(transport.producerState, "stopped")

    def test_detach_undoes_the_pause(self):
        """Detached: a pause it made is undone, and it takes no more orders."""
        transport = StringTransport()
        reading = UserReading(transport)
        reading.pauseProducing()
        reading.detach()
        self.assertEqual(transport.producerState, "producing")
        reading.pauseProducing()
        reading.stopProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_stream_side_names_its_client(self):
        gw = gateway(lambda s: Service(), lambda s: Service())
        user = gw.connect(sent=b"x")
        self.assertIsInstance(user.peer, StreamSide)
        self.assertEqual(user.peer.client_id, "a")
        self.assertIsInstance(user.peer.reading, UserReading)


class LoopbackRetryTests(TestCase):
    """The retry over real sockets: two in-process clients of one gateway."""

    timeout = 30

    @inlineCallbacks
    def test_refused_local_service_costs_the_user_nothing(self):
        """A's local service refuses every connection: each user is served by
        B, with every byte, and each costs one retry."""
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        deployment = Deployment(False, self.mktemp())
        self.addCleanup(deployment.stop)
        deployment.start_server()
        dead = ("127.0.0.1", free_port())  # nothing listens there
        deployment.start_client("A", {"web": dead})
        deployment.start_client("B", {"web": ("127.0.0.1", backend_port)})
        yield deployment.wait_connected("A")
        yield deployment.wait_connected("B")
        port = free_port()
        code, body = yield deployment.put_tunnels(
            [
                {
                    k: v
                    for k, v in tunnel("A", port, "web", ClientIds=["A", "B"]).items()
                    if k != "ClientId"
                }
            ]
        )
        self.assertEqual(code, 200, body)
        for i in range(5):
            user = yield connect_user(port)
            payload = f"request {i}\n".encode() * 100
            user.transport.write(payload)
            yield wait_until(lambda u=user, p=payload: u.data == p, 10, "the echo")
            user.transport.loseConnection()
            yield user.done
        server = deployment.server
        key = ("127.0.0.1", port, "*")
        self.assertEqual(server.stats.retries[key], 5)
        self.assertEqual(server.stats.retry_failures[key], 0)
        self.assertEqual(len(backend.connections), 5)
        code, status = yield deployment.get_json("/tunnels/status")
        self.assertEqual(status["Tunnels"][0]["Serving"], ["A"])
