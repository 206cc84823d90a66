"""Bandwidth caps on real loopback sockets, measured at the receivers.

Slow by nature: the cap is measured over 10 s (after the first second,
which holds the stated burst), both directions at once, while an
uncapped tunnel moves at full speed.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tests.support import Deployment, free_port, tunnel, wait_until
from threshold.config.policy import ClientPolicy

CAP = 1_000_000
CHUNK = b"x" * 65536


@implementer(IPushProducer)
class Blaster(Protocol):
    """Sends as fast as the transport takes it (a push producer), counts what comes."""

    def __init__(self, send: bool = True) -> None:
        self.send = send
        self.received = 0
        self.paused = False
        self.lost = False

    def connectionMade(self) -> None:  # noqa: N802
        if self.send:
            self.transport.registerProducer(self, True)
            self.resumeProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        # write() pauses us (synchronously) once the buffer is full.
        while not self.paused and not self.lost:
            self.transport.write(CHUNK)

    def pauseProducing(self) -> None:  # noqa: N802
        self.paused = True

    def stopProducing(self) -> None:  # noqa: N802
        self.paused = True

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += len(data)

    def connectionLost(self, reason: object = None) -> None:  # noqa: N802
        self.lost = True


class Service:
    """A local service whose connections are Blasters."""

    def __init__(self) -> None:
        self.connections: list[Blaster] = []

    @inlineCallbacks
    def start(self):
        def build() -> Blaster:
            self.connections.append(Blaster())
            return self.connections[-1]

        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(build)
        )
        return self.port.getHost().port


@inlineCallbacks
def user(port: int, send: bool):
    protocol = Blaster(send=send)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return protocol


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


class BandwidthTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def start(self, **server_fields):
        self.deployment = Deployment(False, self.mktemp(), **server_fields)
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        services = {}
        for name in ("capped", "fast"):
            service = Service()
            services[name] = ("127.0.0.1", (yield service.start()))
            setattr(self, name, service)
            self.addCleanup(service.port.stopListening)
        for client_id in ("TestClient1", "TestClient2"):
            self.deployment.start_client(client_id, services)
            yield self.deployment.wait_connected(client_id)

    def close(self, *protocols: Blaster) -> None:
        for protocol in protocols:
            protocol.transport.abortConnection()

    @inlineCallbacks
    def test_tunnel_cap_both_directions_while_another_runs_free(self):
        """1 MB/s each way over 10 s within 5%, an uncapped tunnel far faster."""
        yield self.start()
        capped_port, fast_port = free_port(), free_port()
        code, body = yield self.deployment.put_tunnels(
            [
                tunnel(
                    "TestClient1", capped_port, "capped", BandwidthBytesPerSecond=CAP
                ),
                tunnel("TestClient1", fast_port, "fast"),
            ]
        )
        self.assertEqual(code, 200, body)
        shaped = yield user(capped_port, send=True)
        free = yield user(fast_port, send=False)
        yield wait_until(
            lambda: (
                len(self.capped.connections) == 1 and len(self.fast.connections) == 1
            ),
            what="both services reached",
        )
        backend = self.capped.connections[0]
        yield sleep(1.0)  # the burst (one second's worth) passes first
        start = (shaped.received, backend.received, free.received)
        yield sleep(10.0)
        end = (shaped.received, backend.received, free.received)
        download, upload, fast = (
            (b - a) / 10.0 for a, b in zip(start, end, strict=True)
        )
        self.close(shaped, free)
        self.assertLessEqual(abs(download - CAP), CAP * 0.05, f"download {download}")
        self.assertLessEqual(abs(upload - CAP), CAP * 0.05, f"upload {upload}")
        self.assertGreater(fast, 10 * CAP, f"uncapped {fast}")
        code, status = yield self.deployment.get_json("/tunnels/status")
        bandwidth = status["Tunnels"][0]["Policy"]["Bandwidth"]
        self.assertEqual(bandwidth["Upload"]["BandwidthBytesPerSecond"], CAP)
        self.assertGreater(bandwidth["Download"]["LimitedSeconds"], 5)
        self.assertIsNone(status["Tunnels"][1]["Policy"]["Bandwidth"])

    @inlineCallbacks
    def test_client_cap_across_its_tunnels(self):
        """A client's BandwidthBytesPerSecond is shared by all its tunnels."""
        rate = 500_000
        yield self.start(
            client_policies={"TestClient2": ClientPolicy(bandwidth=rate)},
        )
        a, b = free_port(), free_port()
        code, body = yield self.deployment.put_tunnels(
            [tunnel("TestClient2", a, "fast"), tunnel("TestClient2", b, "fast")]
        )
        self.assertEqual(code, 200, body)
        users = [(yield user(a, send=False)), (yield user(b, send=False))]
        yield sleep(1.0)
        start = sum(u.received for u in users)
        yield sleep(3.0)
        total = (sum(u.received for u in users) - start) / 3.0
        self.close(*users)
        self.assertLessEqual(abs(total - rate), rate * 0.08, f"together {total}")
        code, clients = yield self.deployment.get_json("/clients")
        down = clients["TestClient2"]["Bandwidth"]["Download"]
        self.assertEqual(down["BandwidthBytesPerSecond"], rate)
        self.assertIsNone(clients["TestClient1"]["Bandwidth"])
