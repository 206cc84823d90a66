"""An internet user for the example: connect to a tunnel port and say hello.

It prints its own socket's address and port, sends one line, prints the
answer, and checks that the backend saw that same address and port (which
it can only know from the PROXY header, since its TCP peer is the threshold
client). Exit status 0 when it did, 1 otherwise.

Usage: user.py HOST PORT [MESSAGE]
"""

from __future__ import annotations

import socket
import sys

TIMEOUT = 10.0


def main() -> int:
    """Connect, talk, check; return the exit status."""
    if len(sys.argv) not in (3, 4):
        print("usage: user.py HOST PORT [MESSAGE]", file=sys.stderr)
        return 2
    host, port = sys.argv[1], int(sys.argv[2])
    message = sys.argv[3] if len(sys.argv) == 4 else "hello"
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as s:
            me = s.getsockname()[:2]
            mine = f"{me[0]}:{me[1]}"
            print(f"user: connected to {host}:{port}; my own socket is {mine}")
            s.sendall(message.encode() + b"\n")
            print(f'user: sent "{message}"')
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError as e:
        print(f"user: error talking to {host}:{port}: {e}", file=sys.stderr)
        return 1
    answer = b"".join(chunks).decode("utf-8", "replace").strip()
    print(f"user: got back: {answer}")
    expected = f"connection from {mine} (via PROXY header)"
    if expected not in answer or f'you said "{message}"' not in answer:
        print(
            f"user: the backend did not see my address {mine} and my message",
            file=sys.stderr,
        )
        return 1
    print(f"user: the backend saw {mine}, my own address and port")
    return 0


if __name__ == "__main__":
    sys.exit(main())
