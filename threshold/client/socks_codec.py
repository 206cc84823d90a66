"""SOCKS5 (RFC 1928) as the client's proxy speaks it: a parser and replies.

Only what egress needs: the "no authentication" method and CONNECT, to an
IPv4 address, an IPv6 address or a domain name (resolved by the gateway).
:class:`SocksParser` is fed the bytes of one connection as they come, in
pieces of any size, and says what to do (:class:`Send` a reply,
:class:`Connect`, or :class:`Fail`, with a reply code or without one when
the peer does not speak SOCKS5 at all). It holds at most one message
(greeting: 257 bytes, request: 262). Pure: no reactor.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from threshold.schema.kinds import is_dns_name
from threshold.wire.egress import EgressRefusal

__all__ = [
    "REPLY_FOR_REFUSAL",
    "Connect",
    "Fail",
    "Reply",
    "Send",
    "SocksParser",
    "SocksState",
    "encode_reply",
]

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


class Reply(enum.IntEnum):
    """The REP field of a SOCKS5 reply (RFC 1928, section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


#: The reply code for each reason a gateway gives (docs/egress.md's table).
REPLY_FOR_REFUSAL: dict[EgressRefusal, Reply] = {
    EgressRefusal.DISABLED: Reply.NOT_ALLOWED,
    EgressRefusal.NO_POLICY: Reply.NOT_ALLOWED,
    EgressRefusal.NOT_ALLOWED: Reply.NOT_ALLOWED,
    EgressRefusal.LIMIT: Reply.NOT_ALLOWED,
    EgressRefusal.QUOTA_EXCEEDED: Reply.NOT_ALLOWED,
    EgressRefusal.BAD_REQUEST: Reply.GENERAL_FAILURE,
    EgressRefusal.NAME_NOT_RESOLVED: Reply.HOST_UNREACHABLE,
    EgressRefusal.UNREACHABLE: Reply.HOST_UNREACHABLE,
    EgressRefusal.CONNECTION_REFUSED: Reply.CONNECTION_REFUSED,
    EgressRefusal.TIMEOUT: Reply.TTL_EXPIRED,
    EgressRefusal.FAILED: Reply.GENERAL_FAILURE,
}


class SocksState(enum.Enum):
    """Where the parser is; it only moves forward."""

    GREETING = "greeting"
    REQUEST = "request"
    #: A CONNECT was read: later bytes are the payload, not the parser's.
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the SOCKS client (then go on reading)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Connect:
    """A CONNECT to ``host:port``; ``rest`` are the bytes that followed it."""

    host: str
    port: int
    rest: bytes = b""


@dataclass(frozen=True, slots=True)
class Fail:
    """Give up: send a reply with ``reply`` (None: no reply), then close."""

    reply: Reply | None
    why: str


Event = Send | Connect | Fail


def encode_reply(reply: Reply, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """A reply with the bound address ``host:port`` (an IP; else 0.0.0.0)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = ipaddress.IPv4Address(0)
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes([VERSION, reply, 0, atyp]) + address.packed + port.to_bytes(2, "big")


class SocksParser:
    """The greeting, then one request; incremental and bounded."""

    def __init__(self) -> None:
        self.state = SocksState.GREETING
        self._buffer = b""

    def feed(self, data: bytes) -> list[Event]:
        """Take more bytes; return what to do, in order."""
        if self.state in (SocksState.DONE, SocksState.FAILED):
            raise AssertionError(f"SOCKS parser fed while {self.state.value}")
        self._buffer += data
        events: list[Event] = []
        while self.state in (SocksState.GREETING, SocksState.REQUEST):
            step = self._greeting() if self.state is SocksState.GREETING else None
            if self.state is SocksState.REQUEST and step is None:
                step = self._request()
            if step is None:
                break
            events.extend(step)
        return events

    def _fail(self, reply: Reply | None, why: str) -> list[Event]:
        self.state = SocksState.FAILED
        self._buffer = b""
        return [Fail(reply, why)]

    def _greeting(self) -> list[Event] | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != VERSION:
            # SOCKS4 or not SOCKS at all: there is no reply it would read.
            return self._fail(None, f"not SOCKS5 (version byte {buf[0]})")
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            return self._fail(None, "greeting offers no method")
        if len(buf) < 2 + count:
            return None
        methods, self._buffer = buf[2 : 2 + count], buf[2 + count :]
        if NO_AUTH not in methods:
            self.state = SocksState.FAILED
            self._buffer = b""
            return [
                Send(bytes([VERSION, NO_ACCEPTABLE])),
                Fail(None, "no acceptable method (only no authentication is offered)"),
            ]
        self.state = SocksState.REQUEST
        return [Send(bytes([VERSION, NO_AUTH]))]

    def _request(self) -> list[Event] | None:
        buf = self._buffer
        if len(buf) < 4:
            if buf and buf[0] != VERSION:
                return self._fail(Reply.GENERAL_FAILURE, f"request version {buf[0]}")
            return None
        version, command, reserved, atyp = buf[0], buf[1], buf[2], buf[3]
        if version != VERSION:
            return self._fail(Reply.GENERAL_FAILURE, f"request version {version}")
        if command != CMD_CONNECT:
            return self._fail(
                Reply.COMMAND_NOT_SUPPORTED, f"command {command} (only CONNECT)"
            )
        if reserved != 0:
            return self._fail(Reply.GENERAL_FAILURE, f"reserved byte {reserved}")
        if atyp == ATYP_IPV4:
            end = 4 + 4
        elif atyp == ATYP_IPV6:
            end = 4 + 16
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            end = 5 + buf[4]
        else:
            return self._fail(Reply.ADDRESS_TYPE_NOT_SUPPORTED, f"address type {atyp}")
        if len(buf) < end + 2:
            return None
        port = int.from_bytes(buf[end : end + 2], "big")
        rest = buf[end + 2 :]
        self._buffer = b""
        if atyp == ATYP_IPV4:
            host = str(ipaddress.IPv4Address(buf[4:end]))
        elif atyp == ATYP_IPV6:
            address = ipaddress.IPv6Address(buf[4:end])
            mapped = address.ipv4_mapped
            host = str(mapped) if mapped is not None else str(address)
        else:
            name = buf[5:end]
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError:
                host = ""
            host = host.lower().removesuffix(".")
            if not (is_dns_name(host, resolver=True) or _is_ip(host)):
                return self._fail(
                    Reply.GENERAL_FAILURE, f"domain name {name[:64]!r} is not valid"
                )
        if port == 0:
            return self._fail(Reply.GENERAL_FAILURE, "port 0")
        self.state = SocksState.DONE
        return [Connect(host, port, rest)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
