"""threshold-keygen client --p12-password-file: a PKCS#12 for a browser.

The status page (docs/status-page.md) is opened in a browser, which needs
the operator's key and certificate as one PKCS#12 file.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import subprocess
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.trial.unittest import SynchronousTestCase

from tests.components import require_tool
from threshold.keygen import KeygenError, main, make_ca, make_client_cert, make_p12


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


class P12Tests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="threshold-p12-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir], check=False))
        self.ca_dir = os.path.join(self.dir, "ca")
        self.out = os.path.join(self.dir, "out")
        self.assertEqual(run_main("ca", "--out", self.ca_dir)[0], 0)
        self.password_file = os.path.join(self.dir, "password")
        with open(self.password_file, "w") as f:
            f.write("correct horse\n")

    def client(self, *more: str) -> tuple[int, str, str]:
        return run_main(
            "client", "--ca-dir", self.ca_dir, "--out", self.out, "operator",
            "--p12-password-file", self.password_file, *more,
        )  # fmt: skip

    def test_writes_a_p12_a_browser_reads(self):
        """The .p12 holds the key, the certificate and the CA, mode 0600."""
        status, stdout, _ = self.client()
        self.assertEqual(status, 0)
        path = os.path.join(self.out, "operator.p12")
        self.assertIn(path, stdout)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            data = f.read()
        loaded = pkcs12.load_pkcs12(data, b"correct horse")
        with open(os.path.join(self.out, "operator.crt"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(self.ca_dir, "ca.crt"), "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        assert loaded.cert is not None and loaded.key is not None
        self.assertEqual(loaded.cert.certificate, cert)
        self.assertEqual(loaded.cert.friendly_name, b"operator")
        self.assertEqual([c.certificate for c in loaded.additional_certs], [ca])
        self.assertEqual(
            loaded.key.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ),
            cert.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ),
        )
        with self.assertRaises(ValueError):
            pkcs12.load_pkcs12(data, b"wrong")

    def test_nss_imports_it(self):
        """pk12util (the NSS tool, Chromium's and Firefox's store) imports it."""
        require_tool("certutil")
        require_tool("pk12util")
        self.assertEqual(self.client()[0], 0)
        db = os.path.join(self.dir, "nssdb")
        os.mkdir(db)
        subprocess.run(
            ["certutil", "-N", "-d", f"sql:{db}", "--empty-password"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        subprocess.run(
            ["pk12util", "-i", os.path.join(self.out, "operator.p12"),
             "-d", f"sql:{db}", "-W", "correct horse"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        listed = subprocess.run(
            ["certutil", "-L", "-d", f"sql:{db}"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        self.assertRegex(listed, r"operator\s+u,u,u")

    def test_without_the_option_no_p12(self):
        """Without --p12-password-file only the .crt and .key are written."""
        status, _, _ = run_main(
            "client", "--ca-dir", self.ca_dir, "--out", self.out, "operator"
        )
        self.assertEqual(status, 0)
        self.assertEqual(sorted(os.listdir(self.out)), ["operator.crt", "operator.key"])

    def test_bad_password_files(self):
        """A missing or empty password file: exit 2, a clear line, no file."""
        empty = os.path.join(self.dir, "empty")
        open(empty, "w").close()
        blank = os.path.join(self.dir, "blank")
        with open(blank, "w") as f:
            f.write("\nsecond line\n")
        for path, why in (
            (os.path.join(self.dir, "nope"), "cannot read"),
            (empty, "is empty"),
            (blank, "is empty"),
        ):
            self.password_file = path
            status, _, stderr = self.client()
            self.assertEqual(status, 2, path)
            self.assertIn(why, stderr)
            self.assertIn(path, stderr)
            self.assertFalse(os.path.exists(self.out), path)

    def test_refuses_overwrite(self):
        """An existing .p12 is kept (and nothing written) without --force."""
        os.makedirs(self.out)
        p12 = os.path.join(self.out, "operator.p12")
        with open(p12, "wb") as f:
            f.write(b"keep me")
        status, _, stderr = self.client()
        self.assertEqual(status, 2)
        self.assertIn("already exists", stderr)
        self.assertEqual(os.listdir(self.out), ["operator.p12"])
        with open(p12, "rb") as f:
            self.assertEqual(f.read(), b"keep me")
        self.assertEqual(self.client("--force")[0], 0)
        with open(p12, "rb") as f:
            self.assertNotEqual(f.read(), b"keep me")

    def test_empty_password_refused(self):
        """make_p12 refuses an empty password (some systems cannot import it)."""
        ca = make_ca("x")
        with self.assertRaises(KeygenError):
            make_p12(make_client_cert(ca, "op"), ca, "op", b"")
