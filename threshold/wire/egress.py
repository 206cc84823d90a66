"""Egress lines: a client's connect request on an odd stream, the gateway's answer.

The client opens an odd stream (client-initiated, other than stream 1) and
writes one JSON line, at most ``MAX_LINE`` bytes (unknown keys ignored)::

    {"connect": "smtp.example.net:25"}

``host:port``, an IPv6 address in brackets; the host is an IP address or a
DNS name, resolved on the gateway. The gateway answers with one line, then
relays the stream's bytes to the destination and back::

    {"ok": true, "bound": "203.0.113.7:40312"}
    {"ok": false, "reason": "not_allowed", "error": "..."}

``bound`` is the gateway's local address of the outgoing connection;
``reason`` is one of :class:`EgressRefusal` (a reason this side does not
know reads as ``failed``), after which the gateway closes the stream.
Pure: no reactor.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from threshold.schema.kinds import format_address, parse_host_port
from threshold.wire.handshake import MAX_LINE, decode_line, encode_line

__all__ = [
    "MAX_LINE",
    "EgressAnswer",
    "EgressError",
    "EgressRefusal",
    "EgressRequest",
    "encode_answer",
    "encode_refusal",
    "encode_request",
    "parse_answer",
    "parse_request",
]


class EgressError(ValueError):
    """A malformed egress request or answer line; the message says why."""


class EgressRefusal(StrEnum):
    """Why the gateway did not connect out (the ``reason`` of an answer).

    The values are the ``reason`` label of
    ``threshold_client_egress_refused_total``.
    """

    #: The gateway has no ``EgressPolicy`` at all.
    DISABLED = "disabled"
    #: The gateway has an ``EgressPolicy``, but no entry for this client.
    NO_POLICY = "no_policy"
    #: No rule of the client's allows the destination (address and port).
    NOT_ALLOWED = "not_allowed"
    #: The request line is malformed.
    BAD_REQUEST = "bad_request"
    #: ``MaxEgressConnectionsPerClient`` connections already open.
    LIMIT = "limit"
    #: The client is over its ``QuotaBytes``.
    QUOTA_EXCEEDED = "quota_exceeded"
    #: The name did not resolve (or to no address at all).
    NAME_NOT_RESOLVED = "name_not_resolved"
    #: No route to the destination.
    UNREACHABLE = "unreachable"
    #: The destination refused the connection.
    CONNECTION_REFUSED = "connection_refused"
    #: No answer within ``EgressConnectTimeoutSeconds``.
    TIMEOUT = "timeout"
    #: Any other failure.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class EgressRequest:
    """Where the client asks the gateway to connect."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port``, IPv6 in brackets."""
        return format_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class EgressAnswer:
    """The gateway's answer: connected (``bound``), or refused (``reason``)."""

    ok: bool
    bound: tuple[str, int] | None = None
    reason: EgressRefusal | None = None
    error: str = ""


def encode_request(host: str, port: int) -> bytes:
    """The request line for ``host:port``."""
    line = encode_line({"connect": format_address(host, port)})
    if len(line) > MAX_LINE:
        raise EgressError(f"request longer than {MAX_LINE} bytes")
    return line


def parse_request(line: bytes) -> EgressRequest:
    """Read a request line; raise :class:`EgressError` saying what is wrong."""
    obj = decode_line(line, "egress request", EgressError)
    target = obj.get("connect")
    if not isinstance(target, str):
        raise EgressError('egress request needs "connect": "host:port"')
    try:
        host, port = parse_host_port(target)
    except ValueError as e:
        raise EgressError(f'egress request "connect": {e}') from None
    return EgressRequest(host.lower().removesuffix("."), port)


def encode_answer(host: str, port: int) -> bytes:
    """The answer of a connection made, bound to ``host:port`` on the gateway."""
    return encode_line({"ok": True, "bound": format_address(host, port)})


def encode_refusal(reason: EgressRefusal, error: str) -> bytes:
    """The answer of a refusal; ``error`` is cut so that the line fits."""
    return encode_line({"ok": False, "reason": reason.value, "error": error[:1024]})


def parse_answer(line: bytes) -> EgressAnswer:
    """Read an answer line; raise :class:`EgressError` saying what is wrong."""
    obj = decode_line(line, "egress answer", EgressError)
    ok = obj.get("ok")
    if ok is True:
        bound = obj.get("bound")
        if not isinstance(bound, str):
            raise EgressError('egress answer needs "bound": "host:port"')
        try:
            return EgressAnswer(True, bound=parse_host_port(bound))
        except ValueError as e:
            raise EgressError(f'egress answer "bound": {e}') from None
    if ok is not False:
        raise EgressError('egress answer needs "ok": true or false')
    error = obj.get("error")
    text = obj.get("reason")
    try:
        reason = EgressRefusal(text)
    except ValueError:
        reason = EgressRefusal.FAILED
    return EgressAnswer(
        False, reason=reason, error=error if isinstance(error, str) else ""
    )
