"""The egress benchmark: its percentile, and a smoke run with real processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.benchkit import listening, processes_mentioning
from tests.components import require_tool

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import egress_bench  # noqa: E402


class PercentileTests(SynchronousTestCase):
    def test_nearest_rank(self):
        values = [float(v) for v in range(200, 0, -1)]
        self.assertEqual(egress_bench.percentile(values, 0.99), 198.0)
        self.assertEqual(egress_bench.percentile(values, 0.5), 100.0)
        self.assertEqual(egress_bench.percentile([7.0], 0.99), 7.0)


class SmokeTests(SynchronousTestCase):
    def test_smoke(self):
        """A minimal run measures every figure on every path, then cleans up."""
        require_tool("curl")
        out = Path(tempfile.mkdtemp(prefix="egress-bench-test-"))
        self.addCleanup(shutil.rmtree, out, True)
        figures_file = out / "figures.json"
        argv = [sys.executable, str(BENCHMARKS / "egress_bench.py"), "--quick"]
        argv += ["--size", "1", "--connections", "10", "--json", str(figures_file)]
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        figures = json.loads(figures_file.read_text())
        for path in egress_bench.PATHS:
            bulk = figures["bulk"][path]
            self.assertEqual(len(bulk["down"]), 1, path)
            self.assertEqual(len(bulk["up"]), 1, path)
            self.assertGreater(min(bulk["down"] + bulk["up"]), 0, path)
            self.assertGreater(figures["setup"][path]["p50"], 0, path)
            self.assertGreaterEqual(
                figures["setup"][path]["p99"], figures["setup"][path]["p50"]
            )
            # Only the tunnels have processes of their own to measure.
            self.assertEqual("cpu" in figures["setup"][path], path != "direct")
            self.assertEqual(len(bulk["cpu_down"]), 0 if path == "direct" else 1)
        self.assertIn("| download, MB/s | ", done.stdout)
        self.assertIn("| tunnel CPU per connection | — |", done.stdout)
        for port in figures["ports"]:
            self.assertFalse(listening(port), f"port {port} still served")
        self.assertEqual(processes_mentioning(figures["workdir"]), [])
        self.assertFalse(Path(figures["workdir"]).exists())
