"""The client's admin API: change the service map without dropping the session.

Served on a Unix socket (``AdminSocket`` in the client config, mode 0600),
so only local users with access to the file can use it: there is no network
exposure and no certificate to manage.

- ``GET /liveconfig`` answers the map in force.
- ``PUT /liveconfig`` with ``{"ServiceToLocalAddrMap": {"web":
  "127.0.0.1:8080"}}`` validates the map like the config file does and
  swaps it in at once: new streams use it, running connections are not
  touched, the sessions to the gateways stay up, and the health checks
  follow the new map.
- ``GET /status`` answers each gateway's session (state, since when, RTT)
  and each health check (state, detail, last checked).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from threshold.client.health import CheckState
from threshold.config import ConfigError, parse_service_map
from threshold.logs import observer as log_observer
from threshold.schema import format_address
from threshold.wire import strictjson

if TYPE_CHECKING:
    from twisted.web.iweb import IRequest

    from threshold.client.gateway import GatewayLink
    from threshold.client.settings import ClientSettings, ClientStats

log = Logger(observer=log_observer)

MAX_BODY = 1024 * 1024


class AdminError(Exception):
    """An admin request failed: ``status`` and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientAdminAPI:
    """The admin API: ``/liveconfig`` (the service map) and ``/status``."""

    app = Klein()

    def __init__(
        self, settings: ClientSettings, links: Sequence[GatewayLink] = ()
    ) -> None:
        self.settings = settings
        self.links = tuple(links)

    @staticmethod
    def _json(request: IRequest, status: int, body: object) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode() + b"\n"

    def _view(self) -> dict[str, object]:
        return {
            "ServiceToLocalAddrMap": {
                name: _join(host, port)
                for name, (host, port) in sorted(self.settings.services.items())
            }
        }

    @app.route("/liveconfig", methods=["GET"])
    def get_liveconfig(self, request: IRequest) -> bytes:
        """The live configuration in force."""
        return self._json(request, 200, self._view())

    @app.route("/liveconfig", methods=["PUT"])
    def put_liveconfig(self, request: IRequest) -> bytes:
        """Replace the service map; answer the configuration now in force."""
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0]
        if content_type.strip().lower() != b"application/json":
            raise AdminError(415, "Content-Type must be application/json")
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise AdminError(413, f"the body is larger than {MAX_BODY} bytes")
        try:
            # Strict, like every other input: no key twice, no NaN.
            document = strictjson.loads(body)
        except strictjson.NotUtf8 as e:
            raise AdminError(422, f"the body is not UTF-8: {e}") from None
        except ValueError as e:  # JsonError, or an integer too long to parse
            raise AdminError(422, f"the body is not JSON: {e}") from None
        if not isinstance(document, dict):
            raise AdminError(422, "the body must be a JSON object")
        unknown = set(document) - {"ServiceToLocalAddrMap"}
        if unknown:
            raise AdminError(400, f"unknown field {sorted(unknown)[0]!r}")
        if "ServiceToLocalAddrMap" not in document:
            raise AdminError(400, 'field "ServiceToLocalAddrMap" is missing')
        try:
            services = parse_service_map(
                document["ServiceToLocalAddrMap"], "liveconfig"
            )
        except ConfigError as e:
            raise AdminError(400, str(e)) from None
        self.settings.replace_services(services)
        log.info(
            "live config: service map replaced ({count} services)",
            count=len(services),
        )
        return self._json(request, 200, self._view())

    @app.route("/status", methods=["GET"])
    def get_status(self, request: IRequest) -> bytes:
        """Each gateway's session and each health check, as they are now."""
        return self._json(
            request,
            200,
            {
                "ClientId": self.settings.client_id,
                "Sessions": [_link_view(link) for link in self.links],
                "HealthChecks": self._checks_view(),
                "Counters": _counters_view(self.settings.stats),
            },
        )

    def _checks_view(self) -> dict[str, object]:
        health = self.settings.health
        if health is None:
            return {}
        view: dict[str, object] = {}
        for name, config in sorted(health.configured.items()):
            check = health.checks.get(name)
            view[name] = {
                # A service taken out of the map by live config: not checked.
                "State": "stopped" if check is None else check.state.value,
                "Address": None if check is None else format_address(*check.address),
                "Detail": (
                    check.detail
                    if check is not None and check.state is CheckState.UNHEALTHY
                    else None
                ),
                "LastChecked": None if check is None else _iso(check.last_checked),
                "IntervalSeconds": config.interval_seconds,
                "TimeoutSeconds": config.timeout_seconds,
            }
        return view

    @app.handle_errors(AdminError)
    def admin_error(self, request: IRequest, failure: Failure) -> bytes:
        error: AdminError = failure.value
        return self._json(request, error.status, {"error": error.message})


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _counters_view(stats: ClientStats) -> dict[str, object]:
    """The client's counters since it started (docs/configuration.md)."""
    return {
        "UnknownService": stats.unknown_service,
        "LocalFailures": stats.local_failures,
        "EgressConnections": stats.egress_connections,
        "EgressRefused": stats.egress_refused,
        "UdpFlows": stats.udp_flows,
        "UdpDropped": dict(sorted(stats.udp_dropped.items())),
    }


def _link_view(link: GatewayLink) -> dict[str, object]:
    session = link.session
    connected = session is not None and not session.session.closed
    rtt = link.rtt
    return {
        "Gateway": link.address,
        "GatewayId": link.gateway_id,
        "State": link.state.value,
        "Since": _iso(link.since),
        "RttMilliseconds": None if rtt is None else round(rtt * 1000, 3),
        # The gateway opens even streams, one per user; 1 is the control channel.
        "OpenStreams": (
            sum(1 for i in session.session.streams if i % 2 == 0) if connected else 0
        ),
        "LastError": link.last_error,
        "ConsecutiveRefusals": link.consecutive_refusals,
    }


def admin_site(settings: ClientSettings, links: Sequence[GatewayLink] = ()) -> Site:
    """The admin API as a Site, for a Unix-socket endpoint."""
    return Site(ClientAdminAPI(settings, links).app.resource())
