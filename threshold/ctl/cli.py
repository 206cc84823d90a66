"""threshold-ctl's command line: options, checks before sending, the commands.

``run(reactor, argv)`` is the whole program as a Deferred, with injectable
streams, so tests drive it in-process; ``main`` runs it under ``react``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

from hyperlink import DecodedURL
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.web.client import Agent, HTTPConnectionPool

from threshold.config import ConfigError
from threshold.ctl.doctor_cli import add_parser as add_doctor_parser
from threshold.ctl.doctor_cli import check_options as check_doctor_options
from threshold.ctl.doctor_cli import run_doctor
from threshold.ctl.errors import (
    EXIT_BUG,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CtlError,
    UsageError,
)
from threshold.ctl.events import add_parser as add_events_parser
from threshold.ctl.events import check_options as check_events_options
from threshold.ctl.events import run_events
from threshold.ctl.exchange import Target, call, json_answer
from threshold.ctl.output import Format, dump_json, tunnels_table
from threshold.ctl.progress import progress_for
from threshold.ctl.status import clients_table, gather, render
from threshold.tls import ClientCertPolicy
from threshold.wire import strictjson

DEFAULT_TIMEOUT = 10.0

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
    parser.add_argument(
        "--output",
        choices=[f.value for f in Format],
        default=defaults["output"],
        help="json for scripts, table for people (default: json for ping,"
        " clients and tunnels; table for status and doctor)",
    )


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The command line; global options are accepted before or after a command."""
    top_defaults: dict[str, Any] = {
        dest: environ.get(name) or None for dest, name in _ENV.items()
    }
    top_defaults.update(timeout=DEFAULT_TIMEOUT, compact=False, output=None)
    # On subcommands a default would overwrite what was given before the
    # command, so there they only set what is given.
    sub_defaults = dict.fromkeys(top_defaults, argparse.SUPPRESS)

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Call threshold's management API. Exit status: 0 success,"
        " 1 the API answered an error, 2 usage error, 3 server unreachable;"
        " doctor: 4 warnings only, 5 something is broken.",
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
    status_parser = commands.add_parser(
        "status", help="print clients and tunnels with their state and traffic"
    )
    doctor = add_doctor_parser(commands)
    events = add_events_parser(commands)
    for sub in (ping, clients, tunnels, get, put, status_parser, doctor, events):
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
        option = _OPTION_OF_FIELD.get(e.field or "")
        if option is None:
            raise UsageError(str(e)) from None
        raise UsageError(f"{option}: {e.message}") from None


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


def _format(args: argparse.Namespace) -> Format:
    """``--output``, else the command's default (docs/ctl.md)."""
    if args.output is not None:
        return Format(args.output)
    return Format.TABLE if args.command in ("status", "doctor") else Format.JSON


async def _command(
    reactor: Any,
    args: argparse.Namespace,
    stdin: IO[bytes],
    stdout: IO[str],
    stderr: IO[str],
) -> int:
    """Check everything, then make the requests the command needs."""
    base_url, scheme = _base_url(args.server)
    policy = _https_policy(args) if scheme == "https" else None
    output = _format(args)
    body = None
    if args.command == "tunnels" and args.action == "put":
        body = _read_tunnels(args.file, stdin)
    if args.command == "doctor":
        check_doctor_options(args)
    if args.command == "events":
        check_events_options(args)

    pool = HTTPConnectionPool(reactor, persistent=True)
    if policy is not None:
        agent = Agent(
            reactor, contextFactory=policy, pool=pool, connectTimeout=args.timeout
        )
    else:
        agent = Agent(reactor, pool=pool, connectTimeout=args.timeout)
    target = Target(base_url, agent, args.timeout)
    try:
        if args.command == "ping":
            _, _, content = await call(reactor, target, "GET", "/ping")
            text = content.decode("utf-8", "replace").strip()
            if output is Format.JSON and args.output is not None:
                stdout.write(dump_json(text, args.compact))
            else:
                stdout.write(text + "\n")
            return EXIT_OK
        if args.command == "status":
            answer = await gather(reactor, target)
            stdout.write(
                render(answer)
                if output is Format.TABLE
                else dump_json(answer, args.compact)
            )
            return EXIT_OK
        if args.command == "doctor":
            return await run_doctor(
                reactor, args, target, policy, output, stdout, stderr
            )
        if args.command == "events":
            return await run_events(reactor, args, target, stdout, stderr)
        if args.command == "clients":
            answer = json_answer(*await call(reactor, target, "GET", "/clients"))
        elif args.action == "get":
            answer = json_answer(*await call(reactor, target, "GET", "/tunnels"))
        else:
            assert body is not None
            progress = progress_for(stderr, reactor, "tunnels put", len(body))
            answer = json_answer(
                *await call(reactor, target, "PUT", "/tunnels", body, progress)
            )
    finally:
        # Wait for the connection to close, so nothing is left behind.
        await pool.closeCachedConnections()
    if output is Format.JSON:
        stdout.write(dump_json(answer, args.compact))
    elif args.command == "clients":
        stdout.write(clients_table(answer))
    else:
        stdout.write(tunnels_table(answer))
    return EXIT_OK


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
            return await _command(reactor, parsed, source, out, err)
        except CtlError as e:
            err.write(e.line() + "\n")
            return e.exit_status
        except Exception:
            err.write(f"{PROG}: internal error, please report it:\n")
            err.write(traceback.format_exc())
            return EXIT_BUG

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
