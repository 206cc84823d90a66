"""One request to the management API, and what its failures mean.

Every way a request can go wrong becomes one :class:`CtlError`: an answer
outside 2xx is an :class:`AnswerError` (exit 1) with the API's own message;
no answer at all is an :class:`UnreachableError` (exit 3) saying why in a
few words (refused, TLS, timeout), with a hint where one helps.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from treq import collect
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator
from twisted.web.client import (
    FileBodyProducer,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from threshold.ctl.errors import (
    PROG,
    AnswerError,
    CtlError,
    UnreachableError,
    one_line,
)
from threshold.ctl.progress import Progress

# The API's answers are small (a tunnel list is at most the server's body
# limit, 1 MiB by default); anything far larger is not the API.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """Where and how to send requests, checked before the first one."""

    base_url: str
    agent: IAgent
    timeout: float


def error_message(body: bytes) -> str:
    """The message of an error answer: the API's JSON, else the start of the body."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        details = []
        index, field = value.get("index"), value.get("field")
        if isinstance(index, int) and not isinstance(index, bool):
            details.append(f"entry {index}")
        if isinstance(field, str):
            details.append(f"field {field}")
        message = value["error"]
        if details:
            message += f" ({', '.join(details)})"
        return one_line(message)
    text = " ".join(body.decode("utf-8", "replace").split())
    return one_line(text[:200] + ("..." if len(text) > 200 else ""))


def _tls_reasons(failure_value: BaseException) -> str:
    """Say what an OpenSSL error was about, from its (lib, func, reason) list."""
    reasons = []
    for item in failure_value.args[0] if failure_value.args else ():
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    return ", ".join(r for r in reasons if r) or str(failure_value) or "unknown"


class _CountingReader(io.BytesIO):
    """The body, telling the progress line each chunk the producer takes."""

    def __init__(self, body: bytes, progress: Progress) -> None:
        super().__init__(body)
        self._progress = progress

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self._progress.on_sent(len(chunk))
        return chunk


_TLS_HINTS = {
    "certificate verify failed": (
        " (is --ca the CA that signed the server's certificate?)"
    ),
    "tlsv1 alert unknown ca": (
        " (the server does not accept --cert: is it signed by the server's CA?)"
    ),
}


def describe(exc: BaseException, target: Target) -> str:
    """Why the server could not be reached, in a few words."""
    if isinstance(exc, defer.TimeoutError | defer.CancelledError):
        return f"no answer within {target.timeout:g} seconds"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.DNSLookupError):
        return f"cannot resolve the host name: {exc}"
    if isinstance(exc, error.ConnectError):
        return str(exc).strip() or type(exc).__name__
    if isinstance(exc, VerificationError):
        return f"TLS failure: the server's certificate does not match its name: {exc}"
    if isinstance(exc, SSL.Error):
        reasons = _tls_reasons(exc)
        return f"TLS failure: {reasons}{_TLS_HINTS.get(reasons, '')}"
    if isinstance(
        exc, ResponseFailed | ResponseNeverReceived | RequestTransmissionFailed
    ):
        # These wrap the real causes; a TLS one says the most.
        reasons = [f.value for f in getattr(exc, "reasons", [])]
        for reason in reasons:
            if isinstance(reason, SSL.Error | VerificationError):
                return describe(reason, target)
        for reason in reasons:
            if not isinstance(reason, error.ConnectionDone | error.ConnectionLost):
                return describe(reason, target)
        hint = ""
        if target.base_url.startswith("http://"):
            hint = " (if the server uses TLS, use an https:// URL)"
        return f"the connection closed before an answer{hint}"
    return str(exc).strip() or type(exc).__name__


def _phrase(status: int, phrase: bytes | None) -> str:
    text = (phrase or b"").decode("latin-1").strip()
    if text:
        return one_line(text)
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _exchange(
    reactor: Any,
    target: Target,
    method: str,
    path: str,
    body: bytes | None,
    progress: Progress | None,
) -> tuple[int, str, bytes]:
    """Send one request; return the status, its phrase and the body."""
    headers: dict[bytes, list[bytes]] = {
        b"Accept": [b"application/json"],
        b"User-Agent": [PROG.encode()],
    }
    producer = None
    if body is not None:
        headers[b"Content-Type"] = [b"application/json"]
        # On the given reactor, not the global one Twisted's default uses.
        cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        source = (
            io.BytesIO(body) if progress is None else _CountingReader(body, progress)
        )
        producer = FileBodyProducer(source, cooperator=cooperator)
    # The Agent is called directly, not through treq's HTTPClient: treq
    # re-encodes the URL with hyperlink, which fails on IPv6 literals
    # (python-hyper/hyperlink#68).
    response = await target.agent.request(
        method.encode("ascii"),
        (target.base_url + path).encode("ascii"),
        Headers(headers),
        producer,
    )
    if progress is not None:
        progress.on_answer()
    chunks: list[bytes] = []
    size = 0

    def collector(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_ANSWER_BYTES:
            raise AnswerError(
                response.code,
                _phrase(response.code, response.phrase),
                f"the answer is larger than {MAX_ANSWER_BYTES} bytes",
            )
        chunks.append(data)
        if progress is not None:
            progress.on_received(len(data))

    await collect(response, collector)
    return response.code, _phrase(response.code, response.phrase), b"".join(chunks)


async def call(
    reactor: Any,
    target: Target,
    method: str,
    path: str,
    body: bytes | None = None,
    progress: Progress | None = None,
) -> tuple[int, str, bytes]:
    """One request within the timeout; raise CtlError unless it is a 2xx.

    ``progress``, when given, is told the bytes sent and received, and
    stopped (its line erased) when the call ends, whichever way.
    """
    d = Deferred.fromCoroutine(_exchange(reactor, target, method, path, body, progress))
    d.addTimeout(target.timeout, reactor)
    try:
        status, phrase, content = await d
    except CtlError:
        raise
    except Exception as e:
        raise UnreachableError(
            f"cannot reach {target.base_url}: {describe(e, target)}"
        ) from None
    finally:
        if progress is not None:
            progress.done()
    if not 200 <= status < 300:
        raise AnswerError(status, phrase, error_message(content))
    return status, phrase, content


def json_answer(status: int, phrase: str, content: bytes) -> Any:
    """The answer's JSON, or an AnswerError if it is not the API's."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as e:
        raise AnswerError(
            status, phrase, f"the answer is not JSON ({e}); is --server the API?"
        ) from None
