"""A blocking TLS client that never answers the server's close_notify.

Python's ``ssl`` over a plain socket through memory BIOs, so the test sees
the TCP connection itself: whether (and when) the server closes it, as an
abusive client that ignores TLS close alerts would. Run it in a thread
(``deferToThread``); it blocks.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass


@dataclass
class Exchange:
    """What the server sent, and when it closed the TCP connection."""

    answer: bytes
    #: Seconds from the first byte of the answer (or from the request, if
    #: none came) to the TCP close (FIN or RST); None if still open when the
    #: wait ended.
    closed_after: float | None


def exchange(
    port: int,
    ca: str,
    cert: str,
    key: str,
    request: bytes,
    wait: float = 5.0,
    host: str = "127.0.0.1",
    server_name: str = "localhost",
) -> Exchange:
    """Send ``request`` over TLS, read until the server closes or ``wait``."""
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    deadline = time.monotonic() + wait
    with socket.create_connection((host, port), timeout=wait) as sock:

        def send() -> None:
            data = outgoing.read()
            if data:
                sock.sendall(data)

        def receive() -> bool:
            """Feed what arrives to TLS; False at the TCP close or the deadline."""
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return False
            if not data:
                return False
            incoming.write(data)
            return True

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                send()
                if not receive():
                    raise ConnectionError("closed during the TLS handshake") from None
        send()
        tls.write(request)
        send()
        sent = time.monotonic()
        answer = b""
        first: float | None = None
        tls_open = True
        try:
            while True:
                while tls_open:
                    try:
                        chunk = tls.read(65536)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLZeroReturnError:
                        # The server's close_notify: deliberately unanswered.
                        tls_open = False
                        break
                    if not chunk:
                        tls_open = False
                        break
                    answer += chunk
                    first = first or time.monotonic()
                if not receive():
                    return Exchange(answer, time.monotonic() - (first or sent))
        except TimeoutError:
            return Exchange(answer, None)
