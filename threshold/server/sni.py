"""The SNI read of a hostname-routed connection, bounded in bytes, records and reads.

A connection on a socket whose tunnels have hostname globs is routed by the
SNI name of its TLS ClientHello. :class:`SniReader` feeds each segment to one
incremental :class:`~threshold.wire.clienthello.ClientHelloParser` (linear
work whatever the segmentation) and keeps the bytes for replay. What one
connection may cost before it is routed is bounded: ``MaxClientHelloBytes``
bytes, :data:`~threshold.wire.clienthello.DEFAULT_MAX_RECORDS` records,
:data:`MAX_HELLO_READS` reads, ``SniReadTimeoutSeconds`` seconds.
"""

from __future__ import annotations

from threshold.wire import clienthello
from threshold.wire.clienthello import NeedMore, NotTls, Result

__all__ = ["MAX_HELLO_READS", "SniReader"]

#: Reads (segments) a ClientHello may take. A real client needs one or two;
#: a 64 KiB hello over a 536-byte MSS, read segment by segment, 123; a
#: 500-byte hello sent a byte per segment, 500. Each read costs the reactor
#: a system call and a callback whatever its size, so this, not the byte
#: bound, is what bounds the work of one-byte segments (about 15 ms).
MAX_HELLO_READS = 1024


class SniReader:
    """A connection's first bytes until its ClientHello (or its absence) is known."""

    __slots__ = ("parser", "reads", "max_reads")

    def __init__(
        self,
        max_size: int = clienthello.DEFAULT_MAX_SIZE,
        max_records: int = clienthello.DEFAULT_MAX_RECORDS,
        max_reads: int = MAX_HELLO_READS,
    ) -> None:
        self.parser = clienthello.ClientHelloParser(max_size, max_records)
        self.reads = 0
        self.max_reads = max_reads

    def feed(self, data: bytes) -> Result:
        """Add one segment; NeedMore, or the answer (which never changes)."""
        self.reads += 1
        result = self.parser.feed(data)
        if isinstance(result, NeedMore) and self.reads >= self.max_reads:
            result = self.parser.result = NotTls(
                f"no complete ClientHello in {self.max_reads} reads", True
            )
        return result

    def replay(self) -> bytes:
        """Every byte read, to send on unchanged."""
        return bytes(self.parser.buffer)
