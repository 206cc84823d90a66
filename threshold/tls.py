"""Mutual TLS setup for threshold's control connection and management API.

Both sides trust exactly one CA file: the server requires a client
certificate signed by it, the client checks the server's certificate
against it and against the name it dialed. Certificates and keys are
loaded and checked when the options are built, so a bad file stops the
program at start with a ``ConfigError`` naming the file, not at the first
connection.

Every connection has forward secrecy and an AEAD cipher: a recorded session
cannot be decrypted later by whoever obtains a key. The tunnel control port
speaks only TLS 1.3 (both ends are threshold); the management port also
takes TLS 1.2 for operators' tools, with ECDHE key exchange and AES-GCM or
ChaCha20-Poly1305 only (Mozilla's "intermediate" suites without DHE).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from threshold.config import ConfigError

__all__ = [
    "CONTROL_MINIMUM_TLS",
    "MANAGEMENT_MINIMUM_TLS",
    "TLS12_CIPHERS",
    "ClientCertPolicy",
    "client_creator",
    "peer_common_name",
    "server_options",
]

#: The lowest TLS version of the tunnel control connection, both ends.
CONTROL_MINIMUM_TLS = ssl.TLSVersion.TLSv1_3
#: The lowest TLS version of the management API (operators' tools).
MANAGEMENT_MINIMUM_TLS = ssl.TLSVersion.TLSv1_2

#: The TLS 1.2 suites offered: ECDHE (forward secrecy) with an AEAD cipher.
#: No static RSA, no CBC, no SHA-1 MAC; no DHE either (Twisted offers it only
#: with DH parameters, which threshold never sets). TLS 1.3's own suites are
#: all forward secret and AEAD, and are left as OpenSSL has them.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS)


def _error(source: str, field: str, message: str) -> ConfigError:
    return ConfigError(source, message, field)


def _read(path: str, what: str, field: str, source: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        raise _error(
            source, field, f"cannot load {what} from {path}: {reason}"
        ) from None


def _load_certificates(path: str, field: str, source: str) -> list[x509.Certificate]:
    """Load every PEM certificate in ``path`` (at least one)."""
    data = _read(path, "certificate", field, source)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise _error(
            source, field, f"cannot load certificate from {path}: {e}"
        ) from None
    return certs


def _load_key(path: str, field: str, source: str) -> crypto.PKey:
    data = _read(path, "private key", field, source)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise _error(
            source,
            field,
            f"cannot load private key from {path}: the key is encrypted with a"
            " password; threshold needs an unencrypted key file (mode 0600)",
        ) from None
    except (ValueError, crypto.Error) as e:
        raise _error(
            source, field, f"cannot load private key from {path}: {e}"
        ) from None
    try:
        return crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]
    except TypeError as e:
        raise _error(
            source, field, f"cannot load private key from {path}: {e}"
        ) from None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _trust_root(ca_file: str, source: str) -> ssl.IOpenSSLTrustRoot:
    certs = _load_certificates(ca_file, "CaCertificateFile", source)
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certs]
    )


def _identity(
    key_file: str,
    cert_file: str,
    key_field: str,
    cert_field: str,
    source: str,
) -> tuple[ssl.PrivateCertificate, list[crypto.X509]]:
    """Load our certificate and key; return them and any chain certificates."""
    certs = _load_certificates(cert_file, cert_field, source)
    key = _load_key(key_file, key_field, source)
    if _spki(key.to_cryptography_key().public_key()) != _spki(certs[0].public_key()):
        raise _error(
            source,
            key_field,
            f"private key {key_file} does not match certificate {cert_file}",
        )
    x509s = [crypto.X509.from_cryptography(c) for c in certs]
    private = ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate(x509s[0]), ssl.KeyPair(key)
    )
    return private, x509s[1:]


def server_options(
    ca_file: str,
    key_file: str,
    cert_file: str,
    source: str = "config",
    *,
    minimum: ssl.TLSVersion = MANAGEMENT_MINIMUM_TLS,
) -> ssl.CertificateOptions:
    """Build server TLS options that require a client certificate from the CA.

    Any intermediate certificates after the first one in ``cert_file`` are
    sent along as the chain. ``minimum`` is the lowest TLS version taken:
    :data:`CONTROL_MINIMUM_TLS` for the tunnel control port,
    :data:`MANAGEMENT_MINIMUM_TLS` (the default) for the management port.
    """
    trust_root = _trust_root(ca_file, source)
    identity, chain = _identity(
        key_file, cert_file, "ServerTlsKeyFile", "ServerTlsCertificateFile", source
    )
    return ssl.CertificateOptions(
        privateKey=identity.privateKey.original,
        certificate=identity.original,
        extraCertChain=chain,
        # A trustRoot makes Twisted verify the peer and require its certificate.
        trustRoot=trust_root,
        raiseMinimumTo=minimum,
        acceptableCiphers=_CIPHERS,
    )


def client_creator(
    ca_file: str,
    key_file: str,
    cert_file: str,
    hostname: str,
    source: str = "config",
) -> IOpenSSLClientConnectionCreator:
    """Build client TLS options: present our certificate, verify the server.

    The server must have a certificate from the CA valid for ``hostname``
    (a DNS name or an IP address, matched against the subjectAltName).
    This is the tunnel client's side of the control connection: TLS 1.3 only.
    """
    policy = ClientCertPolicy(
        ca_file, key_file, cert_file, source, minimum=CONTROL_MINIMUM_TLS
    )
    return policy.creator(hostname)


@implementer(IPolicyForHTTPS)
class ClientCertPolicy:
    """An HTTPS policy for treq/Agent that authenticates with a client cert.

    ``minimum`` is the lowest TLS version offered (by default the
    management API's).
    """

    def __init__(
        self,
        ca_file: str,
        key_file: str,
        cert_file: str,
        source: str = "config",
        *,
        minimum: ssl.TLSVersion = MANAGEMENT_MINIMUM_TLS,
    ) -> None:
        self._minimum = minimum
        self._trust_root = _trust_root(ca_file, source)
        self._identity, _ = _identity(
            key_file,
            cert_file,
            "ClientTlsKeyFile",
            "ClientTlsCertificateFile",
            source,
        )

    def creator(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Return connection options for a server named ``hostname``."""
        return ssl.optionsForClientTLS(
            hostname,
            trustRoot=self._trust_root,
            clientCertificate=self._identity,
            extraCertificateOptions={
                "raiseMinimumTo": self._minimum,
                "acceptableCiphers": _CIPHERS,
            },
        )

    def creatorForNetloc(  # noqa: N802 (the IPolicyForHTTPS name)
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        """Return connection options for ``hostname`` (from the request URL)."""
        return self.creator(hostname.decode("ascii"))


def peer_common_name(transport: object) -> str | None:
    """Return the CN of the TLS peer's verified certificate, or None.

    None when the transport is not TLS, the handshake has not finished, the
    peer sent no certificate, or the subject has no single CN. With the
    options above a certificate is only ever present once it verified.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    cert = get()
    if cert is None:
        return None
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    if not isinstance(cert, x509.Certificate):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
