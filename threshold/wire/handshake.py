"""The JSON lines exchanged on tunnel streams: hello, hello reply, stream header.

Each message is one compact JSON object followed by ``\\n``, at most
``MAX_LINE`` bytes. The tunnel client sends a hello on stream 1 and the
server answers with a reply; the server starts every tunneled stream with a
header naming the service. Pure code, no reactor: feed bytes, get values or
a ``HandshakeError`` saying what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from threshold.schema import (
    BOOLEAN,
    CLIENT_ID,
    SERVICE_NAME,
    TEXT,
    Integer,
    Schema,
    SchemaError,
    field,
    show,
)
from threshold.wire import strictjson

__all__ = [
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "PROTO_TCP",
    "PROTO_UDP",
    "HandshakeError",
    "Hello",
    "HelloReply",
    "LineBuffer",
    "StreamHeader",
    "decode_line",
    "encode_hello",
    "encode_hello_reply",
    "encode_line",
    "encode_stream_header",
    "parse_hello",
    "parse_hello_reply",
    "parse_stream_header",
]

#: Longest JSON line accepted, not counting the ``\n``. Bounds what a peer
#: can make us buffer before we know what it wants.
MAX_LINE = 4096

#: The only hello version this code speaks.
PROTOCOL_VERSION = 1

# Error texts in a reply are cut to this many characters, so that the
# encoded reply always fits in MAX_LINE.
_MAX_ERROR = 300


class HandshakeError(ValueError):
    """A handshake line is malformed or not acceptable; the message says why."""


@dataclass(frozen=True)
class Hello:
    """The client's first message: protocol version and client id."""

    version: int = field("version", Integer(0), doc="The hello's version (1).")
    client_id: str = field(
        "clientId", CLIENT_ID, doc="The client's `ClientId`, as in its config."
    )


@dataclass(frozen=True)
class HelloReply:
    """The server's answer to a hello: accepted, or refused with a reason."""

    ok: bool = field("ok", BOOLEAN, doc="Whether the hello was accepted.")
    error: str | None = field(
        "error", TEXT, None, nullable=True, doc="Why it was refused."
    )
    gateway: str | None = field(
        "gateway",
        CLIENT_ID,
        None,
        nullable=True,
        doc="The gateway's id (optional), so a client of several gateways can"
        " tell them apart in its logs and admin API.",
    )


#: The ``proto`` of a stream header: a TCP connection (the default) or a
#: UDP flow (docs/udp.md).
PROTO_TCP = "tcp"
PROTO_UDP = "udp"


@dataclass(frozen=True)
class StreamHeader:
    """The first line of a tunneled stream: which service it is for.

    A UDP flow's line is ``{"proto": "udp", "udpService": NAME}`` (and
    ``"proxyV2": true`` when a PROXY v2 header follows): it has no
    ``service`` key, so that a client from before UDP, which ignores
    ``proto``, refuses the stream (missing ``service``: reset) instead of
    relaying datagrams into a TCP service.
    """

    service: str = field(
        "service", SERVICE_NAME, doc="The service, as in the tunnel's BackEndService."
    )
    proto: str = field("proto", TEXT, PROTO_TCP, doc='"tcp" or "udp".')
    proxy_v2: bool = field(
        "proxyV2",
        BOOLEAN,
        False,
        doc="UDP: the first framed record is a PROXY v2 header for each datagram.",
    )


# Later versions may add keys to each line: they are ignored.
_HELLO = Schema(Hello, ignore_unknown=True)
_HELLO_REPLY = Schema(HelloReply, ignore_unknown=True)
_STREAM_HEADER = Schema(StreamHeader, ignore_unknown=True)


class LineBuffer:
    """Collect bytes until one ``\\n``-terminated line is complete.

    Bounded: more than ``max_length`` bytes without a newline is an error,
    so a peer cannot make us buffer without limit.
    """

    def __init__(self, max_length: int = MAX_LINE) -> None:
        self.max_length = max_length
        self._chunks: list[bytes] = []
        self._length = 0

    def feed(self, data: bytes) -> tuple[bytes | None, bytes]:
        """Add ``data``; return ``(line, rest)`` once a line is complete.

        ``line`` excludes the ``\\n`` and ``rest`` holds the bytes after it,
        which belong to whatever follows the line. Until then the answer is
        ``(None, b"")``. After a line the buffer is empty and can be reused.
        """
        index = data.find(b"\n")
        if index < 0:
            self._length += len(data)
            if self._length > self.max_length:
                raise HandshakeError(
                    f"line longer than {self.max_length} bytes without a newline"
                )
            if data:
                self._chunks.append(bytes(data))
            return None, b""
        total = self._length + index
        if total > self.max_length:
            raise HandshakeError(
                f"line of {total} bytes is longer than {self.max_length} bytes"
            )
        self._chunks.append(bytes(data[:index]))
        line = b"".join(self._chunks)
        self._chunks = []
        self._length = 0
        return line, bytes(data[index + 1 :])


def decode_line(
    line: bytes, what: str, error: type[ValueError] = HandshakeError
) -> dict[str, Any]:
    """Decode one JSON object line, or raise ``error`` naming ``what``.

    Every JSON line on a stream (hello, reply, stream header, control
    channel) is read here: bytes, at most ``MAX_LINE``, strict JSON, an object.
    """
    if not isinstance(line, bytes | bytearray | memoryview):
        raise error(f"{what} must be bytes, got {type(line).__name__}")
    line = bytes(line)
    if line.endswith(b"\n"):
        line = line[:-1]
    if len(line) > MAX_LINE:
        raise error(f"{what} is longer than {MAX_LINE} bytes")
    try:
        value = strictjson.loads(line)
    except strictjson.NotUtf8 as e:
        raise error(f"{what} is not UTF-8 (byte {e.start})") from None
    except strictjson.DuplicateKey as e:
        raise error(f"{what} has key {e.key!r} more than once") from None
    except strictjson.JsonError as e:
        raise error(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def encode_line(obj: dict[str, Any]) -> bytes:
    """One compact, ASCII-only JSON line with its ``\\n``."""
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return data + b"\n"


def _parse(schema: Schema, obj: Mapping[str, Any], what: str) -> Any:
    try:
        return schema.parse(obj)
    except SchemaError as e:
        raise HandshakeError(f"{what} {e}") from None


def _check(kind: Any, value: object, name: str, what: str) -> Any:
    try:
        return kind.check(value)
    except SchemaError as e:
        raise HandshakeError(f"{what} {e.within(name)}") from None


def encode_hello(client_id: str) -> bytes:
    """Encode the client's hello line."""
    _check(CLIENT_ID, client_id, "clientId", "hello")
    return encode_line({"version": PROTOCOL_VERSION, "clientId": client_id})


def parse_hello(line: bytes) -> Hello:
    """Parse and check a hello line (with or without its ``\\n``)."""
    hello: Hello = _parse(_HELLO, decode_line(line, "hello"), "hello")
    if hello.version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"unsupported hello version {hello.version} (this side speaks version"
            f" {PROTOCOL_VERSION})"
        )
    return hello


def encode_hello_reply(
    ok: bool, error: str | None = None, gateway: str | None = None
) -> bytes:
    """Encode the server's answer to a hello.

    A long ``error`` is shortened so the line stays within ``MAX_LINE``.
    ``gateway``: the gateway's id, sent in an accepting reply when given.
    """
    if not isinstance(ok, bool):
        raise HandshakeError(f"ok must be a bool, got {show(ok)}")
    if error is not None and not isinstance(error, str):
        raise HandshakeError(f"error must be a string or None, got {show(error)}")
    if ok:
        if error is not None:
            raise HandshakeError("an accepting reply carries no error")
        if gateway is None:
            return encode_line({"ok": True})
        return encode_line(
            {"ok": True, "gateway": _check(CLIENT_ID, gateway, "gateway", "reply")}
        )
    if error is None:
        error = "refused"
    if len(error) > _MAX_ERROR:
        error = error[: _MAX_ERROR - 3] + "..."
    # Lone surrogates cannot be sent as UTF-8; show them as replacement marks.
    error = error.encode("utf-8", "replace").decode("utf-8")
    return encode_line({"ok": False, "error": error})


def parse_hello_reply(line: bytes) -> HelloReply:
    """Parse the server's answer to a hello."""
    reply: HelloReply = _parse(
        _HELLO_REPLY, decode_line(line, "hello reply"), "hello reply"
    )
    if reply.ok and reply.error is not None:
        return HelloReply(True, gateway=reply.gateway)
    return reply


def encode_stream_header(
    service: str, proto: str = PROTO_TCP, proxy_v2: bool = False
) -> bytes:
    """Encode the header line that starts a tunneled stream (or a UDP flow)."""
    name = _check(SERVICE_NAME, service, "service", "stream header")
    if proto == PROTO_TCP:
        return encode_line({"service": name})
    if proto != PROTO_UDP:
        raise HandshakeError(f"stream header proto {show(proto)} is not tcp or udp")
    obj: dict[str, Any] = {"proto": PROTO_UDP, "udpService": name}
    if proxy_v2:
        obj["proxyV2"] = True
    return encode_line(obj)


def parse_stream_header(line: bytes) -> StreamHeader:
    """Parse the header line of a tunneled stream; unknown keys are ignored.

    An unknown ``proto`` is refused (a later kind of stream this side
    cannot serve), as is a UDP line without ``udpService``.
    """
    obj = decode_line(line, "stream header")
    proto = obj.get("proto", PROTO_TCP)
    if proto == PROTO_UDP:
        fields = {k: v for k, v in obj.items() if k not in ("service", "udpService")}
        if "udpService" not in obj:
            raise HandshakeError("stream header of a UDP flow has no udpService")
        fields["service"] = obj["udpService"]
        obj = fields
    elif proto != PROTO_TCP:
        raise HandshakeError(
            f"stream header proto {show(proto)} is not supported (tcp, udp)"
        )
    header: StreamHeader = _parse(_STREAM_HEADER, obj, "stream header")
    return header
