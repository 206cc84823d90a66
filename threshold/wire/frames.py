"""yamux version 0 framing: the 12-byte header and an incremental decoder.

Byte for byte as in hashicorp/yamux's spec.md, so any yamux implementation
interoperates. Pure code: no reactor, no I/O.

The decoder never buffers a whole Data frame: it hands the payload on in the
pieces TCP delivered, so memory held by the framing layer is at most one
partial header (11 bytes) whatever frame sizes the peer uses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame (used by tests and tools; the session streams)."""

    type: int
    flags: int
    stream_id: int
    length: int
    payload: bytes = b""


def encode_header(type_: int, flags: int, stream_id: int, length: int) -> bytes:
    """Encode one 12-byte frame header."""
    return _HEADER.pack(VERSION, type_, flags, stream_id, length)


def encode_frame(frame: Frame) -> bytes:
    """Encode a whole frame; a Data frame's length is its payload's."""
    if frame.type == TYPE_DATA:
        return (
            encode_header(TYPE_DATA, frame.flags, frame.stream_id, len(frame.payload))
            + frame.payload
        )
    return encode_header(frame.type, frame.flags, frame.stream_id, frame.length)


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

    def feed(self, data: bytes) -> None:
        """Decode everything in ``data``, keeping any incomplete header."""
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
            if self._partial:
                need = HEADER_SIZE - len(self._partial)
                self._partial += data[pos : pos + need]
                pos += need
                if len(self._partial) < HEADER_SIZE:
                    return
                header = self._partial
                self._partial = b""
                version, type_, flags, sid, length = _HEADER.unpack(header)
            elif end - pos >= HEADER_SIZE:
                version, type_, flags, sid, length = _HEADER.unpack_from(data, pos)
                pos += HEADER_SIZE
            else:
                self._partial = data[pos:]
                return
            self._header(version, type_, flags, sid, length)

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


class _Collector:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._header: tuple[int, int, int, int] | None = None
        self._payload: list[bytes] = []

    def frame_header(self, type_: int, flags: int, stream_id: int, length: int) -> None:
        if type_ == TYPE_DATA:
            self._header = (type_, flags, stream_id, length)
            self._payload = []
        else:
            self.frames.append(Frame(type_, flags, stream_id, length))

    def frame_payload(self, stream_id: int, data: bytes) -> None:
        self._payload.append(data)

    def frame_end(self, stream_id: int, flags: int) -> None:
        assert self._header is not None
        self.frames.append(Frame(*self._header, payload=b"".join(self._payload)))
        self._header = None


class FrameReader:
    """Collects whole frames from a byte stream (for tests and tools)."""

    def __init__(self, max_data_length: int = MAX_UINT32) -> None:
        self._collector = _Collector()
        self._decoder = FrameDecoder(self._collector, max_data_length)

    def feed(self, data: bytes) -> list[Frame]:
        """Feed bytes; return the frames completed by them."""
        self._decoder.feed(data)
        frames = self._collector.frames
        self._collector.frames = []
        return frames


def decode_frames(data: bytes, max_data_length: int = MAX_UINT32) -> list[Frame]:
    """Decode a complete byte string of frames (for tests and tools)."""
    return FrameReader(max_data_length).feed(data)
