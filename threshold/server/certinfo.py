"""When certificates end: the server's (from its file) and a client's (from TLS).

``GET /server`` and ``GET /clients`` show ``CertificateNotAfter``; the
event feed warns (``certificate.expiring``) when one ends within
:data:`EXPIRY_WARNING_DAYS` days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import crypto

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "CertificateInfo",
    "from_transport",
    "iso",
    "read_file",
]

#: A certificate ending within this many days is announced.
EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """The end of a certificate's validity and whose it is."""

    not_after: float
    subject: str

    def days_left(self, now: float) -> float:
        """Days until it ends (negative: it has ended)."""
        return (self.not_after - now) / 86400.0

    @property
    def not_after_iso(self) -> str:
        """``notAfter`` in UTC ISO 8601."""
        return iso(self.not_after)


def iso(t: float | None) -> str | None:
    """A time in UTC ISO 8601 (seconds), None for None."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _info(cert: x509.Certificate) -> CertificateInfo:
    return CertificateInfo(
        cert.not_valid_after_utc.timestamp(), cert.subject.rfc4514_string()
    )


def read_file(path: str) -> CertificateInfo | None:
    """The first certificate of a PEM file; None when it cannot be read.

    At start the TLS setup has already refused a file it cannot load, so
    None here means the file changed or went away since.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        return _info(x509.load_pem_x509_certificate(data))
    except (OSError, ValueError):
        return None


def from_transport(transport: object) -> CertificateInfo | None:
    """The TLS peer's verified certificate; None without TLS or certificate."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    if not isinstance(cert, x509.Certificate):
        return None
    return _info(cert)
