"""Faults on real loopback sockets and real processes.

A client process killed mid-transfer, a server restarted with its state
file, a network that drops silently, readers that stop reading, and a
graceful stop. Servers and clients run either in this process (``Deployment``
from tests.support) or as ``twistd`` subprocesses (tests.faultkit).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from tests.faultkit import (
    TWISTD,
    FreezableRelay,
    ModeBackend,
    Pump,
    TwistdProcess,
    sha,
    sleep,
    write_buffered,
)
from tests.support import Deployment, connect_user, free_port, tunnel, wait_until

CLIENT = "TestClient1"


@inlineCallbacks
def echo_through(port: int, size: int = 1_000_000):
    """A user sends ``size`` random bytes to an echo backend; check them back."""
    payload = os.urandom(size)
    user = yield connect_user(port)
    user.transport.write(b"echo\n")
    Pump(user.transport, payload).start()
    yield user.done
    if user.data != payload:
        raise AssertionError(
            f"echo through port {port}: got {len(user.data)} bytes "
            f"(sha {sha(user.data)[:12]}), sent {size} (sha {sha(payload)[:12]})"
        )
    return user


def assert_prefix(test: TestCase, received: bytes, sent: bytes) -> None:
    """``received`` is exactly the first bytes of ``sent`` (by checksum)."""
    test.assertLessEqual(len(received), len(sent))
    test.assertEqual(sha(received), sha(sent[: len(received)]))


@inlineCallbacks
def api_clients(deployment: Deployment):
    code, body = yield deployment.get_json("/clients")
    assert code == 200, (code, body)
    return body


@inlineCallbacks
def wait_api(deployment: Deployment, predicate: Any, timeout: float, what: str):
    """Poll ``GET /clients`` every 20 ms until ``predicate(clients)``."""
    start = time.monotonic()
    while True:
        clients = yield api_clients(deployment)
        if predicate(clients):
            return clients
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}: {clients}")
        yield sleep(0.02)


def connected(clients: dict[str, Any], connections: int = 1) -> bool:
    record = clients.get(CLIENT)
    return (
        record is not None
        and record["CurrentState"] == "ClientConnected"
        and record["Connections"] >= connections
    )


@inlineCallbacks
def wait_ping(deployment: Deployment, process: TwistdProcess, timeout: float = 15):
    """Poll ``GET /ping`` until the server subprocess answers ``pong``."""
    start = time.monotonic()
    while True:
        if not process.running:
            raise AssertionError(f"server exited\n{process.log_tail()}")
        try:
            response = yield deployment.http().get(deployment.url("/ping"))
            body = yield response.content()
            if body == b"pong":
                return
        except Exception:
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"server did not answer /ping\n{process.log_tail()}")
        yield sleep(0.02)


@inlineCallbacks
def try_connect(port: int):
    """Connect and abort at once; return True if accepted, False if refused."""
    try:
        protocol = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(Protocol)
        )
    except ConnectionRefusedError:
        return False
    protocol.transport.abortConnection()
    return True


def drop_api_connections(deployment: Deployment) -> Any:
    """Close the API client's kept-open connections to a server subprocess.

    Before it stops: a kept-open connection would otherwise be reused for
    the next request, to the process that is gone. With no server in this
    process, ``Deployment.stop_server`` does only that.
    """
    assert deployment.server_service is None
    return deployment.stop_server()


@inlineCallbacks
def assert_stopped_cleanly(test: TestCase, process: TwistdProcess, timeout: float):
    """The process stopped its services and exited as twistd does on SIGTERM.

    twistd stops the reactor, then kills itself with the same signal (exit
    status 143 in a shell), so a supervisor sees the signal it sent.
    """
    status = yield process.wait(timeout)
    test.assertEqual(status, -signal.SIGTERM, process.log_tail())
    test.assertIn("Server Shut Down.", process.log_tail(5))
    test.assertNotIn("Traceback", process.log_tail(1000))
    return status


def server_json(deployment: Deployment, **more: Any) -> dict[str, Any]:
    """server.json for a server subprocess on the deployment's ports."""
    config = {
        "TunnelControlPort": deployment.control_port,
        "ManagementPort": deployment.management_port,
        "ListenAddress": "127.0.0.1",
        "ManagementListenAddress": "127.0.0.1",
        "UseTls": False,
        "KeepaliveIntervalSeconds": 0.5,
        "KeepaliveTimeoutSeconds": 2.0,
    }
    config.update(more)
    return config


class FaultTestCase(TestCase):
    """Shared set-up: a scratch directory, a backend, orderly cleanup."""

    timeout = 40

    @inlineCallbacks
    def setUp(self):
        if not os.path.exists(TWISTD):
            self.skipTest(f"no {TWISTD}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = ModeBackend()
        self.backend_port = yield self.backend.start()
        # Cleanups run last-first: backend last, after every connection.
        self.addCleanup(self.backend.stop)

    @inlineCallbacks
    def user(self, port: int):
        """Connect as a user; aborted in cleanup if still open."""
        user = yield connect_user(port)
        self.addCleanup(self._abort, user)
        return user

    def _abort(self, user: Any):
        if user.lost is None:
            user.transport.abortConnection()
        return user.done

    @inlineCallbacks
    def next_backend_connection(self, before: int):
        """The backend connection after the first ``before`` ones, once made."""
        connections = self.backend.connections
        yield wait_until(lambda: len(connections) > before, what="the backend")
        return connections[before]

    def process(self, role: str, config: dict[str, Any], name: str) -> TwistdProcess:
        process = TwistdProcess(role, config, self.dir, name)
        self.addCleanup(process.kill)
        return process

    def deployment(self, **server_fields: Any) -> Deployment:
        fields = dict(
            keepalive_interval_seconds=0.5,
            keepalive_timeout_seconds=2.0,
            shutdown_grace_seconds=1.0,
        )
        fields.update(server_fields)
        deployment = Deployment(False, self.dir, **fields)
        self.addCleanup(deployment.stop)
        return deployment


class ClientKilledTests(FaultTestCase):
    """The client process dies without a word, then comes back."""

    @inlineCallbacks
    def test_client_killed_mid_transfer_and_restarted(self):
        """SIGKILL mid-download: the user is cut at once; a restart serves anew."""
        deployment = self.deployment()
        deployment.start_server()
        client = self.process(
            "threshold-client",
            {
                "ClientId": CLIENT,
                "ServerHost": "127.0.0.1",
                "ServerTunnelControlPort": deployment.control_port,
                "UseTls": False,
                "ServiceToLocalAddrMap": {"svc": f"127.0.0.1:{self.backend_port}"},
                "KeepaliveIntervalSeconds": 0.5,
                "KeepaliveTimeoutSeconds": 2.0,
                "ReconnectInitialDelaySeconds": 0.05,
                "ReconnectMaxDelaySeconds": 0.5,
            },
            "client",
        )
        client.start()
        yield deployment.wait_connected(CLIENT, timeout=15)
        port = free_port()
        code, body = yield deployment.put_tunnels([tunnel(CLIENT, port, "svc")])
        self.assertEqual(code, 200, body)

        # An endless slow download: 16 KiB every 10 ms.
        before = len(self.backend.connections)
        user = yield self.user(port)
        user.transport.write(b"source 0 16384 10\n")
        yield wait_until(lambda: len(user.data) >= 200_000, what="download under way")
        source = self.backend.connections[before]

        client.signal(signal.SIGKILL)
        killed = time.monotonic()
        yield user.done
        cut_after = time.monotonic() - killed
        # The kernel closes a killed process's sockets: no need to wait for
        # the keepalive timeout (2 s) to notice.
        self.assertLess(cut_after, 2.0 + 1.0)
        # Every byte received is the backend's, in order; and the cut is a
        # reset, not a FIN that would pass a truncated download for whole.
        assert_prefix(self, user.data, source.sent)
        self.assertFalse(user.lost.check(ConnectionDone), user.lost)
        self.assertEqual((yield client.wait(5)), -signal.SIGKILL)
        yield source.done

        clients = yield wait_api(
            deployment,
            lambda c: c[CLIENT]["CurrentState"] != "ClientConnected",
            5,
            "the server to see the client gone",
        )
        self.assertIn(clients[CLIENT]["CurrentState"], ("ClientError", "ClientClosed"))
        self.assertEqual(clients[CLIENT]["LastState"], "ClientConnected")
        self.assertFalse(deployment.server.registry.is_connected(CLIENT))

        client.start()
        yield wait_api(
            deployment, lambda c: connected(c, 2), 15, "the restarted client"
        )
        yield echo_through(port)


class ServerRestartTests(FaultTestCase):
    """The server process restarts; its state file brings the tunnels back."""

    @inlineCallbacks
    def test_restart_restores_tunnels_before_clients_return(self):
        """After SIGTERM and a restart the tunnel port listens before the
        client is back, the client returns by itself, and no PUT is needed."""
        deployment = self.deployment()
        state = os.path.join(self.dir, "tunnels.json")
        server = self.process(
            "threshold-server",
            server_json(deployment, StateFile=state, ShutdownGraceSeconds=1),
            "server",
        )
        server.start()
        yield wait_ping(deployment, server)
        # The client reaches the server through a relay that can hold it off,
        # so the probe below runs while it is certainly not connected.
        gate = FreezableRelay(deployment.control_port)
        gate_port = yield gate.start()
        self.addCleanup(gate.stop)
        deployment.start_client(
            CLIENT,
            {"svc": ("127.0.0.1", self.backend_port)},
            server_tunnel_control_port=gate_port,
            keepalive_interval_seconds=0.5,
            keepalive_timeout_seconds=2.0,
            reconnect_initial_delay_seconds=0.05,
            reconnect_max_delay_seconds=0.5,
        )
        yield wait_api(deployment, connected, 10, "the client")
        port = free_port()
        code, tunnels = yield deployment.put_tunnels([tunnel(CLIENT, port, "svc")])
        self.assertEqual(code, 200, tunnels)
        yield echo_through(port)

        gate.refuse_new = True
        server.signal(signal.SIGTERM)
        yield assert_stopped_cleanly(self, server, 10)
        with open(state) as f:
            self.assertEqual(json.load(f), tunnels)
        yield drop_api_connections(deployment)

        server.start()
        yield wait_ping(deployment, server)
        # At once: the restored tunnel accepts, then closes for want of a
        # client (no byte arrives; the connection ends).
        probe = yield self.user(port)
        yield probe.done
        self.assertEqual(probe.data, b"")
        self.assertTrue(probe.lost.check(ConnectionDone), probe.lost)
        clients = yield api_clients(deployment)
        self.assertFalse(connected(clients), clients)
        code, listed = yield deployment.get_json("/tunnels")
        self.assertEqual(listed, tunnels)

        gate.refuse_new = False
        opened = time.monotonic()
        # Backoff: at most ReconnectMaxDelaySeconds plus up to 1 s of jitter.
        yield wait_api(deployment, connected, 0.5 + 1.0 + 1.5, "the client's return")
        self.assertLess(time.monotonic() - opened, 3.0)
        yield echo_through(port)


class SilentDropTests(FaultTestCase):
    """The network between client and server drops everything, silently."""

    @inlineCallbacks
    def test_frozen_link_detected_by_keepalive_both_sides(self):
        """A frozen link is declared dead by keepalive on both sides; the
        client reconnects over a new connection and users get through."""
        keepalive = dict(keepalive_interval_seconds=0.3, keepalive_timeout_seconds=1.5)
        deployment = self.deployment(**keepalive)
        deployment.start_server()
        relay = FreezableRelay(deployment.control_port)
        relay_port = yield relay.start()
        self.addCleanup(relay.stop)
        deployment.start_client(
            CLIENT,
            {"svc": ("127.0.0.1", self.backend_port)},
            server_tunnel_control_port=relay_port,
            # Both sides' keepalives expire within 1.5 to 1.8 s of the freeze;
            # waiting 0.8 s more before reconnecting lets the server record
            # the dead session before a new one replaces it.
            reconnect_initial_delay_seconds=0.8,
            reconnect_max_delay_seconds=1.0,
            **keepalive,
        )
        yield deployment.wait_connected(CLIENT)
        port = free_port()
        code, body = yield deployment.put_tunnels([tunnel(CLIENT, port, "svc")])
        self.assertEqual(code, 200, body)
        yield echo_through(port, 100_000)
        registry = deployment.server.registry
        old_session = registry.session_for(CLIENT)

        # A user in the middle of a download when the link freezes.
        before = len(self.backend.connections)
        user = yield self.user(port)
        user.transport.write(b"source 0 4096 10\n")
        yield wait_until(lambda: len(user.data) > 20_000, what="download under way")
        source = self.backend.connections[before]
        self.assertEqual(relay.freeze(), 1)
        frozen = time.monotonic()

        yield wait_until(
            lambda: registry.session_for(CLIENT) is not old_session,
            timeout=1.5 + 0.3 + 1.0,
            what="the server to declare the session dead",
        )
        noticed = time.monotonic() - frozen
        # Not before a Ping could go unanswered for the whole timeout.
        self.assertGreater(noticed, 1.0)
        record = registry.snapshot()[CLIENT]
        self.assertEqual(record["CurrentState"], "ClientError", record)
        self.assertEqual(record["LastState"], "ClientConnected", record)
        self.assertIn("no answer to Ping within 1.5s", record["LastError"])
        # The user's connection rode on the dead session: it is reset.
        yield user.done
        self.assertFalse(user.lost.check(ConnectionDone), user.lost)
        assert_prefix(self, user.data, source.sent)

        # The client notices too (its own keepalive), and comes back over a
        # new connection that the relay forwards normally.
        yield wait_api(
            deployment, lambda c: connected(c, 2), 1.8 + 1.0 + 1.0 + 1.5, "reconnection"
        )
        self.assertEqual(relay.accepted, 2)
        self.assertIsNot(registry.session_for(CLIENT), old_session)
        # Its end of the download was cut too: the service saw a reset.
        yield source.done
        self.assertFalse(source.lost.check(ConnectionDone), source.lost)
        yield echo_through(port)


WINDOW = 256 * 1024
#: A Twisted TCP transport pauses its producer past 64 KiB; one more write
#: (a 64 KiB read or frame) may land before the pause takes effect.
TRANSPORT_BOUND = 4 * 64 * 1024
#: One stream holds at most its window received plus one read to send.
STREAM_BOUND = WINDOW + 2 * 64 * 1024


class Sampler:
    """Record, every 5 ms, the most bytes held in user space on the path."""

    def __init__(self, server_session: Any, client_session: Any) -> None:
        self.server = server_session
        self.client = client_session
        self.max: dict[str, int] = {}
        self.samples = 0
        self._call = LoopingCall(self.sample)

    def start(self) -> None:
        self._call.start(0.005)

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()

    def _keep(self, name: str, value: int) -> None:
        self.max[name] = max(self.max.get(name, 0), value)

    def sample(self) -> None:
        self.samples += 1
        for side, session in (("server", self.server), ("client", self.client)):
            self._keep(f"{side} session", session.buffered_bytes())
            self._keep(f"{side} control transport", write_buffered(session.transport))
            for stream in list(session.streams.values()):
                self._keep(f"{side} stream", sum(stream.buffered()))
        for stream in list(self.server.streams.values()):
            public = getattr(stream.protocol, "peer", None)
            if public is not None and public.transport.connected:
                self._keep("public transport", write_buffered(public.transport))
        for stream in list(self.client.streams.values()):
            local = getattr(stream.protocol, "local", None)
            if local is not None and local.transport.connected:
                self._keep("local transport", write_buffered(local.transport))

    def reset(self) -> None:
        self.max = {}
        self.samples = 0

    def check(self, test: TestCase, session_bound: int, samples: int = 50) -> None:
        """Every figure within its bound (all measured, none unbounded)."""
        bounds = {
            "server session": session_bound,
            "client session": session_bound,
            "server stream": STREAM_BOUND,
            "client stream": STREAM_BOUND,
            "server control transport": TRANSPORT_BOUND,
            "client control transport": TRANSPORT_BOUND,
            "public transport": TRANSPORT_BOUND,
            "local transport": TRANSPORT_BOUND,
        }
        test.assertGreaterEqual(self.samples, samples)
        for name, bound in bounds.items():
            test.assertIn(name, self.max)
            test.assertLessEqual(self.max[name], bound, f"{name}: {self.max}")


class SlowReaderTests(FaultTestCase):
    """A reader that stops reading holds bounded memory, and only its stream."""

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        window = dict(max_receive_window_bytes=WINDOW)
        self.d = self.deployment(**window)
        self.d.start_server()
        self.d.start_client(CLIENT, {"svc": ("127.0.0.1", self.backend_port)}, **window)
        yield self.d.wait_connected(CLIENT)
        self.port = free_port()
        code, body = yield self.d.put_tunnels([tunnel(CLIENT, self.port, "svc")])
        self.assertEqual(code, 200, body)
        server_session = self.d.server.registry.session_for(CLIENT)
        client_session = yield list(self.d.clients[CLIENT])[0].whenConnected()
        self.sampler = Sampler(server_session, client_session)
        self.sampler.start()
        self.addCleanup(self.sampler.stop)

    @inlineCallbacks
    def stalled(self, progress: Any, seconds: float = 1.5):
        """Let a stalled transfer run; check ``progress()`` stops growing."""
        yield sleep(seconds - 0.5)
        before = progress()
        yield sleep(0.5)
        self.assertGreater(before, 0)
        self.assertEqual(progress(), before, "the stalled transfer still moves")

    @inlineCallbacks
    def timed_echo(self):
        """Seconds to echo 20 MB through the tunnel (checked byte for byte)."""
        started = time.monotonic()
        yield echo_through(self.port, 20_000_000)
        return time.monotonic() - started

    @inlineCallbacks
    def other_user_at_full_speed(self, baseline: float):
        """20 MB echoed on the same tunnel while the other stream is stuck,
        about as fast as with nothing stuck (``baseline`` seconds)."""
        elapsed = yield self.timed_echo()
        # Behind a stuck stream it would never finish; slowed down by it, it
        # would take many times the baseline. The slack absorbs a busy host.
        self.assertLess(elapsed, 4 * baseline + 2.0, f"baseline {baseline:.2f}s")

    @inlineCallbacks
    def test_backend_that_never_reads(self):
        """An upload to a backend that never reads stalls within bounded
        buffers, and another user on the tunnel still moves 20 MB."""
        baseline = yield self.timed_echo()
        self.sampler.reset()
        before = len(self.backend.connections)
        user = yield self.user(self.port)
        user.transport.write(b"sink\n")
        pump = Pump(user.transport, None)
        pump.start()
        sink = yield self.next_backend_connection(before)
        streams = self.sampler.server.streams
        stream = streams[max(streams)]
        public = stream.protocol.peer
        # The server stops reading the user: backpressure reached the socket.
        yield self.stalled(lambda: public.bytes_in)
        self.assertGreater(pump.sent, public.bytes_in)
        self.sampler.check(self, 2 * WINDOW)

        self.sampler.reset()
        yield self.other_user_at_full_speed(baseline)
        # Fewer samples: the reactor is busy moving the 20 MB.
        self.sampler.check(self, 3 * WINDOW, samples=5)
        # The stuck upload is still there, still stuck, not cut.
        self.assertIsNone(user.lost)
        self.assertIn(stream, self.sampler.server.streams.values())
        self.assertEqual(sink.mode, "sink")
        self.assertIsNone(sink.lost)

    @inlineCallbacks
    def test_user_that_never_reads(self):
        """A download to a user who never reads stalls within bounded
        buffers, and another user on the tunnel still moves 20 MB."""
        baseline = yield self.timed_echo()
        self.sampler.reset()
        before = len(self.backend.connections)
        user = yield self.user(self.port)
        user.transport.pauseProducing()
        # 32 MB: more than loopback's socket buffers can hold, so it stalls.
        user.transport.write(b"source 32000000\n")
        source = yield self.next_backend_connection(before)
        yield wait_until(lambda: source.pump is not None, what="the download")
        # The backend is held back: backpressure reached the local service.
        yield self.stalled(lambda: source.pump.sent)
        self.sampler.check(self, 2 * WINDOW)

        self.sampler.reset()
        yield self.other_user_at_full_speed(baseline)
        # Fewer samples: the reactor is busy moving the 20 MB.
        self.sampler.check(self, 3 * WINDOW, samples=5)
        self.assertIsNone(user.lost)
        self.assertIsNone(source.lost)
        # Once the user reads, every byte arrives, in order.
        user.transport.resumeProducing()
        yield user.done
        self.assertTrue(user.lost.check(ConnectionDone), user.lost)
        self.assertEqual(len(user.data), 32_000_000)
        self.assertEqual(sha(user.data), sha(source.sent))


class GracefulStopTests(FaultTestCase):
    """SIGTERM: listeners close first, running connections may finish."""

    @inlineCallbacks
    def test_sigterm_lets_running_transfer_finish(self):
        """After SIGTERM new connections are refused while a running slow
        transfer completes; then the process exits, state file intact."""
        deployment = self.deployment()
        state = os.path.join(self.dir, "tunnels.json")
        server = self.process(
            "threshold-server",
            server_json(deployment, StateFile=state, ShutdownGraceSeconds=5),
            "server",
        )
        server.start()
        yield wait_ping(deployment, server)
        deployment.start_client(
            CLIENT,
            {"svc": ("127.0.0.1", self.backend_port)},
            keepalive_interval_seconds=0.5,
            keepalive_timeout_seconds=2.0,
        )
        yield wait_api(deployment, connected, 10, "the client")
        port = free_port()
        code, tunnels = yield deployment.put_tunnels([tunnel(CLIENT, port, "svc")])
        self.assertEqual(code, 200, tunnels)
        yield drop_api_connections(deployment)

        # 800 kB in 16 kB pieces every 30 ms: about 1.5 s.
        before = len(self.backend.connections)
        user = yield self.user(port)
        user.transport.write(b"source 800000 16000 30\n")
        yield wait_until(lambda: len(user.data) >= 100_000, what="transfer under way")
        source = self.backend.connections[before]

        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        while (yield try_connect(port)):
            self.assertLess(time.monotonic() - signalled, 1.0, "still accepting")
            yield sleep(0.01)
        # Refused while the transfer still runs and the process still waits.
        self.assertIsNone(user.lost)
        self.assertLess(len(user.data), 800_000)
        self.assertTrue(server.running)

        yield user.done
        self.assertTrue(user.lost.check(ConnectionDone), user.lost)
        self.assertEqual(len(user.data), 800_000)
        self.assertEqual(sha(user.data), sha(source.sent))
        yield assert_stopped_cleanly(self, server, 5 + 3)
        # It exited once the transfer was done, not at the end of the grace.
        self.assertLess(time.monotonic() - signalled, 4.5)
        with open(state) as f:
            self.assertEqual(json.load(f), tunnels)

    @inlineCallbacks
    def test_grace_over_cuts_with_reset(self):
        """A transfer still running when the grace period ends is cut with a
        reset at both ends, never a FIN that would look like its end."""
        deployment = self.deployment(shutdown_grace_seconds=0.5)
        deployment.start_server()
        deployment.start_client(CLIENT, {"svc": ("127.0.0.1", self.backend_port)})
        yield deployment.wait_connected(CLIENT)
        port = free_port()
        code, body = yield deployment.put_tunnels([tunnel(CLIENT, port, "svc")])
        self.assertEqual(code, 200, body)
        before = len(self.backend.connections)
        user = yield self.user(port)
        user.transport.write(b"source 0 4096 10\n")
        yield wait_until(lambda: len(user.data) >= 20_000, what="transfer under way")
        source = self.backend.connections[before]

        started = time.monotonic()
        yield deployment.stop_server()
        self.assertGreater(time.monotonic() - started, 0.45)
        yield user.done
        yield source.done
        # The user (behind the server) and the service (behind the client,
        # which got Go Away and then the close) both learn of a cut.
        self.assertFalse(user.lost.check(ConnectionDone), user.lost)
        self.assertFalse(source.lost.check(ConnectionDone), source.lost)
        assert_prefix(self, user.data, source.sent)
