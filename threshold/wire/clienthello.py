"""Read the SNI host name from the start of a TLS connection.

The front end routes a TLS connection by name without terminating TLS: it
feeds what the user sends first to one :class:`ClientHelloParser`, segment
by segment, and replays the bytes to the backend once the answer is known.
Pure code: no reactor, no I/O.

The parser is incremental and bounded. It walks the TLS records (RFC 8446,
5.1) as bytes arrive, reassembles the handshake message when a client
splits it over several records, and looks at nothing past the end of the
ClientHello, so its answer never changes as more bytes arrive: it is
:class:`NeedMore` until the hello is complete, then the same :class:`Hello`
or :class:`NotTls` whatever follows. Its work is linear in the bytes fed,
whatever the record and segment sizes: only the 5-byte record headers are
read until the hello is complete, and only then is the message copied,
once. A hello that would need more than ``max_size`` bytes, record headers
included, or more than ``max_records`` records, is refused.
:func:`parse_client_hello` is the same parser applied to one buffer.

Malformed input cannot raise: every read is bounds-checked by
:class:`_Cursor`, which reports a short vector with the internal
:class:`_Malformed`; that one exception type is turned into :class:`NotTls`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "DEFAULT_MAX_RECORDS",
    "DEFAULT_MAX_SIZE",
    "ClientHelloParser",
    "Hello",
    "NeedMore",
    "NotTls",
    "Result",
    "parse_client_hello",
]

# Bytes a hello may occupy, record headers included. Real hellos are well
# under 2 KiB, post-quantum key shares included; 16 KiB is one full record.
DEFAULT_MAX_SIZE = 16384

# Records a hello may span on a connection. Real stacks use one (four for a
# 64 KiB hello); tools that split hellos to defeat filters use tens. Parsing
# is linear anyway: this bounds the per-record work to a constant.
DEFAULT_MAX_RECORDS = 256

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_CONTENT_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 1
_MAX_RECORD = 2**14  # TLSPlaintext.length limit, RFC 8446 5.1
_EXT_SERVER_NAME = 0x0000
_NAME_TYPE_HOST_NAME = 0

_LDH_LABEL = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The buffer ends before the ClientHello does: call again with more."""


@dataclass(frozen=True, slots=True)
class Hello:
    """A complete, well-formed ClientHello.

    ``server_name`` is the SNI host name, lowercased and without a trailing
    dot; None when there is no SNI or the name is not a valid DNS host name.
    """

    server_name: str | None


@dataclass(frozen=True, slots=True)
class NotTls:
    """The bytes are not a TLS ClientHello; ``reason`` says what was wrong.

    ``bounded`` is true when a bound (size, records) gave the answer rather
    than the bytes themselves; it takes no part in comparisons.
    """

    reason: str
    bounded: bool = field(default=False, compare=False)


Result: TypeAlias = NeedMore | Hello | NotTls

_NEED_MORE = NeedMore()


class _Malformed(Exception):
    """A length or value inside a complete ClientHello is inconsistent."""


class _Cursor:
    """A bounds-checked reader over ``buf[pos:end]`` named for messages."""

    __slots__ = ("buf", "pos", "end", "name")

    def __init__(self, buf: memoryview, pos: int, end: int, name: str) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end
        self.name = name

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return self.end - self.pos

    def _take(self, count: int, what: str) -> int:
        """Advance over ``count`` bytes; return where they start."""
        if count > self.left:
            raise _Malformed(
                f"{what} needs {count} bytes but {self.name} has {self.left} left"
            )
        start = self.pos
        self.pos += count
        return start

    def uint(self, size: int, what: str) -> int:
        """Read a big-endian unsigned integer of ``size`` bytes."""
        start = self._take(size, what)
        return int.from_bytes(self.buf[start : start + size], "big")

    def skip(self, count: int, what: str) -> None:
        """Skip ``count`` bytes."""
        self._take(count, what)

    def vector(self, length_size: int, what: str) -> _Cursor:
        """Read a TLS vector (a length then that many bytes) as a sub-cursor."""
        length = self.uint(length_size, f"{what} length")
        if length > self.left:
            raise _Malformed(
                f"{what} length {length} runs past the end of {self.name}"
                f" ({self.left} bytes left)"
            )
        start = self._take(length, what)
        return _Cursor(self.buf, start, start + length, what)

    def rest(self) -> bytes:
        """Return the unread bytes and consume them."""
        start = self._take(self.left, "rest")
        return bytes(self.buf[start : self.end])


class ClientHelloParser:
    """Parse a connection's first bytes as they arrive: :meth:`feed` each chunk.

    The work is linear in the bytes fed, whatever the record and chunk
    sizes: each chunk is appended once, and parsing resumes where it
    stopped (at most the current record's 9 header bytes are looked at
    again). ``max_size`` bounds the bytes the hello may occupy, record
    headers included; ``max_records`` (None: no bound) the records it may
    span. Past either the answer is a bounded :class:`NotTls`.

    ``buffer`` holds every byte fed until the answer is known (at most
    ``max_size`` plus the last chunk), for the caller to replay; ``work``
    counts the bytes and record steps examined, for tests of the bound.
    """

    __slots__ = (
        "max_size",
        "max_records",
        "buffer",
        "result",
        "work",
        "records",
        "_pos",
        "_got",
        "_total",
        "_header",
        "_spans",
    )

    def __init__(
        self, max_size: int = DEFAULT_MAX_SIZE, max_records: int | None = None
    ) -> None:
        self.max_size = max_size
        self.max_records = max_records
        self.buffer = bytearray()
        #: NeedMore until the answer is known; then it never changes.
        self.result: Result = _NEED_MORE
        self.work = 0
        #: Records walked through so far.
        self.records = 0
        self._pos = 0  # start of the current record
        self._got = 0  # message bytes located so far
        self._total: int | None = None  # message length, once known
        self._header = b""  # handshake header bytes of completed records
        self._spans: list[tuple[int, int]] = []  # the message within buffer

    def feed(self, data: bytes | bytearray | memoryview) -> Result:
        """Add the next chunk; return the answer so far (never raises)."""
        if self.result is not _NEED_MORE:
            return self.result
        self.buffer += data
        self.work += len(data)
        self.result = self._walk()
        return self.result

    def _walk(self) -> Result:
        """Resume the record walk; commit state only as records complete."""
        buf = self.buffer
        size = len(buf)
        max_size = self.max_size

        def short(end: int) -> Result | None:
            """Refuse or wait when ``buf[:end]`` is needed and not all there."""
            if end > max_size:
                return NotTls(f"ClientHello larger than {max_size} bytes", True)
            if end > size:
                return _NEED_MORE
            return None

        while self._total is None or self._got < self._total:
            pos = self._pos
            self.work += 1
            if self.max_records is not None and self.records >= self.max_records:
                return NotTls(
                    f"ClientHello spread over more than {self.max_records} records",
                    True,
                )
            if stop := short(pos + 1):
                return stop
            if buf[pos] != _CONTENT_HANDSHAKE:
                return NotTls(_record_type_reason(buf[pos], pos))
            if stop := short(pos + 3):
                return stop
            if buf[pos + 1] != 3:
                return NotTls(
                    f"record version {buf[pos + 1]}.{buf[pos + 2]} at byte {pos}"
                    " is not 3.x"
                )
            if stop := short(pos + _RECORD_HEADER):
                return stop
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if length == 0:
                return NotTls(f"handshake record at byte {pos} is empty")
            if length > _MAX_RECORD:
                return NotTls(
                    f"record length {length} at byte {pos} exceeds the TLS limit"
                    f" of {_MAX_RECORD}"
                )
            start = pos + _RECORD_HEADER
            header = self._header
            total = self._total
            if total is None:
                # The 4-byte handshake header may itself span tiny records.
                count = min(_HANDSHAKE_HEADER - len(header), length)
                if stop := short(start + count):
                    return stop
                header += buf[start : start + count]
                if header[0] != _HANDSHAKE_CLIENT_HELLO:
                    return NotTls(
                        f"handshake type {header[0]} is not ClientHello"
                        f" ({_HANDSHAKE_CLIENT_HELLO})"
                    )
                if len(header) == _HANDSHAKE_HEADER:
                    total = _HANDSHAKE_HEADER + int.from_bytes(header[1:], "big")
                    if total > max_size:
                        return NotTls(
                            f"ClientHello larger than {max_size} bytes"
                            f" ({total} declared)",
                            True,
                        )
            take = length if total is None else min(length, total - self._got)
            if stop := short(start + take):
                return stop
            # The record is complete as far as the message goes: commit.
            self._header = header
            self._total = total
            self._spans.append((start, start + take))
            self._got += take
            self._pos = start + length
            self.records += 1

        spans = self._spans
        if len(spans) == 1:
            message = memoryview(bytes(buf[spans[0][0] : spans[0][1]]))
        else:
            message = memoryview(b"".join(buf[a:b] for a, b in spans))
        self.work += len(message)
        try:
            return _parse_body(
                _Cursor(message, _HANDSHAKE_HEADER, self._got, "ClientHello")
            )
        except _Malformed as e:
            return NotTls(str(e))


def parse_client_hello(
    data: bytes | bytearray | memoryview,
    max_size: int = DEFAULT_MAX_SIZE,
    max_records: int | None = None,
) -> Result:
    """Parse everything received so far on a connection as a TLS ClientHello.

    Returns :class:`NeedMore`, :class:`Hello` or :class:`NotTls`, and never
    raises for any ``data``. ``max_size`` bounds the bytes of ``data`` the
    hello may occupy: past it the answer is :class:`NotTls`, so a caller
    that buffers until the answer is not :class:`NeedMore` buffers at most
    ``max_size`` bytes (plus one segment). A connection should use one
    :class:`ClientHelloParser` instead: calling this on a growing buffer
    re-reads it from the start each time.
    """
    return ClientHelloParser(max_size, max_records).feed(data)


def _record_type_reason(byte: int, pos: int) -> str:
    """Explain why a record does not start with the handshake type."""
    reason = f"record type 0x{byte:02x} at byte {pos} is not handshake (0x16)"
    if pos == 0 and byte & 0x80:
        reason += ": an SSLv2-compatible hello, not supported"
    return reason


def _parse_body(hello: _Cursor) -> Hello:
    """Check a ClientHello body (RFC 8446 4.1.2) and return its SNI name."""
    major = hello.uint(1, "legacy_version")
    minor = hello.uint(1, "legacy_version")
    if major != 3:
        raise _Malformed(f"ClientHello version {major}.{minor} is not 3.x")
    hello.skip(32, "random")
    session_id = hello.vector(1, "session_id")
    if session_id.left > 32:
        raise _Malformed(f"session_id length {session_id.left} exceeds 32")
    suites = hello.vector(2, "cipher_suites")
    if suites.left == 0 or suites.left % 2:
        raise _Malformed(
            f"cipher_suites length {suites.left} is not a positive even number"
        )
    if hello.vector(1, "compression_methods").left == 0:
        raise _Malformed("compression_methods is empty")
    if hello.left == 0:
        return Hello(None)  # extensions are optional before TLS 1.3
    extensions = hello.vector(2, "extensions")
    if hello.left:
        raise _Malformed(f"{hello.left} bytes follow the extensions in ClientHello")
    server_name: str | None = None
    seen_sni = False
    while extensions.left:
        kind = extensions.uint(2, "extension type")
        body = extensions.vector(2, f"extension 0x{kind:04x}")
        if kind == _EXT_SERVER_NAME:
            # Two names could route to one backend while another reads the
            # other: refuse rather than pick one.
            if seen_sni:
                raise _Malformed("duplicate server_name extension")
            seen_sni = True
            server_name = _parse_server_name(body)
    return Hello(server_name)


def _parse_server_name(body: _Cursor) -> str | None:
    """Return the host_name of a server_name extension (RFC 6066, 3)."""
    names = body.vector(2, "server_name_list")
    if body.left:
        raise _Malformed(
            f"{body.left} bytes follow server_name_list in the server_name extension"
        )
    if names.left == 0:
        raise _Malformed("server_name_list is empty")
    host: bytes | None = None
    while names.left:
        name_type = names.uint(1, "name_type")
        name = names.vector(2, f"server name of type {name_type}")
        if name_type != _NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            raise _Malformed("server_name_list has more than one host_name")
        if name.left == 0:
            raise _Malformed("host_name is empty")
        host = name.rest()
    return None if host is None else _host_name(host)


def _host_name(raw: bytes) -> str | None:
    """Return ``raw`` as a lowercase DNS host name, or None if it is not one.

    Letters, digits and hyphens in labels of 1 to 63 bytes, at most 253 in
    all; ``xn--`` labels must be valid IDNA (2003) A-labels. A numeric last label
    means an IP literal, which RFC 6066 forbids in SNI.
    """
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not 0 < len(name) <= 253:
        return None
    labels = name.split(b".")
    for label in labels:
        if _LDH_LABEL.fullmatch(label) is None:
            return None
        if label.startswith(b"xn--") and not _is_a_label(label):
            return None
    if labels[-1].isdigit():
        return None
    return name.decode("ascii")


def _is_a_label(label: bytes) -> bool:
    """Tell whether an ``xn--`` label is a valid IDNA A-label.

    The codec's ToUnicode decodes the Punycode, checks the result with
    nameprep (no control or prohibited characters) and that it encodes
    back to the same label; any failure is a UnicodeError.
    """
    try:
        label.decode("idna")
    except UnicodeError:
        return False
    return True
