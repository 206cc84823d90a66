"""A session's way out to its transport: frames at once, or held while corked.

Over TLS every write to the transport becomes a record (and, at once or on
the reactor's turn, a send): the frames of one burst, such as those written
while the session acts on a slice of input, or a new stream's SYN and its
opening bytes, are worth sending as one. While corked (:meth:`cork`,
counted, so nested bursts are one) frames are held in order; the outermost
:meth:`uncork` writes them as one ``writeSequence``. A burst must end
before control returns to the reactor, so nothing is delayed by it.
"""

from __future__ import annotations

from errno import EWOULDBLOCK
from typing import Any

from twisted.internet.main import CONNECTION_LOST
from twisted.internet.tcp import Connection as _TcpConnection

#: How much the session's TCP transport buffers before it pauses the
#: session (and so the streams' producers), instead of Twisted's 64 KiB:
#: with bulk on several streams each pause and resume is a round of
#: epoll_ctl calls per stream. One session per client: bounded memory.
SESSION_TCP_BUFFER = 1024 * 1024
#: What a session reads per ``recv`` (Twisted: 64 KiB): many TLS records per
#: read in bulk. Into one buffer the process's sessions share (the reactor
#: reads one socket at a time and the bytes are copied out at once): a new
#: 1 MiB buffer per read would be an mmap, mremap and munmap each time.
SESSION_TCP_READ = SESSION_TCP_BUFFER
_read_buffer: memoryview | None = None  # made with the first session


def widen_buffer(transport: Any) -> None:
    """Let the TCP under ``transport`` (TLS or not) buffer SESSION_TCP_BUFFER.

    Twisted's TCP reads ``bufferSize`` per ``recv`` too: a TCP connection's
    reads go through the buffer of SESSION_TCP_READ the sessions share.
    """
    for t in (transport, getattr(transport, "transport", None)):
        size = getattr(t, "bufferSize", None)
        if isinstance(size, int) and size < SESSION_TCP_BUFFER:
            if isinstance(t, _TcpConnection):
                _read_at_most(t, SESSION_TCP_READ)
            t.bufferSize = SESSION_TCP_BUFFER


def _read_at_most(connection: _TcpConnection, size: int) -> None:
    """Twisted's TCP ``doRead``, reading up to ``size`` into the shared buffer."""
    global _read_buffer
    if _read_buffer is None:
        _read_buffer = memoryview(bytearray(SESSION_TCP_READ))
    sock = connection.socket
    view = _read_buffer[:size]

    def doRead() -> Any:  # noqa: N802
        try:
            count = sock.recv_into(view)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        return connection._dataReceived(view[:count].tobytes())

    connection.doRead = doRead  # type: ignore[method-assign]


class FrameWriter:
    """Writes one session's frames to ``transport``, corked or at once."""

    __slots__ = ("_depth", "_held", "transport")

    def __init__(self) -> None:
        #: The session's transport; None until connected, and once dropped.
        self.transport: Any = None
        self._depth = 0
        self._held: list[bytes] = []

    def write(self, frame: bytes) -> None:
        """A whole frame (a header, or header and payload joined)."""
        if self._depth:
            self._held.append(frame)
        elif self.transport is not None:
            self.transport.write(frame)

    def write_data(self, header: bytes, payload: bytes) -> None:
        """A Data frame, header and payload apart (no copy to join them)."""
        if self._depth:
            self._held += (header, payload)
        elif self.transport is not None:
            self.transport.writeSequence([header, payload])

    def cork(self) -> None:
        """Hold frames until the matching :meth:`uncork`."""
        self._depth += 1

    def uncork(self) -> None:
        """Write what was held, at the outermost uncork."""
        self._depth -= 1
        if not self._depth:
            self.flush()

    def flush(self) -> None:
        """Write what is held now (before the transport is closed)."""
        held = self._held
        if held and self.transport is not None:
            self._held = []
            self.transport.writeSequence(held)

    def drop(self) -> None:
        """The connection is gone: forget what is held, write nothing more."""
        self._held = []
        self.transport = None
