"""Real TLS ClientHellos from Python's ssl module, for front-end tests."""

from __future__ import annotations

import ssl
import warnings


def python_hello(
    server_name: str | None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> bytes:
    """The ClientHello bytes a Python TLS client sends first.

    The handshake runs over memory BIOs and stops when it wants the server's
    answer, so the return value is exactly what a real client would write.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        # TLS 1.0 and 1.1 are deprecated; some tests build such hellos.
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello, "the TLS client wrote no ClientHello"
    return hello
