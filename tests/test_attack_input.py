"""Hostile input through every JSON door: the API, the state file, config files.

Reproductions of issue 11 items 5 and 9: a control character in
``BackEndService`` was accepted by ``PUT /tunnels`` (then every user
connection leaked a stream), and a JSON integer of thousands of digits gave
a 500 with a traceback (API) or a traceback at start (state file, config).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase

from threshold.config import ConfigError, load_client_config, load_server_config
from threshold.server.api import ManagementAPI
from threshold.server.routes import RouteTable
from threshold.server.statefile import StateFileError, read_state

URL = "http://management.invalid"
JSON_TYPE = {b"content-type": [b"application/json"]}
HUGE = "1" * 5000  # Python refuses int() of more than 4300 digits

TUNNEL = {
    "ClientId": "TestClient1",
    "ListenAddress": "127.0.0.1",
    "ListenPort": 9000,
    "BackEndService": "web",
}

# Odd documents that json.loads either accepts wrongly or raises on with
# something other than its decode error.
ODD_BODIES = {
    "huge integer": f'[{{"ListenPort": {HUGE}}}]'.encode(),
    "huge negative integer": f"[-{HUGE}]".encode(),
    "float overflowing to infinity": b'[{"ListenPort": 1e400}]',
    "deep lists": b"[" * 100_000,
    "deep objects": b'{"a":' * 50_000,
}


class _Port:
    def stopListening(self) -> Deferred[None]:
        return succeed(None)


class _Clients:
    def snapshot(self) -> dict[str, Any]:
        return {"TestClient1": {"CurrentState": "ClientConnected"}}


def _api() -> tuple[StubTreq, list[tuple[str, int]]]:
    bound: list[tuple[str, int]] = []

    def listen(host: str, port: int, factory: object) -> Deferred[_Port]:
        bound.append((host, port))
        return succeed(_Port())

    table = RouteTable(listen, lambda key: Factory(), lambda client: True)
    return StubTreq(ManagementAPI(table, _Clients()).app.resource()), bound


class ManagementApiTests(SynchronousTestCase):
    """PUT /tunnels answers every hostile body with a clear 4xx, never a 500."""

    def put(self, stub: StubTreq, body: bytes) -> tuple[int, dict[str, Any]]:
        d = stub.request("PUT", URL + "/tunnels", data=body, headers=JSON_TYPE)
        stub.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        return response.code, json.loads(content)

    def test_control_characters_in_service(self):
        """A control character in BackEndService is 400 naming entry and field."""
        stub, bound = _api()
        for service in ("web\u0007x", "web\n", "\u007fweb", "we\u200bb"):
            body = json.dumps(
                [TUNNEL, dict(TUNNEL, ListenPort=9001, BackEndService=service)]
            )
            code, answer = self.put(stub, body.encode())
            self.assertEqual(code, 400, (service, answer))
            self.assertEqual((answer["index"], answer["field"]), (1, "BackEndService"))
            self.assertIn("printable", answer["error"])
        self.assertEqual(bound, [], "a refused set opens no socket")
        self.assertEqual(self.put(stub, json.dumps([TUNNEL]).encode())[0], 200)

    def test_odd_json_is_422(self):
        """Huge numbers and deep nesting are 422 with a one-line reason."""
        stub, bound = _api()
        for what, body in ODD_BODIES.items():
            code, answer = self.put(stub, body)
            self.assertEqual(code, 422, (what, answer))
            self.assertIn("not JSON", answer["error"], what)
            self.assertNotIn("\n", answer["error"])
            self.assertNotIn("set_int_max_str_digits", answer["error"])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(bound, [])


class FileTests(SynchronousTestCase):
    """The state file and config files refuse odd JSON in one line naming the file."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="threshold-attack-input-")
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_state_file(self):
        """read_state raises StateFileError (one line naming the file), only."""
        for what, body in ODD_BODIES.items():
            path = self.write("tunnels.json", body)
            with self.assertRaises(StateFileError, msg=what) as cm:
                read_state(path)
            self.assertIn(path, str(cm.exception))
            self.assertNotIn("\n", str(cm.exception))

    def test_state_file_control_character(self):
        """A state file naming a service with a control character is refused."""
        path = self.write(
            "tunnels.json", json.dumps([dict(TUNNEL, BackEndService="web\n")]).encode()
        )
        with self.assertRaises(StateFileError) as cm:
            read_state(path)
        self.assertIn('field "BackEndService"', str(cm.exception))

    def test_config_files(self):
        """Both config loaders raise a one-line ConfigError naming the file."""
        for what, body in ODD_BODIES.items():
            for load in (load_server_config, load_client_config):
                path = self.write("config.json", body)
                with self.assertRaises(ConfigError, msg=what) as cm:
                    load(path)
                line = str(cm.exception)
                self.assertTrue(line.startswith(f"{path}: not valid JSON: "), line)
                self.assertNotIn("\n", line)
                self.assertEqual(cm.exception.source, path)

    def test_config_huge_port(self):
        """A 5,000-digit port in a config file: one line naming the file."""
        path = self.write("server.json", f'{{"TunnelControlPort": {HUGE}}}'.encode())
        with self.assertRaises(ConfigError) as cm:
            load_server_config(path)
        self.assertEqual(
            str(cm.exception),
            f"{path}: not valid JSON: an integer of 5000 digits is too long"
            " (at most 4300)",
        )
