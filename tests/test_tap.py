"""twistd start-up: configuration errors stop with one line, no traceback."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from functools import partial

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.certs import test_pki
from tests.packagekit import copy_checkout
from threshold.tap.common import TlsServerEndpoint, server_endpoint
from threshold.tls import server_options

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


class PackageListTests(TestCase):
    def test_every_package_listed(self):
        """setup.cfg lists every package of the checkout (a wheel has only those)."""
        import configparser

        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        listed = set(config["options"]["packages"].split())
        found = {"twisted.plugins"}
        for folder, _, files in os.walk(os.path.join(ROOT, "threshold")):
            if "__init__.py" in files:
                found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
        self.assertEqual(listed, found)


def _can_build_editable_offline() -> bool:
    """Whether this interpreter's setuptools builds editable wheels by itself."""
    import importlib.util

    import setuptools

    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


class EditableInstallTests(TestCase):
    """``pip install -e .`` (a PEP 660 editable install) gives twistd the plugins."""

    def test_twistd_lists_plugins_after_editable_install(self):
        """After ``pip install -e .`` in a fresh venv, twistd lists both roles.

        A copy of the checkout is installed (``--no-deps``, without build
        isolation, so no network) into a new venv that sees this
        interpreter's packages through a ``.pth`` line; twistd then runs
        from an unrelated folder, with no PYTHONPATH.
        """
        if not _can_build_editable_offline():
            self.skipTest("needs setuptools >= 70.1 or wheel (the test extras)")
        work = os.path.abspath(self.mktemp())
        source = os.path.join(work, "checkout")
        copy_checkout(source)

        venv = os.path.join(work, "venv")
        run = partial(subprocess.run, capture_output=True, text=True, timeout=120)
        result = run([sys.executable, "-m", "venv", "--without-pip", venv])
        self.assertEqual(result.returncode, 0, result.stderr)
        python = os.path.join(venv, "bin", "python")
        site_packages = run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
        with open(os.path.join(site_packages, "deps.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = run(
            [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
             "--no-build-isolation", "-e", source],
            env=env,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)

        elsewhere = os.path.join(work, "elsewhere")
        os.makedirs(elsewhere)
        result = run(
            [python, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            cwd=elsewhere,
            env=env,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("threshold-server", result.stdout)
        self.assertIn("threshold-client", result.stdout)


class ServerEndpointTests(TestCase):
    """Listeners are IPv4 or IPv6 as their address is, TLS when asked."""

    def test_family_follows_address(self):
        """An IPv6 address ("::" included) listens with IPv6, IPv4 with IPv4."""
        reactor = MemoryReactor()
        for host, kind in (
            ("::", TCP6ServerEndpoint),
            ("::1", TCP6ServerEndpoint),
            ("0.0.0.0", TCP4ServerEndpoint),
            ("127.0.0.1", TCP4ServerEndpoint),
        ):
            self.assertIsInstance(server_endpoint(reactor, host, 1, None), kind, host)

    def test_tls_wraps_the_listener(self):
        """With TLS options, every connection is inside TLS on that address."""
        reactor = MemoryReactor()
        pki = test_pki()
        options = server_options(pki.ca_cert, pki.server_key, pki.server_cert)
        endpoint = server_endpoint(reactor, "::", 9057, options)
        self.assertIsInstance(endpoint, TlsServerEndpoint)
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        factory = Factory.forProtocol(Protocol)
        endpoint.listen(factory)
        [(port, wrapper, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9057, "::"))
        self.assertIsInstance(wrapper, TLSMemoryBIOFactory)
        self.assertIs(wrapper.wrappedFactory, factory)
