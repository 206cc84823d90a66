"""An internet user of the example's UDP tunnel: send one datagram, check the answer.

It prints its own socket's address and port, sends MESSAGE in one datagram
to HOST:PORT (the gateway's public UDP port), prints the answer, and checks
that the service saw that same address and port (which it can only know
from the PROXY v2 header, since its UDP peer is the threshold client).
UDP may lose a datagram: it sends again every second, up to 5 times.
Exit status 0 when the answer came and named this user, 1 otherwise.

Usage: udp_user.py HOST PORT [MESSAGE]
"""

from __future__ import annotations

import socket
import sys

TRIES = 5


def main() -> int:
    """Send, wait for the answer, check it."""
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    host, port = sys.argv[1], int(sys.argv[2])
    message = sys.argv[3] if len(sys.argv) == 4 else "ping"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        me = "{}:{}".format(*sock.getsockname())
        print(f"user: sending from {me} to {host}:{port} (UDP): {message!r}")
        sock.settimeout(1.0)
        for _ in range(TRIES):
            sock.sendto(message.encode(), (host, port))
            try:
                answer, _ = sock.recvfrom(65535)
            except TimeoutError:
                continue
            break
        else:
            print(f"user: no answer after {TRIES} datagrams", file=sys.stderr)
            return 1
    text = answer.decode("utf-8", "replace")
    print(f"user: got back: {text}")
    if f"datagram from {me} (via PROXY v2 header)" not in text:
        print(f"user: the service did not see my address {me}", file=sys.stderr)
        return 1
    print("user: the service saw this user's own address and port")
    return 0


if __name__ == "__main__":
    sys.exit(main())
