"""The JSON lines exchanged on tunnel streams: hello, hello reply, stream header.

Each message is one compact JSON object followed by ``\\n``, at most
``MAX_LINE`` bytes. The tunnel client sends a hello on stream 1 and the
server answers with a reply; the server starts every tunneled stream with a
header naming the service. Pure code, no reactor: feed bytes, get values or
a ``HandshakeError`` saying what was wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from threshold.wire import strictjson

__all__ = [
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "HandshakeError",
    "Hello",
    "HelloReply",
    "LineBuffer",
    "StreamHeader",
    "encode_hello",
    "encode_hello_reply",
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

# Same rule as the ClientId config field ("@" is kept out for ClientId@Domain).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_MAX_SERVICE = 128
# Error texts in a reply are cut to this many characters, so that the
# encoded reply always fits in MAX_LINE.
_MAX_ERROR = 300


class HandshakeError(ValueError):
    """A handshake line is malformed or not acceptable; the message says why."""


@dataclass(frozen=True)
class Hello:
    """The client's first message: protocol version and client id."""

    version: int
    client_id: str


@dataclass(frozen=True)
class HelloReply:
    """The server's answer to a hello: accepted, or refused with a reason."""

    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class StreamHeader:
    """The first line of a tunneled stream: which service it is for."""

    service: str


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


def _decode(line: bytes, what: str) -> dict[str, Any]:
    """Decode one JSON object line, or raise HandshakeError naming ``what``."""
    if not isinstance(line, bytes | bytearray | memoryview):
        raise HandshakeError(f"{what} must be bytes, got {type(line).__name__}")
    line = bytes(line)
    if line.endswith(b"\n"):
        line = line[:-1]
    if len(line) > MAX_LINE:
        raise HandshakeError(f"{what} is longer than {MAX_LINE} bytes")
    try:
        value = strictjson.loads(line)
    except strictjson.NotUtf8 as e:
        raise HandshakeError(f"{what} is not UTF-8 (byte {e.start})") from None
    except strictjson.DuplicateKey as e:
        raise HandshakeError(f"{what} has key {e.key!r} more than once") from None
    except strictjson.JsonError as e:
        raise HandshakeError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise HandshakeError(
            f"{what} must be a JSON object, got {type(value).__name__}"
        )
    return value


def _encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return data + b"\n"


def _check_client_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _CLIENT_ID.fullmatch(value):
        raise HandshakeError(
            f'{what} "clientId" must be 1 to 128 letters, digits, ".", "_" or "-",'
            f" got {_brief(value)}"
        )
    return value


def _check_service(value: object, what: str) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > _MAX_SERVICE
        or not value.isprintable()
    ):
        raise HandshakeError(
            f'{what} "service" must be 1 to {_MAX_SERVICE} printable characters,'
            f" got {_brief(value)}"
        )
    return value


def _brief(value: object, limit: int = 60) -> str:
    """Show a (possibly hostile) value briefly, on one line."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_hello(client_id: str) -> bytes:
    """Encode the client's hello line."""
    _check_client_id(client_id, "hello")
    return _encode({"version": PROTOCOL_VERSION, "clientId": client_id})


def parse_hello(line: bytes) -> Hello:
    """Parse and check a hello line (with or without its ``\\n``)."""
    obj = _decode(line, "hello")
    if "version" not in obj:
        raise HandshakeError('hello has no "version"')
    version = obj["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise HandshakeError(
            f'hello "version" must be an integer, got {_brief(version)}'
        )
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"unsupported hello version {version} (this side speaks version"
            f" {PROTOCOL_VERSION})"
        )
    if "clientId" not in obj:
        raise HandshakeError('hello has no "clientId"')
    return Hello(version, _check_client_id(obj["clientId"], "hello"))


def encode_hello_reply(ok: bool, error: str | None = None) -> bytes:
    """Encode the server's answer to a hello.

    A long ``error`` is shortened so the line stays within ``MAX_LINE``.
    """
    if not isinstance(ok, bool):
        raise HandshakeError(f"ok must be a bool, got {_brief(ok)}")
    if error is not None and not isinstance(error, str):
        raise HandshakeError(f"error must be a string or None, got {_brief(error)}")
    if ok:
        if error is not None:
            raise HandshakeError("an accepting reply carries no error")
        return _encode({"ok": True})
    if error is None:
        error = "refused"
    if len(error) > _MAX_ERROR:
        error = error[: _MAX_ERROR - 3] + "..."
    # Lone surrogates cannot be sent as UTF-8; show them as replacement marks.
    error = error.encode("utf-8", "replace").decode("utf-8")
    return _encode({"ok": False, "error": error})


def parse_hello_reply(line: bytes) -> HelloReply:
    """Parse the server's answer to a hello."""
    obj = _decode(line, "hello reply")
    if "ok" not in obj:
        raise HandshakeError('hello reply has no "ok"')
    ok = obj["ok"]
    if not isinstance(ok, bool):
        raise HandshakeError(
            f'hello reply "ok" must be true or false, got {_brief(ok)}'
        )
    error = obj.get("error")
    if error is not None and not isinstance(error, str):
        raise HandshakeError(
            f'hello reply "error" must be a string, got {_brief(error)}'
        )
    if ok:
        error = None
    return HelloReply(ok, error)


def encode_stream_header(service: str) -> bytes:
    """Encode the header line that starts a tunneled stream."""
    return _encode({"service": _check_service(service, "stream header")})


def parse_stream_header(line: bytes) -> StreamHeader:
    """Parse the header line of a tunneled stream; unknown keys are ignored."""
    obj = _decode(line, "stream header")
    if "service" not in obj:
        raise HandshakeError('stream header has no "service"')
    return StreamHeader(_check_service(obj["service"], "stream header"))
