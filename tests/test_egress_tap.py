"""The client's service tree with Egress: the SOCKS5 listener, and its warning."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import Recorder, free_port, wait_until
from threshold.config import parse_client_config
from threshold.tap.client import build_client


def client_config(listen: str):
    return parse_client_config(
        {
            "ClientId": "home-a",
            "ServerHost": "127.0.0.1",
            "ServerTunnelControlPort": free_port(),
            "UseTls": False,
            "ServiceToLocalAddrMap": {},
            "Egress": {"SocksListen": listen},
        },
        "client.json",
    )


class EgressServiceTests(TestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "SocksListen" in formatEvent(e)]

    @inlineCallbacks
    def test_listens_and_answers(self):
        """The proxy listens on SocksListen; with no gateway connected a
        CONNECT gets 05 03 (network unreachable). No warning on loopback."""
        port = free_port()
        service = build_client(client_config(f"127.0.0.1:{port}"), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        program = Recorder()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), program)
        program.transport.write(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x19")
        yield program.done
        self.assertEqual(program.data[:4], b"\x05\x00\x05\x03")
        self.assertEqual(self.warnings(), [])

    @inlineCallbacks
    def test_warns_off_loopback(self):
        """A SocksListen that is not loopback is warned about at start."""
        port = free_port()
        service = build_client(client_config(f"0.0.0.0:{port}"), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        yield wait_until(lambda: self.warnings(), 5, "warning")
        self.assertIn("no authentication", self.warnings()[0])
