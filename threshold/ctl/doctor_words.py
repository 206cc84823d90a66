"""The judges of ``threshold-ctl doctor``: facts in, findings in plain words out.

Pure functions: every message and every "what to do" is written here, so
docs/doctor.md and the tests can hold them to their words.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from threshold.ctl.doctor_facts import (
    Answer,
    Check,
    Connect,
    Ending,
    Finding,
    Level,
    Probe,
    Resolution,
)
from threshold.ctl.output import client_ids

#: A certificate expiring within this many days is a warning.
EXPIRY_WARNING_DAYS = 30
#: HTTP statuses a server answers to a request line it cannot parse, such as
#: ``PROXY TCP4 ...``: Bad Request, Method Not Allowed, Not Implemented.
_BAD_REQUEST_STATUSES = frozenset({400, 405, 501})
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")


def same_address(a: str, b: str) -> bool:
    """Whether two IP addresses are the same (IPv4-mapped IPv6 as IPv4)."""
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    x = getattr(x, "ipv4_mapped", None) or x
    y = getattr(y, "ipv4_mapped", None) or y
    return x == y


def _listed(addresses: Iterable[str]) -> str:
    return ", ".join(addresses) or "none"


def judge_dns(result: Resolution, gateway: Iterable[str]) -> Finding:
    """The name resolves, and to this gateway's addresses."""
    gateway = tuple(gateway)
    asked = f" (asked {result.server})" if result.server else ""
    if result.error is not None:
        return Finding(
            Check.DNS,
            Level.BROKEN,
            f"{result.name} does not resolve: {result.error}.",
            f"Add an A (or AAAA) record for {result.name} pointing at this"
            f" gateway ({_listed(gateway)}), or fix the name in the tunnel.",
        )
    ours = [a for a in result.addresses if any(same_address(a, g) for g in gateway)]
    others = [a for a in result.addresses if a not in ours]
    if not ours:
        return Finding(
            Check.DNS,
            Level.BROKEN,
            f"{result.name} resolves to {_listed(others)}{asked}, which is not this"
            f" gateway (its addresses: {_listed(gateway)}): users go elsewhere.",
            f"Point the A/AAAA records of {result.name} at {_listed(gateway)}; if"
            " this gateway has another public address (NAT, a load balancer),"
            " give it with --public-address.",
        )
    if others:
        return Finding(
            Check.DNS,
            Level.WARNING,
            f"{result.name} resolves to {_listed(result.addresses)}{asked}; of"
            f" these only {_listed(ours)} is this gateway: some users go elsewhere.",
            f"Remove {_listed(others)} from the records of {result.name}, or give"
            " them with --public-address if they are this gateway too.",
        )
    return Finding(
        Check.DNS,
        Level.OK,
        f"{result.name} resolves to {_listed(ours)}{asked}, this gateway.",
    )


def judge_port(address: str, port: int, result: Connect) -> Finding:
    """The public port accepts a connection."""
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    if result.accepted:
        return Finding(Check.PORT, Level.OK, f"{where} accepts connections.")
    return Finding(
        Check.PORT,
        Level.BROKEN,
        f"{where} does not accept connections: {result.error}.",
        "The gateway listens there (the tunnel is in force), so something on"
        " the way refuses or drops the connection: open the port in the"
        " firewall or security group, or check that the address is this"
        " gateway's (--public-address).",
    )


def _not_connected(client_id: str, clients: Mapping[str, Any]) -> str:
    record = clients.get(client_id)
    if not isinstance(record, Mapping):
        return f"{client_id} has never connected to this gateway"
    words = f"{client_id} is not connected ({record.get('CurrentState')}"
    if record.get("LastChange"):
        words += f" since {record['LastChange']}"
    if record.get("LastError"):
        words += f", last error: {record['LastError']}"
    return words + ")"


def judge_clients(
    entry: Mapping[str, Any], clients: Mapping[str, Any]
) -> list[Finding]:
    """A client of the tunnel is connected, and healthy for its service.

    ``entry`` is the tunnel as ``GET /tunnels/status`` shows it (with
    ``Clients`` and ``Serving``), ``clients`` the ``GET /clients`` answer.
    """
    ids = client_ids(entry)
    states = {c.get("ClientId"): c for c in entry.get("Clients") or []}
    if "Clients" not in entry:
        # An older gateway: GET /tunnels/status without Clients; its clients'
        # states from GET /clients, each connected one counted healthy.
        for i in ids:
            up = (clients.get(i) or {}).get("CurrentState") == "ClientConnected"
            states[i] = {"ClientId": i, "Connected": up, "Healthy": up}
    connected = [i for i in ids if (states.get(i) or {}).get("Connected")]
    away = [
        i for i in ids if i not in connected and (clients.get(i) or {}).get("GoingAway")
    ]
    missing = [_not_connected(i, clients) for i in ids if i not in connected]
    service = entry.get("BackEndService")
    if not connected:
        fix = (
            f"Start threshold-client on {' or '.join(ids)} and check that it"
            " reaches this gateway's tunnel control port (its log says why not)."
        )
        if away:
            fix = f"{', '.join(away)} is going away (restarting?); " + fix
        return [
            Finding(
                Check.CLIENT,
                Level.BROKEN,
                "No client of this tunnel is connected: " + "; ".join(missing) + ".",
                fix,
            )
        ]
    found = [
        Finding(
            Check.CLIENT,
            Level.WARNING if missing else Level.OK,
            f"{', '.join(connected)} connected"
            + (f"; {'; '.join(missing)}." if missing else "."),
            "Start the missing client for failover." if missing else None,
        )
    ]
    serving = list(entry.get("Serving") or [])
    if "Serving" not in entry:
        serving = [i for i in connected if states[i].get("Healthy")]
    sick = [
        (i, (states.get(i) or {}).get("Reason") or "unhealthy")
        for i in connected
        if not (states.get(i) or {}).get("Healthy")
    ]
    words = "; ".join(f"{i} says {_quoted(reason, service)}" for i, reason in sick)
    fix = (
        f"Start the service {service} on that machine, or fix its address in"
        " ServiceToLocalAddrMap of the client's client.json."
    )
    if not serving:
        found.append(
            Finding(
                Check.SERVICE,
                Level.BROKEN,
                f"No client can serve {service}: {words or 'none is healthy'}.",
                fix,
            )
        )
    elif sick:
        found.append(
            Finding(
                Check.SERVICE,
                Level.WARNING,
                f"{', '.join(serving)} serves {service}, but {words}.",
                fix,
            )
        )
    else:
        checked = [
            i
            for i in serving
            if service in ((clients.get(i) or {}).get("Health") or {})
        ]
        how = (
            f"healthy on {', '.join(checked)} (its HealthChecks)"
            if checked
            else "not checked by the client (no HealthChecks entry), so counted healthy"
        )
        found.append(
            Finding(
                Check.SERVICE,
                Level.OK,
                f"{', '.join(serving)} serves {service}: {how}.",
            )
        )
    return found


def _quoted(reason: str, service: Any) -> str:
    """``service web unhealthy: connection refused at ...`` with the words quoted."""
    head = f"service {service} unhealthy: "
    if reason.startswith(head):
        return f'"{reason[len(head) :]}" for {service} (the client\'s own words)'
    return reason


def _shown(data: bytes) -> str:
    """The first line of an answer, printable."""
    line = data.split(b"\n", 1)[0].rstrip(b"\r")[:60]
    text = line.decode("latin-1")
    return re.sub(r"[^\x20-\x7e]", ".", text)


def judge_answer(entry: Mapping[str, Any], answer: Answer) -> Finding:
    """What a real connection through the tunnel says of the PROXY header.

    The heuristic and its limits are in docs/doctor.md: a service that
    expects the header closes (or answers 400) when it gets a request
    instead; one that does not expect it answers 400/405/501 to the
    ``PROXY ...`` line, or closes.
    """
    sent = bool(entry.get("HaProxyProxyProtocol"))
    service = entry.get("BackEndService")
    probe = answer.probe.value
    set_true = (
        "Set HaProxyProxyProtocol true on this tunnel, or turn the PROXY"
        " protocol off in the service."
    )
    set_false = (
        "Set HaProxyProxyProtocol false on this tunnel, or turn the PROXY"
        " protocol on in the service (nginx: listen ... proxy_protocol)."
    )
    with_header = "the PROXY header and " if sent else ""
    if answer.error is not None:
        return Finding(
            Check.BACKEND,
            Level.BROKEN,
            f"A connection through the tunnel could not be made: {answer.error}.",
            "The port accepted a connection a moment before: run doctor again;"
            " if it keeps failing, look at the gateway's limits (MaxConnections...)"
            " and its log.",
        )
    if answer.ending is Ending.RESET:
        return Finding(
            Check.BACKEND,
            Level.BROKEN,
            f"A connection through the tunnel was reset before any answer: the"
            f" client could not connect to {service}"
            + (f" ({answer.error})" if answer.error else "")
            + ".",
            f"Start {service} on the client's machine, or fix its address in"
            " ServiceToLocalAddrMap; a HealthChecks entry for it makes the client"
            " say why in GET /clients.",
        )
    if answer.ending is Ending.SILENT:
        return Finding(
            Check.BACKEND,
            Level.SKIPPED,
            f"{service} did not answer {with_header}a {probe} within"
            f" {answer.seconds:.1f} s: it may speak another protocol; whether it"
            " expects a PROXY header cannot be told.",
        )
    if answer.ending is Ending.CLOSED:
        if not sent:
            return Finding(
                Check.BACKEND,
                Level.BROKEN,
                f"{service} closed the connection without answering a {probe}:"
                " it probably expects a PROXY header, which this tunnel does not"
                " send.",
                set_true,
            )
        return Finding(
            Check.BACKEND,
            Level.WARNING,
            f"{service} closed the connection without answering the PROXY header"
            f" and a {probe}: it may not expect a PROXY header.",
            set_false,
        )
    status = _STATUS_LINE.match(answer.data)
    code = int(status.group(1)) if status else None
    shown = _shown(answer.data)
    if code is not None and not sent and code == 400:
        return Finding(
            Check.BACKEND,
            Level.BROKEN,
            f'{service} answered "{shown}" to a plain {probe}: it probably'
            " expects a PROXY header, which this tunnel does not send.",
            set_true,
        )
    if code is not None and sent and code in _BAD_REQUEST_STATUSES:
        return Finding(
            Check.BACKEND,
            Level.BROKEN,
            f'{service} answered "{shown}" to the PROXY header: it does not'
            " expect one, and takes it for a bad request.",
            set_false,
        )
    if answer.probe is Probe.TLS:
        first = answer.data[:1]
        if first == b"\x16":
            words = "answered the TLS ClientHello with a handshake"
        elif first == b"\x15":
            if sent:
                return Finding(
                    Check.BACKEND,
                    Level.WARNING,
                    f"{service} answered the PROXY header and a TLS ClientHello"
                    " with a TLS alert: it may not expect a PROXY header.",
                    set_false,
                )
            words = "answered the TLS ClientHello with an alert (it speaks TLS)"
        else:
            return Finding(
                Check.BACKEND,
                Level.WARNING,
                f'{service} answered a TLS ClientHello with "{shown}", not TLS.',
                "Check that the service behind this hostname speaks TLS.",
            )
    else:
        words = f'answered "{shown}"'
    proxy = (
        "the PROXY header it gets is accepted"
        if sent
        else "no PROXY header is sent, none seems expected"
    )
    return Finding(Check.BACKEND, Level.OK, f"{service} {words}; {proxy}.")


def parse_time(text: str) -> datetime.datetime | None:
    """An ISO 8601 UTC time of the API (``...Z``), or None if not one."""
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError, TypeError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when


def judge_certificate(
    whose: str, not_after: datetime.datetime, now: datetime.datetime, fix: str
) -> Finding:
    """A certificate is valid for more than EXPIRY_WARNING_DAYS days."""
    day = not_after.strftime("%Y-%m-%d %H:%M UTC")
    left = not_after - now
    if left.total_seconds() <= 0:
        return Finding(
            Check.CERTIFICATE, Level.BROKEN, f"{whose} expired on {day}.", fix
        )
    days = left.days
    if days < EXPIRY_WARNING_DAYS:
        when = f"in {days} days" if days >= 1 else "within a day"
        return Finding(
            Check.CERTIFICATE, Level.WARNING, f"{whose} expires {when}, on {day}.", fix
        )
    return Finding(Check.CERTIFICATE, Level.OK, f"{whose} is valid until {day}.")


def client_certificate_fix(client_id: str) -> str:
    """What to do about a client's certificate."""
    return (
        f"Make a new certificate (threshold-keygen client --ca-dir pki --out pki"
        f" {client_id}), install it as the client's ClientTlsCertificateFile and"
        " key, and restart threshold-client."
    )


SERVER_CERTIFICATE_FIX = (
    "Make a new server certificate (threshold-keygen server), install it as the"
    " gateway's ServerTlsCertificateFile and key, and restart the gateway."
)
