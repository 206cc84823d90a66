"""``threshold-ctl status``: clients and tunnels at a glance.

Asks ``GET /clients`` and ``GET /tunnels/status``, and ``GET /metrics`` for
each tunnel's open connections and bytes (a gateway without metrics shows
``-`` there). The JSON form (docs/ctl.md) is the API's answers put together:
``{"Clients": ..., "Tunnels": [... each with "Traffic"], "NotRestored": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from threshold.ctl.errors import AnswerError
from threshold.ctl.exchange import Target, call, json_answer
from threshold.ctl.output import (
    human_bytes,
    proxy_word,
    state_word,
    table,
    tunnel_name,
)

#: The per-tunnel metrics the Traffic object is made of, by its key.
_TRAFFIC_METRICS = {
    "threshold_tunnel_connections": "Connections",
    "threshold_tunnel_connections_open": "OpenConnections",
    "threshold_tunnel_received_bytes": "ReceivedBytes",
    "threshold_tunnel_sent_bytes": "SentBytes",
}

TunnelKey = tuple[str, str, str]


def parse_traffic(text: str) -> dict[TunnelKey, dict[str, int]]:
    """Per tunnel (address, port, glob): its Traffic from the metrics text."""
    traffic: dict[TunnelKey, dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key_name = _TRAFFIC_METRICS.get(sample.name.removesuffix("_total"))
            if key_name is None:
                continue
            labels = sample.labels
            key = (
                labels.get("listen_address", ""),
                labels.get("listen_port", ""),
                labels.get("hostname", ""),
            )
            traffic.setdefault(key, {})[key_name] = int(sample.value)
    return traffic


def _key(entry: Mapping[str, Any]) -> TunnelKey:
    return (
        str(entry.get("ListenAddress", "")),
        str(entry.get("ListenPort", "")),
        str(entry.get("ListenHostnameGlob", "")),
    )


async def gather(reactor: Any, target: Target) -> dict[str, Any]:
    """The status structure, from two or three API calls."""
    clients = json_answer(*await call(reactor, target, "GET", "/clients"))
    tunnels = json_answer(*await call(reactor, target, "GET", "/tunnels/status"))
    try:
        _, _, metrics = await call(reactor, target, "GET", "/metrics")
        traffic: dict[TunnelKey, dict[str, int]] | None = parse_traffic(
            metrics.decode("utf-8", "replace")
        )
    except (AnswerError, ValueError):
        # No metrics on this gateway (404), or not the text format.
        traffic = None
    entries = []
    for entry in tunnels.get("Tunnels", []) if isinstance(tunnels, dict) else []:
        found = None
        if traffic is not None:
            found = dict.fromkeys(_TRAFFIC_METRICS.values(), 0)
            found.update(traffic.get(_key(entry), {}))
        entries.append({**entry, "Traffic": found})
    return {
        "Clients": clients,
        "Tunnels": entries,
        "NotRestored": tunnels.get("NotRestored", []),
    }


def _health(client: Mapping[str, Any]) -> str:
    health = client.get("Health") or {}
    if not isinstance(health, Mapping) or not health:
        return "-"
    bad = [
        f"{service}: {(v or {}).get('Detail') or 'unhealthy'}"
        for service, v in health.items()
        if not (v or {}).get("Healthy")
    ]
    return "; ".join(bad) if bad else "ok"


def _rtt(client: Mapping[str, Any]) -> str:
    rtt = client.get("RttMilliseconds")
    return "-" if rtt is None else f"{rtt:.0f}ms" if rtt >= 10 else f"{rtt:.1f}ms"


def _since(client: Mapping[str, Any]) -> str:
    when = client.get("ConnectedSince") or client.get("LastChange")
    return "-" if not when else str(when).replace("T", " ").removesuffix("Z")


def _traffic_cells(traffic: Mapping[str, int] | None) -> tuple[str, str, str]:
    if traffic is None:
        return "-", "-", "-"
    return (
        str(traffic.get("OpenConnections", 0)),
        human_bytes(traffic.get("ReceivedBytes", 0)),
        human_bytes(traffic.get("SentBytes", 0)),
    )


def clients_table(clients: Mapping[str, Any]) -> str:
    """``GET /clients`` for people: state, since when, RTT, streams, health."""
    if not clients:
        return "no clients\n"
    rows = [
        (
            client_id,
            state_word(c.get("CurrentState")),
            _since(c),
            _rtt(c),
            c.get("OpenStreams"),
            _health(c),
        )
        for client_id, c in sorted(clients.items())
    ]
    return table(
        ("CLIENT", "STATE", "SINCE", "RTT", "STREAMS", "HEALTH"), rows, flexible=(5,)
    )


def render(status: Mapping[str, Any]) -> str:
    """The status for people: a clients table and a tunnels table."""
    out = [clients_table(status.get("Clients") or {})]
    tunnels = status.get("Tunnels") or []
    if tunnels:
        rows = [
            (
                tunnel_name(t),
                t.get("BackEndService"),
                proxy_word(t),
                ", ".join(t.get("Serving", [])) or "none",
                *_traffic_cells(t.get("Traffic")),
            )
            for t in tunnels
        ]
        out.append(
            table(
                ("TUNNEL", "SERVICE", "PROXY", "SERVING", "OPEN", "IN", "OUT"),
                rows,
                flexible=(3, 0),
            )
        )
    else:
        out.append("no tunnels\n")
    for entry in status.get("NotRestored") or []:
        out.append(f"not restored: entry {entry.get('Index')}: {entry.get('Error')}\n")
    return "\n".join(out)
