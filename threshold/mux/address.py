"""The address a stream reports as its peer and host."""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from zope.interface import implementer


@implementer(IAddress)
class StreamAddress:
    """The address of a stream: the session's peer and the stream id."""

    def __init__(self, session_address: IAddress | None, stream_id: int) -> None:
        self.session_address = session_address
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return f"StreamAddress({self.session_address!r}, {self.stream_id})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StreamAddress)
            and other.session_address == self.session_address
            and other.stream_id == self.stream_id
        )

    def __hash__(self) -> int:
        return hash((self.stream_id, repr(self.session_address)))
