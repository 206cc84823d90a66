"""Tests for threshold.keygen: the CA, server and client certificates and CLI."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import shutil
import stat
import subprocess
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.trial.unittest import SynchronousTestCase

from tests.components import missing
from threshold.keygen import (
    KeygenError,
    KeyPair,
    main,
    make_ca,
    make_client_cert,
    make_server_cert,
    write_pair,
)


def load(pair: KeyPair) -> tuple[x509.Certificate, object]:
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    return cert, key


def common_name(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def pyopenssl_verify(ca_pem: bytes, cert_pem: bytes) -> None:
    """Verify ``cert_pem`` against ``ca_pem`` with OpenSSL; raise if invalid."""
    store = crypto.X509Store()
    store.add_cert(
        crypto.X509.from_cryptography(x509.load_pem_x509_certificate(ca_pem))
    )
    leaf = crypto.X509.from_cryptography(x509.load_pem_x509_certificate(cert_pem))
    crypto.X509StoreContext(store, leaf).verify_certificate()


# Key generation is cheap but shared to keep the suite fast.
_CA = make_ca("test root")
_OTHER_CA = make_ca("other root")
_SERVER = make_server_cert(
    _CA, ["localhost", "tunnel.example.com"], ["127.0.0.1", "::1"]
)
_CLIENT = make_client_cert(_CA, "TestClient1@example.org")


class CertificateTests(SynchronousTestCase):
    def test_ca(self):
        """The CA is self-signed, CA:true, may sign certificates, ECDSA P-256."""
        cert, key = load(_CA)
        self.assertEqual(common_name(cert), "test root")
        self.assertEqual(cert.issuer, cert.subject)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertIsInstance(cert.signature_hash_algorithm, hashes.SHA256)
        cert.verify_directly_issued_by(cert)

    def test_ca_default_name_and_days(self):
        """By default the CA is called "threshold CA" and lasts ten years."""
        cert, _ = load(make_ca(days=3650))
        self.assertEqual(common_name(cert), "threshold CA")
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertAlmostEqual(lifetime.days, 3650, delta=1)

    def test_server(self):
        """The server cert has the names and IPs as SANs and serverAuth."""
        cert, key = load(_SERVER)
        self.assertEqual(common_name(cert), "localhost")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["localhost", "tunnel.example.com"]
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertFalse(
            cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        )
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        cert.verify_directly_issued_by(load(_CA)[0])

    def test_server_ip_only(self):
        """A server cert with only IPs takes the first IP as its CN."""
        cert, _ = load(make_server_cert(_CA, [], ["192.0.2.1"]))
        self.assertEqual(common_name(cert), "192.0.2.1")

    def test_client(self):
        """The client cert has the CN asked for and clientAuth only."""
        cert, _ = load(_CLIENT)
        self.assertEqual(common_name(cert), "TestClient1@example.org")
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertEqual(cert.issuer, load(_CA)[0].subject)

    def test_pyopenssl_store_verifies(self):
        """OpenSSL's X509Store accepts the leaves under the CA, not another CA."""
        pyopenssl_verify(_CA.cert_pem, _SERVER.cert_pem)
        pyopenssl_verify(_CA.cert_pem, _CLIENT.cert_pem)
        self.assertRaises(
            crypto.X509StoreContextError,
            pyopenssl_verify,
            _OTHER_CA.cert_pem,
            _CLIENT.cert_pem,
        )

    def test_openssl_verify(self):
        """The openssl command line accepts the chain for its purpose."""
        if shutil.which("openssl") is None:
            raise missing("openssl is not installed")
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        paths = {}
        for name, pem in (
            ("ca", _CA.cert_pem),
            ("other", _OTHER_CA.cert_pem),
            ("server", _SERVER.cert_pem),
            ("client", _CLIENT.cert_pem),
        ):
            paths[name] = os.path.join(directory, name + ".crt")
            with open(paths[name], "wb") as f:
                f.write(pem)

        def verify(ca: str, leaf: str, purpose: str) -> int:
            return subprocess.run(
                [
                    "openssl",
                    "verify",
                    "-purpose",
                    purpose,
                    "-CAfile",
                    paths[ca],
                    paths[leaf],
                ],
                capture_output=True,
            ).returncode

        self.assertEqual(verify("ca", "server", "sslserver"), 0)
        self.assertEqual(verify("ca", "client", "sslclient"), 0)
        self.assertNotEqual(verify("other", "server", "sslserver"), 0)
        # The EKUs keep each certificate to its role.
        self.assertNotEqual(verify("ca", "client", "sslserver"), 0)
        self.assertNotEqual(verify("ca", "server", "sslclient"), 0)

    def test_keys_match(self):
        """Each key pair's key belongs to its certificate."""
        for pair in (_CA, _SERVER, _CLIENT):
            cert, key = load(pair)
            self.assertEqual(
                cert.public_key().public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo,
                ),
                key.public_key().public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo,
                ),
            )

    def test_bad_input(self):
        """Bad names, IPs, days or CA material raise KeygenError."""
        self.assertRaises(KeygenError, make_server_cert, _CA, [], [])
        self.assertRaises(KeygenError, make_server_cert, _CA, ["x"], ["not-an-ip"])
        self.assertRaises(KeygenError, make_server_cert, _CA, "localhost", [])
        self.assertRaises(KeygenError, make_client_cert, _CA, "")
        self.assertRaises(KeygenError, make_client_cert, _CA, "x" * 65)
        self.assertRaises(KeygenError, make_ca, "ca", 0)
        self.assertRaises(KeygenError, make_client_cert, KeyPair(b"x", b"y"), "c")
        mixed = KeyPair(_CA.cert_pem, _OTHER_CA.key_pem)
        with self.assertRaises(KeygenError) as cm:
            make_client_cert(mixed, "c")
        self.assertIn("does not match", str(cm.exception))


class WriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def test_modes(self):
        """The key is written with mode 0600, the certificate 0644."""
        cert, key = os.path.join(self.dir, "a.crt"), os.path.join(self.dir, "a.key")
        write_pair(_CLIENT, cert, key)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(cert).st_mode), 0o644)
        with open(key, "rb") as f:
            self.assertEqual(f.read(), _CLIENT.key_pem)

    def test_refuse_overwrite(self):
        """Existing files are kept unless force is given."""
        cert, key = os.path.join(self.dir, "a.crt"), os.path.join(self.dir, "a.key")
        with open(key, "wb") as f:
            f.write(b"precious")
        with self.assertRaises(KeygenError) as cm:
            write_pair(_CLIENT, cert, key)
        self.assertIn("already exists", str(cm.exception))
        with open(key, "rb") as f:
            self.assertEqual(f.read(), b"precious")
        self.assertFalse(os.path.exists(cert))

    def test_force(self):
        """With force, existing files are replaced and the key made 0600."""
        cert, key = os.path.join(self.dir, "a.crt"), os.path.join(self.dir, "a.key")
        with open(key, "wb") as f:
            f.write(b"old")
        os.chmod(key, 0o644)
        write_pair(_CLIENT, cert, key, force=True)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        with open(key, "rb") as f:
            self.assertEqual(f.read(), _CLIENT.key_pem)


class CommandLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def test_full_pki(self):
        """ca, server and client commands write a chain that verifies."""
        ca_dir, out = self.path("ca"), self.path("out")
        self.assertEqual(self.run_main("ca", "--out", ca_dir, "--cn", "My CA")[0], 0)
        status, stdout, _ = self.run_main(
            "server", "--ca-dir", ca_dir, "--out", out,
            "--name", "tunnel.example.com", "--name", "alt.example.com",
            "--ip", "192.0.2.1",
        )  # fmt: skip
        self.assertEqual(status, 0)
        self.assertIn("server.crt", stdout)
        status, _, _ = self.run_main(
            "client", "--ca-dir", ca_dir, "--out", out, "TestClient1",
            "--domain", "example.org",
        )  # fmt: skip
        self.assertEqual(status, 0)
        self.assertEqual(
            self.run_main("client", "--ca-dir", ca_dir, "--out", out, "op")[0], 0
        )

        for key in ("ca/ca.key", "out/server.key", "out/TestClient1.key", "out/op.key"):
            self.assertEqual(stat.S_IMODE(os.stat(self.path(key)).st_mode), 0o600, key)

        def read(name: str) -> bytes:
            with open(self.path(name), "rb") as f:
                return f.read()

        ca = x509.load_pem_x509_certificate(read("ca/ca.crt"))
        self.assertEqual(common_name(ca), "My CA")
        server = x509.load_pem_x509_certificate(read("out/server.crt"))
        san = server.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName),
            ["tunnel.example.com", "alt.example.com"],
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("192.0.2.1")]
        )
        client = x509.load_pem_x509_certificate(read("out/TestClient1.crt"))
        self.assertEqual(common_name(client), "TestClient1@example.org")
        op = x509.load_pem_x509_certificate(read("out/op.crt"))
        self.assertEqual(common_name(op), "op")
        for name in ("out/server.crt", "out/TestClient1.crt", "out/op.crt"):
            pyopenssl_verify(read("ca/ca.crt"), read(name))

    def test_refuses_overwrite(self):
        """Running ca twice fails with exit 2 and keeps the first CA."""
        ca_dir = self.path("ca")
        self.assertEqual(self.run_main("ca", "--out", ca_dir)[0], 0)
        with open(self.path("ca", "ca.key"), "rb") as f:
            first = f.read()
        status, _, stderr = self.run_main("ca", "--out", ca_dir)
        self.assertEqual(status, 2)
        self.assertIn("already exists", stderr)
        self.assertIn("--force", stderr)
        with open(self.path("ca", "ca.key"), "rb") as f:
            self.assertEqual(f.read(), first)
        self.assertEqual(self.run_main("ca", "--out", ca_dir, "--force")[0], 0)
        with open(self.path("ca", "ca.key"), "rb") as f:
            self.assertNotEqual(f.read(), first)

    def test_missing_ca(self):
        """A missing CA directory is reported on stderr with exit 2."""
        status, _, stderr = self.run_main(
            "server", "--ca-dir", self.path("none"), "--out", self.dir, "--name", "x"
        )
        self.assertEqual(status, 2)
        self.assertIn("ca.crt", stderr)
        self.assertEqual(stderr.count("\n"), 1)

    def test_bad_client_id(self):
        """A client id the config would refuse is refused here too."""
        self.run_main("ca", "--out", self.dir)
        for bad in ("a@b", "../x", "a b"):
            status, _, stderr = self.run_main(
                "client", "--ca-dir", self.dir, "--out", self.dir, bad
            )
            self.assertEqual(status, 2)
            self.assertIn("invalid client id", stderr)
        self.assertFalse(os.path.exists(self.path("x.key")))

    def test_server_needs_a_name(self):
        """The server command without --name or --ip fails cleanly."""
        self.run_main("ca", "--out", self.dir)
        status, _, stderr = self.run_main(
            "server", "--ca-dir", self.dir, "--out", self.dir
        )
        self.assertEqual(status, 2)
        self.assertIn("at least one name or IP", stderr)
        status, _, stderr = self.run_main(
            "server", "--ca-dir", self.dir, "--out", self.dir, "--ip", "nope"
        )
        self.assertEqual(status, 2)
        self.assertIn("invalid IP address", stderr)

    def test_usage_errors(self):
        """Bad command lines exit 2 with argparse's message."""
        for argv in ([], ["bogus"], ["ca"], ["ca", "--out", self.dir, "--days", "x"]):
            status, _, stderr = self.run_main(*argv)
            self.assertEqual(status, 2, argv)
            self.assertIn("threshold-keygen", stderr)
