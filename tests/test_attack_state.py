"""The state file against a real API and a real server process.

Concurrent ``PUT /tunnels`` must leave the file holding the set in force
(the newest), and a restart with a saved port now taken must restore the
rest, say loudly what it could not, and keep the file until the next PUT.
"""

from __future__ import annotations

import json
import os
import socket

from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.faultkit import TWISTD, TwistdProcess
from tests.support import Deployment, free_port, tunnel, wait_until
from tests.test_attack_management import management_site_of
from tests.test_faults import connected, server_json, wait_api, wait_ping
from threshold.server.statefile import read_state
from threshold.server.tunnels import parse_tunnels

CLIENT = "TestClient1"


def put_request(tunnels: list[dict]) -> bytes:
    body = json.dumps(tunnels).encode()
    return (
        b"PUT /tunnels HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (blocking: run it in a thread)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class ConcurrentPutTests(TestCase):
    timeout = 30

    async def test_file_holds_the_set_in_force(self):
        """Two PUTs read in the same turn: the first must wait for a socket to
        close, the second then applies at once. Both answer 200, and the file
        read back is the set in force (the second), not the first."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "tunnels.json")
        deployment = Deployment(False, directory, state_file=path)
        deployment.start_server()
        self.addCleanup(deployment.stop)
        deployment.start_client(CLIENT, {"svc": ("127.0.0.1", 1)})
        await deployment.wait_connected(CLIENT)
        a, b, c = (tunnel(CLIENT, free_port(), "svc") for _ in range(3))
        code, _ = await deployment.put_tunnels([a, b])
        self.assertEqual(code, 200)
        sockets = [
            socket.create_connection(("127.0.0.1", deployment.management_port))
            for _ in range(2)
        ]
        for sock in sockets:
            self.addCleanup(sock.close)
        # Both accepted (and read from) by the server before anything is sent.
        site = management_site_of(deployment)
        await wait_until(lambda: len(site.pending) == 2, what="the connections")
        # Both requests are in the server's socket buffers before its next
        # turn: the first removes b (a socket to close: it waits), the second
        # then adds c and removes nothing (no wait).
        sockets[0].sendall(put_request([a]))
        sockets[1].sendall(put_request([a, c]))
        answers = await gatherResults(
            [deferToThread(read_all, sock) for sock in sockets]
        )
        for answer in answers:
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        code, in_force = await deployment.get_json("/tunnels")
        self.assertEqual(
            [t["ListenPort"] for t in in_force], [a["ListenPort"], c["ListenPort"]]
        )
        with open(path) as f:
            self.assertEqual(json.load(f), in_force)
        self.assertEqual(read_state(path), deployment.server.routes.tunnels())


class RestoreTests(TestCase):
    timeout = 40

    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            self.skipTest(f"no {TWISTD}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    async def test_port_taken_restores_the_rest(self):
        """A saved tunnel whose port is taken is left out, logged, counted and
        listed; the others listen; the file stays until a PUT changes it."""
        deployment = Deployment(False, self.dir)
        self.addCleanup(deployment.stop)
        state = os.path.join(self.dir, "tunnels.json")
        free, taken = free_port(), free_port()
        saved = [tunnel(CLIENT, free, "web"), tunnel(CLIENT, taken, "ssh")]
        saved = [parse_tunnels([t])[0].to_json() for t in saved]
        with open(state, "w") as f:
            json.dump(saved, f)
        before = os.stat(state).st_mtime_ns
        # Someone else holds the port now.
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        self.addCleanup(squatter.close)

        server = TwistdProcess(
            "threshold-server", server_json(deployment, StateFile=state), self.dir, "s"
        )
        self.addCleanup(server.kill)
        server.start()
        await wait_ping(deployment, server)

        code, listed = await deployment.get_json("/tunnels")
        self.assertEqual((code, listed), (200, [saved[0]]))
        with socket.create_connection(("127.0.0.1", free), timeout=5):
            pass
        code, status = await deployment.get_json("/tunnels/status")
        self.assertEqual(
            [{k: t[k] for k in saved[0]} for t in status["Tunnels"]], [saved[0]]
        )
        self.assertEqual(len(status["NotRestored"]), 1)
        entry = status["NotRestored"][0]
        self.assertEqual((entry["Index"], entry["Tunnel"]), (1, saved[1]))
        self.assertIn("already in use", entry["Error"])
        response = await deployment.http().get(deployment.url("/metrics"))
        metrics = (await response.content()).decode()
        self.assertIn("threshold_tunnels_not_restored 1.0", metrics)
        log = server.log_tail(200)
        self.assertIn("state file entry 1 (client TestClient1", log)
        self.assertIn("1 of 2 tunnels restored", log)
        self.assertNotIn("Traceback", log)
        # The file is as it was.
        with open(state) as f:
            self.assertEqual(json.load(f), saved)
        self.assertEqual(os.stat(state).st_mtime_ns, before)

        # The operator changes the set: the file follows, the report clears.
        squatter.close()
        deployment.start_client(CLIENT, {})
        await wait_api(deployment, connected, 10, "the client")
        code, answer = await deployment.put_tunnels(saved)
        self.assertEqual((code, answer), (200, saved))
        with open(state) as f:
            self.assertEqual(json.load(f), saved)
        self.assertGreater(os.stat(state).st_mtime_ns, before)
        code, status = await deployment.get_json("/tunnels/status")
        tunnels = [{k: t[k] for k in saved[0]} for t in status["Tunnels"]]
        self.assertEqual((tunnels, status["NotRestored"]), (saved, []))
