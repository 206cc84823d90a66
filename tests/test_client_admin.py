"""The client's admin API: live service-map changes, validation, Unix socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from treq.testing import StubTreq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.clientkit import make_settings
from tests.components import missing
from tests.support import Backend, Deployment, connect_user, free_port, tunnel
from threshold.client.admin import ClientAdminAPI


def curl_unix(sock: str, path: str, put_json: str | None = None):
    """Call an HTTP API on a Unix socket with curl (in a thread); skip if none."""
    curl = shutil.which("curl")
    if curl is None:
        raise missing("curl is not installed")
    command = [curl, "-sS", "--unix-socket", sock]
    if put_json is not None:
        command += ["-X", "PUT", "-H", "Content-Type: application/json"]
        command += ["-d", put_json]
    return deferToThread(
        subprocess.run,
        [*command, f"http://localhost{path}"],
        capture_output=True,
        text=True,
        timeout=10,
    )


class AdminAPITests(SynchronousTestCase):
    def setUp(self):
        self.settings = make_settings(services={"web": ("127.0.0.1", 80)})
        self.treq = StubTreq(ClientAdminAPI(self.settings).app.resource())

    def put(self, body: bytes, content_type: str = "application/json"):
        response = self.successResultOf(
            self.treq.put(
                "http://admin/liveconfig",
                data=body,
                headers={"Content-Type": [content_type]},
            )
        )
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_get(self):
        """GET answers the map in force, in the config file's form."""
        response = self.successResultOf(self.treq.get("http://admin/liveconfig"))
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual(body, {"ServiceToLocalAddrMap": {"web": "127.0.0.1:80"}})

    def test_put_replaces_map(self):
        """PUT swaps the map in at once and answers it."""
        code, body = self.put(
            json.dumps(
                {"ServiceToLocalAddrMap": {"ssh": "[::1]:22", "db": "localhost:5432"}}
            ).encode()
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            body,
            {"ServiceToLocalAddrMap": {"db": "localhost:5432", "ssh": "[::1]:22"}},
        )
        self.assertEqual(
            self.settings.services, {"ssh": ("::1", 22), "db": ("localhost", 5432)}
        )

    def test_bad_requests_change_nothing(self):
        """Every bad body gets a clear error and leaves the map as it was."""
        cases = [
            (b'{"ServiceToLocalAddrMap": {"web": "nope"}}', 400, "host:port"),
            (b'{"ServiceToLocalAddrMap": []}', 400, "ServiceToLocalAddrMap"),
            (b'{"Other": {}}', 400, "unknown field"),
            (b"{}", 400, "missing"),
            (b"[1]", 422, "JSON object"),
            (b"{", 422, "not JSON"),
        ]
        for body, status, fragment in cases:
            code, answer = self.put(body)
            self.assertEqual(code, status, body)
            self.assertIn(fragment, answer["error"])
        code, answer = self.put(b"{}", "text/plain")
        self.assertEqual(code, 415)
        self.assertEqual(self.settings.services, {"web": ("127.0.0.1", 80)})

    def test_strict_json(self):
        """A key given twice, NaN, or bytes that are not UTF-8 are refused (422)."""
        cases = [
            (
                b'{"ServiceToLocalAddrMap": {"ssh": "[::1]:22"},'
                b' "ServiceToLocalAddrMap": {}}',
                "not JSON: the key 'ServiceToLocalAddrMap' is given twice",
            ),
            (
                b'{"ServiceToLocalAddrMap": {"a": "127.0.0.1:1", "a": "127.0.0.1:2"}}',
                "not JSON: the key 'a' is given twice",
            ),
            (b'{"ServiceToLocalAddrMap": {"a": NaN}}', "not JSON: NaN"),
            (b'{"ServiceToLocalAddrMap": {"a": "\xff"}}', "not UTF-8"),
            (b'{"ServiceToLocalAddrMap": {"a": ' + b"9" * 5000 + b"}}", "not JSON"),
        ]
        for body, fragment in cases:
            code, answer = self.put(body)
            self.assertEqual(code, 422, body[:60])
            self.assertIn(fragment, answer["error"], body[:60])
        self.assertEqual(self.settings.services, {"web": ("127.0.0.1", 80)})


class LiveConfigTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_new_service_without_reconnecting(self):
        """A service added over the Unix socket works; the session stays up."""
        # Unix socket paths are short: keep it out of the deep trial folder.
        # (Removed after the deployment stops: cleanups run last-in first.)
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        deployment = Deployment(False, self.mktemp())
        self.addCleanup(deployment.stop)
        deployment.start_server()
        sock = os.path.join(folder, "admin.sock")
        deployment.start_client("TestClient1", {}, admin_socket=sock)
        yield deployment.wait_connected("TestClient1")
        session = deployment.server.registry.session_for("TestClient1")
        self.assertEqual(os.stat(sock).st_mode & 0o777, 0o600)

        body = json.dumps(
            {"ServiceToLocalAddrMap": {"echo": f"127.0.0.1:{backend_port}"}}
        )
        result = yield curl_unix(sock, "/liveconfig", put_json=body)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("echo", json.loads(result.stdout)["ServiceToLocalAddrMap"])

        port = free_port()
        code, answer = yield deployment.put_tunnels(
            [tunnel("TestClient1", port, "echo")]
        )
        self.assertEqual(code, 200, answer)
        user = yield connect_user(port)
        user.transport.write(b"live")
        user.transport.loseWriteConnection()
        yield user.done
        self.assertEqual(user.data, b"live")
        self.assertIs(deployment.server.registry.session_for("TestClient1"), session)


class ManagementSocketTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_management_api_on_unix_socket(self):
        """With ManagementSocket, the API answers on the socket (mode 0600)."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder, True)
        sock = os.path.join(folder, "mgmt.sock")
        deployment = Deployment(False, self.mktemp(), management_socket=sock)
        self.addCleanup(deployment.stop)
        deployment.start_server()
        self.assertEqual(os.stat(sock).st_mode & 0o777, 0o600)
        result = yield curl_unix(sock, "/ping")
        self.assertEqual(result.stdout, "pong")
        result = yield curl_unix(sock, "/tunnels", put_json="[]")
        self.assertEqual(json.loads(result.stdout), [])
