"""In-memory fixtures for the tunnel client: a fake gateway and local services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from threshold.client.session import ClientSession, session_factory
from threshold.client.settings import ClientSettings
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.testing import Collector
from threshold.wire.handshake import LineBuffer, encode_hello_reply, parse_hello

HELLO_TIMEOUT = 10.0


class HelloAnswer(Collector):
    """Stream 1 on a fake server: answer the hello with ``reply``."""

    def __init__(self, reply: bytes, seen: list) -> None:
        super().__init__()
        self.reply = reply
        self.seen = seen
        self.buffer = LineBuffer()

    def dataReceived(self, data):  # noqa: N802
        line, _ = self.buffer.feed(data)
        if line is not None:
            self.seen.append(parse_hello(line))
            self.transport.write(self.reply)


class FakeEndpoint:
    """A local endpoint whose connection the test completes or fails."""

    def __init__(self, result: Deferred | None = None) -> None:
        self.result = result
        self.transport = StringTransport()
        self.connects: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> FakeEndpoint:
        self.connects.append((host, port))
        return self

    def connect(self, factory):
        if self.result is not None:
            return self.result
        d = Deferred()
        self.pending = (factory, d)
        return d

    def finish(self):
        factory, d = self.pending
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        d.callback(protocol)
        return protocol


def make_settings(
    endpoint: Any = None, clock: Clock | None = None, **fields: Any
) -> ClientSettings:
    """Client settings with one service, ``web`` at 127.0.0.1:8080."""
    values: dict[str, Any] = dict(
        client_id="TestClient1",
        services={"web": ("127.0.0.1", 8080)},
        server="server:9056",
        clock=clock or Clock(),
        local_endpoint=endpoint or FakeEndpoint(),
        session_config=SessionConfig(keepalive_interval=0),
        hello_timeout=HELLO_TIMEOUT,
    )
    values.update(fields)
    return ClientSettings(**values)


@dataclass
class Connected:
    """A client session and a fake gateway joined in memory."""

    settings: ClientSettings
    #: The client's side: the handler and its MuxSession.
    client: ClientSession
    session: MuxSession
    #: The fake gateway's MuxSession.
    server: MuxSession
    pump: iosim.IOPump
    #: The hellos the fake gateway received.
    seen: list

    @property
    def clock(self) -> Clock:
        return self.settings.clock


def connect(
    endpoint: FakeEndpoint | None = None,
    reply: bytes = encode_hello_reply(True),
    **fields: Any,
) -> Connected:
    """Connect a client session to a gateway that answers the hello with ``reply``."""
    settings = make_settings(endpoint, **fields)
    clock = settings.clock
    seen: list = []
    session, server, pump = iosim.connectedServerAndClient(
        lambda: MuxSession(
            client=False,
            clock=clock,
            handler=StreamAcceptor(lambda s: HelloAnswer(reply, seen)),
            config=SessionConfig(keepalive_interval=0),
        ),
        lambda: session_factory(settings).buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return Connected(settings, session.handler, session, server, pump, seen)
