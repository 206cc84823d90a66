"""Tests for threshold.tls: mutual TLS with real certificates, in memory."""

from __future__ import annotations

import os
import shutil
import tempfile

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.certs import test_pki
from threshold.config import ConfigError
from threshold.tls import (
    CONTROL_MINIMUM_TLS,
    ClientCertPolicy,
    client_creator,
    peer_common_name,
    server_options,
)


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Record what happens on one end of a TLS connection."""

    def __init__(self) -> None:
        self.data = b""
        self.handshake_done = False
        self.lost: Failure | None = None
        self.peer_cn_at_handshake: str | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.peer_cn_at_handshake = peer_common_name(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost = reason


def run_tls(server_opts, client_opts):
    """Connect a TLS server and client in memory; return both Recorders."""
    clock = Clock()
    server = Recorder()
    client = Recorder()
    server_factory = TLSMemoryBIOFactory(
        server_opts, False, Factory.forProtocol(lambda: server), clock=clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_opts, True, Factory.forProtocol(lambda: client), clock=clock
    )
    client_tls, server_tls, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    pump.flush()
    if client.handshake_done:
        client.transport.write(b"ping from client")
        server.transport.write(b"pong from server")
        pump.flush()
    return server, client


class TlsTestMixin:
    def setUp(self) -> None:
        self.pki = test_pki()

    def good_server(self):
        p = self.pki
        return server_options(p.ca_cert, p.server_key, p.server_cert, "server.json")

    def good_client(self, name: str = "TestClient1", host: str = "localhost"):
        p = self.pki
        return client_creator(
            p.ca_cert, p.client_key(name), p.client_cert(name), host, "client.json"
        )

    def assertRefused(self, server: Recorder, client: Recorder) -> None:
        """Neither side saw the other's data and both connections ended."""
        self.assertEqual(server.data, b"")
        self.assertEqual(client.data, b"")
        self.assertFalse(server.handshake_done and client.handshake_done)
        self.assertIsNotNone(server.lost)
        self.assertIsNotNone(client.lost)


class MutualTlsTests(TlsTestMixin, SynchronousTestCase):
    def test_good_certificates(self):
        """With certificates from the CA, data flows both ways."""
        server, client = run_tls(self.good_server(), self.good_client())
        self.assertEqual(server.data, b"ping from client")
        self.assertEqual(client.data, b"pong from server")
        self.assertIsNone(server.lost)
        self.assertIsNone(client.lost)

    def test_peer_common_name(self):
        """peer_common_name gives each side the CN of the other's certificate."""
        server, client = run_tls(self.good_server(), self.good_client("TestClient2"))
        self.assertEqual(server.peer_cn_at_handshake, "TestClient2")
        self.assertEqual(client.peer_cn_at_handshake, "localhost")
        self.assertEqual(peer_common_name(server.transport), "TestClient2")

    def test_ip_address_hostname(self):
        """A client dialing an IP address checks it against the IP SANs."""
        for host in ("127.0.0.1", "::1"):
            server, client = run_tls(self.good_server(), self.good_client(host=host))
            self.assertEqual(server.data, b"ping from client", host)

    def test_client_from_other_ca_refused(self):
        """A client certificate signed by another CA is refused by the server."""
        p = self.pki
        creator = client_creator(
            p.ca_cert, p.other_client_key, p.other_client_cert, "localhost"
        )
        server, client = run_tls(self.good_server(), creator)
        self.assertRefused(server, client)
        self.assertIsNone(server.peer_cn_at_handshake)
        self.assertTrue(server.lost.check(SSL.Error), server.lost)

    def test_no_client_certificate_refused(self):
        """A client without a certificate is refused by the server."""
        trust = ssl.Certificate.loadPEM(open(self.pki.ca_cert, "rb").read())
        creator = ssl.optionsForClientTLS("localhost", trustRoot=trust)
        server, client = run_tls(self.good_server(), creator)
        self.assertRefused(server, client)
        self.assertTrue(server.lost.check(SSL.Error), server.lost)

    def test_wrong_server_name_refused(self):
        """The client refuses a server certificate that is not for its name."""
        for host in ("example.com", "127.0.0.2"):
            server, client = run_tls(self.good_server(), self.good_client(host=host))
            self.assertRefused(server, client)
            self.assertIn("VerificationError", str(client.lost.type), host)

    def test_server_from_other_ca_refused(self):
        """The client refuses a server whose certificate is from another CA."""
        p = self.pki
        creator = client_creator(
            p.other_ca_cert,
            p.client_key("TestClient1"),
            p.client_cert("TestClient1"),
            "localhost",
        )
        server, client = run_tls(self.good_server(), creator)
        self.assertRefused(server, client)
        self.assertTrue(client.lost.check(SSL.Error), client.lost)

    def test_policy(self):
        """ClientCertPolicy provides IPolicyForHTTPS and makes working options."""
        p = self.pki
        policy = ClientCertPolicy(
            p.ca_cert, p.client_key("operator"), p.client_cert("operator")
        )
        self.assertTrue(verifyObject(IPolicyForHTTPS, policy))
        server, client = run_tls(
            self.good_server(), policy.creatorForNetloc(b"localhost", 9057)
        )
        self.assertEqual(server.data, b"ping from client")
        self.assertEqual(peer_common_name(server.transport), "operator")

    def test_policy_checks_name(self):
        """ClientCertPolicy verifies the host name of the URL."""
        p = self.pki
        policy = ClientCertPolicy(
            p.ca_cert, p.client_key("operator"), p.client_cert("operator")
        )
        server, client = run_tls(
            self.good_server(), policy.creatorForNetloc(b"other.example", 9057)
        )
        self.assertRefused(server, client)

    def test_minimum_tls_version(self):
        """The server context refuses TLS 1.0 and 1.1."""
        context = self.good_server().getContext()
        options = context.set_options(0)
        self.assertTrue(options & SSL.OP_NO_TLSv1)
        self.assertTrue(options & SSL.OP_NO_TLSv1_1)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)

    def test_control_options_tls13_only(self):
        """The control port's options refuse TLS 1.2 as well."""
        p = self.pki
        options = server_options(
            p.ca_cert, p.server_key, p.server_cert, minimum=CONTROL_MINIMUM_TLS
        )
        self.assertTrue(options.getContext().set_options(0) & SSL.OP_NO_TLSv1_2)
        server, client = run_tls(options, self.good_client())
        self.assertEqual(server.data, b"ping from client")
        self.assertEqual(
            server.transport.getHandle().get_protocol_version_name(), "TLSv1.3"
        )

    def test_tunnel_client_refuses_tls12_server(self):
        """The tunnel client does not fall back to TLS 1.2 for any server."""
        p = self.pki
        with open(p.server_cert, "rb") as c, open(p.server_key, "rb") as k:
            identity = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        with open(p.ca_cert, "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        tls12 = ssl.CertificateOptions(
            privateKey=identity.privateKey.original,
            certificate=identity.original,
            trustRoot=ca,
            lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2,
        )
        server, client = run_tls(tls12, self.good_client())
        self.assertRefused(server, client)
        # An operator's tool (the default policy) still speaks TLS 1.2.
        policy = ClientCertPolicy(
            p.ca_cert, p.client_key("operator"), p.client_cert("operator")
        )
        server, client = run_tls(tls12, policy.creatorForNetloc(b"localhost", 1))
        self.assertEqual(server.data, b"ping from client")
        self.assertEqual(
            server.transport.getHandle().get_protocol_version_name(), "TLSv1.2"
        )
        self.assertTrue(
            server.transport.getHandle().get_cipher_name().startswith("ECDHE-")
        )


class PeerCommonNameTests(SynchronousTestCase):
    def test_plain_transport(self):
        """A transport without TLS has no peer common name."""
        self.assertIsNone(peer_common_name(StringTransport()))
        self.assertIsNone(peer_common_name(object()))

    def test_no_certificate(self):
        """A TLS transport whose peer sent no certificate gives None."""

        class NoCert:
            def getPeerCertificate(self):
                return None

        self.assertIsNone(peer_common_name(NoCert()))

    def test_certificate_object(self):
        """The CN is read from a pyOpenSSL or a cryptography certificate."""
        from cryptography import x509

        data = open(test_pki().client_cert("operator"), "rb").read()
        crypto_cert = x509.load_pem_x509_certificate(data)
        openssl_cert = ssl.Certificate.loadPEM(data).original

        for cert in (crypto_cert, openssl_cert):

            class Transport:
                def getPeerCertificate(self, cert=cert):
                    return cert

            self.assertEqual(peer_common_name(Transport()), "operator")


class BadFileTests(SynchronousTestCase):
    """Every file problem is a ConfigError naming the config, field and file."""

    def setUp(self) -> None:
        self.pki = test_pki()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertServerError(self, field: str, path: str, text: str, **files) -> None:
        p = self.pki
        args = {"ca_file": p.ca_cert, "key_file": p.server_key}
        args["cert_file"] = p.server_cert
        args.update(files)
        with self.assertRaises(ConfigError) as cm:
            server_options(source="server.json", **args)
        message = str(cm.exception)
        self.assertTrue(message.startswith(f'server.json: field "{field}": '), message)
        self.assertIn(path, message)
        self.assertIn(text, message)
        self.assertNotIn("\n", message)

    def test_missing_ca(self):
        """A missing CA file is named with the reason."""
        path = os.path.join(self.dir, "nope.crt")
        self.assertServerError("CaCertificateFile", path, "No such file", ca_file=path)

    def test_ca_not_a_certificate(self):
        """A CA file without a PEM certificate is refused."""
        path = self.write("ca.crt", b"hello\n")
        self.assertServerError(
            "CaCertificateFile", path, "cannot load certificate", ca_file=path
        )

    def test_garbage_key(self):
        """A key file that is not a PEM key is refused."""
        path = self.write("server.key", b"-----BEGIN PRIVATE KEY-----\nxx\n")
        self.assertServerError(
            "ServerTlsKeyFile", path, "cannot load private key", key_file=path
        )

    def test_certificate_as_key(self):
        """Giving the certificate where the key belongs is refused."""
        self.assertServerError(
            "ServerTlsKeyFile",
            self.pki.server_cert,
            "cannot load private key",
            key_file=self.pki.server_cert,
        )

    def test_encrypted_key(self):
        """A password-protected key is refused with a hint."""
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        path = self.write("enc.key", pem)
        self.assertServerError("ServerTlsKeyFile", path, "encrypted", key_file=path)

    def test_key_does_not_match(self):
        """A key that does not belong to the certificate is refused."""
        self.assertServerError(
            "ServerTlsKeyFile",
            self.pki.server_cert,
            "does not match",
            key_file=self.pki.client_key("TestClient1"),
        )

    def test_missing_certificate(self):
        """A missing certificate file is named."""
        path = os.path.join(self.dir, "server.crt")
        self.assertServerError(
            "ServerTlsCertificateFile", path, "No such file", cert_file=path
        )

    def test_directory_as_certificate(self):
        """A directory given as a certificate file is refused."""
        self.assertServerError(
            "ServerTlsCertificateFile", self.dir, "cannot load", cert_file=self.dir
        )

    def test_client_side_field_names(self):
        """Client-side errors name the client's config fields."""
        path = os.path.join(self.dir, "missing.key")
        p = self.pki
        with self.assertRaises(ConfigError) as cm:
            client_creator(
                p.ca_cert, path, p.client_cert("TestClient1"), "localhost", "c.json"
            )
        self.assertTrue(
            str(cm.exception).startswith('c.json: field "ClientTlsKeyFile": ')
        )
        with self.assertRaises(ConfigError) as cm:
            ClientCertPolicy(p.ca_cert, p.client_key("operator"), path, "c.json")
        self.assertTrue(
            str(cm.exception).startswith('c.json: field "ClientTlsCertificateFile": ')
        )
