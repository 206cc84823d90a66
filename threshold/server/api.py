"""The management API: a Klein resource over the route table and the clients.

``GET /ping``, ``GET /clients``, ``GET /tunnels``, ``GET /tunnels/status``,
``PUT /tunnels``, ``GET /metrics``, and the status page ``GET /`` with
its files and ``GET /status/history`` (see docs/api.md). Every answer but
``/ping`` and ``/metrics`` is JSON; every error is a JSON object
``{"error": "..."}`` with a status code that says what went wrong. The API
changes state only through ``RouteTable.apply``.

Serve it with :func:`threshold.server.site.management_site`, which refuses
an oversized body before it is buffered and bounds what connections hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from threshold.server import statuspage
from threshold.server.events_sse import StreamRefused
from threshold.server.routes import RouteTable, Tunnel, TunnelError, parse_tunnels
from threshold.server.stats import Limit
from threshold.tls import peer_common_name
from threshold.wire import strictjson

__all__ = [
    "ApiError",
    "ClientsView",
    "ManagementAPI",
]

log = Logger()

_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


class ClientsView(Protocol):
    """What the management API needs from the server's client registry."""

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each known client's state, keyed by ClientId, ready for JSON."""
        ...


class ServingView(Protocol):
    """What ``GET /tunnels/status`` reads of the serving table."""

    def view(self, tunnel: Tunnel) -> Jsonable:
        """The state of the tunnel's clients, and the ones serving it."""
        ...


class Jsonable(Protocol):
    """A view with a JSON form."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        ...


class PolicyView(Protocol):
    """What the API reads and changes of the access policy (policy.py)."""

    def client_view(self, client_id: str) -> dict[str, Any]:
        """A client's quota, bandwidth and refusals."""
        ...

    def tunnel_view(self, tunnel: Tunnel) -> dict[str, Any]:
        """A tunnel's refusals and bandwidth."""
        ...

    def reset_quota(self, client_id: str) -> Any:
        """Start a client's quota over; None when it has no quota."""
        ...

    def knows(self, client_id: str) -> bool:
        """Whether the policy has (or had saved) a quota for the client."""
        ...


class EventStreamsView(Protocol):
    """What ``GET /events`` needs: start one stream (events_sse.EventStreams)."""

    def open(self, request: IRequest) -> Deferred[bytes]:
        """Stream the events; fires when the stream ends. Raises StreamRefused."""
        ...


class HistoryView(Protocol):
    """What ``GET /status/history`` reads (history.TrafficHistory)."""

    def to_json(self, after: int | None = None) -> dict[str, Any]:
        """The samples (only those after sample ``after``, if given)."""
        ...


class ApiError(Exception):
    """A request refused with an HTTP status and a JSON error message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _decode_json(body: bytes) -> object:
    """Decode a UTF-8 JSON body, or raise ApiError 422 saying why not."""
    try:
        return strictjson.loads(body)
    except strictjson.NotUtf8 as e:
        raise ApiError(422, f"the body is not UTF-8: {e}") from None
    except strictjson.JsonError as e:
        raise ApiError(422, f"the body is not JSON: {e}") from None


def _check_content_type(request: IRequest) -> None:
    """Accept ``application/json`` (with an UTF-8 charset if any), else 415."""
    raw = request.getHeader(b"content-type")
    if raw is None:
        raise ApiError(415, "Content-Type must be application/json, got none")
    value = raw.decode("latin-1")
    media_type, *params = value.split(";")
    if media_type.strip().lower() != "application/json":
        raise ApiError(415, f'Content-Type must be application/json, not "{value}"')
    for param in params:
        name, _, setting = param.partition("=")
        if name.strip().lower() == "charset":
            charset = setting.strip().strip('"').lower()
            if charset not in _UTF8_CHARSETS:
                raise ApiError(415, f'charset must be utf-8, not "{charset}"')


def _declared_length(request: IRequest) -> int | None:
    raw = request.getHeader(b"content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


class ManagementAPI:
    """The management API over a route table and a view of the clients.

    With ``allowed_common_names``, only TLS clients whose verified
    certificate has one of these Common Names may call it; with
    ``require_tls_identity``, any verified client certificate is needed.
    Others get 403. ``apply`` replaces ``routes.apply`` for ``PUT /tunnels``
    (the server's, which also saves the set); ``metrics`` renders
    ``GET /metrics``; ``serving`` tells ``GET /tunnels/status`` each
    tunnel's clients and which serve it (without it, that part is left out).
    """

    app = Klein()

    def __init__(
        self,
        routes: RouteTable,
        clients: ClientsView,
        max_body_bytes: int = 1048576,
        allowed_common_names: Sequence[str] | None = None,
        require_tls_identity: bool = False,
        apply: Callable[[list[Tunnel]], Deferred[list[Tunnel]]] | None = None,
        metrics: Callable[[], bytes] | None = None,
        limit_hit: Callable[[Limit], None] = lambda limit: None,
        serving: ServingView | None = None,
        policy: PolicyView | None = None,
        fleet: Any = None,
        history: HistoryView | None = None,
        events: EventStreamsView | None = None,
        server_info: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        #: The traffic history (history.py) for ``GET /status/history``.
        self._history = history
        #: The event streams (events_sse.py) for ``GET /events``.
        self._events = events
        #: The gateway's own facts for ``GET /server`` (serverinfo.py).
        self._server_info = server_info
        self._policy = policy
        #: In a fleet (threshold.server.fleet.Fleet): PUT goes through etcd.
        self._fleet = fleet
        self._routes = routes
        self._serving = serving
        #: Counts a limit hit (the server's counter, for metrics).
        self.limit_hit = limit_hit
        self._metrics = metrics
        # The server passes its own apply, which also persists the new set.
        self._apply = apply if apply is not None else routes.apply
        self._clients = clients
        self.max_body_bytes = max_body_bytes
        self._allowed = (
            frozenset(allowed_common_names)
            if allowed_common_names is not None
            else None
        )
        self._require_identity = require_tls_identity or self._allowed is not None

    # -- helpers ------------------------------------------------------------

    @staticmethod
    def _json(request: IRequest, status: int, body: object) -> bytes:
        """Serialise one JSON answer and set its status and Content-Type."""
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode("utf-8") + b"\n"

    def _authorize(self, request: IRequest) -> None:
        """Refuse with 403 a request without an allowed certificate identity."""
        if not self._require_identity:
            return
        name = peer_common_name(getattr(request, "transport", None))
        if name is None:
            raise ApiError(
                403, "a client certificate is required to use the management API"
            )
        if self._allowed is not None and name not in self._allowed:
            raise ApiError(
                403,
                f"certificate CN {json.dumps(name)} may not use the management API",
            )

    # -- routes -------------------------------------------------------------

    @app.route("/ping", methods=["GET"])
    def ping(self, request: IRequest) -> bytes:
        """Answer ``pong``: the process is up and serving."""
        self._authorize(request)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"pong"

    @app.route("/clients", methods=["GET"])
    def clients(self, request: IRequest) -> bytes:
        """The state of every known client."""
        self._authorize(request)
        clients = self._clients.snapshot()
        if self._policy is not None:
            for client_id, body in clients.items():
                body.update(self._policy.client_view(client_id))
        if self._fleet is not None:
            clients = self._fleet.clients(clients)
        return self._json(request, 200, clients)

    @app.route("/clients/<client_id>/quota/reset", methods=["POST"])
    def reset_quota(self, request: IRequest, client_id: str) -> bytes:
        """Start the client's quota count for the current period over."""
        self._authorize(request)
        policy = self._policy
        known = client_id in self._clients.snapshot() or (
            policy is not None and policy.knows(client_id)
        )
        if not known:
            raise ApiError(404, f"no such client: {json.dumps(client_id)}")
        account = policy.reset_quota(client_id) if policy is not None else None
        if account is None:
            raise ApiError(
                409, f"client {json.dumps(client_id)} has no quota (QuotaBytes)"
            )
        log.info(
            "management API reset the quota of client {client_id} for {peer}",
            client_id=client_id,
            peer=peer_common_name(getattr(request, "transport", None)),
        )
        return self._json(request, 200, {"ClientId": client_id, **account.view()})

    @app.route("/tunnels", methods=["GET"])
    def get_tunnels(self, request: IRequest) -> bytes:
        """The tunnels in force."""
        self._authorize(request)
        if self._fleet is not None:
            request.setHeader(b"etag", self._fleet.etag())
        return self._json(request, 200, [t.to_json() for t in self._routes.tunnels()])

    @app.route("/tunnels/status", methods=["GET"])
    def tunnels_status(self, request: IRequest) -> bytes:
        """The tunnels in force with their clients' states and who serves them,
        and the saved ones not restored at start.

        Apart from ``GET /tunnels`` so that its answer stays a plain list.
        """
        self._authorize(request)
        return self._json(
            request,
            200,
            {
                "Tunnels": [self._status(t) for t in self._routes.tunnels()],
                "NotRestored": [n.to_json() for n in self._routes.not_restored()],
                **({} if self._fleet is None else {"Gateways": self._fleet.statuses()}),
            },
        )

    def _status(self, tunnel: Tunnel) -> dict[str, Any]:
        body = tunnel.to_json()
        if self._serving is not None:
            body.update(self._serving.view(tunnel).to_json())
        if self._policy is not None:
            body["Policy"] = self._policy.tunnel_view(tunnel)
        return body

    # -- the status page (statuspage.py) ------------------------------------

    @app.route("/", methods=["GET"])
    def status_page(self, request: IRequest) -> bytes:
        """The status page: clients, tunnels and their charts (read-only)."""
        self._authorize(request)
        return statuspage.page(request)

    @app.route("/static/<name>", methods=["GET"])
    def static_file(self, request: IRequest, name: str) -> bytes:
        """The status page's stylesheet and script."""
        self._authorize(request)
        body = statuspage.static_file(request, name)
        if body is None:
            raise ApiError(404, f"no such file: {json.dumps(name)}")
        return body

    @app.route("/status/history", methods=["GET"])
    def status_history(self, request: IRequest) -> bytes:
        """The last hour of traffic samples per tunnel and for the gateway."""
        self._authorize(request)
        if self._history is None:
            raise ApiError(404, "no traffic history on this server")
        try:
            after = statuspage.after_sample(request)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        request.setHeader(b"cache-control", b"no-store")
        return self._json(request, 200, self._history.to_json(after))

    @app.route("/events", methods=["GET"])
    def events(self, request: IRequest) -> Deferred[bytes]:
        """The event feed as Server-Sent Events (docs/events.md)."""
        self._authorize(request)
        if self._events is None:
            raise ApiError(404, "no event stream on this server")
        try:
            return self._events.open(request)
        except StreamRefused as e:
            raise ApiError(e.status, e.message) from None

    @app.route("/server", methods=["GET"])
    def server(self, request: IRequest) -> bytes:
        """The gateway itself: id, version, ports, certificate end date."""
        self._authorize(request)
        if self._server_info is None:
            raise ApiError(404, "no server information on this server")
        return self._json(request, 200, self._server_info())

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        """The server's metrics in the Prometheus text format."""
        self._authorize(request)
        if self._metrics is None:
            raise ApiError(404, "no metrics on this server")
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics()

    @app.route("/tunnels", methods=["PUT"])
    async def put_tunnels(self, request: IRequest) -> bytes:
        """Replace the whole tunnel set, all or nothing."""
        self._authorize(request)
        declared = _declared_length(request)
        if declared is not None and declared > self.max_body_bytes:
            raise self._too_large()
        _check_content_type(request)
        body = request.content.read(self.max_body_bytes + 1)
        if len(body) > self.max_body_bytes:
            raise self._too_large()
        tunnels = parse_tunnels(_decode_json(body))
        if self._fleet is not None:
            applied, _ = await self._fleet.put(tunnels, request.getHeader(b"if-match"))
            request.setHeader(b"etag", self._fleet.etag())
        else:
            applied = await self._apply(tunnels)
        log.info(
            "management API applied {count} tunnels for {peer}",
            count=len(applied),
            peer=peer_common_name(getattr(request, "transport", None)),
        )
        return self._json(request, 200, [t.to_json() for t in applied])

    def _too_large(self) -> ApiError:
        self.limit_hit(Limit.MANAGEMENT_BODY)
        return ApiError(413, f"the body is larger than {self.max_body_bytes} bytes")

    # -- errors, mapped in one place ---------------------------------------

    @app.handle_errors(ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error: ApiError = failure.value
        return self._json(request, error.status, {"error": error.message})

    @app.handle_errors(TunnelError)
    def tunnel_error(self, request: IRequest, failure: Failure) -> bytes:
        error: TunnelError = failure.value
        return self._json(request, error.status, error.to_json())

    @app.handle_errors(HTTPException)
    def http_error(self, request: IRequest, failure: Failure) -> bytes:
        """Routing errors: unknown path 404, wrong method 405 (with Allow)."""
        try:
            self._authorize(request)
        except ApiError as e:
            return self._json(request, e.status, {"error": e.message})
        error: HTTPException = failure.value
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        if isinstance(error, MethodNotAllowed):
            allowed = sorted(error.valid_methods or ())
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            message = f"method {method} not allowed on {path}; use {', '.join(allowed)}"
        elif isinstance(error, NotFound):
            message = f"no such path: {path}"
        else:
            # Other routing answers (a redirect, say) keep werkzeug's headers.
            for name, value in error.get_response({}).headers:
                if name.lower() not in ("content-type", "content-length"):
                    request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
            message = error.description or error.name
        return self._json(request, error.code or 500, {"error": message})

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Failure) -> bytes:
        """Anything else: log the traceback, answer 500 without it."""
        log.failure(
            "management API {method} {path} failed",
            failure,
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
        )
        return self._json(request, 500, {"error": "internal error"})
