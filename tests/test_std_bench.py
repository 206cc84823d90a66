"""The standard-tools benchmark: its parsers on real recorded output, a smoke run.

The recordings in ``tests/std_outputs/`` are what iperf3 3.12, wrk 4.1.0,
ab 2.3 and py-spy 0.4 printed on Debian 12 against nginx 1.22 (and against
a closed port, a missing page, a server that closes at once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from tests.benchkit import listening, processes_mentioning
from tests.components import missing as missing_component

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
OUTPUTS = Path(__file__).resolve().parent / "std_outputs"
sys.path.insert(0, str(BENCHMARKS))

import std_profile  # noqa: E402
import std_report  # noqa: E402
import std_tools  # noqa: E402
from std_tools import ToolError  # noqa: E402


def recorded(name: str) -> str:
    return (OUTPUTS / name).read_text()


class Iperf3Tests(SynchronousTestCase):
    def test_receiver_total(self):
        """The figure is the receiver's total: with -R, what the client got."""
        out = std_tools.parse_iperf3(recorded("iperf3_P2_reverse.json"))
        self.assertEqual(out.bytes, 16777216)
        self.assertAlmostEqual(out.bits_per_second, 34160785950.623566)
        self.assertAlmostEqual(out.seconds, 0.003929)

    def test_error(self):
        """iperf3's own error (JSON with "error") becomes a ToolError saying it."""
        with self.assertRaisesRegex(ToolError, "Connection refused"):
            std_tools.parse_iperf3(recorded("iperf3_refused.json"))

    def test_nothing_received(self):
        """A test that ended having moved no bytes is an error, not a zero
        rate (and no division by zero for CPU per GB)."""
        doc = json.loads(recorded("iperf3_P2_reverse.json"))
        doc["end"]["sum_received"].update(bytes=0, bits_per_second=0)
        with self.assertRaisesRegex(ToolError, "received 0 bytes"):
            std_tools.parse_iperf3(json.dumps(doc))

    def test_not_json(self):
        """Output that is not JSON is refused, not read as zero."""
        with self.assertRaisesRegex(ToolError, "no JSON"):
            std_tools.parse_iperf3("iperf3: error - unable to connect\n")

    def test_argv(self):
        """By time or by bytes, -R for the download, JSON out."""
        argv = std_tools.iperf3_argv("iperf3", 5201, 8, True, seconds=3)
        self.assertEqual(argv[-3:], ["-t", "3", "-R"])
        self.assertIn("-J", argv)
        self.assertEqual(argv[argv.index("-P") + 1], "8")
        argv = std_tools.iperf3_argv("iperf3", 5201, 1, False, size="32M")
        self.assertEqual(argv[-2:], ["-n", "32M"])


class WrkTests(SynchronousTestCase):
    def test_keepalive(self):
        """Requests, their time, the rate and the percentiles in seconds."""
        out = std_tools.parse_wrk(recorded("wrk_keepalive.txt"))
        self.assertEqual(out.requests, 53739)
        self.assertAlmostEqual(out.seconds, 1.10)
        self.assertAlmostEqual(out.rate, 48850.13)
        self.assertEqual(out.errors, 0)
        self.assertAlmostEqual(out.latency["50"], 303e-6)
        self.assertAlmostEqual(out.latency["99"], 2.16e-3)

    def test_non_2xx_are_errors(self):
        """Answers that are not 2xx or 3xx count as errors."""
        out = std_tools.parse_wrk(recorded("wrk_close_404.txt"))
        self.assertEqual(out.errors, 15192)
        self.assertEqual(out.requests, 15192)

    def test_socket_errors(self):
        """Socket errors (here: reads on connections closed at once) count."""
        out = std_tools.parse_wrk(recorded("wrk_read_errors.txt"))
        self.assertEqual(out.errors, 15077)
        self.assertEqual(out.requests, 0)

    def test_no_totals(self):
        """wrk's complaint instead of a report is a ToolError."""
        with self.assertRaisesRegex(ToolError, "no totals"):
            std_tools.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")

    def test_close_header(self):
        """Connection: close only when asked for."""
        self.assertIn("Connection: close", std_tools.wrk_argv("wrk", "u", 16, 3, True))
        self.assertNotIn("-H", std_tools.wrk_argv("wrk", "u", 16, 3, False))


class AbTests(SynchronousTestCase):
    def test_percentiles_from_csv(self):
        """p50 and p90 come from the -e file, in seconds (µs precision)."""
        out = std_tools.parse_ab(recorded("ab_new.txt"), recorded("ab_new.csv"))
        self.assertEqual((out.complete, out.failed, out.non_2xx), (200, 0, 0))
        self.assertEqual(out.document_length, 1024)
        self.assertAlmostEqual(out.p50, 0.086e-3)
        self.assertAlmostEqual(out.p90, 0.109e-3)

    def test_non_2xx(self):
        """A missing page shows as non-2xx answers, with the wrong length."""
        out = std_tools.parse_ab(recorded("ab_404.txt"), recorded("ab_404.csv"))
        self.assertEqual(out.non_2xx, 50)
        self.assertEqual(out.document_length, 153)

    def test_missing_csv(self):
        """No percentile file content: an error, not a zero latency."""
        with self.assertRaisesRegex(ToolError, "50%"):
            std_tools.parse_ab(recorded("ab_new.txt"), "")


class EnsureTests(SynchronousTestCase):
    def test_names_the_apt_line(self):
        """A missing tool and no installing: the exact command to run."""
        found = {"ab": "/usr/bin/ab"}
        with mock.patch.object(std_tools, "find", found.get):
            with self.assertRaises(ToolError) as caught:
                std_tools.ensure(["ab", "wrk", "sshd", "ssh"], install=False)
        self.assertIn(
            "apt-get update && apt-get install -y openssh-client openssh-server wrk",
            str(caught.exception),
        )

    def test_not_root(self):
        """Not root: no apt-get run, the command named instead."""
        with (
            mock.patch.object(std_tools, "find", lambda p: None),
            mock.patch.object(os, "geteuid", lambda: 1000),
            mock.patch.object(std_tools.subprocess, "run") as run,
        ):
            with self.assertRaisesRegex(ToolError, "not root.*install -y iperf3"):
                std_tools.ensure(["iperf3"], install=True)
        run.assert_not_called()

    def test_no_apt_get(self):
        """Root but no apt-get (not Debian): the command named, nothing run."""
        with (
            mock.patch.object(std_tools, "find", lambda p: None),
            mock.patch.object(os, "geteuid", lambda: 0),
            mock.patch.object(std_tools.shutil, "which", lambda p: None),
            mock.patch.object(std_tools.subprocess, "run") as run,
        ):
            with self.assertRaisesRegex(ToolError, "no apt-get.*install -y nginx"):
                std_tools.ensure(["nginx"], install=True)
        run.assert_not_called()

    def test_found(self):
        """Everything there: the paths, nothing installed."""
        with mock.patch.object(std_tools, "find", lambda p: f"/usr/bin/{p}"):
            self.assertEqual(
                std_tools.ensure(["wrk"], install=True), {"wrk": "/usr/bin/wrk"}
            )


class ProfileSummaryTests(SynchronousTestCase):
    def test_real_stacks(self):
        """Self and inclusive shares of all samples (also those without a
        Python frame) from py-spy's raw output, lines of a function merged."""
        summary = std_profile.summarise(recorded("pyspy_json.raw"))
        self.assertEqual(summary["samples"], 173)
        top, share = summary["self"][0]
        self.assertEqual(top, "JSONEncoder.iterencode (json/encoder.py)")
        self.assertAlmostEqual(share, 145 / 173)
        inclusive = dict(summary["inclusive"])
        self.assertAlmostEqual(inclusive["work (<string>)"], 171 / 173)
        self.assertAlmostEqual(inclusive[std_profile.NO_FRAME], 2 / 173)


class ReportTests(SynchronousTestCase):
    def test_medians_and_ratios(self):
        """Medians over rounds, pairs element-wise; ratios only against direct."""
        runs = {
            "direct": {"close_rate": [9000.0, 10000.0, 8000.0]},
            "threshold": {
                "close_rate": [900.0, 1000.0, 2000.0],
                "close_cpu": [[300.0, 200.0], [500.0, 400.0], [400.0, 100.0]],
                "rss": [[58e6, 57e6], [59e6, 58e6], [60e6, 56e6]],
            },
        }
        figures = {"medians": {p: std_report.medians(v) for p, v in runs.items()}}
        self.assertEqual(figures["medians"]["threshold"]["close_cpu"], 600.0)
        self.assertEqual(
            figures["medians"]["threshold"]["close_cpu_split"], [400.0, 200.0]
        )
        lines = std_report.table(figures)
        close = next(line for line in lines if line.startswith("| new connections"))
        self.assertEqual(close.split(" | ")[1:], ["9.00k", "1.00k (0.11×) |"])
        rss = next(line for line in lines if line.startswith("| RSS"))
        self.assertIn("59 + 57", rss)


class SmokeTests(SynchronousTestCase):
    """Real runs: nginx, iperf3, haproxy and threshold, a few seconds each."""

    PATHS = "direct,haproxy,threshold"

    def setUp(self):
        missing = [p for p in ("iperf3", "wrk", "ab", "nginx", "haproxy")]
        missing = [p for p in missing if std_tools.find(p) is None]
        if missing:
            packages = {std_tools.PACKAGES[p] for p in missing}
            raise missing_component(f"needs {std_tools.install_line(packages)}")
        self.out = Path(tempfile.mkdtemp(prefix="std-bench-test-"))

    def start(self, *args: str) -> subprocess.Popen:
        argv = [sys.executable, str(BENCHMARKS / "std_bench.py"), "--smoke"]
        argv += ["--no-install", "--paths", self.PATHS, *args]
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def assertCleanedUp(self, info: dict) -> None:
        for port in info["backends"].values():
            self.assertFalse(listening(port), f"port {port} still served")
        self.assertEqual(processes_mentioning(info["workdir"]), [])
        self.assertFalse(Path(info["workdir"]).exists())

    def test_smoke(self):
        """One short round measures every figure on every path, cleans up."""
        figures_file = self.out / "figures.json"
        proc = self.start("--json", str(figures_file))
        stdout, stderr = proc.communicate(timeout=120)
        self.assertEqual(proc.returncode, 0, stderr[-2000:])
        figures = json.loads(figures_file.read_text())
        self.assertEqual(figures["errors"], [])
        keys = {key for key, *_ in std_report.ROWS}
        tunnel_only = {"cpu_gb_1", "cpu_gb_8", "ka_cpu", "close_cpu", "rss", "ready"}
        for path in self.PATHS.split(","):
            want = keys - tunnel_only if path == "direct" else keys
            self.assertEqual(want - set(figures["medians"][path]), set(), path)
        self.assertGreater(figures["medians"]["threshold"]["rss"][1], 1e6)
        self.assertIn("| new connections/s", stdout)
        self.assertCleanedUp(figures["info"])

    def test_interrupted(self):
        """Ctrl-C in the middle stops every process it started."""
        proc = self.start("--json", str(self.out / "figures.json"))
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while "bulk1_up" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        workdir = seen.split("working directory ", 1)[1].split(";", 1)[0]
        self.assertTrue(processes_mentioning(workdir), "nothing started")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 130, stderr[-2000:])
        self.assertEqual(processes_mentioning(workdir), [])
        self.assertFalse(Path(workdir).exists())
