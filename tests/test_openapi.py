"""Tests for docs/openapi.json: the spec against the real management API.

The spec's paths are the Klein app's routes; every status it lists is
produced by a request here, and every answer validates against the spec's
schema for it. The schemas are checked with a small validator for the
subset of JSON Schema the spec uses (the spec is checked to use no other
keyword, so nothing is silently ignored).
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from threshold.config.policy import ClientPolicy
from threshold.server.api import ManagementAPI
from threshold.server.events import EventFeed
from threshold.server.events_sse import EventStreams, StreamSettings
from threshold.server.history import TrafficHistory
from threshold.server.policy import CLIENT_VIEW_FIELDS, GatewayPolicy, PolicySettings
from threshold.server.registry import (
    STATE_CLOSED,
    STATE_CONNECTED,
    STATE_ERROR,
    STATE_UNKNOWN,
    ClientRecord,
    ClientRegistry,
)
from threshold.server.routes import (
    NotRestored,
    RouteTable,
    Tunnel,
    TunnelError,
    parse_tunnels,
)
from threshold.server.serverinfo import ServerFacts
from threshold.server.serving import ServingTable
from threshold.server.stats import GatewayStats

SPEC_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "docs",
    "openapi.json",
)
URL = "http://management.invalid"
JSON = {b"content-type": [b"application/json"]}
BUSY_PORT = 9999
METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")

# Keywords the validator checks, and annotations it may ignore.
CHECKED = {
    "$ref",
    "type",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "enum",
    "anyOf",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
}
ANNOTATIONS = {"description", "default", "examples", "format", "title"}


def load_spec() -> dict[str, Any]:
    with open(SPEC_PATH, encoding="utf-8") as f:
        return json.load(f)


SPEC = load_spec()


class SchemaError(Exception):
    """A value does not match a schema; the message says where and why."""


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow ``$ref`` pointers (``#/...`` only) until a non-reference."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"]
        if not pointer.startswith("#/") or pointer in seen:
            raise SchemaError(f"unsupported or circular $ref {pointer!r}")
        seen.add(pointer)
        node = spec
        for part in pointer[2:].split("/"):
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"$ref {pointer!r} does not resolve")
            node = node[part]
    return node


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, dict)
    raise SchemaError(f"unknown type {name!r}")


def validate(spec: dict[str, Any], schema: Any, value: Any, where: str = "$") -> None:
    """Raise SchemaError unless ``value`` matches ``schema`` (our subset)."""
    if schema is True:
        return
    if schema is False:
        raise SchemaError(f"{where}: no value is allowed here")
    if "$ref" in schema:
        validate(spec, resolve(spec, schema), value, where)
        return
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in types):
            raise SchemaError(f"{where}: {value!r} is not of type {types}")
    if "enum" in schema:
        # JSON equality: True is not 1.
        if not any(
            value == option and type(value) is type(option) for option in schema["enum"]
        ):
            raise SchemaError(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaError(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(f"{where}: longer than {schema['maxLength']}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(spec, schema["items"], item, f"{where}[{index}]")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                raise SchemaError(f"{where}: required property {name!r} missing")
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                validate(spec, properties[name], item, f"{where}.{name}")
            elif "additionalProperties" in schema:
                validate(spec, schema["additionalProperties"], item, f"{where}.{name}")
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                validate(spec, option, value, where)
                break
            except SchemaError as e:
                errors.append(str(e))
        else:
            raise SchemaError(f"{where}: matches none of anyOf: {errors}")


def schemas_in(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every schema object in the spec (under a ``schema`` or components)."""
    found: list[tuple[str, Any]] = []

    def walk_schema(schema: Any, where: str) -> None:
        if not isinstance(schema, dict):
            return
        found.append((where, schema))
        for name, sub in schema.get("properties", {}).items():
            walk_schema(sub, f"{where}/properties/{name}")
        for key in ("items", "additionalProperties"):
            walk_schema(schema.get(key), f"{where}/{key}")
        for index, sub in enumerate(schema.get("anyOf", ())):
            walk_schema(sub, f"{where}/anyOf/{index}")

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "schema":
                    walk_schema(value, f"{where}/schema")
                elif key == "schemas" and where == "/components":
                    for name, schema in value.items():
                        walk_schema(schema, f"{where}/schemas/{name}")
                else:
                    walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(node, path)
    return found


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, METHOD) to the operation object."""
    return {
        (path, method.upper()): item[method]
        for path, item in spec["paths"].items()
        for method in METHODS
        if method in item
    }


def app_routes() -> set[tuple[str, str]]:
    """(path, METHOD) served by the Klein app, HEAD aside."""
    routes = set()
    for rule in ManagementAPI.app.url_map.iter_rules():
        # werkzeug writes variables <name> or <conv:name>; OpenAPI {name}.
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((path, method))
    return routes


# -- the real app, driven in memory -----------------------------------------


class FakeSession:
    """What the client registry reads from a session."""

    def __init__(self, rtt: float | None) -> None:
        self.streams = {1: object(), 4: object()}
        self.rtt = rtt

    def go_away(self, code: int) -> None:
        pass


class FakePort:
    def stopListening(self) -> Deferred[None]:
        return succeed(None)


def fake_listen(host: str, port: int, factory: object) -> Deferred[FakePort]:
    """Listen nowhere; the port BUSY_PORT is in use."""
    if port == BUSY_PORT:
        return fail(
            CannotListenError(
                host, port, OSError(errno.EADDRINUSE, "Address already in use")
            )
        )
    return succeed(FakePort())


def registry() -> ClientRegistry:
    """A registry with two connected clients, an errored and a closed one."""
    clients = ClientRegistry(wall_clock=lambda: 1714564800.0)
    clients.connected("TestClient1", FakeSession(0.0215), "127.0.0.1:50000")
    clients.connected("TestClient2", FakeSession(None), "[::1]:50003")
    errored = FakeSession(None)
    clients.connected("TestClient3", errored, "[::1]:50001")
    clients.disconnected("TestClient3", errored, RuntimeError("keepalive timeout"))
    closed = FakeSession(0.01)
    clients.connected("TestClient4", closed, "127.0.0.1:50002")
    clients.disconnected("TestClient4", closed, ConnectionDone())
    return clients


TUNNEL_KEY = ("127.0.0.1", 9000, "*.example.com")
TUNNEL = {
    "ClientId": "TestClient1",
    "ListenAddress": "127.0.0.1",
    "ListenPort": 9000,
    "ListenHostnameGlob": "*.example.com",
    "BackEndService": "web",
    "HaProxyProxyProtocol": True,
}


def spec_path(path: str) -> str:
    """The spec's path of a request's (``/clients/a/quota/reset``: its template)."""
    for template in SPEC["paths"]:
        if re.fullmatch(re.sub(r"\{[^}/]+\}", "[^/]+", template), path):
            return template
    return path


class Answer:
    """One request and what the app answered."""

    def __init__(
        self, method: str, path: str, status: int, content_type: str, body: bytes
    ) -> None:
        self.method = method
        self.path = spec_path(path.split("?")[0])
        self.status = status
        self.content_type = content_type
        self.body = body

    def __repr__(self) -> str:
        return f"{self.method} {self.path} -> {self.status} {self.body[:200]!r}"


class Harness:
    """Builds APIs over fakes and records every answer."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.answers: list[Answer] = []
        self.bodies: list[bytes] = []

    def api(
        self,
        clients: Any = None,
        apply: Callable[..., Any] | None = None,
        metrics: Callable[[], bytes] | None = lambda: b"# TYPE x gauge\nx 1\n",
        tunnels: Callable[[], list[Tunnel]] | None = None,
        restore: list[Tunnel] | None = None,
        **kwargs: Any,
    ) -> StubTreq:
        clients = clients if clients is not None else registry()
        serving = None
        if isinstance(clients, ClientRegistry):
            serving = ServingTable(clients, GatewayStats())
            kwargs.setdefault("serving", serving)
        table = RouteTable(
            fake_listen,
            lambda key: Factory(),
            serving.update if serving is not None else lambda tunnels: None,
        )
        if restore is not None:
            self.case.successResultOf(table.restore(restore))
        if tunnels is not None:
            table.tunnels = tunnels  # type: ignore[method-assign]
        api = ManagementAPI(table, clients, apply=apply, metrics=metrics, **kwargs)
        return StubTreq(api.app.resource())

    def request(
        self,
        stub: StubTreq,
        method: str,
        path: str,
        body: object = None,
        headers: dict[bytes, list[bytes]] | None = None,
    ) -> Answer:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        if method == "PUT" and headers is None:
            headers = JSON
        d = stub.request(method, URL + path, data=body, headers=headers)
        stub.flush()
        response = self.case.successResultOf(d)
        content = self.case.successResultOf(response.content())
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        answer = Answer(method, path, response.code, content_type.decode(), content)
        self.answers.append(answer)
        if method == "PUT" and response.code == 200:
            self.bodies.append(body)
        return answer


class Broken:
    """A client view whose snapshot fails: the API must answer 500."""

    def snapshot(self) -> dict[str, Any]:
        raise ZeroDivisionError("broken on purpose")

    def to_json(self, after: int | None = None) -> dict[str, Any]:
        raise ZeroDivisionError("broken on purpose")

    def is_connected(self, client_id: str) -> bool:
        return True


def drive(case: SynchronousTestCase) -> Harness:
    """Send the requests that produce every status the spec lists."""
    h = Harness(case)
    ok = h.api()
    h.request(ok, "GET", "/ping")
    h.request(ok, "GET", "/clients")
    h.request(ok, "GET", "/tunnels")
    h.request(ok, "PUT", "/tunnels", [TUNNEL, dict(TUNNEL, ListenPort=9001)])
    h.request(ok, "PUT", "/tunnels", SPEC_EXAMPLE_REQUEST)
    h.request(ok, "GET", "/tunnels")
    h.request(ok, "GET", "/metrics")
    h.request(ok, "GET", "/tunnels/status")
    # A restore that could not bind one saved entry.
    saved = parse_tunnels([TUNNEL, dict(TUNNEL, ListenPort=BUSY_PORT)])
    h.request(h.api(restore=saved), "GET", "/tunnels/status")
    h.request(ok, "PUT", "/tunnels", [])
    # 400: an invalid field, an unknown field, a duplicate route.
    h.request(ok, "PUT", "/tunnels", [dict(TUNNEL, ListenPort=70000)])
    h.request(ok, "PUT", "/tunnels", [dict(TUNNEL, Colour="red")])
    h.request(ok, "PUT", "/tunnels", [TUNNEL, TUNNEL])
    # 400: a client listed twice, ClientId and ClientIds that differ.
    several = {k: v for k, v in TUNNEL.items() if k != "ClientId"}
    twice = dict(several, ClientIds=["TestClient1", "TestClient1"])
    h.request(ok, "PUT", "/tunnels", [twice])
    h.request(ok, "PUT", "/tunnels", [dict(TUNNEL, ClientIds=["TestClient2"])])
    # Clients that are not connected (closed, errored, never seen) are no
    # error (older versions answered 404); several clients, each mode.
    for client_id in ("TestClient3", "TestClient4", "TestClient9"):
        h.request(ok, "PUT", "/tunnels", [dict(TUNNEL, ClientId=client_id)])
    h.request(ok, "GET", "/tunnels/status")
    modes = ("failover", "round-robin", "least-connections")
    body = [
        dict(several, ListenPort=9000 + i, Balance=mode,
             ClientIds=["TestClient3", "TestClient1", "TestClient2"])
        for i, mode in enumerate(modes)
    ]  # fmt: skip
    h.request(ok, "PUT", "/tunnels", body)
    h.request(ok, "GET", "/tunnels")
    h.request(ok, "GET", "/tunnels/status")
    # 409: the port is in use.
    h.request(ok, "PUT", "/tunnels", [dict(TUNNEL, ListenPort=BUSY_PORT)])
    # 413, 415, 422.
    small = h.api(max_body_bytes=16)
    h.request(small, "PUT", "/tunnels", [TUNNEL])
    h.request(ok, "PUT", "/tunnels", [TUNNEL], {b"content-type": [b"text/plain"]})
    h.request(ok, "PUT", "/tunnels", b"[{")
    h.request(ok, "PUT", "/tunnels", {"tunnels": []})
    h.request(ok, "PUT", "/tunnels", [TUNNEL, 3])
    # 403 on every route: a certificate is required and there is none.
    forbidden = h.api(allowed_common_names=["operator"])
    for (path, method), _ in operations(SPEC).items():
        h.request(forbidden, method, path, [] if method == "PUT" else None)
    # 404 metrics: a server without them.
    h.request(h.api(metrics=None), "GET", "/metrics")
    # The status page, its files and the traffic history (404: none kept).
    sampler = TrafficHistory(GatewayStats(), Clock(), lambda: [TUNNEL_KEY])
    sampler.sample()
    page = h.api(history=sampler)
    for path in ("/", "/static/status.js", "/static/status.css", "/static/favicon.svg",
                 "/static/nope.js", "/status/history"):  # fmt: skip
        h.request(page, "GET", path)
    h.request(page, "GET", "/status/history?after=1")
    h.request(page, "GET", "/status/history?after=-1")
    h.request(ok, "GET", "/status/history")
    h.request(h.api(history=Broken()), "GET", "/status/history")
    # The access policy: its fields in the answers, the quota reset.
    quota = PolicySettings(
        client_policies={"TestClient1": ClientPolicy(quota_bytes=10)}
    )
    clients = registry()
    policy = GatewayPolicy(quota, Clock(), GatewayStats())
    with_policy = h.api(clients=clients, policy=policy)
    h.request(with_policy, "PUT", "/tunnels", [dict(TUNNEL, BandwidthBytesPerSecond=9)])
    h.request(with_policy, "GET", "/clients")
    h.request(with_policy, "GET", "/tunnels/status")
    h.request(with_policy, "POST", "/clients/TestClient1/quota/reset")
    h.request(with_policy, "POST", "/clients/TestClient2/quota/reset")  # no quota
    h.request(with_policy, "POST", "/clients/TestClient9/quota/reset")  # unknown

    # 500 wherever the server's own code can fail.
    def broken_tunnels() -> list[Tunnel]:
        raise ZeroDivisionError("broken on purpose")

    def broken_metrics() -> bytes:
        raise ZeroDivisionError("broken on purpose")

    h.request(h.api(clients=Broken()), "GET", "/clients")
    h.request(h.api(tunnels=broken_tunnels), "GET", "/tunnels")
    h.request(h.api(tunnels=broken_tunnels), "GET", "/tunnels/status")
    h.request(h.api(metrics=broken_metrics), "GET", "/metrics")
    h.request(
        h.api(apply=lambda tunnels: fail(ZeroDivisionError("broken on purpose"))),
        "PUT",
        "/tunnels",
        [TUNNEL],
    )
    # 503: the set cannot be saved to the state file.
    not_saved = TunnelError(503, "not applied: the tunnel set cannot be saved: x")
    h.request(h.api(apply=lambda tunnels: fail(not_saved)), "PUT", "/tunnels", [])
    # The event stream (a feed already closed: the stream ends at once) and
    # the gateway's facts.
    feed = EventFeed(Clock(), wall_clock=lambda: 1714564800.0)
    feed.emit("client.connected", ClientId="TestClient1", Peer="127.0.0.1:50000")
    feed.close()
    closed = h.api(events=EventStreams(feed, Clock()))
    h.request(closed, "GET", "/events?since=0")
    h.request(closed, "GET", "/events?since=x")
    full = EventStreams(feed, Clock(), StreamSettings(max_subscribers=0))
    h.request(h.api(events=full), "GET", "/events")
    h.request(ok, "GET", "/events")
    gateway = SimpleNamespace(routes=RouteTable(fake_listen, lambda key: Factory()))
    gateway.registry = registry()
    facts = ServerFacts(gateway, "eu-1", True, "0.0.0.0", 9056, 9057, feed=feed)
    h.request(h.api(server_info=facts.to_json), "GET", "/server")
    h.request(ok, "GET", "/server")
    h.request(h.api(server_info=broken_tunnels), "GET", "/server")
    case.flushLoggedErrors(ZeroDivisionError)
    return h


def example_value(media: dict[str, Any]) -> Any:
    return next(iter(media["examples"].values()))["value"]


SPEC_EXAMPLE_REQUEST = example_value(
    SPEC["paths"]["/tunnels"]["put"]["requestBody"]["content"]["application/json"]
)


class SpecShapeTests(SynchronousTestCase):
    """The spec is a well-formed OpenAPI 3.1 document of our subset."""

    def test_openapi_version_and_security(self):
        """OpenAPI 3.1, secured by the mutualTLS scheme, which is described."""
        self.assertTrue(SPEC["openapi"].startswith("3.1."))
        self.assertEqual(SPEC["security"], [{"mutualTLS": []}])
        scheme = SPEC["components"]["securitySchemes"]["mutualTLS"]
        self.assertEqual(scheme["type"], "mutualTLS")
        self.assertIn("ManagementAllowedCommonNames", scheme["description"])

    def test_every_ref_resolves(self):
        """Every $ref in the spec points at something that exists."""
        refs: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if "$ref" in node:
                    refs.append(node["$ref"])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(SPEC)
        self.assertGreater(len(refs), 10)
        for ref in refs:
            resolve(SPEC, {"$ref": ref})

    def test_only_checked_keywords(self):
        """Schemas use only keywords the validator checks, or annotations."""
        schemas = schemas_in(SPEC)
        self.assertGreater(len(schemas), 20)
        for where, schema in schemas:
            unknown = set(schema) - CHECKED - ANNOTATIONS
            self.assertEqual(unknown, set(), where)

    def test_examples_validate(self):
        """Every example in the spec matches the schema next to it."""
        count = 0

        def walk(node: Any, where: str) -> None:
            nonlocal count
            if isinstance(node, dict):
                if "schema" in node and "examples" in node:
                    for name, example in node["examples"].items():
                        validate(
                            SPEC, node["schema"], example["value"], f"{where}/{name}"
                        )
                        count += 1
                for key, value in node.items():
                    walk(value, f"{where}/{key}")

        walk(SPEC, "")
        self.assertGreater(count, 8)

    def test_validator_can_fail(self):
        """The validator refuses wrong types, missing and unknown fields."""
        minimal = {"ClientId": "a", "ListenPort": 1, "BackEndService": "b"}
        written = parse_tunnels([minimal])[0].to_json()
        tunnel = dict(written, **TUNNEL)
        schema = {"$ref": "#/components/schemas/Tunnel"}
        validate(SPEC, schema, tunnel)
        for wrong in (
            dict(tunnel, ListenPort="443"),
            dict(tunnel, ListenPort=0),
            dict(tunnel, HaProxyProxyProtocol=1),
            dict(tunnel, HaProxyProxyProtocolVersion=True),
            dict(tunnel, BackEndService="x" * 129),
            dict(tunnel, Colour="red"),
            dict(tunnel, Balance="random"),
            dict(tunnel, ClientIds="TestClient1"),
            {k: v for k, v in tunnel.items() if k != "ClientIds"},
        ):
            with self.assertRaises(SchemaError):
                validate(SPEC, schema, wrong)
        entry = {"ListenPort": 1, "BackEndService": "web"}
        with self.assertRaises(SchemaError):
            validate(SPEC, {"$ref": "#/components/schemas/TunnelInput"}, entry)
        validate(
            SPEC,
            {"$ref": "#/components/schemas/TunnelInput"},
            dict(entry, ClientIdentifier="TestClient1"),
        )


class RoutesTests(SynchronousTestCase):
    """The spec's paths and methods are exactly the app's routes."""

    def test_paths_match_routes(self):
        """Every path and method in the spec exists in the app, and vice versa."""
        self.assertEqual(set(operations(SPEC)), app_routes())

    def test_head_only_with_get(self):
        """The app adds HEAD only where there is GET (so the spec need not list it)."""
        for rule in ManagementAPI.app.url_map.iter_rules():
            if "HEAD" in (rule.methods or ()):
                self.assertIn("GET", rule.methods, rule.rule)

    def test_operations_have_ids_and_defaults(self):
        """Each operation has a unique operationId and a default error answer."""
        ids = [op["operationId"] for op in operations(SPEC).values()]
        self.assertEqual(len(ids), len(set(ids)))
        for key, op in operations(SPEC).items():
            self.assertIn("default", op["responses"], key)
            self.assertIn("200", op["responses"], key)


class AnswersTests(SynchronousTestCase):
    """The real app's answers are the ones the spec describes."""

    def setUp(self) -> None:
        self.harness = drive(self)

    def response_spec(self, answer: Answer) -> tuple[str, dict[str, Any]]:
        op = operations(SPEC)[(answer.path, answer.method)]
        key = str(answer.status)
        if key not in op["responses"]:
            self.assertFalse(
                200 <= answer.status < 300, f"success not in spec: {answer}"
            )
            key = "default"
        return key, resolve(SPEC, op["responses"][key])

    def test_every_answer_validates(self):
        """Each answer's content type and body match the spec for its status."""
        for answer in self.harness.answers:
            _, response = self.response_spec(answer)
            media_type = answer.content_type.split(";")[0].strip()
            self.assertIn(media_type, response["content"], answer)
            schema = response["content"][media_type]["schema"]
            if media_type == "application/json":
                value = json.loads(answer.body)
            else:
                value = answer.body.decode("utf-8")
            try:
                validate(SPEC, schema, value)
            except SchemaError as e:
                self.fail(f"{answer}: {e}")

    def test_every_listed_status_is_produced(self):
        """Every status the spec lists for an operation comes out of some request."""
        produced: dict[tuple[str, str], set[str]] = {}
        for answer in self.harness.answers:
            key = (answer.path, answer.method)
            produced.setdefault(key, set()).add(str(answer.status))
        for key, op in operations(SPEC).items():
            listed = set(op["responses"]) - {"default"}
            self.assertEqual(listed - produced.get(key, set()), set(), key)
        put = set(operations(SPEC)[("/tunnels", "PUT")]["responses"])
        self.assertEqual(
            put,
            {
                "200",
                "400",
                "403",
                "409",
                "413",
                "415",
                "422",
                "500",
                "503",
                "default",
            },
        )

    def test_every_success_request_validates(self):
        """Each accepted PUT body matches the request schema."""
        schema = SPEC["paths"]["/tunnels"]["put"]["requestBody"]["content"][
            "application/json"
        ]["schema"]
        self.assertGreaterEqual(len(self.harness.bodies), 3)
        for body in self.harness.bodies:
            validate(SPEC, schema, json.loads(body))

    def test_example_request_accepted(self):
        """The spec's PUT example is applied and answered as its 200 example."""
        answers = [
            a
            for a in self.harness.answers
            if a.method == "PUT" and a.status == 200 and b"ssh" in a.body
        ]
        self.assertEqual(len(answers), 1)
        response = SPEC["paths"]["/tunnels"]["put"]["responses"]["200"]
        expected = example_value(response["content"]["application/json"])
        self.assertEqual(json.loads(answers[0].body), expected)


class FieldsTests(SynchronousTestCase):
    """The schemas' fields are the ones the code reads and writes."""

    def schema(self, name: str) -> dict[str, Any]:
        return SPEC["components"]["schemas"][name]

    def test_tunnel_fields(self):
        """The Tunnel schema has exactly the fields Tunnel.to_json() writes."""
        tunnel = parse_tunnels(
            [{"ClientId": "a", "ListenPort": 1, "BackEndService": "b"}]
        )
        fields = list(tunnel[0].to_json())
        schema = self.schema("Tunnel")
        self.assertEqual(list(schema["properties"]), fields)
        # ClientId is written for a tunnel of one client only.
        self.assertEqual(schema["required"], [f for f in fields if f != "ClientId"])
        [several] = parse_tunnels(
            [{"ClientIds": ["a", "b"], "ListenPort": 1, "BackEndService": "b"}]
        )
        self.assertEqual(list(several.to_json()), schema["required"])
        self.assertIs(schema["additionalProperties"], False)

    def test_tunnel_input_fields_and_defaults(self):
        """TunnelInput takes to_json's fields and ClientIdentifier; defaults hold."""
        minimal = {"ClientId": "a", "ListenPort": 1, "BackEndService": "b"}
        written = parse_tunnels([minimal])[0].to_json()
        properties = self.schema("TunnelInput")["properties"]
        self.assertEqual(set(properties), set(written) | {"ClientIdentifier"})
        defaults = {k: p["default"] for k, p in properties.items() if "default" in p}
        # ClientIds has no default: it is ClientId's one client.
        self.assertEqual(set(defaults), set(written) - set(minimal) - {"ClientIds"})
        self.assertEqual(written["ClientIds"], ["a"])
        for name, value in defaults.items():
            self.assertEqual(written[name], value, name)
            self.assertIs(type(written[name]), type(value), name)
        # Each field of TunnelInput is accepted by the server, and only those.
        for name in properties:
            if name not in minimal and name not in ("ClientIdentifier", "ClientIds"):
                parse_tunnels([dict(minimal, **{name: defaults[name]})])
        parse_tunnels([dict(minimal, ClientIds=["a"])])
        parse_tunnels([dict(minimal, ClientIdentifier="a")])
        with self.assertRaises(TunnelError):
            parse_tunnels([dict(minimal, Unlisted=1)])

    def test_tunnel_constraints_match_parser(self):
        """The spec's bounds and enums are what the parser accepts and refuses."""
        minimal = {"ClientId": "a", "ListenPort": 1, "BackEndService": "b"}
        properties = self.schema("TunnelInput")["properties"]
        port = properties["ListenPort"]
        service = properties["BackEndService"]
        version = properties["HaProxyProxyProtocolVersion"]
        accepted = [
            {"ListenPort": port["minimum"]},
            {"ListenPort": port["maximum"]},
            {"BackEndService": "s" * service["maxLength"]},
            *({"HaProxyProxyProtocolVersion": v} for v in version["enum"]),
        ]
        refused = [
            {"ListenPort": port["minimum"] - 1},
            {"ListenPort": port["maximum"] + 1},
            {"BackEndService": "s" * (service["maxLength"] + 1)},
            {"BackEndService": ""},
            {"ClientId": ""},
            {"HaProxyProxyProtocolVersion": max(version["enum"]) + 1},
        ]
        for change in accepted:
            parse_tunnels([dict(minimal, **change)])
            validate(SPEC, {"$ref": "#/components/schemas/TunnelInput"},
                     dict(minimal, **change))  # fmt: skip
        for change in refused:
            with self.assertRaises(TunnelError, msg=str(change)):
                parse_tunnels([dict(minimal, **change)])
            with self.assertRaises(SchemaError, msg=str(change)):
                validate(SPEC, {"$ref": "#/components/schemas/TunnelInput"},
                         dict(minimal, **change))  # fmt: skip

    def test_client_state_fields(self):
        """ClientState lists exactly the fields ClientRecord.to_json() writes."""
        written = ClientRecord("TestClient1").to_json()
        schema = self.schema("ClientState")
        # ``GET /clients`` adds the access policy's fields to each client.
        self.assertEqual(set(schema["properties"]), set(written) | CLIENT_VIEW_FIELDS)
        self.assertEqual(set(schema["required"]), set(written))

    def test_client_states_enum(self):
        """The state enums are the registry's states."""
        states = {STATE_UNKNOWN, STATE_CONNECTED, STATE_CLOSED, STATE_ERROR}
        properties = self.schema("ClientState")["properties"]
        for name in ("CurrentState", "LastState"):
            self.assertEqual(set(properties[name]["enum"]), states)

    def test_not_restored_fields(self):
        """NotRestored lists exactly the fields NotRestored.to_json() writes."""
        entry = parse_tunnels([TUNNEL])[0]
        error = TunnelError(409, "in use", index=0, field="ListenPort")
        written = NotRestored(0, entry, error).to_json()
        schema = self.schema("NotRestored")
        self.assertEqual(list(schema["properties"]), list(written))
        self.assertEqual(schema["required"], list(written))
        validate(SPEC, schema, written)

    def test_error_fields(self):
        """The Error schema has the fields TunnelError.to_json() writes."""
        written = TunnelError(400, "x", index=0, field="ListenPort").to_json()
        schema = self.schema("Error")
        self.assertEqual(set(schema["properties"]), set(written))
        self.assertEqual(schema["required"], ["error"])
