"""The status page in a real headless browser, over mutual TLS.

A gateway and a client on loopback (tests/support.py's Deployment, with
TLS), Debian's chromium driven by chromedriver (selenium). The browser
presents the operator's client certificate like a person's browser would:
the certificate and key are imported into an NSS database in a temporary
HOME (``$HOME/.pki/nssdb``, where Chromium on Linux keeps certificates),
the test CA is trusted there for the server's certificate, and the
profile's preferences auto-select the certificate for the management
API's origin (the ``auto_select_certificate`` content setting, the
preference behind Chromium's AutoSelectCertificateForUrls policy), since
a headless browser shows no certificate dialog. No system setting is
touched.

The test opens the page before the client connects, sees it appear, drives
bytes through the tunnel and sees the counters and the bandwidth chart
grow; a service name full of markup stays text; at 390 px wide nothing
overflows. Screenshots go to the test's temporary directory (their paths
are printed).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.components import missing, require_tool
from tests.support import (
    Backend,
    Deployment,
    connect_user,
    free_port,
    tunnel,
    wait_until,
)
from threshold.config.client import HealthCheck
from threshold.keygen import KeyPair, make_p12

#: A service name that would run script if the page built markup from data.
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"><b>svc</b>"

#: What a page load may log: the event stream is optional (404 without it).
ALLOWED_LOG = ("/events",)

BROWSER_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--window-size=1100,1400",
)


def nss_home(directory: str, ca_cert: str, cert: str, key: str) -> str:
    """A HOME whose NSS database trusts the CA and holds the client identity.

    The identity goes in as threshold-keygen's PKCS#12 (``make_p12``), the
    file an operator imports into a browser.
    """
    home = os.path.join(directory, "home")
    db = os.path.join(home, ".pki", "nssdb")
    os.makedirs(db)

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    p12 = os.path.join(directory, "operator.p12")
    with open(p12, "wb") as f:
        f.write(
            make_p12(
                KeyPair(read(cert), read(key)),
                KeyPair(read(ca_cert), b""),
                "operator",
                b"test",
            )
        )

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    run("certutil", "-N", "-d", f"sql:{db}", "--empty-password")
    # "C,,": a CA trusted to issue server certificates.
    run("certutil", "-A", "-d", f"sql:{db}", "-n", "CA", "-t", "C,,", "-i", ca_cert)
    run("pk12util", "-i", p12, "-d", f"sql:{db}", "-W", "test")
    return home


class Browser:
    """One headless chromium (blocking calls: run them in a thread)."""

    def __init__(self, directory: str, home: str, origin: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        profile = tempfile.mkdtemp(dir=directory, prefix="profile-")
        os.makedirs(os.path.join(profile, "Default"))
        # Any certificate the server's CA list matches, for this origin only.
        prefs = {
            "profile": {
                "content_settings": {
                    "exceptions": {
                        "auto_select_certificate": {
                            f"{origin},*": {"setting": {"filters": [{}]}}
                        }
                    }
                }
            }
        }
        with open(os.path.join(profile, "Default", "Preferences"), "w") as f:
            json.dump(prefs, f)
        options = webdriver.ChromeOptions()
        options.binary_location = require_tool("chromium")
        for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        service = Service(
            require_tool("chromedriver"),
            env=dict(os.environ, HOME=home),
            log_output=os.path.join(directory, "chromedriver.log"),
        )
        self.driver = webdriver.Chrome(service=service, options=options)
        self.driver.set_page_load_timeout(20)

    def wait(self, script: str, what: str, timeout: float = 15.0) -> Any:
        """Run ``script`` (returning a value) until it is truthy."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
                lambda driver: driver.execute_script(script)
            )
        except TimeoutException:
            raise AssertionError(
                f"timed out waiting for {what}; the page says: "
                + self.driver.execute_script("return document.body.innerText")[:2000]
            ) from None

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def severe_logs(self) -> list[str]:
        """Console errors (CSP violations, failed loads, exceptions)."""
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry["level"] == "SEVERE"
            and not any(allowed in entry["message"] for allowed in ALLOWED_LOG)
        ]

    def phone(self) -> None:
        """A phone's viewport: 390 CSS pixels wide, touch, mobile."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
        )

    def quit(self) -> None:
        self.driver.quit()


def js_number(value: float) -> str:
    """A number as JavaScript's String() writes it (5 for 5.0)."""
    return str(int(value)) if value == int(value) else repr(value)


TUNNEL_CARD = "document.querySelector('article[data-tunnel=\"127.0.0.1:{port}\"]')"


class StatusPageBrowserTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        for tool in ("chromium", "chromedriver", "certutil", "pk12util"):
            require_tool(tool)
        try:
            import selenium  # noqa: F401
        except ImportError:
            raise missing("selenium is not installed (the test extras)") from None

    @inlineCallbacks
    def test_live_page_over_mutual_tls(self):
        """The page shows a client connecting and a tunnel's traffic rising."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        deployment = Deployment(True, directory, status_sample_interval_seconds=1)
        pki = deployment.pki
        assert pki is not None
        deployment.start_server()
        self.addCleanup(deployment.stop)
        backend = Backend(echo=True)
        backend_port = yield backend.start()
        self.addCleanup(backend.stop)
        port, other = free_port(), free_port()
        # The second tunnel: two clients, TestClient2 never connects, and
        # TestClient1 reports its (hostile) service unhealthy.
        second = tunnel("TestClient1", other, HOSTILE)
        del second["ClientId"]
        second["ClientIds"] = ["TestClient1", "TestClient2"]
        code, body = yield deployment.put_tunnels(
            [tunnel("TestClient1", port, "web"), second]
        )
        self.assertEqual(code, 200, body)

        home = nss_home(
            directory,
            pki.ca_cert,
            pki.client_cert("operator"),
            pki.client_key("operator"),
        )
        origin = f"https://localhost:{deployment.management_port}"
        browser = yield deferToThread(Browser, directory, home, origin)
        self.addCleanup(deferToThread, browser.quit)
        yield deferToThread(browser.driver.get, deployment.url("/"))
        card = TUNNEL_CARD.format(port=port)

        # The page drew the tunnels from the API (so TLS and the
        # certificate worked); no client has connected yet.
        yield deferToThread(browser.wait, f"return {card} !== null", "the tunnel")
        self.assertEqual(browser.js("return document.title"), "threshold status")
        self.assertIsNone(
            browser.js("return document.querySelector('[data-client-id]')")
        )
        self.assertIn("no client has connected yet", browser.js(
            "return document.getElementById('clients').innerText"))  # fmt: skip

        # The page follows the event stream (and then polls every 10 s).
        yield deferToThread(
            browser.wait,
            "return document.body.dataset.events === 'open'",
            "the page to follow GET /events",
        )

        # A client connects: it appears, connected, within a few seconds
        # (the client.connected event; the next poll is up to 10 s away).
        deployment.start_client(
            "TestClient1",
            {"web": ("127.0.0.1", backend_port), HOSTILE: ("127.0.0.1", free_port())},
            health_checks={HOSTILE: HealthCheck(interval_seconds=1, timeout_seconds=1)},
        )
        yield deployment.wait_connected("TestClient1")
        yield deferToThread(
            browser.wait,
            "return document.querySelector("
            '\'article[data-client-id="TestClient1"][data-state="ClientConnected"]\')',
            "TestClient1 connected on the page",
            5.0,
        )
        serving = browser.js(f"return {card}.innerText")
        self.assertIn("serving", serving)

        # Bytes through the tunnel: the counters and the chart grow.
        before = int(browser.js(f"return {card}.dataset.receivedBytes"))
        self.assertEqual(before, 0)
        # A few bursts over a few samples, so the chart has a shape.
        chunk, bursts = b"x" * 100_000, 5
        payload = chunk * bursts
        user = yield connect_user(port)
        for burst in range(1, bursts + 1):
            user.transport.write(chunk)
            yield wait_until(
                lambda n=burst: len(user.data) >= n * len(chunk), 15, "the echo"
            )
            yield deferLater(reactor, 0.4, lambda: None)
        yield deferToThread(
            browser.wait,
            f"return Number({card}.dataset.receivedBytes) >= {len(payload)}"
            f" && Number({card}.dataset.sentBytes) >= {len(payload)}",
            "the tunnel's byte counters",
        )
        rate = yield deferToThread(
            browser.wait,
            f"const line = {card}.querySelector('polyline.in');"
            " return line && Number(line.dataset.points) >= 2"
            " && Number(line.closest('svg').dataset.max) > 0"
            " && line.closest('svg').dataset.max;",
            "the bandwidth chart to rise",
        )
        self.assertGreater(float(rate), 0)
        open_line = browser.js(f"return {card}.querySelector('polyline.open')")
        self.assertIsNotNone(open_line)

        # The page asked only for new samples after its first answer: what
        # it merged is the server's ring. With sampling stopped, a new set
        # (the tunnels.applied event) makes it refresh once more.
        deployment.server.history.stop()
        code, full = yield deployment.get_json("/status/history")
        self.assertEqual(code, 200)
        [ring] = [t for t in full["Tunnels"] if t["ListenPort"] == port]
        times = ring["Samples"]["Times"]
        self.assertGreater(len(times), 3)
        self.assertEqual(ring["SamplesKept"], len(times))
        code, _ = yield deployment.put_tunnels(
            [tunnel("TestClient1", port, "web"), second]
        )
        self.assertEqual(code, 200)
        expected = f"{len(times)} {js_number(times[0])} {js_number(times[-1])}"
        merged = yield deferToThread(
            browser.wait,
            f"const s = {card}.dataset.samples;"
            f" return s === {json.dumps(expected)} && s",
            "the page's samples to be the server's",
        )
        self.assertEqual(merged, expected)

        # Markup in a service name stays text: shown as written, nothing run.
        heading = browser.js(
            f"return {TUNNEL_CARD.format(port=other)}.querySelector('h3').textContent"
        )
        self.assertEqual(heading, f"127.0.0.1:{other} → {HOSTILE}")
        # The client's health report, in its own words, names it too.
        health = yield deferToThread(
            browser.wait,
            "const c = document.querySelector("
            "'article[data-client-id=\"TestClient1\"]');"
            " return c && c.innerText.includes('unhealthy') && c.innerText;",
            "TestClient1's health report",
        )
        self.assertIn(f"unhealthy {HOSTILE}: connection refused at 127.0.0.1:", health)
        clients = browser.js(f"return {TUNNEL_CARD.format(port=other)}.innerText")
        self.assertIn(f"down TestClient1: service {HOSTILE} unhealthy", clients)
        self.assertIn("down TestClient2: not connected", clients)
        for selector in ("img", "main b"):
            count = browser.js(f"return document.querySelectorAll('{selector}').length")
            self.assertEqual(count, 0, selector)
        self.assertEqual(browser.js("return document.title"), "threshold status")

        desktop = os.path.join(directory, "status-page.png")
        yield deferToThread(browser.driver.save_screenshot, desktop)
        print(f"\nstatus page screenshot: {desktop}")

        # A phone: one column, nothing wider than the screen.
        yield deferToThread(browser.phone)
        yield deferToThread(browser.driver.refresh)
        yield deferToThread(browser.wait, f"return {card} !== null", "the phone page")
        widths = browser.js(
            "return [document.documentElement.scrollWidth, window.innerWidth,"
            " Math.max(...[...document.querySelectorAll('article, svg, dl')]"
            ".map(e => e.getBoundingClientRect().right))]"
        )
        scroll_width, viewport, rightmost = widths
        self.assertEqual(viewport, 390)
        self.assertLessEqual(scroll_width, 390)
        self.assertLessEqual(rightmost, 390)
        phone = os.path.join(directory, "status-page-phone.png")
        yield deferToThread(browser.driver.save_screenshot, phone)
        print(f"status page at 390 px: {phone}")

        # No CSP violation, no script error, no failed load.
        logs = yield deferToThread(browser.severe_logs)
        self.assertEqual(logs, [])
        user.transport.loseConnection()
        yield user.done
