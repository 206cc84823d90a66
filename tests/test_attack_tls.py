"""TLS suites and versions on the real ports, probed with ``openssl s_client``.

A recorded session must not be decryptable later by whoever obtains the
server's key: no static-RSA key exchange, no CBC or SHA-1 suites, on either
port. The control port (both ends threshold) takes TLS 1.3 only; the
management port takes TLS 1.2 with ECDHE and an AEAD cipher, or TLS 1.3.
The server uses an RSA certificate here: only with one can a client ask for
static-RSA key exchange at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.certs import rsa_server_files
from tests.support import Deployment

#: Suites without forward secrecy or without AEAD, each refused on both ports.
WEAK_TLS12 = (
    "AES128-SHA",  # static RSA, CBC, SHA-1
    "AES256-SHA",  # static RSA, CBC, SHA-1
    "AES128-GCM-SHA256",  # static RSA
    "AES256-GCM-SHA384",  # static RSA
    "DHE-RSA-AES128-GCM-SHA256",  # finite-field DH: not offered
    "ECDHE-RSA-AES128-SHA",  # forward secret, but CBC with SHA-1
    "ECDHE-RSA-AES256-SHA384",  # forward secret, but CBC
)

#: The TLS 1.2 suites the management port takes (with an RSA certificate).
GOOD_TLS12 = (
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
)


@dataclass(frozen=True)
class Probe:
    """What one ``openssl s_client`` run negotiated (None: refused)."""

    protocol: str | None
    cipher: str | None
    output: str


def _parse(output: str) -> Probe:
    """Read ``s_client -brief``'s summary, printed once the handshake is done."""
    if "CONNECTION ESTABLISHED" not in output:
        return Probe(None, None, output)
    protocol = re.search(r"^Protocol version: (\S+)", output, re.MULTILINE)
    cipher = re.search(r"^Ciphersuite: (\S+)", output, re.MULTILINE)
    return Probe(
        protocol.group(1) if protocol else None,
        cipher.group(1) if cipher else None,
        output,
    )


class TlsSuiteTests(TestCase):
    timeout = 60

    def setUp(self):
        self.openssl = shutil.which("openssl")
        if self.openssl is None:
            raise SkipTest("openssl not installed")
        cert, key = rsa_server_files()
        self.deployment = Deployment(
            True,
            self.mktemp(),
            server_tls_certificate_file=cert,
            server_tls_key_file=key,
        )
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.ports = {
            "control": self.deployment.control_port,
            "management": self.deployment.management_port,
        }

    def s_client(self, port: int, *options: str):
        """Handshake with ``openssl s_client`` (with a client certificate)."""
        pki = self.deployment.pki
        command = [
            self.openssl,
            "s_client",
            "-brief",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            pki.ca_cert,
            "-cert",
            pki.client_cert("operator"),
            "-key",
            pki.client_key("operator"),
            *options,
        ]

        def run() -> Probe:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=20,
            )
            return _parse(result.stdout + result.stderr)

        return deferToThread(run)

    @inlineCallbacks
    def test_weak_tls12_suites_refused_on_both_ports(self):
        """Static RSA, DHE and CBC suites are refused by both ports."""
        for name, port in self.ports.items():
            for cipher in WEAK_TLS12:
                # @SECLEVEL=0 so that this client offers what it is asked to.
                probe = yield self.s_client(
                    port, "-tls1_2", "-cipher", f"{cipher}@SECLEVEL=0"
                )
                self.assertIsNone(probe.cipher, f"{name} took {cipher}")

    @inlineCallbacks
    def test_old_versions_refused_on_both_ports(self):
        """TLS 1.0 and 1.1 are refused by both ports."""
        for name, port in self.ports.items():
            for version in ("-tls1", "-tls1_1"):
                probe = yield self.s_client(
                    port, version, "-cipher", "DEFAULT@SECLEVEL=0"
                )
                self.assertIsNone(probe.cipher, f"{name} took {version}")

    @inlineCallbacks
    def test_management_takes_ecdhe_aead_tls12(self):
        """The management port takes TLS 1.2 with ECDHE and an AEAD cipher."""
        for cipher in GOOD_TLS12:
            probe = yield self.s_client(
                self.ports["management"], "-tls1_2", "-cipher", cipher
            )
            self.assertEqual(
                (probe.protocol, probe.cipher), ("TLSv1.2", cipher), probe.output
            )

    @inlineCallbacks
    def test_control_refuses_tls12(self):
        """The control port refuses TLS 1.2, even with a good suite."""
        for cipher in GOOD_TLS12:
            probe = yield self.s_client(
                self.ports["control"], "-tls1_2", "-cipher", cipher
            )
            self.assertIsNone(probe.cipher, f"control took TLS 1.2 {cipher}")

    @inlineCallbacks
    def test_tls13_on_both_ports(self):
        """Both ports take TLS 1.3, which is what a client offers first."""
        for name, port in self.ports.items():
            for options in (("-tls1_3",), ()):
                probe = yield self.s_client(port, *options)
                self.assertEqual(probe.protocol, "TLSv1.3", (name, probe.output))

    @inlineCallbacks
    def test_real_client_connects_with_tls13(self):
        """The tunnel client still connects to this server, over TLS 1.3."""
        self.deployment.start_client("TestClient1", {})
        yield self.deployment.wait_connected("TestClient1")
        session = self.deployment.server.registry.session_for("TestClient1")
        handle = session.transport.getHandle()
        self.assertEqual(handle.get_protocol_version_name(), "TLSv1.3")
