"""Certificate generation for threshold: a CA, server and client certificates.

threshold's TLS is mutual and pinned to one CA, so an operator (or a test)
needs a small private PKI. Keys are ECDSA P-256, signatures SHA-256.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from threshold.schema import CLIENT_ID, SchemaError

__all__ = [
    "KeyPair",
    "KeygenError",
    "main",
    "make_ca",
    "make_client_cert",
    "make_p12",
    "make_server_cert",
    "write_pair",
]

# CA keys that can sign: ours are ECDSA, an existing CA made elsewhere may not be.
_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# Allow for clocks that are a little behind the issuer's.
_BACKDATE = datetime.timedelta(minutes=5)


class KeygenError(Exception):
    """A certificate could not be made or written; the message says why."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise KeygenError("the common name must not be empty")
    if len(common_name) > 64:
        # RFC 5280 upper bound for commonName.
        raise KeygenError(f"common name {common_name!r} is longer than 64 characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise KeygenError(f"days must be a positive integer, got {days!r}")


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def _load_ca(ca: KeyPair) -> tuple[x509.Certificate, _SigningKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
    except ValueError as e:
        raise KeygenError(f"cannot load the CA certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise KeygenError(f"cannot load the CA private key: {e}") from None
    if not isinstance(key, _SigningKey):
        raise KeygenError("the CA private key is of an unsupported type")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise KeygenError("the CA private key does not match the CA certificate")
    return cert, key


def _sign(builder: x509.CertificateBuilder, key: _SigningKey) -> x509.Certificate:
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
    )


def make_ca(common_name: str = "threshold CA", days: int = 3650) -> KeyPair:
    """Make a self-signed CA that can sign threshold's server and client certs."""
    _check_days(days)
    key = _new_key()
    name = _name(common_name)
    builder = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    cert = _sign(builder, key)
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _leaf(
    ca: KeyPair,
    common_name: str,
    usage: x509.ObjectIdentifier,
    days: int,
    san: list[x509.GeneralName] | None,
) -> KeyPair:
    _check_days(days)
    ca_cert, ca_key = _load_ca(ca)
    key = _new_key()
    builder = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(san), critical=False
        )
    cert = _sign(builder, ca_key)
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_server_cert(
    ca: KeyPair, names: Sequence[str], ips: Sequence[str] = (), days: int = 825
) -> KeyPair:
    """Make a server certificate for DNS ``names`` and IP addresses ``ips``.

    Clients check the server's name against the subjectAltName entries, so
    every name or address clients use as ``ServerHost`` must be listed.
    """
    if isinstance(names, str) or isinstance(ips, str):
        raise KeygenError("names and ips must be lists of strings")
    if not names and not ips:
        raise KeygenError("a server certificate needs at least one name or IP")
    san: list[x509.GeneralName] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise KeygenError(f"invalid server name {name!r}")
        try:
            san.append(x509.DNSName(name))
        except ValueError as e:
            raise KeygenError(f"invalid server name {name!r}: {e}") from None
    parsed_ips = []
    for ip in ips:
        try:
            parsed_ips.append(ipaddress.ip_address(ip))
        except ValueError:
            raise KeygenError(f"invalid IP address {ip!r}") from None
    san.extend(x509.IPAddress(ip) for ip in parsed_ips)
    common_name = names[0] if names else str(parsed_ips[0])
    return _leaf(ca, common_name, ExtendedKeyUsageOID.SERVER_AUTH, days, san)


def make_client_cert(ca: KeyPair, common_name: str, days: int = 825) -> KeyPair:
    """Make a client certificate whose CN is ``ClientId`` or ``ClientId@Domain``."""
    if not isinstance(common_name, str):
        raise KeygenError(f"invalid common name {common_name!r}")
    return _leaf(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, days, None)


def make_p12(pair: KeyPair, ca: KeyPair, name: str, password: bytes) -> bytes:
    """A PKCS#12 file of a client's key, certificate and CA, for a browser.

    Browsers and operating systems import client identities this way (the
    status page needs the operator's). Protected by ``password``, with
    AES-256 and PBKDF2 (what current browsers and NSS read).
    """
    from cryptography.hazmat.primitives.serialization import pkcs12

    if not password:
        raise KeygenError("the PKCS#12 password must not be empty")
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    return pkcs12.serialize_key_and_certificates(
        name.encode("utf-8"),
        key,  # type: ignore[arg-type]
        cert,
        [ca_cert],
        serialization.BestAvailableEncryption(password),
    )


def _read_password(path: str) -> bytes:
    """The first line of a file (a password never goes on the command line)."""
    try:
        with open(path, "rb") as f:
            line = f.readline(4097)
    except OSError as e:
        raise KeygenError(f"cannot read {path}: {e.strerror}") from None
    password = line.rstrip(b"\r\n")
    if not password:
        raise KeygenError(f"{path}: the first line (the password) is empty")
    return password


def _write(path: str, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if not force:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise KeygenError(
            f"{path} already exists; not overwriting it (use --force)"
        ) from None
    except OSError as e:
        raise KeygenError(f"cannot write {path}: {e.strerror}") from None
    try:
        # O_CREAT's mode does not apply to a file that already existed.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        raise KeygenError(f"cannot write {path}: {e.strerror}") from None


def write_pair(
    pair: KeyPair, cert_path: str, key_path: str, force: bool = False
) -> None:
    """Write the certificate (mode 0644) and the key (mode 0600).

    Existing files are refused unless ``force`` is true, so a CA key is never
    replaced by accident.
    """
    if not force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise KeygenError(
                    f"{path} already exists; not overwriting it (use --force)"
                )
    _write(key_path, pair.key_pem, 0o600, force)
    _write(cert_path, pair.cert_pem, 0o644, force)


def _read_ca(ca_dir: str) -> KeyPair:
    data = []
    for name in ("ca.crt", "ca.key"):
        path = os.path.join(ca_dir, name)
        try:
            with open(path, "rb") as f:
                data.append(f.read())
        except OSError as e:
            raise KeygenError(f"cannot read {path}: {e.strerror}") from None
    pair = KeyPair(cert_pem=data[0], key_pem=data[1])
    _load_ca(pair)
    return pair


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="threshold-keygen",
        description="Make a CA and the server and client certificates for threshold.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ca = sub.add_parser("ca", help="make a CA: ca.crt and ca.key")
    ca.add_argument("--out", required=True, metavar="DIR")
    ca.add_argument("--cn", default="threshold CA", metavar="NAME")
    ca.add_argument("--days", type=int, default=3650)

    server = sub.add_parser("server", help="make server.crt and server.key")
    server.add_argument("--ca-dir", required=True, metavar="DIR")
    server.add_argument("--out", required=True, metavar="DIR")
    server.add_argument(
        "--name", action="append", default=[], metavar="HOST", dest="names"
    )
    server.add_argument("--ip", action="append", default=[], metavar="IP", dest="ips")
    server.add_argument("--days", type=int, default=825)

    client = sub.add_parser("client", help="make CLIENT_ID.crt and CLIENT_ID.key")
    client.add_argument("--ca-dir", required=True, metavar="DIR")
    client.add_argument("--out", required=True, metavar="DIR")
    client.add_argument("client_id", metavar="CLIENT_ID")
    client.add_argument("--domain", default=None, metavar="DOMAIN")
    client.add_argument("--days", type=int, default=825)
    client.add_argument(
        "--p12-password-file",
        default=None,
        metavar="FILE",
        help="also write CLIENT_ID.p12 (key, certificate and CA, for a browser),"
        " protected by the password on the first line of FILE",
    )

    for p in (ca, server, client):
        p.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def _check_client_id(client_id: str) -> None:
    # The ClientId rule of the config and the hello; it also keeps the file
    # name safe.
    try:
        CLIENT_ID.check(client_id)
    except SchemaError as e:
        raise KeygenError(f"invalid client id {client_id!r}: {e.message}") from None


def _run(args: argparse.Namespace) -> str:
    p12: bytes | None = None
    if args.command == "ca":
        pair = make_ca(args.cn, days=args.days)
        stem = "ca"
    elif args.command == "server":
        ca = _read_ca(args.ca_dir)
        pair = make_server_cert(ca, args.names, args.ips, days=args.days)
        stem = "server"
    else:
        _check_client_id(args.client_id)
        if args.domain is not None and not args.domain:
            raise KeygenError("--domain must not be empty")
        cn = args.client_id
        if args.domain:
            cn = f"{args.client_id}@{args.domain}"
        ca = _read_ca(args.ca_dir)
        pair = make_client_cert(ca, cn, days=args.days)
        stem = args.client_id
        if args.p12_password_file is not None:
            password = _read_password(args.p12_password_file)
            p12 = make_p12(pair, ca, cn, password)
    os.makedirs(args.out, exist_ok=True)
    cert_path = os.path.join(args.out, stem + ".crt")
    key_path = os.path.join(args.out, stem + ".key")
    p12_path = os.path.join(args.out, stem + ".p12")
    if p12 is not None and not args.force and os.path.lexists(p12_path):
        raise KeygenError(
            f"{p12_path} already exists; not overwriting it (use --force)"
        )
    write_pair(pair, cert_path, key_path, force=args.force)
    if p12 is not None:
        _write(p12_path, p12, 0o600, args.force)
        return f"wrote {cert_path}, {key_path} and {p12_path}"
    return f"wrote {cert_path} and {key_path}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``threshold-keygen``; return the exit status (2 on any error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse already printed its message; keep its status (0 for --help).
        return e.code if isinstance(e.code, int) else 2
    try:
        message = _run(args)
    except KeygenError as e:
        print(f"threshold-keygen: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"threshold-keygen: error: {e}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
