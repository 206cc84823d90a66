"""Tests for the status page's HTTP side: GET /, /static/<name>, /status/history.

The real Klein app in memory (StubTreq): content types, the strict
Content-Security-Policy, caching, 404 for files that are not shipped, no
path out of the static folder, methods, authorization. The page in a real
browser is tests/test_status_page_browser.py.
"""

from __future__ import annotations

import configparser
import json
import os
import re
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.packagekit import copy_checkout
from threshold.server import statuspage
from threshold.server.api import ManagementAPI
from threshold.server.events import EventType
from threshold.server.history import TrafficHistory
from threshold.server.registry import ClientRegistry
from threshold.server.routes import RouteTable
from threshold.server.stats import GatewayStats

URL = "http://management.invalid"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "threshold", "server", "static")


class FakePort:
    def stopListening(self) -> Any:  # noqa: N802
        return succeed(None)


def stub(history: bool = True, **kwargs: Any) -> tuple[StubTreq, TrafficHistory]:
    """The management app over an empty route table and registry."""
    stats = GatewayStats()
    clock = Clock()
    clock.advance(1000)
    table = RouteTable(lambda h, p, f: succeed(FakePort()), lambda key: Factory())
    sampler = TrafficHistory(stats, clock, lambda: [t.key for t in table.tunnels()])
    sampler.sample()
    api = ManagementAPI(
        table, ClientRegistry(), history=sampler if history else None, **kwargs
    )
    return StubTreq(api.app.resource()), sampler


class Answer:
    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None


class RoutesTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.app, self.history = stub()

    def request(self, method: str, path: str, app: StubTreq | None = None) -> Answer:
        app = app or self.app
        d = app.request(method, URL + path)
        app.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return Answer(response.code, response.headers, body)


class PageTests(RoutesTestCase):
    def test_page(self):
        """GET / is the HTML page with a strict CSP, never stored."""
        answer = self.request("GET", "/")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("content-type"), "text/html; charset=utf-8")
        csp = answer.header("content-security-policy")
        self.assertEqual(csp, statuspage.CONTENT_SECURITY_POLICY.decode())
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        self.assertEqual(directives["default-src"], "'none'")
        self.assertEqual(directives["script-src"], "'self'")
        self.assertEqual(directives["frame-ancestors"], "'none'")
        self.assertNotIn("unsafe", csp)
        self.assertEqual(answer.header("cache-control"), "no-store")
        self.assertEqual(answer.header("x-content-type-options"), "nosniff")
        self.assertIn(b'<script src="/static/status.js" defer></script>', answer.body)
        self.assertIn(b'<link rel="stylesheet" href="/static/status.css">', answer.body)

    def test_page_has_no_inline_code(self):
        """No inline script, event handler or style: the CSP would block them."""
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            html = f.read()
        scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S)
        self.assertEqual(scripts, [""])
        self.assertIsNone(re.search(r"\son[a-z]+\s*=", html))
        self.assertIsNone(re.search(r"<style|\sstyle\s*=", html))
        # Every file the page links to is shipped.
        for link in re.findall(r'(?:src|href)="/static/([^"]+)"', html):
            self.assertEqual(self.request("GET", f"/static/{link}").code, 200, link)

    def test_script_builds_no_markup(self):
        """The script never turns data into markup (text nodes only)."""
        with open(os.path.join(STATIC, "status.js"), encoding="utf-8") as f:
            script = f.read()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function", "setAttribute(\"on"):  # fmt: skip
            self.assertNotIn(sink, script)

    def test_script_listens_to_event_types_that_exist(self):
        """Each event type the page refreshes on is one the feed emits.

        The page listens to a subset of server/events.py's EventType by
        name; a type renamed there would otherwise leave the page deaf.
        """
        with open(os.path.join(STATIC, "status.js"), encoding="utf-8") as f:
            script = f.read()
        [listed] = re.findall(r"const EVENTS = \[([^\]]*)\]", script)
        names = re.findall(r'"([^"]+)"', listed)
        self.assertGreater(len(names), 3)
        self.assertLessEqual(set(names), {t.value for t in EventType})

    def test_head(self):
        """HEAD / answers the page's headers without a body."""
        answer = self.request("HEAD", "/")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.body, b"")
        self.assertIsNotNone(answer.header("content-security-policy"))

    def test_other_methods_refused(self):
        """The page is read-only: POST, PUT and DELETE get 405 naming GET."""
        for method in ("POST", "PUT", "DELETE"):
            for path in ("/", "/static/status.js", "/status/history"):
                answer = self.request(method, path)
                self.assertEqual(answer.code, 405, (method, path))
                self.assertEqual(answer.header("allow"), "GET, HEAD")
                self.assertIn("not allowed", json.loads(answer.body)["error"])


class StaticTests(RoutesTestCase):
    def test_types_and_caching(self):
        """Each shipped file has its content type and may be cached an hour."""
        for name, content_type in (
            ("status.js", "text/javascript; charset=utf-8"),
            ("status.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ):
            answer = self.request("GET", f"/static/{name}")
            self.assertEqual(answer.code, 200, name)
            self.assertEqual(answer.header("content-type"), content_type)
            self.assertEqual(answer.header("cache-control"), "public, max-age=3600")
            self.assertEqual(answer.header("x-content-type-options"), "nosniff")
            with open(os.path.join(STATIC, name), "rb") as f:
                self.assertEqual(answer.body, f.read())

    def test_unknown_files(self):
        """A file that is not shipped is a JSON 404 naming it."""
        for name in ("nope.js", "status.JS", "status", "index.html", "status.js.map"):
            answer = self.request("GET", f"/static/{name}")
            self.assertEqual(answer.code, 404, name)
            self.assertEqual(answer.header("content-type"), "application/json")
            self.assertEqual(
                json.loads(answer.body), {"error": f"no such file: {json.dumps(name)}"}
            )

    def test_no_path_traversal(self):
        """No spelling of a path leads out of the static folder."""
        for path in (
            "/static/../api.py",
            "/static/..%2fapi.py",
            "/static/%2e%2e%2fapi.py",
            "/static/%2e%2e/%2e%2e/setup.cfg",
            "/static/..%5capi.py",
            "/static/statuspage.py",
            "/static/__init__.py",
            "/static/%2fetc%2fpasswd",
            "/static//etc/passwd",
            "/static/",
            "/static",
            "/../threshold/server/api.py",
        ):
            answer = self.request("GET", path)
            self.assertEqual(answer.code, 404, path)
            self.assertNotIn(b"import", answer.body, path)
            self.assertNotIn(b"root:", answer.body, path)

    def test_shipped_in_the_package(self):
        """setup.cfg ships the whole static folder (a wheel has no other copy)."""
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        data = config["options.package_data"]["threshold.server"].split()
        self.assertEqual(data, ["static/*"])
        entries = os.listdir(STATIC)
        self.assertTrue(all(os.path.isfile(os.path.join(STATIC, e)) for e in entries))
        self.assertEqual(
            set(entries), {"index.html", "status.js", "status.css", "favicon.svg"}
        )


class HistoryRouteTests(RoutesTestCase):
    def test_history(self):
        """GET /status/history is the sampler's JSON, never stored."""
        answer = self.request("GET", "/status/history")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertEqual(answer.header("cache-control"), "no-store")
        body = json.loads(answer.body)
        self.assertEqual(body, self.history.to_json())
        self.assertEqual(body["Gateway"]["Samples"]["Times"], [1000])

    def test_after(self):
        """?after=N answers only the later samples."""
        self.history.sample()
        body = json.loads(self.request("GET", "/status/history?after=1").body)
        self.assertEqual(body, self.history.to_json(1))
        self.assertEqual(body["Sample"], 2)
        self.assertEqual(len(body["Gateway"]["Samples"]["Times"]), 1)
        self.assertEqual(body["Gateway"]["SamplesKept"], 2)
        empty = json.loads(self.request("GET", "/status/history?after=2").body)
        self.assertEqual(empty["Gateway"]["Samples"]["Times"], [])

    def test_bad_after(self):
        """A value of after that is not a sample number: 400 saying so."""
        for query in ("x", "-1", "1.5", "%201", "1e3", "", "+1", "1&after=2",
                      "9" * 19, "%D9%A3"):  # fmt: skip
            answer = self.request("GET", f"/status/history?after={query}")
            self.assertEqual(answer.code, 400, query)
            error = json.loads(answer.body)["error"]
            self.assertTrue(error.startswith("after "), error)

    def test_no_history(self):
        """A server built without a sampler answers 404."""
        app, _ = stub(history=False)
        answer = self.request("GET", "/status/history", app)
        self.assertEqual(answer.code, 404)
        self.assertIn("no traffic history", json.loads(answer.body)["error"])


class AuthorizationTests(RoutesTestCase):
    def test_certificate_required(self):
        """Like the API: without an accepted certificate, 403 and no page."""
        app, _ = stub(require_tls_identity=True)
        for path in ("/", "/static/status.js", "/status/history", "/static/nope"):
            answer = self.request("GET", path, app)
            self.assertEqual(answer.code, 403, path)
            self.assertNotIn(b"<html", answer.body)
            self.assertIn("client certificate", json.loads(answer.body)["error"])


class InstalledPackageTests(SynchronousTestCase):
    def test_wheel_install_serves_the_files(self):
        """A (non-editable) wheel install has the page's files and serves them.

        A copy of the checkout is built into a wheel and installed (no
        network: no deps, no index, no build isolation) in a fresh venv
        that sees this interpreter's packages; the installed statuspage
        module, run from an unrelated folder, finds every file.
        """
        import shutil
        import site
        import subprocess
        import sys
        import tempfile

        import setuptools

        if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1):
            self.skipTest("needs setuptools >= 70.1 (the test extras)")
        work = tempfile.mkdtemp(prefix="threshold-wheel-")
        self.addCleanup(shutil.rmtree, work, True)
        source = os.path.join(work, "checkout")
        copy_checkout(source)
        venv = os.path.join(work, "venv")

        def run(*argv: str, cwd: str | None = None) -> str:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, cwd=cwd, env=env
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            return result.stdout

        run(sys.executable, "-m", "venv", "--without-pip", venv)
        python = os.path.join(venv, "bin", "python")
        purelib = run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
        ).strip()
        with open(os.path.join(purelib, "deps.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
            "--no-build-isolation", source)  # fmt: skip
        elsewhere = os.path.join(work, "elsewhere")
        os.makedirs(elsewhere)
        listed = run(
            python,
            "-c",
            "import threshold.server.statuspage as s;"
            " print(s.__file__); print(sorted(s._files()))",
            cwd=elsewhere,
        ).splitlines()
        self.assertTrue(listed[0].startswith(purelib), listed[0])
        self.assertEqual(
            listed[1],
            str(
                sorted(["favicon.svg", "index.html", "status.css", "status.js"])
            ),  # fmt: skip
        )
