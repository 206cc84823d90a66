"""The gateway service in memory: control listener, saving, restore, stop."""

from __future__ import annotations

import errno
import json
import os

from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.server.control import ControlSettings
from threshold.server.registry import STATE_CONNECTED
from threshold.server.routes import TunnelError, parse_tunnels
from threshold.server.service import TunnelServer
from threshold.server.statefile import read_state, write_state
from threshold.server.stats import HandshakeFailure
from threshold.testing import Collector
from threshold.wire.handshake import encode_hello


def at_once(f, *args):
    """Run the state file's blocking write in the caller's thread."""
    return maybeDeferred(f, *args)


class Listen:
    """A listen function whose ports can be made busy."""

    def __init__(self) -> None:
        self.busy: set[int] = set()
        self.open: set[int] = set()

    def __call__(self, host, port, factory):
        if port in self.busy:
            raise CannotListenError(host, port, OSError(errno.EADDRINUSE, "in use"))
        self.open.add(port)
        return succeed(FakePort(self, port))


class FakePort:
    def __init__(self, listen: Listen, port: int) -> None:
        self.listen, self.port = listen, port

    def stopListening(self):
        self.listen.open.discard(self.port)
        return succeed(None)


def make_server(clock: Clock, state_file=None, restore=None, listen=None, **settings):
    config = SessionConfig(keepalive_interval=0)
    return TunnelServer(
        listen or Listen(),
        clock,
        ControlSettings(session=config, **settings),
        state_file=state_file,
        restore=restore,
        run_in_thread=at_once,
    )


def dial(server: TunnelServer, clock: Clock):
    """A raw client session connected in memory to the server's factory."""
    factory = server.control_factory()
    client, session, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(None),
        lambda: MuxSession(
            client=True,
            clock=clock,
            handler=StreamAcceptor(lambda s: Collector()),
            config=SessionConfig(keepalive_interval=0),
        ),
        clock=clock,
    )
    return client, session, pump


def hello(client: MuxSession, pump, client_id: str = "TestClient1") -> Collector:
    reply = Collector()
    stream = client.open_stream(reply)
    stream.write(encode_hello(client_id))
    pump.flush()
    return reply


def entry(port: int, client: str = "TestClient1") -> dict:
    return {"ClientId": client, "ListenPort": port, "BackEndService": "svc"}


class ControlTests(SynchronousTestCase):
    def test_hello_through_the_service(self):
        """The service's control factory accepts a client into its registry,
        counting refusals in the service's counters."""
        clock = Clock()
        server = make_server(clock)
        client, session, pump = dial(server, clock)
        self.assertEqual(json.loads(hello(client, pump).data), {"ok": True})
        self.assertEqual(
            server.registry.snapshot()["TestClient1"]["CurrentState"], STATE_CONNECTED
        )
        self.assertIs(server.control_factory(), server.control_factory())
        bad, _, bad_pump = dial(server, clock)
        bad.open_stream(Collector()).write(b"nope\n")
        bad_pump.flush()
        self.assertEqual(
            server.stats.handshake_failures, {HandshakeFailure.BAD_HELLO: 1}
        )


class SaveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "state.json")
        self.clock = Clock()

    def test_apply_saves(self):
        """An accepted set is in the file when the apply answers."""
        server = make_server(self.clock, state_file=self.path)
        tunnels = parse_tunnels([entry(9000)])
        # No client need be connected.
        self.assertEqual(self.successResultOf(server.apply(tunnels)), tunnels)
        self.assertEqual(read_state(self.path), tunnels)

    def test_save_failure_is_503_and_nothing_changes(self):
        """A set that cannot be saved is refused with 503; the old set stays
        in force and in the file, and the new sockets are closed."""
        listen = Listen()
        server = make_server(self.clock, state_file=self.path, listen=listen)
        server.registry.connected("TestClient1", FakeSession(), "p")
        old = parse_tunnels([entry(9000)])
        self.successResultOf(server.apply(old))
        # A directory where the file was: the rename over it fails.
        os.rename(self.path, self.path + ".keep")
        os.mkdir(self.path)
        os.mkdir(os.path.join(self.path, "occupied"))
        failure = self.failureResultOf(
            server.apply(parse_tunnels([entry(9001)])), TunnelError
        )
        self.assertEqual(failure.value.status, 503)
        self.assertIn("cannot be saved", failure.value.message)
        self.assertEqual(server.routes.tunnels(), old)
        self.assertEqual(listen.open, {9000})
        self.assertEqual(read_state(self.path + ".keep"), old)


class FakeSession:
    streams: dict = {}
    rtt = None

    def go_away(self, code: int = 0) -> None:
        pass


class RestoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "state.json")
        self.clock = Clock()

    def test_partial_restore(self):
        """A saved tunnel whose port is taken is left out; the others serve;
        the file stays as it was until a PUT changes the set."""
        saved = parse_tunnels([entry(9000), entry(9001), entry(9002, "B")])
        write_state(self.path, saved)
        before = os.stat(self.path).st_mtime_ns
        listen = Listen()
        listen.busy = {9001}
        server = make_server(
            self.clock, state_file=self.path, restore=saved, listen=listen
        )
        server.startService()
        self.assertEqual(server.routes.tunnels(), [saved[0], saved[2]])
        self.assertEqual([f.index for f in server.routes.not_restored()], [1])
        self.assertEqual(listen.open, {9000, 9002})
        self.assertEqual(read_state(self.path), saved)
        self.assertEqual(os.stat(self.path).st_mtime_ns, before)
        # The operator's next set replaces all of it.
        server.registry.connected("TestClient1", FakeSession(), "p")
        listen.busy = set()
        new = parse_tunnels([entry(9001)])
        self.successResultOf(server.apply(new))
        self.assertEqual(read_state(self.path), new)
        self.assertEqual(server.routes.not_restored(), [])


class StopTests(SynchronousTestCase):
    def test_graceful_stop_lets_streams_finish(self):
        """On stop, running streams may finish; then the sessions close."""
        clock = Clock()
        server = make_server(clock)
        server.shutdown_grace = 10
        client, session, pump = dial(server, clock)
        hello(client, pump)
        user = Collector()
        stream = session.open_stream(user)
        pump.flush()
        server.startService()
        stopped = server.stopService()
        pump.flush()
        self.assertNoResult(stopped)
        self.assertFalse(client.closed)
        stream.write(b"last words")
        stream.loseConnection()
        for c in list(client.streams.values()):
            c.loseConnection()
        pump.flush()
        self.successResultOf(stopped)
        self.assertTrue(client.closed)

    def test_graceful_stop_cuts_after_grace(self):
        """Connections still running after the grace period are cut."""
        clock = Clock()
        server = make_server(clock)
        server.shutdown_grace = 10
        client, session, pump = dial(server, clock)
        hello(client, pump)
        session.open_stream(Collector())
        pump.flush()
        server.startService()
        stopped = server.stopService()
        pump.flush()
        clock.advance(9)
        pump.flush()
        self.assertNoResult(stopped)
        clock.advance(2)
        pump.flush()
        self.successResultOf(stopped)
        self.assertTrue(client.closed)
