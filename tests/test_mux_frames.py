"""Tests for the yamux frame codec."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.testing import Frame, FrameReader, decode_frames, encode_frame
from threshold.wire import frames as F


def frame_strategy() -> st.SearchStrategy[Frame]:
    sid = st.integers(0, F.MAX_UINT32)
    flags = st.integers(0, 0xFFFF)
    data = st.builds(
        lambda f, s, p: Frame(F.TYPE_DATA, f, s, len(p), p),
        flags,
        sid,
        st.binary(max_size=300),
    )
    other = st.builds(
        Frame,
        st.sampled_from([F.TYPE_WINDOW_UPDATE, F.TYPE_PING, F.TYPE_GO_AWAY]),
        flags,
        sid,
        st.integers(0, F.MAX_UINT32),
    )
    return st.one_of(data, other)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


class HeaderTests(SynchronousTestCase):
    def test_layout(self):
        """The header is version, type, flags, stream id, length, big-endian."""
        raw = F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN | F.FLAG_ACK, 7, 513)
        self.assertEqual(raw, bytes([0, 1, 0, 3, 0, 0, 0, 7, 0, 0, 2, 1]))

    def test_data_frame_bytes(self):
        """A Data frame is the header with the payload length, then payload."""
        raw = encode_frame(Frame(F.TYPE_DATA, F.FLAG_FIN, 3, 0, b"hi"))
        self.assertEqual(raw, struct.pack(">BBHII", 0, 0, 4, 3, 2) + b"hi")

    def test_describe_flags(self):
        """Flags render as names for log lines."""
        self.assertEqual(F.describe_flags(F.FLAG_SYN | F.FLAG_RST), "SYN|RST")
        self.assertEqual(F.describe_flags(0), "-")
        self.assertEqual(F.describe_flags(0x30), "0x30")


class DecoderTests(SynchronousTestCase):
    @settings(max_examples=200)
    @given(st.lists(frame_strategy(), max_size=20), st.lists(st.integers(0, 10**6)))
    def test_round_trip_any_fragmentation(self, frames, cuts):
        """Frames encoded then fed in arbitrary fragments decode unchanged."""
        wire = b"".join(encode_frame(f) for f in frames)
        reader = FrameReader()
        out = []
        for piece in split(wire, cuts):
            out.extend(reader.feed(piece))
        self.assertEqual(out, frames)

    @given(st.lists(frame_strategy(), min_size=1, max_size=5))
    def test_one_byte_at_a_time(self, frames):
        """Feeding a single byte at a time yields the same frames."""
        wire = b"".join(encode_frame(f) for f in frames)
        reader = FrameReader()
        out = []
        for i in range(len(wire)):
            out.extend(reader.feed(wire[i : i + 1]))
        self.assertEqual(out, frames)

    def test_payload_streamed_in_pieces(self):
        """A Data payload is handed on as it arrives, never buffered whole."""
        events = []

        class H:
            def frame_header(self, t, f, s, n):
                events.append(("h", t, s, n))

            def frame_payload(self, s, d):
                events.append(("p", d))

            def frame_end(self, s, f):
                events.append(("e", f))

        dec = F.FrameDecoder(H(), 100)
        wire = F.encode_header(F.TYPE_DATA, F.FLAG_FIN, 5, 6) + b"abcdef"
        dec.feed(wire[:15])
        self.assertEqual(events, [("h", 0, 5, 6), ("p", b"abc")])
        dec.feed(wire[15:])
        self.assertEqual(events[2:], [("p", b"def"), ("e", F.FLAG_FIN)])

    @settings(max_examples=200)
    @given(
        st.lists(frame_strategy(), max_size=20),
        st.lists(st.integers(0, 10**6)),
        st.integers(0, 4),
    )
    def test_bounded_feed_stops_at_headers(self, frames, cuts, limit):
        """With max_frames, each call decodes at most that many headers and
        returns the bytes it used; feeding the rest later, piece by piece,
        yields every frame in order."""
        collected = []

        class H:
            headers = 0

            def frame_header(self, t, f, s, n):
                H.headers += 1
                if t != F.TYPE_DATA:
                    collected.append(Frame(t, f, s, n))
                else:
                    collected.append([t, f, s, n, b""])

            def frame_payload(self, s, d):
                collected[-1][4] += d

            def frame_end(self, s, f):
                collected[-1] = Frame(*collected[-1][:4], payload=collected[-1][4])

        dec = F.FrameDecoder(H(), F.MAX_UINT32)
        for piece in split(b"".join(encode_frame(f) for f in frames), cuts):
            while True:
                before = H.headers
                used = dec.feed(piece, limit)
                self.assertLessEqual(H.headers - before, limit)
                self.assertLessEqual(used, len(piece))
                piece = piece[used:]
                if not piece:
                    break
                self.assertEqual(H.headers - before, limit)  # stopped by the bound
                if limit == 0:
                    # A zero bound decodes no header at all: continue unbounded.
                    dec.feed(piece)
                    break
        self.assertEqual(collected, frames)

    def test_bad_version(self):
        """A version other than 0 is a FrameError naming it."""
        with self.assertRaisesRegex(F.FrameError, "version 1"):
            decode_frames(b"\x01" + bytes(11))

    def test_bad_type(self):
        """An unknown frame type is a FrameError naming it."""
        with self.assertRaisesRegex(F.FrameError, "unknown frame type 9"):
            decode_frames(b"\x00\x09" + bytes(10))

    def test_data_over_maximum(self):
        """A Data header longer than the maximum fails before any payload."""
        with self.assertRaisesRegex(F.FrameError, "101 bytes.*maximum of 100"):
            decode_frames(F.encode_header(F.TYPE_DATA, 0, 1, 101), 100)

    def test_window_update_length_not_limited(self):
        """The maximum applies to Data only; other lengths are values."""
        frames = decode_frames(F.encode_header(F.TYPE_PING, 1, 0, F.MAX_UINT32), 10)
        self.assertEqual(frames, [Frame(F.TYPE_PING, 1, 0, F.MAX_UINT32)])

    @settings(max_examples=300)
    @given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=5))
    def test_garbage_only_frame_error(self, data, cuts):
        """Random bytes decode or raise FrameError, nothing else."""
        reader = FrameReader(max_data_length=64)
        try:
            for piece in split(data, cuts):
                reader.feed(piece)
        except F.FrameError:
            pass
