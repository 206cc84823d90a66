"""A throwaway PKI for tests, generated once per test process.

Key generation is fast but not free, so every suite shares one set of
files in a temporary directory that is removed when the process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from threshold.keygen import make_ca, make_client_cert, make_server_cert, write_pair

__all__ = ["CLIENT_NAMES", "TestPki", "rsa_server_files", "test_pki"]

#: The client certificates signed by the main CA.
CLIENT_NAMES = ("TestClient1", "TestClient2", "operator")


@dataclass(frozen=True)
class TestPki:
    """Paths of the test CA, server and client certificates and keys."""

    __test__ = False  # not a test case, whatever the name says

    directory: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    other_ca_cert: str
    other_ca_key: str
    other_client_cert: str
    other_client_key: str

    def client_cert(self, name: str) -> str:
        """Return the certificate path of client ``name`` (main CA)."""
        return self._client_path(name, "crt")

    def client_key(self, name: str) -> str:
        """Return the key path of client ``name`` (main CA)."""
        return self._client_path(name, "key")

    def _client_path(self, name: str, ext: str) -> str:
        if name not in CLIENT_NAMES:
            raise KeyError(f"no test certificate for {name!r}; have {CLIENT_NAMES}")
        return os.path.join(self.directory, "clients", f"{name}.{ext}")


_cache: TestPki | None = None


def test_pki() -> TestPki:
    """Return the shared test PKI, generating it on first use."""
    global _cache
    if _cache is not None:
        return _cache
    directory = tempfile.mkdtemp(prefix="threshold-test-pki-")
    atexit.register(shutil.rmtree, directory, True)

    def path(*parts: str) -> str:
        return os.path.join(directory, *parts)

    for sub in ("clients", "other"):
        os.mkdir(path(sub))

    ca = make_ca("threshold test CA")
    write_pair(ca, path("ca.crt"), path("ca.key"))
    server = make_server_cert(ca, ["localhost"], ["127.0.0.1", "::1"])
    write_pair(server, path("server.crt"), path("server.key"))
    for name in CLIENT_NAMES:
        pair = make_client_cert(ca, name)
        write_pair(pair, path("clients", f"{name}.crt"), path("clients", f"{name}.key"))

    other_ca = make_ca("unrelated test CA")
    write_pair(other_ca, path("other", "ca.crt"), path("other", "ca.key"))
    other_client = make_client_cert(other_ca, "TestClient1")
    write_pair(
        other_client, path("other", "TestClient1.crt"), path("other", "TestClient1.key")
    )

    _cache = TestPki(
        directory=directory,
        ca_cert=path("ca.crt"),
        ca_key=path("ca.key"),
        server_cert=path("server.crt"),
        server_key=path("server.key"),
        other_ca_cert=path("other", "ca.crt"),
        other_ca_key=path("other", "ca.key"),
        other_client_cert=path("other", "TestClient1.crt"),
        other_client_key=path("other", "TestClient1.key"),
    )
    return _cache


_rsa_cache: tuple[str, str] | None = None


def signed_by_test_ca(
    name: str, key: Any, common_name: str, ips: tuple[str, ...], usages: list[Any]
) -> tuple[str, str]:
    """A certificate for ``key`` signed by the test CA, for localhost and
    ``ips``, with extended key ``usages``: written as ``name``.crt and .key
    in the test PKI's directory; (cert, key) paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    pki = test_pki()
    with open(pki.ca_cert, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(pki.ca_key, "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    now = datetime.datetime.now(datetime.UTC)
    san: list[x509.GeneralName] = [x509.DNSName("localhost")]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path = os.path.join(pki.directory, f"{name}.crt")
    key_path = os.path.join(pki.directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def rsa_server_files() -> tuple[str, str]:
    """An RSA server certificate and key from the test CA: (cert, key) paths.

    threshold's own keys are ECDSA, but an operator may bring an RSA
    certificate, and only with one can a client ask for static-RSA key
    exchange. Made on first use (RSA key generation takes a moment).
    """
    global _rsa_cache
    if _rsa_cache is None:
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _rsa_cache = signed_by_test_ca(
            "rsa-server",
            key,
            "localhost",
            ("127.0.0.1", "::1"),
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
    return _rsa_cache


# trial collects module-level names that look like tests only from test_*
# modules, but keep pytest-style collectors away from the factory too.
test_pki.__test__ = False  # type: ignore[attr-defined]
