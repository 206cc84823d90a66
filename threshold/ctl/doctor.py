"""``threshold-ctl doctor``: walk each tunnel as a user's connection would.

Per tunnel, one check after another (:class:`Check` order: DNS, port,
client, service, backend, certificate), stopping at the first broken link
with what to do about it. The network is behind :class:`Probes` (the real
ones in :mod:`threshold.ctl.doctor_probe`), the wording in
:mod:`threshold.ctl.doctor_words`. docs/doctor.md describes every check.
"""

from __future__ import annotations

import datetime
import fnmatch
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from threshold.ctl.doctor_facts import (
    Answer,
    Check,
    Connect,
    Finding,
    Level,
    Probe,
    Resolution,
)
from threshold.ctl.doctor_words import (
    client_certificate_fix,
    judge_answer,
    judge_certificate,
    judge_clients,
    judge_dns,
    judge_port,
    parse_time,
    same_address,
)
from threshold.ctl.output import WIDTH, client_ids, tunnel_name

#: Ports whose services speak TLS from the first byte: a tunnel on one of
#: them (or routed by hostname) is probed with a ClientHello, not HTTP.
TLS_PORTS = frozenset({443, 465, 636, 853, 993, 995, 8443})
_WILDCARD_LISTEN = ("0.0.0.0", "::", "")


class Probes(Protocol):
    """The network as doctor uses it (see doctor_probe for the real one)."""

    async def resolve(self, name: str) -> Resolution: ...

    async def connect(self, host: str, port: int) -> Connect: ...

    async def through(
        self, host: str, port: int, probe: Probe, name: str
    ) -> Answer: ...


def worst(levels: Iterable[Level]) -> Level:
    """The worst level; a skipped check counts as ok (it found nothing wrong)."""
    level = max(levels, default=Level.OK)
    return Level.OK if level is Level.SKIPPED else level


@dataclass(frozen=True)
class Gateway:
    """What doctor knows of the gateway before walking the tunnels."""

    url: str
    #: This gateway's addresses: the API's host resolved, --public-address.
    addresses: tuple[str, ...]
    #: The ``GET /clients`` answer.
    clients: Mapping[str, Any]
    now: datetime.datetime
    #: ``--name``: the name users use for tunnels without an exact hostname.
    name: str | None = None


@dataclass
class TunnelReport:
    """One tunnel's findings, in check order."""

    entry: Mapping[str, Any]
    findings: list[Finding] = field(default_factory=list)

    @property
    def level(self) -> Level:
        return worst(f.level for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        e = self.entry
        return {
            "Tunnel": tunnel_name(e),
            "ListenAddress": e.get("ListenAddress"),
            "ListenPort": e.get("ListenPort"),
            "ListenHostnameGlob": e.get("ListenHostnameGlob"),
            "BackEndService": e.get("BackEndService"),
            "ClientIds": client_ids(e),
            "Level": self.level.word,
            "Findings": [f.to_json() for f in self.findings],
        }


@dataclass
class Report:
    """The gateway's findings and each tunnel's."""

    gateway: Gateway
    findings: list[Finding]
    tunnels: list[TunnelReport]

    @property
    def level(self) -> Level:
        levels = [f.level for f in self.findings] + [t.level for t in self.tunnels]
        return worst(levels)

    @property
    def exit_status(self) -> int:
        return self.level.exit_status

    def to_json(self) -> dict[str, Any]:
        """The JSON form (docs/doctor.md)."""
        return {
            "Gateway": {
                "Url": self.gateway.url,
                "Addresses": list(self.gateway.addresses),
                "Findings": [f.to_json() for f in self.findings],
            },
            "Tunnels": [t.to_json() for t in self.tunnels],
            "Level": self.level.word,
            "ExitStatus": self.exit_status,
        }


def host_name(entry: Mapping[str, Any], name: str | None) -> tuple[str | None, bool]:
    """The name users reach the tunnel by, and whether it routes by hostname.

    An exact glob is its own name; ``*`` and wildcard globs take ``--name``
    when it matches them.
    """
    glob = (entry.get("ListenHostnameGlob") or "*").lower()
    if glob == "*":
        return name, False
    if "*" not in glob:
        return glob, True
    if name is not None and fnmatch.fnmatchcase(name.lower(), glob):
        return name, True
    return None, True


def _listen(entry: Mapping[str, Any]) -> str | None:
    address = str(entry.get("ListenAddress") or "")
    return None if address in _WILDCARD_LISTEN else address


async def check_tunnel(
    entry: Mapping[str, Any], gateway: Gateway, probes: Probes
) -> TunnelReport:
    """Walk one tunnel (a ``GET /tunnels/status`` entry), stopping when broken."""
    report = TunnelReport(entry)

    def add(finding: Finding) -> bool:
        report.findings.append(finding)
        return finding.level is Level.BROKEN

    listen = _listen(entry)
    ours = gateway.addresses + ((listen,) if listen else ())
    name, by_hostname = host_name(entry, gateway.name)
    host = listen or (gateway.addresses[0] if gateway.addresses else "127.0.0.1")
    if name is not None:
        resolution = await probes.resolve(name)
        finding = judge_dns(resolution, dict.fromkeys(ours))
        if add(finding):
            return report
        mine = [
            a for a in resolution.addresses if any(same_address(a, o) for o in ours)
        ]
        if mine:
            host = mine[0]
    elif by_hostname:
        add(
            Finding(
                Check.DNS,
                Level.SKIPPED,
                f"{entry.get('ListenHostnameGlob')} is a wildcard: give --name"
                " with one of its names to check that name's DNS.",
            )
        )
    port = int(entry.get("ListenPort") or 0)
    tcp = (entry.get("Protocol") or "tcp") == "tcp"
    if tcp and add(judge_port(host, port, await probes.connect(host, port))):
        return report
    for finding in judge_clients(entry, gateway.clients):
        if add(finding):
            return report
    if not tcp:
        add(
            Finding(
                Check.BACKEND,
                Level.SKIPPED,
                f"A {entry.get('Protocol')} tunnel: doctor does not probe its port"
                " or its service (it checks DNS, the client and its health).",
            )
        )
        return report
    probe = Probe.TLS if by_hostname or port in TLS_PORTS else Probe.HTTP
    sni = name or _wildcard_example(entry) or host
    if add(judge_answer(entry, await probes.through(host, port, probe, sni))):
        return report
    for client_id in client_ids(entry):
        record = gateway.clients.get(client_id) or {}
        when = parse_time(record.get("CertificateNotAfter"))
        if when is not None:
            add(
                judge_certificate(
                    f"{client_id}'s certificate",
                    when,
                    gateway.now,
                    client_certificate_fix(client_id),
                )
            )
    return report


def _wildcard_example(entry: Mapping[str, Any]) -> str | None:
    """A name a wildcard glob takes (``*.example.com``: doctor.example.com)."""
    glob = str(entry.get("ListenHostnameGlob") or "")
    if glob.startswith("*."):
        return "doctor" + glob[1:]
    return None


def matches(entry: Mapping[str, Any], wanted: str) -> bool:
    """Whether TUNNEL (``PORT``, ``ADDRESS:PORT``, ``HOSTNAME``, ``HOSTNAME:PORT``
    or the name doctor prints) names this tunnel."""
    wanted = wanted.strip().lower()
    port = str(entry.get("ListenPort"))
    address = str(entry.get("ListenAddress") or "").lower()
    glob = str(entry.get("ListenHostnameGlob") or "*").lower()
    names = {
        port,
        f"{address}:{port}",
        f"[{address}]:{port}",
        tunnel_name(entry).lower(),
    }
    if glob != "*":
        names |= {glob, f"{glob}:{port}"}
    return wanted in names


# -- for people ----------------------------------------------------------------

_LEVEL_WORDS = {
    Level.OK: "ok",
    Level.SKIPPED: "skipped",
    Level.WARNING: "WARNING",
    Level.BROKEN: "BROKEN",
}


def _finding_lines(finding: Finding) -> list[str]:
    head = f"  {_LEVEL_WORDS[finding.level]:<8} {finding.check.value:<12} "
    indent = " " * len(head)
    lines = textwrap.wrap(
        finding.message,
        WIDTH,
        initial_indent=head,
        subsequent_indent=indent,
        break_on_hyphens=False,
    )
    if finding.fix and finding.level >= Level.WARNING:
        lines += textwrap.wrap(
            "What to do: " + finding.fix,
            WIDTH,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )
    return lines


def _title(entry: Mapping[str, Any]) -> str:
    clients = ", ".join(client_ids(entry))
    service = entry.get("BackEndService")
    return f"tunnel {tunnel_name(entry)} (service {service}, {clients})"


def render(report: Report) -> str:
    """The report for people: one line per check, the fix under what is wrong."""
    addresses = ", ".join(report.gateway.addresses) or "unknown"
    lines = [f"gateway {report.gateway.url} (addresses {addresses})"]
    for finding in report.findings:
        lines += _finding_lines(finding)
    for tunnel in report.tunnels:
        lines.append(_title(tunnel.entry))
        for finding in tunnel.findings:
            lines += _finding_lines(finding)
    lines.append(summary(report))
    return "\n".join(lines) + "\n"


def summary(report: Report) -> str:
    """The last line: how many tunnels are broken, warned, good."""
    counts = {level: 0 for level in Level}
    for tunnel in report.tunnels:
        counts[tunnel.level] += 1
    total = len(report.tunnels)
    words = report.level.word if report.level >= Level.WARNING else "all good"
    good = counts[Level.OK]
    return (
        f"result: {words}: {total} tunnel{'s' if total != 1 else ''},"
        f" {counts[Level.BROKEN]} broken, {counts[Level.WARNING]} with warnings,"
        f" {good} good (exit {report.exit_status})"
    )


def select(tunnels: Sequence[Mapping[str, Any]], wanted: str | None) -> list[Any]:
    """The tunnels to walk: all, or those TUNNEL names."""
    if wanted is None:
        return list(tunnels)
    return [t for t in tunnels if matches(t, wanted)]
