"""A tiny UDP service for the example: it answers each datagram with one.

It stands for a self-hoster's UDP service behind threshold (a game server,
WireGuard, DNS). Each datagram may start with a PROXY v2 header (the tunnel
has ``HaProxyProxyProtocol`` with version 2: threshold puts one in front of
every datagram); the user's address comes from it, since the datagram's
own source is the threshold client. It answers to the datagram's source,
which threshold sends back to that user only:

    udp-echo: datagram from 127.0.0.1:54321 (via PROXY v2 header): you said "ping"

Plain asyncio and the standard library, nothing from threshold.

Usage: udp_echo.py --port-file FILE [--host 127.0.0.1] [--port 0]. It binds
the port (0: a free one) and writes its number to FILE once it is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import struct
import sys

# haproxy's doc/proxy-protocol.txt, section 2.2: the v2 signature, then
# version/command, family/transport, and the length of the addresses.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
UDP4, UDP6 = 0x12, 0x22


class HeaderError(ValueError):
    """A datagram with a PROXY v2 signature but a header that is not valid."""


def parse_proxy_v2(datagram: bytes) -> tuple[tuple[str, int] | None, bytes]:
    """The user's (address, port) from a leading PROXY v2 header, and the rest.

    No header: (None, the datagram unchanged).
    """
    if not datagram.startswith(V2_SIGNATURE):
        return None, datagram
    if len(datagram) < 16:
        raise HeaderError("PROXY v2 header cut short")
    ver_cmd, family, length = struct.unpack("!BBH", datagram[12:16])
    if ver_cmd >> 4 != 2 or len(datagram) < 16 + length:
        raise HeaderError("malformed PROXY v2 header")
    body, rest = datagram[16 : 16 + length], datagram[16 + length :]
    if family == UDP4 and length >= 12:
        host = str(ipaddress.IPv4Address(body[:4]))
        return (host, int.from_bytes(body[8:10], "big")), rest
    if family == UDP6 and length >= 36:
        host = str(ipaddress.IPv6Address(body[:16]))
        return (host, int.from_bytes(body[32:34], "big")), rest
    raise HeaderError(f"PROXY v2 header for family 0x{family:02x}, not UDP")


def _show(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Echo(asyncio.DatagramProtocol):
    """Answer each datagram with one line saying who sent what."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            user, payload = parse_proxy_v2(data)
        except HeaderError as e:
            print(f"udp-echo: refused a datagram from {_show(addr)}: {e}", flush=True)
            answer = f"udp-echo: error: {e}"
        else:
            text = payload.decode("utf-8", "replace").rstrip("\r\n")
            if user is None:
                seen = f"{_show(addr)} (no PROXY header)"
            else:
                seen = f"{_show(user)} (via PROXY v2 header)"
            print(f"udp-echo: UDP peer {_show(addr)}; the user is {seen}", flush=True)
            answer = f'udp-echo: datagram from {seen}: you said "{text}"'
        self.transport.sendto(answer.encode(), addr)


async def serve(host: str, port: int, port_file: str) -> None:
    """Bind, publish the port in ``port_file``, answer until SIGTERM."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=(host, port))
    bound = transport.get_extra_info("sockname")[1]
    # Write then rename, so a reader never sees a half-written number.
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{bound}\n")
    os.replace(tmp, port_file)
    print(f"udp-echo: listening on {_show((host, bound))} (UDP)", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    transport.close()
    print("udp-echo: stopped", flush=True)


def main() -> int:
    """Run the service until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True, metavar="FILE")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.port_file))
    except OSError as e:
        print(f"udp-echo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
