"""A tiny backend service for the example: it reads the PROXY v1 header.

It stands for the self-hoster's own service behind threshold. Its TCP peer
is always the threshold client, so the internet user's real address comes
only from the PROXY protocol header that the server puts in front of the
user's bytes. For each connection it reads that header and one line from
the user, answers with one line naming the address it learned, and closes:

    backend: connection from 127.0.0.1:54321 (via PROXY header): you said "hello"

Plain asyncio, nothing from threshold: any service that speaks PROXY v1
(nginx, HAProxy, Postfix, ...) works the same way.

Usage: backend.py --port-file FILE [--host 127.0.0.1] [--port 0]
[--name backend]. It listens on the port (0: a free one; a given one lets
it come back on the same port after a stop) and writes the port number to
FILE once it is listening. ``--name`` starts its answers, so that two of
them (one per home machine) can be told apart.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys

# haproxy's doc/proxy-protocol.txt: a v1 header is at most 107 bytes, CRLF included.
MAX_V1_HEADER = 107
MAX_LINE = 4096
READ_TIMEOUT = 10.0
#: The first word of every answer (--name).
NAME = "backend"


class HeaderError(ValueError):
    """The connection did not start with a valid PROXY v1 header."""


def parse_proxy_v1(line: bytes) -> tuple[str, int] | None:
    """The user's (address, port) from a PROXY v1 line, or None for UNKNOWN."""
    if not line.endswith(b"\r\n"):
        raise HeaderError("no PROXY header (or one without CRLF)")
    parts = line[:-2].decode("ascii", "replace").split(" ")
    if parts[0] != "PROXY":
        raise HeaderError("the connection does not start with 'PROXY '")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise HeaderError(f"malformed PROXY v1 header {line!r}")
    _, family, src, _dst, sport, _dport = parts
    try:
        ip = ipaddress.ip_address(src)
        port = int(sport)
    except ValueError:
        raise HeaderError(f"malformed address in PROXY header {line!r}") from None
    if ip.version != (4 if family == "TCP4" else 6) or not 0 <= port <= 65535:
        raise HeaderError(f"malformed address in PROXY header {line!r}")
    return str(ip), port


def _show(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the header and one line, answer with one line, close."""
    peer = writer.get_extra_info("peername")[:2]
    try:
        header = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
        if len(header) > MAX_V1_HEADER:
            raise HeaderError("PROXY header longer than 107 bytes")
        user = parse_proxy_v1(header)
        said = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        text = said.rstrip(b"\r\n").decode("utf-8", "replace")
        seen = _show(user) if user is not None else "an unknown address"
        print(
            f"backend: TCP peer {_show(peer)}; PROXY header says the user is {seen}",
            flush=True,
        )
        answer = f'{NAME}: connection from {seen} (via PROXY header): you said "{text}"'
    except HeaderError as e:
        print(f"backend: refused {_show(peer)}: {e}", flush=True)
        answer = f"backend: error: {e}"
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        print(f"backend: {_show(peer)} closed or sent too much", flush=True)
        answer = "backend: error: incomplete or oversized input"
    except TimeoutError:
        print(f"backend: {_show(peer)} sent nothing in time", flush=True)
        answer = "backend: error: timed out"
    try:
        writer.write(answer.encode() + b"\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except OSError:
        pass


async def serve(host: str, port: int, port_file: str) -> None:
    """Listen on ``port`` (0: a free one), publish it, serve until SIGTERM."""
    server = await asyncio.start_server(handle, host, port, limit=MAX_LINE)
    port = server.sockets[0].getsockname()[1]
    # Write then rename, so a reader never sees a half-written number.
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, port_file)
    print(f"backend: listening on {_show((host, port))}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    print("backend: stopped", flush=True)


def main() -> int:
    """Run the backend until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--port-file", required=True, metavar="FILE")
    parser.add_argument("--name", default="backend", help="the first word of answers")
    args = parser.parse_args()
    global NAME
    NAME = args.name
    try:
        asyncio.run(serve(args.host, args.port, args.port_file))
    except OSError as e:
        print(f"backend: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
