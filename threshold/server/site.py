"""The HTTP server under the management API: what a connection may hold.

- A body over ``max_body_bytes`` is refused (413) as soon as it is
  announced or counted, before it is buffered, and the connection closes.
- Connections that have not yet sent a complete request head are
  unauthenticated (with TLS, none has shown a certificate the API
  accepted): they share ``max_pending`` slots, at most
  ``max_pending_per_source`` per source (an IPv6 /64 is one source), a
  newcomer taking back the oldest slot of the source holding the most
  (:mod:`threshold.server.admission`); each has ``request_timeout`` from
  the TCP accept (TLS handshake included) to its first request head.
- A connection the server closes (413, request timeout) is cut
  :data:`CLOSE_GRACE` seconds later if still open: TLS would otherwise wait
  for the peer's close_notify, which an abusive peer never sends.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from threshold.server.addresses import DEFAULT_IPV6_PREFIX, source_of
from threshold.server.admission import Refusal, RefusedConnection, SourceShares
from threshold.server.stats import Limit

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall
    from twisted.python.failure import Failure
    from twisted.web.resource import IResource

    from threshold.server.api import ManagementAPI

__all__ = ["CLOSE_GRACE", "ManagementLimits", "management_site"]

log = Logger()

#: Seconds a connection the server closed may take to go before it is cut.
CLOSE_GRACE = 0.5


@dataclass(frozen=True)
class ManagementLimits:
    """Bounds on what a management API client can hold."""

    max_body_bytes: int = 1048576
    #: Close a connection idle this long between requests.
    idle_timeout: float = 60.0
    #: Connections without a complete first request, in total.
    max_pending: int = 64
    #: Of those, from one source; 0: no per-source cap (a Unix socket).
    max_pending_per_source: int = 8
    #: Time from the accept to the first complete request head.
    request_timeout: float = 10.0
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX


class _LimitedRequest(Request):
    """A request that refuses a body over the limit without keeping it.

    A declared ``Content-Length`` over the limit is refused at once; a
    chunked body is counted as it arrives. Either way the answer is 413 and
    the connection closes, so a huge upload is never held.
    """

    _refused = False
    _received = 0

    @property
    def _site(self) -> ManagementSite:
        return self.channel.site

    def gotLength(self, length: int | None) -> None:  # noqa: N802
        if length is not None and length > self._site.limits.max_body_bytes:
            # No "100 Continue": the client must not start sending the body.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._site.limits.max_body_bytes:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        if self.content is not None:
            self.content.close()
            self.content = None
        limit = self._site.limits.max_body_bytes
        body = (
            json.dumps({"error": f"the body is larger than {limit} bytes"}).encode()
            + b"\n"
        )
        log.warn(
            "management API refused a body over {limit} bytes from {peer}",
            limit=limit,
            peer=str(self.channel.transport.getPeer()),
        )
        self._site.limit_hit(Limit.MANAGEMENT_BODY)
        # The channel has not started a response for this request, so the
        # answer is written straight to the transport, as Twisted does for
        # its own 400s.
        self.channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        self.channel.close_promptly()


class ManagementChannel(HTTPChannel):
    """An HTTP/1.1 connection of the management API, within its limits."""

    site: ManagementSite
    _deadline: IDelayedCall | None = None
    _cut: IDelayedCall | None = None

    def connectionMade(self) -> None:  # noqa: N802
        """Start the clock for the first request head (TLS included)."""
        super().connectionMade()
        self._deadline = self.callLater(
            self.site.limits.request_timeout, self._request_timed_out
        )

    def allHeadersReceived(self) -> None:  # noqa: N802
        """A complete request head: no longer pending."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.site.pending.release(self)
        super().allHeadersReceived()

    def close_promptly(self) -> None:
        """Close after what is written; cut if still open after CLOSE_GRACE."""
        if self._cut is None:
            self._cut = self.callLater(CLOSE_GRACE, self._cut_now)
        self.loseConnection()

    def evict(self) -> None:
        """A newcomer took this connection's pending slot: cut it."""
        log.info(
            "management connection from {peer} cut before its first request: "
            "its source holds the most pending connections",
            peer=str(self.transport.getPeer()),
        )
        self.transport.abortConnection()

    def _request_timed_out(self) -> None:
        self._deadline = None
        self.site.limit_hit(Limit.MANAGEMENT_REQUEST_TIMEOUT)
        log.info(
            "management connection from {peer} closed: no complete request "
            "within {timeout}s (ManagementRequestTimeoutSeconds)",
            peer=str(self.transport.getPeer()),
            timeout=self.site.limits.request_timeout,
        )
        self.close_promptly()

    def _cut_now(self) -> None:
        self._cut = None
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802
        """Give the slot back and stop the timers."""
        for call in (self._deadline, self._cut):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._cut = None
        self.site.pending.release(self)
        super().connectionLost(reason)


class ManagementSite(Site):
    """A Site of management channels: HTTP/1.1 only, so ``request.transport``
    is the TLS one, and admission by source before anything is read."""

    protocol = ManagementChannel

    def __init__(
        self,
        resource: IResource,
        limits: ManagementLimits,
        limit_hit: Callable[[Limit], None],
        reactor: Any = None,
    ) -> None:
        super().__init__(
            resource,
            requestFactory=_LimitedRequest,
            timeout=limits.idle_timeout,
            reactor=reactor,
        )
        self.limits = limits
        self.limit_hit = limit_hit
        #: Connections that have not sent a complete request head yet.
        self.pending: SourceShares[ManagementChannel] = SourceShares(
            limits.max_pending, limits.max_pending_per_source, evict=True
        )

    def acceptableProtocols(self) -> list[bytes]:  # noqa: N802
        """Only HTTP/1.1 in ALPN."""
        return [b"http/1.1"]

    def buildProtocol(self, addr: Any) -> ManagementChannel | RefusedConnection:  # noqa: N802
        """A channel, or past the shares a connection cut at once."""
        channel = super().buildProtocol(addr)
        source = source_of(addr, self.limits.ipv6_prefix)
        admission = self.pending.admit(source, channel)
        if not admission.admitted:
            per_source = admission.refusal is Refusal.PER_SOURCE
            self.limit_hit(
                Limit.PENDING_MANAGEMENT_PER_SOURCE
                if per_source
                else Limit.PENDING_MANAGEMENT
            )
            log.warn(
                "management connection from {peer} refused: {count} connections "
                "without a request yet{where}",
                peer=str(addr),
                count=self.pending.count(source) if per_source else len(self.pending),
                where=f" from {source}" if per_source else "",
            )
            return RefusedConnection()
        if admission.evicted is not None:
            self.limit_hit(Limit.PENDING_MANAGEMENT)
            admission.evicted.evict()
        return channel


def management_site(
    api: ManagementAPI, limits: ManagementLimits | None = None, reactor: Any = None
) -> ManagementSite:
    """The Site serving ``api`` within ``limits`` (the API's body limit)."""
    limits = replace(limits or ManagementLimits(), max_body_bytes=api.max_body_bytes)
    return ManagementSite(api.app.resource(), limits, api.limit_hit, reactor)
