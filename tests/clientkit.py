"""In-memory fixtures for the tunnel client: a fake gateway and local services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from threshold.client.gateway import GatewayLink
from threshold.client.session import ClientSession, session_factory
from threshold.client.settings import ClientSettings
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.testing import Collector
from threshold.wire.handshake import LineBuffer, encode_hello_reply, parse_hello

HELLO_TIMEOUT = 10.0


class HelloAnswer(Collector):
    """Stream 1 on a fake server: answer the hello with ``reply``.

    The lines the client sends after the hello (the control channel) are
    kept in ``lines``; ``close_after_reply`` FINs stream 1 after the reply,
    as gateways did before the control channel.
    """

    def __init__(self, reply: bytes, seen: list, close_after_reply: bool = False):
        super().__init__()
        self.reply = reply
        self.seen = seen
        self.close_after_reply = close_after_reply
        self.buffer = LineBuffer()
        self.lines: list[bytes] = []
        self.answered = False

    def dataReceived(self, data):  # noqa: N802
        while data:
            line, data = self.buffer.feed(data)
            if line is None:
                return
            if self.answered:
                self.lines.append(line + b"\n")
                continue
            self.answered = True
            self.seen.append(parse_hello(line))
            self.transport.write(self.reply)
            if self.close_after_reply:
                self.transport.loseConnection()


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
    #: The gateway's link and the fake gateway's stream 1 protocols.
    link: GatewayLink
    answers: list

    @property
    def clock(self) -> Clock:
        return self.settings.clock

    @property
    def control_lines(self) -> list[bytes]:
        """What the client sent on the control channel after the hello."""
        return [line for answer in self.answers for line in answer.lines]


def connect(
    endpoint: FakeEndpoint | None = None,
    reply: bytes = encode_hello_reply(True),
    *,
    settings: ClientSettings | None = None,
    link: GatewayLink | None = None,
    close_after_reply: bool = False,
    **fields: Any,
) -> Connected:
    """Connect a client session to a gateway that answers the hello with ``reply``."""
    if settings is None:
        settings = make_settings(endpoint, **fields)
    clock = settings.clock
    if link is None:
        link = GatewayLink("server:9056", clock)
    seen: list = []
    answers: list[HelloAnswer] = []

    def answer(stream):
        answers.append(HelloAnswer(reply, seen, close_after_reply))
        return answers[-1]

    link.connecting()
    session, server, pump = iosim.connectedServerAndClient(
        lambda: MuxSession(
            client=False,
            clock=clock,
            handler=StreamAcceptor(answer),
            config=SessionConfig(keepalive_interval=0),
        ),
        lambda: session_factory(settings, link).buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return Connected(
        settings, session.handler, session, server, pump, seen, link, answers
    )


class GatewayEndpoint:
    """Each connect joins the client, in memory, to a new fake gateway.

    ``reply`` answers every hello (it may be changed between attempts);
    ``refuse_connect`` makes attempts fail as a closed port would.
    """

    def __init__(
        self, clock: Clock, reply: bytes, close_after_reply: bool = False
    ) -> None:
        self.clock = clock
        self.reply = reply
        self.close_after_reply = close_after_reply
        self.refuse_connect = False
        self.black_hole = False
        self.seen: list = []
        self.attempts: list[float] = []
        self.pumps: list[iosim.IOPump] = []
        self.gateways: list[MuxSession] = []
        #: Stream 1 of each gateway session, in order.
        self.answers: list[HelloAnswer] = []

    def _answer(self, stream):
        if stream.id != 1:
            return None
        self.answers.append(HelloAnswer(self.reply, self.seen, self.close_after_reply))
        return self.answers[-1]

    def connect(self, factory):
        self.attempts.append(self.clock.seconds())
        if self.refuse_connect:
            return fail(ConnectionRefusedError("refused"))
        client = factory.buildProtocol(None)
        server = MuxSession(
            client=False,
            clock=self.clock,
            handler=StreamAcceptor(self._answer),
            config=SessionConfig(keepalive_interval=0),
        )
        self.gateways.append(server)
        self.pumps.append(
            iosim.connect(
                server,
                iosim.makeFakeServer(server),
                client,
                iosim.makeFakeClient(client),
                greet=False,
                clock=self.clock,
            )
        )
        return succeed(client)

    def flush(self) -> None:
        """Move the bytes waiting between every pair.

        With ``black_hole`` set the bytes are dropped both ways instead (a
        gateway frozen or cut off); a closed connection is still seen.
        """
        for pump in self.pumps:
            if self.black_hole:
                pump.clientIO.getOutBuffer()
                pump.serverIO.getOutBuffer()
            pump.flush()

    def run(self, seconds: float, step: float = 0.25) -> None:
        """Let ``seconds`` pass, moving bytes between every pair meanwhile."""
        for _ in range(round(seconds / step)):
            self.flush()
            self.clock.advance(step)
        self.flush()

    @property
    def control_lines(self) -> list[bytes]:
        """Every control line the client sent to this gateway, in order."""
        return [line for answer in self.answers for line in answer.lines]
