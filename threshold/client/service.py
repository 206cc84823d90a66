"""The tunnel client: one session to the server, streams to local services.

The client dials the server (TLS with its certificate when configured),
says hello on stream 1 and, once accepted, serves the streams the server
opens: each starts with a header naming a service, which the client looks
up in ``ServiceToLocalAddrMap``. An unknown service or a failed local
connection resets the stream. The client never connects anywhere else: the
server only names services, it cannot pick addresses.

Reconnecting is Twisted's ``ClientService`` with exponential backoff and
jitter; refused hellos are counted too, so a misconfigured client backs off
instead of hammering the server.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from threshold.logs import observer as log_observer
from threshold.mux.session import MuxSession, SessionConfig
from threshold.relay import RelayEnd, tune_transport
from threshold.wire.handshake import (
    HandshakeError,
    LineBuffer,
    encode_hello,
    parse_hello_reply,
    parse_stream_header,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IDelayedCall,
        IReactorTime,
        IStreamClientEndpoint,
    )

    from threshold.mux.stream import Stream

log = Logger(observer=log_observer)


class HelloRefused(Exception):
    """The server refused the hello; the message is its reason."""


@implementer(IHalfCloseableProtocol)
class ServiceStream(Protocol):
    """A stream the server opened: read the service header, connect, relay."""

    def __init__(self, tunnel: TunnelClient) -> None:
        self.tunnel = tunnel
        self.buffer = LineBuffer()
        self.end = RelayEnd()
        self.local: RelayEnd | None = None
        self.service: str | None = None
        self._pending = b""
        self._connecting: Deferred[Any] | None = None

    def makeConnection(self, transport: Stream) -> None:  # noqa: N802
        """Both this header reader and the relay end sit on the stream."""
        self.end.makeConnection(transport)
        Protocol.makeConnection(self, transport)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        """Read the header line; hold the rest until the service is up."""
        if self.service is not None:
            if self.local is not None:
                self.end.dataReceived(data)
            else:
                self._pending += data
            return
        try:
            line, rest = self.buffer.feed(data)
            if line is None:
                return
            header = parse_stream_header(line)
        except HandshakeError as e:
            log.warn(
                "stream {stream_id}: bad stream header: {why}; reset",
                stream_id=self.transport.id,
                why=e,
            )
            self.transport.abortConnection()
            return
        self.service = header.service
        address = self.tunnel.services.get(header.service)
        if address is None:
            self.tunnel.unknown_service += 1
            log.warn(
                'stream {stream_id}: unknown service "{service}"; reset',
                stream_id=self.transport.id,
                service=header.service,
            )
            self.transport.abortConnection()
            return
        # Hold the stream while the local connection is made: what arrives
        # meanwhile stays within the stream's window.
        self._pending = rest
        self.transport.pauseProducing()
        host, port = address
        endpoint = self.tunnel.local_endpoint(host, port)
        local = RelayEnd()
        self._connecting = endpoint.connect(_Once(local))
        self._connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, local: RelayEnd) -> None:
        self._connecting = None
        if self.transport.closed:
            local.transport.loseConnection()
            return
        tune_transport(local.transport)
        self.local = local
        pending, self._pending = self._pending, b""
        if pending:
            local.transport.write(pending)
        self.end.join(local)
        self.transport.resumeProducing()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError):
            # The stream ended while we were connecting (connectionLost).
            return
        self.tunnel.local_failures += 1
        log.warn(
            'stream {stream_id}: cannot connect to service "{service}": {why}; reset',
            stream_id=self.transport.id,
            service=self.service,
            why=failure.getErrorMessage(),
        )
        if not self.transport.closed:
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:  # noqa: N802
        """The server half-closed: pass it on once connected."""
        if self.local is not None:
            self.end.readConnectionLost()
        elif self.service is None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # noqa: N802
        """Our direction is shut."""
        self.end.writeConnectionLost()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # noqa: N802
        """The stream ended: end the local side the same way."""
        if self._connecting is not None:
            self._connecting.cancel()
        self.end.connectionLost(reason)


class _Once(Factory):
    """A factory for exactly one given protocol (an endpoint's connect)."""

    # One per tunneled connection: "Starting factory" lines would be noise.
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:  # noqa: N802
        return self._protocol


class ClientSession(MuxSession):
    """The client's session: hello first, then serve the server's streams."""

    def __init__(self, tunnel: TunnelClient) -> None:
        super().__init__(
            client=True,
            clock=tunnel.clock,
            handler=self,
            config=tunnel.session_config,
            name=f"session to {tunnel.server}",
        )
        self.tunnel = tunnel
        self.accepted = False
        #: Fires when the server accepts the hello; fails if it does not.
        self.ready: Deferred[ClientSession] = Deferred()
        self.ready.addErrback(lambda f: None)
        self._hello_timer: IDelayedCall | None = None
        self._reply = LineBuffer()

    def session_started(self, session: MuxSession) -> None:
        """Say hello on stream 1."""
        tune_transport(self.transport)
        log.info("connected to {server}; sending hello", server=self.tunnel.server)
        stream = self.open_stream(_HelloReader(self))
        stream.write(encode_hello(self.tunnel.client_id))
        # A server that accepts the connection but never answers the hello
        # must not hold the client: give up and back off like a refusal.
        self._hello_timer = self.clock.callLater(
            self.tunnel.hello_timeout, self._hello_timed_out
        )

    def _hello_timed_out(self) -> None:
        self._hello_timer = None
        self.reply(None, f"no answer to the hello within {self.tunnel.hello_timeout}s")

    def reply(self, line: bytes | None, error: str | None = None) -> None:
        """The server's answer to the hello (or why there is none)."""
        if self.ready.called:
            return
        if self._hello_timer is not None and self._hello_timer.active():
            self._hello_timer.cancel()
        self._hello_timer = None
        if error is None and line is not None:
            try:
                answer = parse_hello_reply(line)
            except HandshakeError as e:
                error = f"bad hello reply: {e}"
            else:
                if not answer.ok:
                    error = f"server refused the hello: {answer.error}"
        if error is not None:
            log.error("{server}: {error}", server=self.tunnel.server, error=error)
            self.tunnel.refusals += 1
            self.close()
            self.ready.errback(HelloRefused(error))
            return
        self.tunnel.refusals = 0
        self.accepted = True
        log.info(
            "tunnel to {server} up as client {client_id}",
            server=self.tunnel.server,
            client_id=self.tunnel.client_id,
        )
        self.ready.callback(self)

    def stream_opened(self, session: MuxSession, stream: Stream) -> Protocol | None:
        """Serve the server's streams once the hello is accepted."""
        if not self.accepted:
            return None
        return ServiceStream(self.tunnel)

    def session_ended(self, session: MuxSession, reason: BaseException) -> None:
        """Fail a pending hello; log the end of an accepted session."""
        if not self.ready.called:
            self.ready.errback(
                HelloRefused(f"connection closed before the hello reply: {reason}")
            )
        if self.accepted:
            log.info(
                "tunnel to {server} down: {why}",
                server=self.tunnel.server,
                why=str(reason) or type(reason).__name__,
            )


class _HelloReader(Protocol):
    """Stream 1 on the client: read the server's one-line reply."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.buffer = LineBuffer()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        try:
            line, _ = self.buffer.feed(data)
        except HandshakeError as e:
            self.session.reply(None, f"bad hello reply: {e}")
            return
        if line is not None:
            self.session.reply(line)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # noqa: N802
        self.session.reply(None, "stream 1 closed before the hello reply")


class TunnelClient:
    """Settings and counters shared by the client's sessions."""

    def __init__(
        self,
        client_id: str,
        services: Mapping[str, tuple[str, int]],
        server: str,
        clock: IReactorTime,
        local_endpoint: Callable[[str, int], IStreamClientEndpoint],
        session_config: SessionConfig | None = None,
        hello_timeout: float = 10.0,
    ) -> None:
        self.client_id = client_id
        self.services = dict(services)
        self.server = server
        self.clock = clock
        self.local_endpoint = local_endpoint
        self.session_config = session_config or SessionConfig()
        #: Seconds to wait for the server's answer to the hello.
        self.hello_timeout = hello_timeout
        self.unknown_service = 0
        self.local_failures = 0
        #: Hellos refused in a row (reset by an accepted one).
        self.refusals = 0

    def factory(self) -> Factory:
        """The factory of sessions for ``ClientService``."""
        return Factory.forProtocol(lambda: ClientSession(self))


class _TunnelClientService(ClientService):
    """ClientService that ends the session with Go Away when stopped."""

    def stopService(self) -> Deferred[None]:  # noqa: N802
        """Say Go Away and close; then let ClientService finish stopping."""
        d = self.whenConnected(failAfterFailures=1)
        d.addCallbacks(lambda session: session.close(), lambda _: None)
        return super().stopService()


def reconnecting_service(
    tunnel: TunnelClient,
    endpoint: IStreamClientEndpoint,
    clock: IReactorTime,
    initial_delay: float = 1.0,
    max_delay: float = 60.0,
) -> ClientService:
    """A ``ClientService`` that holds the session, backing off with jitter."""
    policy = backoffPolicy(
        initialDelay=initial_delay,
        maxDelay=max_delay,
        factor=2.0,
        jitter=random.random,
    )

    def logged(attempt: int) -> float:
        # A refused hello ends a connection that did succeed, which
        # ClientService counts as no failure: count refusals ourselves so
        # that a misconfigured client backs off all the same.
        delay = policy(max(attempt, tunnel.refusals))
        log.info(
            "reconnecting to {server} in {delay:.1f}s (attempt {attempt})",
            server=tunnel.server,
            delay=delay,
            attempt=attempt + 1,
        )
        return delay

    return _TunnelClientService(
        endpoint,
        tunnel.factory(),
        retryPolicy=logged,
        clock=clock,
    )


def local_tcp_endpoint(reactor: Any, timeout: float) -> Callable[[str, int], Any]:
    """Connect to local services by address, or by host name.

    An IP address connects directly; only a name goes through
    ``HostnameEndpoint`` (a resolver lookup in a thread, happy eyeballs),
    which costs more than the rest of a tunneled connection together.
    """

    def make(host: str, port: int) -> IStreamClientEndpoint:
        if isIPAddress(host):
            return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
        return HostnameEndpoint(reactor, host, port, timeout=timeout)

    return make
