"""yamux version 0 framing: the 12-byte header and an incremental decoder.

Byte for byte as in hashicorp/yamux's spec.md, so any yamux implementation
interoperates. Pure code: no reactor, no I/O.

The decoder never buffers a whole Data frame: it hands the payload on in the
pieces TCP delivered, so memory held by the framing layer is at most one
partial header (11 bytes) whatever frame sizes the peer uses.
"""

from __future__ import annotations

import struct
from typing import Protocol

VERSION = 0
HEADER_SIZE = 12

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3
TYPE_NAMES = {
    TYPE_DATA: "Data",
    TYPE_WINDOW_UPDATE: "WindowUpdate",
    TYPE_PING: "Ping",
    TYPE_GO_AWAY: "GoAway",
}

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2
GO_AWAY_NAMES = {
    GO_AWAY_NORMAL: "normal",
    GO_AWAY_PROTOCOL_ERROR: "protocol error",
    GO_AWAY_INTERNAL_ERROR: "internal error",
}

MAX_UINT32 = 0xFFFFFFFF

_HEADER = struct.Struct(">BBHII")


class FrameError(Exception):
    """The byte stream is not valid yamux framing; the session must end."""


def encode_header(type_: int, flags: int, stream_id: int, length: int) -> bytes:
    """Encode one 12-byte frame header."""
    return _HEADER.pack(VERSION, type_, flags, stream_id, length)


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """The type, flags, stream id and length of a 12-byte header (for logs)."""
    return _HEADER.unpack(header[:HEADER_SIZE])[1:]


def describe_flags(flags: int) -> str:
    """Render flags as ``SYN|ACK`` for log lines."""
    names = [
        name
        for bit, name in (
            (FLAG_SYN, "SYN"),
            (FLAG_ACK, "ACK"),
            (FLAG_FIN, "FIN"),
            (FLAG_RST, "RST"),
        )
        if flags & bit
    ]
    extra = flags & ~0xF
    if extra:
        names.append(hex(extra))
    return "|".join(names) or "-"


class FrameHandler(Protocol):
    """What a :class:`FrameDecoder` reports to."""

    def frame_header(self, type_: int, flags: int, stream_id: int, length: int) -> None:
        """A header arrived; for Data, ``length`` payload bytes follow."""

    def frame_payload(self, stream_id: int, data: bytes) -> None:
        """A piece of the current Data frame's payload."""

    def frame_end(self, stream_id: int, flags: int) -> None:
        """The current Data frame's payload is complete."""


class FrameDecoder:
    """Turns a byte stream, split anyhow, into frame events.

    ``max_data_length`` bounds the length a Data header may announce; a
    larger one is a :class:`FrameError` before any payload is read.
    Exceptions raised by the handler propagate and leave the decoder
    stopped (it must not be fed again).
    """

    __slots__ = ("_handler", "_max", "_partial", "_remaining", "_sid", "_flags")

    def __init__(self, handler: FrameHandler, max_data_length: int) -> None:
        self._handler = handler
        self._max = max_data_length
        self._partial = b""
        self._remaining = 0
        self._sid = 0
        self._flags = 0

    def feed(self, data: bytes, max_frames: int = -1) -> int:
        """Decode ``data``, keeping any incomplete header; return bytes used.

        With ``max_frames`` >= 0, stop before the header that would make one
        more than that many (a payload in progress is always finished, so
        the bytes left over start with a header): the caller feeds the rest
        later, which bounds the work one call can cause.
        """
        handler = self._handler
        pos = 0
        end = len(data)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                if take == end and pos == 0:
                    chunk = data
                else:
                    chunk = data[pos : pos + take]
                pos += take
                self._remaining -= take
                handler.frame_payload(self._sid, chunk)
                if not self._remaining:
                    handler.frame_end(self._sid, self._flags)
                continue
            if not max_frames:
                return pos
            max_frames -= 1
            if self._partial:
                need = HEADER_SIZE - len(self._partial)
                self._partial += data[pos : pos + need]
                pos += need
                if len(self._partial) < HEADER_SIZE:
                    return end
                header = self._partial
                self._partial = b""
                version, type_, flags, sid, length = _HEADER.unpack(header)
            elif end - pos >= HEADER_SIZE:
                version, type_, flags, sid, length = _HEADER.unpack_from(data, pos)
                pos += HEADER_SIZE
            else:
                self._partial = data[pos:]
                return end
            self._header(version, type_, flags, sid, length)
        return end

    def _header(
        self, version: int, type_: int, flags: int, sid: int, length: int
    ) -> None:
        if version != VERSION:
            raise FrameError(f"unsupported yamux version {version} (expected 0)")
        if type_ not in TYPE_NAMES:
            raise FrameError(f"unknown frame type {type_}")
        if type_ == TYPE_DATA and length > self._max:
            raise FrameError(
                f"Data frame of {length} bytes on stream {sid} exceeds the "
                f"maximum of {self._max}"
            )
        self._handler.frame_header(type_, flags, sid, length)
        if type_ == TYPE_DATA:
            if length:
                self._remaining = length
                self._sid = sid
                self._flags = flags
            else:
                self._handler.frame_end(sid, flags)
