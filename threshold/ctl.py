"""``threshold-ctl``: a command-line client of the management API.

For scripts and operators: ``ping``, ``clients``, ``tunnels get`` and
``tunnels put FILE``, JSON on stdout, one line per error on stderr, and exit
statuses a script can rely on (docs/ctl.md):

- 0: success;
- 1: the API answered with an error (any 4xx or 5xx), or with something
  that is not the API's answer;
- 2: a usage error (arguments, certificate files, the tunnels FILE), found
  before any request is sent;
- 3: the server could not be reached (refused, TLS failure, timeout);
- 70: a bug in threshold-ctl itself.

``run(reactor, argv)`` is the whole program as a Deferred, with injectable
streams, so tests drive it in-process; ``main`` runs it under ``react``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

from hyperlink import DecodedURL
from OpenSSL import SSL
from service_identity import VerificationError
from treq import collect
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import react
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from threshold.config import ConfigError
from threshold.tls import ClientCertPolicy
from threshold.wire import strictjson

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_BUG",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "AnswerError",
    "CtlError",
    "UnreachableError",
    "UsageError",
    "main",
    "run",
]

PROG = "threshold-ctl"

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_BUG = 70  # EX_SOFTWARE in sysexits.h

DEFAULT_TIMEOUT = 10.0

# The API's answers are small (a tunnel list is at most the server's body
# limit, 1 MiB by default); anything far larger is not the API.
MAX_ANSWER_BYTES = 64 * 1024 * 1024

_ENV = {
    "server": "THRESHOLD_SERVER",
    "ca": "THRESHOLD_CA",
    "cert": "THRESHOLD_CERT",
    "key": "THRESHOLD_KEY",
}

# ConfigError names threshold.tls's config fields; threshold-ctl's are options.
_OPTION_OF_FIELD = {
    "CaCertificateFile": "--ca",
    "ClientTlsCertificateFile": "--cert",
    "ClientTlsKeyFile": "--key",
}


class CtlError(Exception):
    """A failure that ends the command with ``exit_status`` and one line."""

    exit_status = EXIT_API_ERROR

    def line(self) -> str:
        """The line printed on stderr."""
        return f"{PROG}: {self}"


class UsageError(CtlError):
    """Bad arguments or input, found before any request was sent."""

    exit_status = EXIT_USAGE

    def line(self) -> str:
        return f"{PROG}: error: {self}"


class AnswerError(CtlError):
    """The API answered with an error status, or not as the API does."""

    exit_status = EXIT_API_ERROR

    def __init__(self, status: int, phrase: str, message: str) -> None:
        head = f"{status} {phrase}".strip()
        super().__init__(f"{head}: {message}" if message else head)
        self.status = status
        self.phrase = phrase
        self.message = message


class UnreachableError(CtlError):
    """No answer from the server: refused, TLS failure, timeout."""

    exit_status = EXIT_UNREACHABLE


@dataclass(frozen=True)
class _Target:
    """Where and how to send requests, checked before the first one."""

    base_url: str
    agent: IAgent
    timeout: float


def _one_line(text: str) -> str:
    """Escape control characters so a message stays on one line."""
    return re.sub(
        r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text
    ).strip()


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return seconds


def _add_globals(parser: argparse.ArgumentParser, defaults: Mapping[str, Any]) -> None:
    """Add the global options; ``defaults`` maps each dest to its default."""
    parser.add_argument(
        "--server",
        metavar="URL",
        default=defaults["server"],
        help="the management API, e.g. https://tunnel.example.net:9057"
        " (env THRESHOLD_SERVER)",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        default=defaults["ca"],
        help="CA certificate the server's certificate must be signed by"
        " (env THRESHOLD_CA)",
    )
    parser.add_argument(
        "--cert",
        metavar="FILE",
        default=defaults["cert"],
        help="client certificate, e.g. operator.crt (env THRESHOLD_CERT)",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        default=defaults["key"],
        help="client private key (env THRESHOLD_KEY)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_timeout,
        default=defaults["timeout"],
        help=f"give up after this long (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        default=defaults["compact"],
        help="print JSON on one line",
    )


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line; global options are accepted before or after a command."""
    top_defaults: dict[str, Any] = {
        dest: environ.get(name) or None for dest, name in _ENV.items()
    }
    top_defaults.update(timeout=DEFAULT_TIMEOUT, compact=False)
    # On subcommands a default would overwrite what was given before the
    # command, so there they only set what is given.
    sub_defaults = dict.fromkeys(top_defaults, argparse.SUPPRESS)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Call threshold's management API. Exit status: 0 success,"
        " 1 the API answered an error, 2 usage error, 3 server unreachable.",
    )
    _add_globals(parser, top_defaults)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ping = commands.add_parser("ping", help="check the server answers (prints pong)")
    clients = commands.add_parser("clients", help="print the state of every client")
    tunnels = commands.add_parser("tunnels", help="print or replace the tunnels")
    actions = tunnels.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = actions.add_parser("get", help="print the tunnels in force")
    put = actions.add_parser(
        "put", help="replace every tunnel, all or nothing; print the tunnels in force"
    )
    put.add_argument(
        "file",
        metavar="FILE",
        help="a JSON list of tunnels; - for stdin",
    )
    for sub in (ping, clients, tunnels, get, put):
        _add_globals(sub, sub_defaults)
    return parser


def _parse_args(
    argv: Sequence[str], environ: Mapping[str, str], stdout: IO[str], stderr: IO[str]
) -> argparse.Namespace | int:
    """Parse ``argv``; return the namespace, or the exit status argparse chose."""
    parser = _parser(environ)
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            return parser.parse_args(list(argv))
        except SystemExit as e:
            # argparse printed its message (or the help, with status 0).
            return e.code if isinstance(e.code, int) else EXIT_USAGE


def _base_url(server: str | None) -> tuple[str, str]:
    """Check ``--server``; return the base URL and its scheme."""
    if not server:
        raise UsageError("no server: give --server URL or set THRESHOLD_SERVER")
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https"):
        raise UsageError(
            f"--server {server!r}: the URL must start with https:// (or http://"
            " for a server with UseTls false)"
        )
    try:
        parts.port  # noqa: B018 (urlsplit checks the port when asked for it)
    except ValueError:
        raise UsageError(f"--server {server!r}: the port is not valid") from None
    if not parts.hostname:
        raise UsageError(f"--server {server!r}: no host name")
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            f"--server {server!r}: the API authenticates by certificate, not"
            " by a user name in the URL"
        )
    if parts.query or parts.fragment:
        raise UsageError(f"--server {server!r}: a query or fragment is not allowed")
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    if not base.isascii():
        # An international host name (or path): its ASCII (IDNA) form.
        try:
            base = DecodedURL.from_text(base).to_uri().to_text()
        except (ValueError, UnicodeError) as e:
            raise UsageError(f"--server {server!r}: {e}") from None
    return base, parts.scheme


def _https_policy(args: argparse.Namespace) -> ClientCertPolicy:
    """Load --ca, --cert and --key, all required for https."""
    missing = [f"--{name}" for name in ("ca", "cert", "key") if not getattr(args, name)]
    if missing:
        env = ", ".join(_ENV[name[2:]] for name in missing)
        raise UsageError(
            f"an https:// server needs --ca, --cert and --key; missing"
            f" {', '.join(missing)} (or set {env})"
        )
    for name in ("ca", "cert", "key"):
        path = getattr(args, name)
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise UsageError(f"--{name} {path}: {e.strerror or e}") from None
    try:
        return ClientCertPolicy(args.ca, args.key, args.cert, source=PROG)
    except ConfigError as e:
        message = str(e)
        match = re.match(rf'{re.escape(PROG)}: field "(\w+)": (.*)$', message)
        if match is not None and match.group(1) in _OPTION_OF_FIELD:
            message = f"{_OPTION_OF_FIELD[match.group(1)]}: {match.group(2)}"
        raise UsageError(message) from None


def _read_tunnels(path: str, stdin: IO[bytes]) -> bytes:
    """Read and check the tunnels FILE (``-``: stdin); return its bytes.

    The bytes are sent unchanged; the check is only that they are a JSON
    list (the server checks each entry), with the server's strictness:
    UTF-8, no NaN, no key given twice.
    """
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = stdin.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {name}: {e.strerror or e}") from None
    try:
        tunnels = strictjson.loads(data)
    except strictjson.NotUtf8 as e:
        raise UsageError(f"{name}: not UTF-8: {e}") from None
    except strictjson.JsonError as e:
        raise UsageError(f"{name}: not JSON: {e}") from None
    if not isinstance(tunnels, list):
        kind = "an object" if isinstance(tunnels, dict) else type(tunnels).__name__
        raise UsageError(f"{name}: must be a JSON list of tunnels, not {kind}")
    return data


def _error_message(body: bytes) -> str:
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
        return _one_line(message)
    text = " ".join(body.decode("utf-8", "replace").split())
    return _one_line(text[:200] + ("..." if len(text) > 200 else ""))


def _tls_reasons(failure_value: BaseException) -> str:
    """Say what an OpenSSL error was about, from its (lib, func, reason) list."""
    reasons = []
    for item in failure_value.args[0] if failure_value.args else ():
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    return ", ".join(r for r in reasons if r) or str(failure_value) or "unknown"


_TLS_HINTS = {
    "certificate verify failed": (
        " (is --ca the CA that signed the server's certificate?)"
    ),
    "tlsv1 alert unknown ca": (
        " (the server does not accept --cert: is it signed by the server's CA?)"
    ),
}


def _describe(exc: BaseException, target: _Target) -> str:
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
                return _describe(reason, target)
        for reason in reasons:
            if not isinstance(reason, error.ConnectionDone | error.ConnectionLost):
                return _describe(reason, target)
        hint = ""
        if target.base_url.startswith("http://"):
            hint = " (if the server uses TLS, use an https:// URL)"
        return f"the connection closed before an answer{hint}"
    return str(exc).strip() or type(exc).__name__


@implementer(IBodyProducer)
class _Body:
    """A request body that is all in memory, written at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:  # noqa: N802
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


async def _exchange(
    target: _Target, method: str, path: str, body: bytes | None
) -> tuple[int, str, bytes]:
    """Send one request; return the status, its phrase and the body."""
    headers: dict[bytes, list[bytes]] = {
        b"Accept": [b"application/json"],
        b"User-Agent": [PROG.encode()],
    }
    if body is not None:
        headers[b"Content-Type"] = [b"application/json"]
    # The Agent is called directly, not through treq's HTTPClient: treq
    # re-encodes the URL with hyperlink, which fails on IPv6 literals
    # (python-hyper/hyperlink#68).
    response = await target.agent.request(
        method.encode("ascii"),
        (target.base_url + path).encode("ascii"),
        Headers(headers),
        _Body(body) if body is not None else None,
    )
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

    await collect(response, collector)
    return response.code, _phrase(response.code, response.phrase), b"".join(chunks)


def _phrase(status: int, phrase: bytes | None) -> str:
    text = (phrase or b"").decode("latin-1").strip()
    if text:
        return _one_line(text)
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _call(
    reactor: Any, target: _Target, method: str, path: str, body: bytes | None = None
) -> tuple[int, str, bytes]:
    """One request within the timeout; raise CtlError unless it is a 2xx."""
    d = Deferred.fromCoroutine(_exchange(target, method, path, body))
    d.addTimeout(target.timeout, reactor)
    try:
        status, phrase, content = await d
    except CtlError:
        raise
    except Exception as e:
        raise UnreachableError(
            f"cannot reach {target.base_url}: {_describe(e, target)}"
        ) from None
    if not 200 <= status < 300:
        raise AnswerError(status, phrase, _error_message(content))
    return status, phrase, content


def _json_answer(status: int, phrase: str, content: bytes) -> Any:
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as e:
        raise AnswerError(
            status, phrase, f"the answer is not JSON ({e}); is --server the API?"
        ) from None


async def _command(
    reactor: Any,
    args: argparse.Namespace,
    stdin: IO[bytes],
    stdout: IO[str],
) -> None:
    """Check everything, then make the one request the command needs."""
    base_url, scheme = _base_url(args.server)
    policy = _https_policy(args) if scheme == "https" else None
    body = None
    if args.command == "tunnels" and args.action == "put":
        body = _read_tunnels(args.file, stdin)

    pool = HTTPConnectionPool(reactor, persistent=True)
    if policy is not None:
        agent = Agent(
            reactor, contextFactory=policy, pool=pool, connectTimeout=args.timeout
        )
    else:
        agent = Agent(reactor, pool=pool, connectTimeout=args.timeout)
    target = _Target(base_url, agent, args.timeout)
    try:
        if args.command == "ping":
            _, _, content = await _call(reactor, target, "GET", "/ping")
            stdout.write(content.decode("utf-8", "replace").strip() + "\n")
            return
        if args.command == "clients":
            answer = _json_answer(*await _call(reactor, target, "GET", "/clients"))
        elif args.action == "get":
            answer = _json_answer(*await _call(reactor, target, "GET", "/tunnels"))
        else:
            answer = _json_answer(
                *await _call(reactor, target, "PUT", "/tunnels", body)
            )
    finally:
        # Wait for the connection to close, so nothing is left behind.
        await pool.closeCachedConnections()
    stdout.write(json.dumps(answer, indent=None if args.compact else 2) + "\n")


def run(
    reactor: Any,
    argv: Sequence[str],
    *,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Deferred[int]:
    """Run ``threshold-ctl`` with ``argv``; fire with the exit status.

    Never fails: every error is one line on ``stderr`` and its status.
    The streams and environment default to the process's own.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    env = environ if environ is not None else os.environ

    async def go() -> int:
        parsed = _parse_args(argv, env, out, err)
        if isinstance(parsed, int):
            return parsed
        source = stdin if stdin is not None else _stdin_bytes()
        try:
            await _command(reactor, parsed, source, out)
        except CtlError as e:
            err.write(e.line() + "\n")
            return e.exit_status
        except Exception:
            err.write(f"{PROG}: internal error, please report it:\n")
            err.write(traceback.format_exc())
            return EXIT_BUG
        return EXIT_OK

    return Deferred.fromCoroutine(go())


def _stdin_bytes() -> IO[bytes]:
    buffer = getattr(sys.stdin, "buffer", None)
    return buffer if buffer is not None else io.BytesIO()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``threshold-ctl`` under the reactor and exit with its status."""
    args = list(sys.argv[1:] if argv is None else argv)

    async def go(reactor: Any) -> None:
        status = await run(reactor, args)
        if status:
            raise SystemExit(status)

    react(go)


if __name__ == "__main__":
    main()
