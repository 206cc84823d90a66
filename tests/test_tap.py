"""twistd start-up: configuration errors stop with one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def twistd(*args: str, cwd: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


class ConfigErrorTests(TestCase):
    """What an operator sees when a config file is wrong."""

    def setUp(self):
        if not os.path.exists(TWISTD):
            self.skipTest(f"no twistd next to {sys.executable}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def assert_one_line(self, result, *fragments):
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    def test_missing_server_config(self):
        """A missing file names the file."""
        result = twistd("threshold-server", "-c", "nope.json", cwd=self.dir)
        self.assert_one_line(result, "nope.json")

    def test_unknown_field(self):
        """An unknown field is named, with a suggestion."""
        path = os.path.join(self.dir, "server.json")
        with open(path, "w") as f:
            json.dump({"UseTls": False, "TunnelControlPortt": 9000}, f)
        result = twistd("threshold-server", "-c", path, cwd=self.dir)
        self.assert_one_line(result, "server.json", "TunnelControlPortt")

    def test_mistyped_client_field(self):
        """A field of the wrong type is named with what was expected."""
        path = os.path.join(self.dir, "client.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "ClientId": "c1",
                    "ServerHost": "localhost",
                    "UseTls": "yes",
                    "ServiceToLocalAddrMap": {},
                },
                f,
            )
        result = twistd("threshold-client", "-c", path, cwd=self.dir)
        self.assert_one_line(result, "client.json", "UseTls")

    def test_unreadable_certificate(self):
        """A certificate file that is not a certificate stops start-up."""
        for name in ("ca.crt", "server.key", "server.crt"):
            with open(os.path.join(self.dir, name), "w") as f:
                f.write("not PEM\n")
        path = os.path.join(self.dir, "server.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "UseTls": True,
                    "CaCertificateFile": "ca.crt",
                    "ServerTlsKeyFile": "server.key",
                    "ServerTlsCertificateFile": "server.crt",
                },
                f,
            )
        result = twistd("threshold-server", "-c", path, cwd=self.dir)
        self.assert_one_line(result, "server.json")
