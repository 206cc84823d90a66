"""``threshold-ctl doctor``'s options, and the run: ask the gateway, walk, print."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Mapping
from typing import IO, Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from threshold.ctl.doctor import (
    Gateway,
    Report,
    TunnelReport,
    check_tunnel,
    render,
    select,
)
from threshold.ctl.doctor_facts import (
    Answer,
    Check,
    Connect,
    Finding,
    Level,
    Probe,
    Resolution,
)
from threshold.ctl.doctor_probe import (
    api_certificate_not_after,
    connect,
    is_ip,
    resolve,
    through,
)
from threshold.ctl.doctor_words import (
    SERVER_CERTIFICATE_FIX,
    judge_certificate,
    parse_time,
)
from threshold.ctl.errors import AnswerError, UsageError
from threshold.ctl.exchange import Target, call, json_answer
from threshold.ctl.output import Format, dump_json, tunnel_name
from threshold.ctl.progress import steps_for

DEFAULT_PROBE_TIMEOUT = 3.0
#: Tunnels walked at once.
PARALLEL = 8


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 < seconds <= 600:
        raise argparse.ArgumentTypeError(
            f"must be above 0 and at most 600, not {value}"
        )
    return seconds


def _address(value: str) -> str:
    if not is_ip(value):
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}")
    return value


def _dns_server(value: str) -> tuple[str, int]:
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not is_ip(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with an IP address (e.g. 1.1.1.1:53), not {value!r}"
        )
    return host, int(port)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``doctor`` to the commands; return its parser."""
    doctor = commands.add_parser(
        "doctor",
        help="walk each tunnel as a user would and say where it breaks",
        description="Exit status: 0 all good, 4 warnings only, 5 something is"
        " broken (and ctl's own: 1 API error, 2 usage, 3 gateway unreachable).",
    )
    doctor.add_argument(
        "tunnel",
        metavar="TUNNEL",
        nargs="?",
        help="only this tunnel: PORT, ADDRESS:PORT, HOSTNAME or HOSTNAME:PORT",
    )
    doctor.add_argument(
        "--name",
        help="the name users reach tunnels by, for tunnels without an exact"
        " hostname (checked in DNS, sent as SNI)",
    )
    doctor.add_argument(
        "--public-address",
        metavar="ADDRESS",
        type=_address,
        action="append",
        default=[],
        help="an address of this gateway besides the API's host (repeatable)",
    )
    doctor.add_argument(
        "--dns-server",
        metavar="HOST:PORT",
        type=_dns_server,
        help="ask this DNS server instead of the system's resolver",
    )
    doctor.add_argument(
        "--probe-timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_PROBE_TIMEOUT,
        help=f"how long each probe waits (default {DEFAULT_PROBE_TIMEOUT:g})",
    )
    return doctor


def check_options(args: argparse.Namespace) -> None:
    """Checks of doctor's options that argparse does not make."""
    if args.name is not None and (not args.name.strip() or " " in args.name):
        raise UsageError(f"--name {args.name!r}: not a host name")


class RealProbes:
    """:class:`threshold.ctl.doctor.Probes` on the network."""

    def __init__(
        self, reactor: Any, dns_server: tuple[str, int] | None, timeout: float
    ) -> None:
        self.reactor = reactor
        self.dns_server = dns_server
        self.timeout = timeout

    async def resolve(self, name: str) -> Resolution:
        return await resolve(self.reactor, name, self.dns_server, self.timeout)

    async def connect(self, host: str, port: int) -> Connect:
        return await connect(self.reactor, host, port, self.timeout)

    async def through(self, host: str, port: int, probe: Probe, name: str) -> Answer:
        return await through(self.reactor, host, port, probe, name, self.timeout)


async def _server_info(
    reactor: Any, target: Target
) -> tuple[Mapping[str, Any] | None, str]:
    """``GET /server``, or None and why not (an older gateway answers 404)."""
    try:
        answer = json_answer(*await call(reactor, target, "GET", "/server"))
    except AnswerError as e:
        return None, f"GET /server answers {e}"
    if not isinstance(answer, Mapping):
        return None, "GET /server answers no JSON object"
    return answer, ""


async def _server_certificate(
    reactor: Any,
    target: Target,
    policy: Any,
    info: Mapping[str, Any] | None,
    why: str,
    now: datetime.datetime,
) -> Finding:
    """The gateway's certificate: from GET /server, else as the API presents it."""
    if info is not None and "CertificateNotAfter" in info:
        when = parse_time(info["CertificateNotAfter"])
        if when is None:
            return Finding(
                Check.CERTIFICATE,
                Level.SKIPPED,
                "The gateway reports no certificate (it runs without TLS).",
            )
        return judge_certificate(
            "The gateway's certificate", when, now, SERVER_CERTIFICATE_FIX
        )
    parts = urlsplit(target.base_url)
    if policy is None:
        return Finding(
            Check.CERTIFICATE,
            Level.SKIPPED,
            f"Cannot check the gateway's certificate: {why or 'it does not say'}"
            " (an older gateway?), and the API is plain http.",
        )
    try:
        when = await api_certificate_not_after(
            reactor,
            parts.hostname or "",
            parts.port or 443,
            policy,
            target.timeout,
        )
    except Exception as e:  # any TLS failure: the API calls worked, so say so
        return Finding(
            Check.CERTIFICATE,
            Level.SKIPPED,
            f"Cannot check the gateway's certificate: {type(e).__name__}.",
        )
    return judge_certificate(
        "The management API's certificate", when, now, SERVER_CERTIFICATE_FIX
    )


def _client_certificates(clients: Mapping[str, Any]) -> list[Finding]:
    records = [c for c in clients.values() if isinstance(c, Mapping)]
    if records and not all("CertificateNotAfter" in c for c in records):
        return [
            Finding(
                Check.CERTIFICATE,
                Level.SKIPPED,
                "Cannot check the clients' certificates: this gateway's GET"
                " /clients does not report CertificateNotAfter (an older gateway).",
            )
        ]
    return []


def _not_restored(status: Mapping[str, Any]) -> list[Finding]:
    found = []
    for item in status.get("NotRestored") or []:
        tunnel = item.get("Tunnel") or {}
        found.append(
            Finding(
                Check.RESTORE,
                Level.BROKEN,
                f"The saved tunnel {tunnel_name(tunnel)} (entry {item.get('Index')})"
                f" was not restored at start: {item.get('Error')}.",
                "Free that address (or change the tunnel) and send the set again"
                " with threshold-ctl tunnels put.",
            )
        )
    return found


async def _gateway_addresses(
    reactor: Any, target: Target, public: list[str], timeout: float
) -> tuple[str, ...]:
    host = urlsplit(target.base_url).hostname or ""
    resolved = await resolve(reactor, host, None, timeout)
    return tuple(dict.fromkeys([*public, *resolved.addresses]))


async def run_doctor(
    reactor: Any,
    args: argparse.Namespace,
    target: Target,
    policy: Any,
    output: Format,
    stdout: IO[str],
    stderr: IO[str],
) -> int:
    """Ask the gateway, walk the tunnels, print the report; return the status."""
    status = json_answer(*await call(reactor, target, "GET", "/tunnels/status"))
    clients = json_answer(*await call(reactor, target, "GET", "/clients"))
    if not isinstance(status, Mapping) or not isinstance(clients, Mapping):
        raise AnswerError(
            200, "OK", "the answer is not the API's; is --server the API?"
        )
    tunnels = select(status.get("Tunnels") or [], args.tunnel)
    if args.tunnel is not None and not tunnels:
        names = ", ".join(tunnel_name(t) for t in status.get("Tunnels") or [])
        raise UsageError(
            f"no tunnel in force matches {args.tunnel!r}"
            f" (the tunnels: {names or 'none'})"
        )
    now = datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
    info, why = await _server_info(reactor, target)
    version = f" (version {info['Version']})" if info and info.get("Version") else ""
    count = len(status.get("Tunnels") or [])
    findings = [
        Finding(
            Check.API,
            Level.OK,
            f"The management API answers{version}: {count}"
            f" tunnel{'s' if count != 1 else ''} in force, {len(clients)}"
            f" client{'s' if len(clients) != 1 else ''} known.",
        ),
        await _server_certificate(reactor, target, policy, info, why, now),
        *_client_certificates(clients),
        *(_not_restored(status) if args.tunnel is None else []),
    ]
    addresses = await _gateway_addresses(
        reactor, target, args.public_address, args.probe_timeout
    )
    gateway = Gateway(target.base_url, addresses, clients, now, args.name)
    probes = RealProbes(reactor, args.dns_server, args.probe_timeout)
    limit = DeferredSemaphore(PARALLEL)
    steps = steps_for(stderr, reactor, "doctor: tunnels checked", len(tunnels))

    async def one(entry: Mapping[str, Any]) -> TunnelReport:
        report = await check_tunnel(entry, gateway, probes)
        if steps is not None:
            steps.step()
        return report

    def walk(entry: Mapping[str, Any]) -> Any:
        return limit.run(lambda: Deferred.fromCoroutine(one(entry)))

    try:
        reports: list[TunnelReport] = await gatherResults([walk(t) for t in tunnels])
    finally:
        if steps is not None:
            steps.done()
    report = Report(gateway, findings, reports)
    if output is Format.JSON:
        stdout.write(dump_json(report.to_json(), args.compact))
    else:
        stdout.write(render(report))
    return report.exit_status
