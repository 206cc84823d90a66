"""Fuzz targets, one per parser: each takes bytes and checks the contract.

The contract everywhere: any input ends in a value or in the parser's own
error type, never another exception. ``tests/fuzz/run`` drives these with
atheris (coverage-guided); ``tests/test_fuzz_targets.py`` runs them on a
seed corpus in every test run so they keep working.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from threshold import config
from threshold.client.socks_codec import SocksParser, SocksState
from threshold.config.egress import EGRESS_POLICY
from threshold.mux.interfaces import StreamAcceptor
from threshold.mux.session import MuxSession, SessionConfig
from threshold.schema import SchemaError
from threshold.server import routes
from threshold.server.api import ApiError, _decode_json
from threshold.testing import Collector, FrameReader
from threshold.wire import clienthello, egress, frames, handshake


def _cuts(data: bytes) -> list[bytes]:
    """Split ``data`` at points taken from its own first byte (deterministic)."""
    if not data:
        return [b""]
    step = data[0] % 7 + 1
    return [data[i : i + step] for i in range(0, len(data), step)]


def frames_target(data: bytes) -> None:
    """Frame decoder: FrameError or frames; a session: never an exception."""
    reader = FrameReader(max_data_length=1 << 16)
    try:
        for piece in _cuts(data):
            reader.feed(piece)
    except frames.FrameError:
        pass
    session = MuxSession(
        client=bool(data[:1] and data[0] & 1),
        clock=Clock(),
        handler=StreamAcceptor(lambda s: Collector(pause_on_connect=bool(s.id & 2))),
        config=SessionConfig(keepalive_interval=0, max_streams=8),
    )
    session.makeConnection(StringTransport())
    for piece in _cuts(data):
        session.dataReceived(piece)


def handshake_target(data: bytes) -> None:
    """Hello, reply and stream-header parsers: HandshakeError or a value."""
    for parse in (
        handshake.parse_hello,
        handshake.parse_hello_reply,
        handshake.parse_stream_header,
    ):
        try:
            parse(data)
        except handshake.HandshakeError:
            pass
    buffer = handshake.LineBuffer(max_length=256)
    try:
        for piece in _cuts(data):
            buffer.feed(piece)
    except handshake.HandshakeError:
        pass


def clienthello_target(data: bytes) -> None:
    """ClientHello parser: never raises; a final answer never changes."""
    result = clienthello.parse_client_hello(data, max_size=4096)
    if not isinstance(result, clienthello.NeedMore):
        again = clienthello.parse_client_hello(data + b"\x00" * 7, max_size=4096)
        if again != result:
            raise AssertionError(f"answer changed: {result!r} then {again!r}")


def _json_value(data: bytes) -> object:
    try:
        return json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return None


def config_target(data: bytes) -> None:
    """Config parsers: ConfigError or a config, for any JSON document."""
    value = _json_value(data)
    for parse in (config.parse_server_config, config.parse_client_config):
        try:
            parse(value, "fuzz.json", "/nonexistent")
        except config.ConfigError:
            pass
    try:
        config.parse_service_map(value, "fuzz")
    except config.ConfigError:
        pass


def api_target(data: bytes) -> None:
    """PUT /tunnels bodies: ApiError (422) or TunnelError, or tunnels."""
    try:
        body = _decode_json(data)
    except ApiError:
        return
    try:
        routes.parse_tunnels(body)
    except routes.TunnelError:
        pass


def egress_target(data: bytes) -> None:
    """SOCKS5 parser, egress lines, EgressPolicy: events, their own errors."""
    parser = SocksParser()
    for piece in _cuts(data):
        if parser.state in (SocksState.DONE, SocksState.FAILED):
            break
        parser.feed(piece)
    for parse in (egress.parse_request, egress.parse_answer):
        try:
            parse(data)
        except egress.EgressError:
            pass
    try:
        EGRESS_POLICY.check(_json_value(data))
    except SchemaError:
        pass


TARGETS = {
    "frames": frames_target,
    "handshake": handshake_target,
    "clienthello": clienthello_target,
    "config": config_target,
    "api": api_target,
    "egress": egress_target,
}
