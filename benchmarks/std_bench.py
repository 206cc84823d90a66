"""threshold measured with the tools operators use, beside haproxy and ssh -R.

Run from a checkout::

    .venv/bin/python benchmarks/std_bench.py [--rounds 3] [--quick] [--json FILE]

On loopback, in one run, for each of: direct, haproxy (a one-hop TCP proxy
in C), ``ssh -R`` (a private sshd), threshold plaintext and threshold with
mutual TLS (server and client under twistd, tunnels opened with ``PUT
/tunnels``):

- iperf3 bulk, 1 and 8 streams (``-P 8``), both directions (``-R``),
  Gbit/s, and the tunnel's CPU seconds per GB;
- wrk against nginx serving a 1 KiB file, 16 connections: keep-alive
  requests/s, and ``Connection: close`` (a new connection per request)
  connections/s, with the tunnel's CPU µs per request;
- one connection at a time (ab -c 1): p50 of a request on a new connection
  and of a request on a kept-alive one;
- RSS of each tunnel process right after start, and the time from the first
  process started until the tunnel serves its first request.

Every tunnel is started afresh in each round; workloads run interleaved
over the paths; the report gives the median of the rounds with its ratio to
direct, as a markdown table on stdout (progress on stderr). The Debian
packages needed are installed when missing (as root; ``--no-install``
only names them). Every process started is stopped at the end, on errors
and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import std_profile
import std_tools
from sshtunnel import OpenSsh, SshError
from std_report import BEFORE, PATHS, medians, report
from std_services import (
    PAGE,
    Direct,
    Haproxy,
    Iperf3Server,
    Nginx,
    SshReverse,
    Threshold,
    Tunnel,
    make_pki,
)
from std_tools import ToolError
from tunnel_bench import (
    GB,
    BenchError,
    Children,
    cpu_snapshot,
    cpu_used,
    load_average,
    machine,
    say,
)

#: Which programs each path needs, beside iperf3, wrk, ab and nginx.
NEEDS = {
    "haproxy": ["haproxy"],
    "ssh -R": ["sshd", "ssh", "ssh-keygen"],
}
LOADS = ["iperf3", "wrk", "ab", "nginx"]
CONNECTIONS = 16
#: How long py-spy watches the Connection: close workload (--profile).
PROFILE_SECONDS = 10


@dataclass(frozen=True)
class Settings:
    """How long each workload runs."""

    rounds: int
    iperf_seconds: int | None
    iperf_size: str | None
    wrk_seconds: int
    ab_new: int
    ab_keepalive: int


def settings_for(args: argparse.Namespace) -> Settings:
    if args.smoke:
        return Settings(args.rounds or 1, None, "32M", 1, 100, 200)
    if args.quick:
        return Settings(args.rounds or 3, 1, None, 1, 500, 1000)
    return Settings(args.rounds or 3, 3, None, 3, 2000, 3000)


class Bench:
    """Runs the workloads on each path and keeps every round's figures."""

    def __init__(
        self,
        tools: dict[str, str],
        settings: Settings,
        iperf: Iperf3Server,
        workdir: Path,
        figures: dict[str, Any],
    ) -> None:
        self.tools = tools
        self.s = settings
        self.iperf = iperf
        self.workdir = workdir
        self.figures = figures
        self.errors: list[str] = figures["errors"]

    def record(self, path: str, key: str, value: Any) -> None:
        self.figures["runs"].setdefault(path, {}).setdefault(key, []).append(value)

    def _cpu(self, tunnel: Tunnel, run: Any) -> tuple[Any, float, float]:
        """Run ``run()``; also return the tunnel's CPU seconds, server and client."""
        if isinstance(tunnel, Direct):
            return run(), 0.0, 0.0
        before = cpu_snapshot(tunnel.processes())
        result = run()
        server, client = cpu_used(before, cpu_snapshot(tunnel.processes()))
        return result, server, client

    def _tool(self, argv: list[str], timeout: float) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ToolError(f"{Path(argv[0]).name} ran over {timeout:.0f}s") from None
        if r.returncode and not r.stdout:
            raise ToolError(f"{Path(argv[0]).name}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def bulk(self, tunnel: Tunnel, streams: int, reverse: bool) -> None:
        argv = std_tools.iperf3_argv(
            self.tools["iperf3"],
            tunnel.ports["iperf"],
            streams,
            reverse,
            self.s.iperf_seconds,
            self.s.iperf_size,
        )
        timeout = (self.s.iperf_seconds or 10) + 60
        key = f"bulk{streams}_{'down' if reverse else 'up'}"
        # Through a tunnel the close of the last test's connections reaches
        # iperf3 -s a little later; until then it answers "busy".
        time.sleep(0.3)
        for _ in range(4):
            try:
                out, server, client = self._cpu(
                    tunnel, lambda: std_tools.parse_iperf3(self._tool(argv, timeout))
                )
                break
            except ToolError as e:
                say(f"  {tunnel.name} {key}: {e}; trying again")
                self.figures["retries"].append(f"{tunnel.name}, {key}: {e}")
                if "busy" in str(e):
                    # iperf3 -s says so until it has wound up the last test.
                    time.sleep(0.5)
                else:
                    # A test that failed half-way can leave the server stuck.
                    self.iperf.restart()
        else:
            self.errors.append(f"{tunnel.name}, {key}: no result in 4 tries")
            return
        self.record(tunnel.name, key, out.bits_per_second / 1e9)
        if not isinstance(tunnel, Direct):
            gb = out.bytes / GB
            self.record(tunnel.name, "cpu_" + key, [server / gb, client / gb])

    def http(self, tunnel: Tunnel, close: bool) -> None:
        url = f"http://127.0.0.1:{tunnel.ports['http']}{PAGE}"
        argv = std_tools.wrk_argv(
            self.tools["wrk"], url, CONNECTIONS, self.s.wrk_seconds, close
        )
        key = "close" if close else "ka"
        try:
            out, server, client = self._cpu(
                tunnel,
                lambda: std_tools.parse_wrk(self._tool(argv, self.s.wrk_seconds + 60)),
            )
        except ToolError as e:
            self.errors.append(f"{tunnel.name}, {key}: {e}")
            say(f"  {tunnel.name} {key}: {e}")
            return
        if out.errors:
            self.errors.append(f"{tunnel.name}, wrk {key}: {out.errors} errors")
        self.record(tunnel.name, f"{key}_rate", out.rate)
        if not isinstance(tunnel, Direct) and out.requests:
            per = [server / out.requests * 1e6, client / out.requests * 1e6]
            self.record(tunnel.name, f"{key}_cpu", per)

    def sequential(self, tunnel: Tunnel, keepalive: bool) -> None:
        url = f"http://127.0.0.1:{tunnel.ports['http']}{PAGE}"
        count = self.s.ab_keepalive if keepalive else self.s.ab_new
        csv_path = self.workdir / "ab.csv"
        argv = std_tools.ab_argv(self.tools["ab"], url, count, keepalive, str(csv_path))
        key = "ka_p50" if keepalive else "new_p50"
        try:
            report = self._tool(argv, 120)
            out = std_tools.parse_ab(report, csv_path.read_text())
        except (ToolError, OSError) as e:
            self.errors.append(f"{tunnel.name}, {key}: {e}")
            say(f"  {tunnel.name} {key}: {e}")
            return
        if out.failed or out.non_2xx or out.complete != count:
            self.errors.append(
                f"{tunnel.name}, ab {key}: {out.complete} of {count} complete, "
                f"{out.failed} failed, {out.non_2xx} not 2xx"
            )
        self.record(tunnel.name, key, out.p50 * 1e3)

    def round(self, tunnels: list[Tunnel], number: int) -> None:
        say(f"round {number}: starting the tunnels")
        try:
            for t in tunnels:
                if isinstance(t, Direct):
                    continue
                started = t.start()
                self.record(t.name, "ready", started["ready"])
                self.record(
                    t.name, "rss", [started["rss_server"], started["rss_client"]]
                )
                self.record(t.name, "phases", started["phases"])
                say(
                    f"  {t.name}: ready in {started['ready']:.2f}s, RSS "
                    f"{started['rss_server'] / 1e6:.1f} + "
                    f"{started['rss_client'] / 1e6:.1f} MB"
                )
            workloads = [
                ("bulk1_up", lambda t: self.bulk(t, 1, False)),
                ("bulk1_down", lambda t: self.bulk(t, 1, True)),
                ("bulk8_up", lambda t: self.bulk(t, 8, False)),
                ("bulk8_down", lambda t: self.bulk(t, 8, True)),
                ("ka_rate", lambda t: self.http(t, False)),
                ("close_rate", lambda t: self.http(t, True)),
                ("new_p50", lambda t: self.sequential(t, False)),
                ("ka_p50", lambda t: self.sequential(t, True)),
            ]
            for key, workload in workloads:
                for t in tunnels:
                    workload(t)
                say(
                    f"  {key}: "
                    + "; ".join(self._last(t.name, key, number) for t in tunnels)
                )
        finally:
            for t in tunnels:
                t.stop()

    def _last(self, path: str, key: str, number: int) -> str:
        """The value of round ``number`` for ``path``, for the progress line."""
        values = self.figures["runs"].get(path, {}).get(key, [])
        if len(values) < number:
            return f"{path} failed"
        return f"{path} {values[number - 1]:.3g}"


# -- the run ------------------------------------------------------------------


def run(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    s = settings_for(args)
    paths = [p.strip() for p in args.paths.split(",")]
    programs = LOADS + [tool for p in paths for tool in NEEDS.get(p, [])]
    tools = std_tools.ensure(programs, install=not args.no_install, say=say)
    if args.profile:
        std_profile.py_spy()  # missing: say so now, not after the rounds
    started = time.monotonic()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv
        ),
        "load_start": load_average(),
        "rounds": s.rounds,
        "settings": s.__dict__,
        "versions": tool_versions(tools),
        **machine(),
    }
    figures.update(info=info, runs={}, errors=[], retries=[])
    workdir = Path(tempfile.mkdtemp(prefix="threshold-std-bench-"))
    info["workdir"] = str(workdir)
    say(f"working directory {workdir}; load average {info['load_start']}")
    children = Children(workdir)
    try:
        nginx = Nginx(tools["nginx"], workdir / "nginx", children)
        nginx.start()
        iperf = Iperf3Server(tools["iperf3"], children)
        iperf.start()
        backends = {"http": nginx.port, "iperf": iperf.port}
        info["backends"] = backends
        pki = None
        if args.before or any(p.startswith("threshold") for p in paths):
            pki = make_pki(workdir / "pki")
        tunnels: list[Tunnel] = []
        for p in paths:
            if p == "direct":
                tunnels.append(Direct(backends))
            elif p == "haproxy":
                tunnels.append(
                    Haproxy(tools["haproxy"], workdir / "haproxy", children, backends)
                )
            elif p == "ssh -R":
                ssh = OpenSsh(tools["sshd"], tools["ssh"], tools["ssh-keygen"])
                tunnels.append(SshReverse(ssh, workdir / "ssh", children, backends))
            else:
                assert pki is not None
                tls = p == "threshold TLS"
                d = workdir / ("tls" if tls else "plain")
                tunnels.append(Threshold(tls, d, children, backends, pki))
        if args.before:
            # The same TLS tunnel with another checkout's code, in the same
            # run: a before/after that the machine's state cannot skew.
            assert pki is not None
            before = Threshold(
                True,
                workdir / "before",
                children,
                backends,
                pki,
                root=args.before.resolve(),
                name=BEFORE,
            )
            tunnels.append(before)
        bench = Bench(tools, s, iperf, workdir, figures)
        for number in range(1, s.rounds + 1):
            bench.round(tunnels, number)
        if args.profile:
            target = next(t for t in tunnels if t.name == "threshold TLS")
            figures["profile"] = std_profile.profile_close(
                target, tools, PROFILE_SECONDS, Path(args.profile), CONNECTIONS
            )
    finally:
        info["load_end"] = load_average()
        info["seconds"] = time.monotonic() - started
        children.stop_all()
        figures["medians"] = {p: medians(v) for p, v in figures.get("runs", {}).items()}
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def tool_versions(tools: dict[str, str]) -> dict[str, str]:
    flags = {"iperf3": "--version", "wrk": "-v", "ab": "-V", "nginx": "-v"}
    flags.update(haproxy="-v", ssh="-V")
    return {
        name: std_tools.version([tools[name], flag])
        for name, flag in flags.items()
        if name in tools
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="rounds (default 3; --smoke 1)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="1 s per workload (about 3 minutes)"
    )
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="one short round: does everything start and parse (seconds)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated subset of {','.join(PATHS)} (default: all)",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not apt-get install missing tools; name the command and stop",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure here")
    parser.add_argument(
        "--before",
        metavar="DIR",
        type=Path,
        help=f"also run threshold TLS with the code of checkout DIR ({BEFORE!r})",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="afterwards, py-spy the threshold TLS server and client during "
        "the Connection: close workload; raw stacks into DIR, a summary printed",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the working directory (logs)"
    )
    args = parser.parse_args(argv)
    paths = {p.strip() for p in args.paths.split(",")}
    if paths - set(PATHS):
        parser.error(f"unknown paths: {', '.join(sorted(paths - set(PATHS)))}")
    if args.profile and "threshold TLS" not in paths:
        parser.error("--profile needs the threshold TLS path")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    figures: dict[str, Any] = {}
    status = 0
    try:
        run(args, figures)
    except ToolError as e:
        say(f"std_bench: {e}")
        return 2
    except (BenchError, SshError) as e:
        say(f"std_bench: {e}")
        status = 1
    except KeyboardInterrupt:
        say("std_bench: interrupted; every process it started is stopped")
        return 130
    if figures.get("medians"):
        if status:
            say("std_bench: what was measured before the error:")
        report(figures)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
