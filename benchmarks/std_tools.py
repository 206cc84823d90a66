"""The operators' tools the standard benchmark drives: finding them, their output.

``std_bench.py`` measures with iperf3, wrk and ab against nginx, beside
haproxy and ``ssh -R``. This module finds those programs (installing their
Debian packages when it may), builds their command lines and parses what
they print. The parsers are pure functions, tested on recorded real output
in ``tests/test_std_bench.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

#: Where Debian puts nginx, haproxy and sshd: not on every user's PATH.
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
#: Program -> the Debian package that ships it.
PACKAGES = {
    "iperf3": "iperf3",
    "wrk": "wrk",
    "ab": "apache2-utils",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}


class ToolError(Exception):
    """A tool is missing or its output cannot be read; the message says why."""


def install_line(packages: Iterable[str]) -> str:
    """The exact command that installs ``packages``."""
    names = " ".join(sorted(set(packages)))
    return f"apt-get update && apt-get install -y {names}"


def find(program: str) -> str | None:
    """The path of ``program`` on PATH or in the sbin directories, or None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(program, path=path)


def ensure(programs: Iterable[str], install: bool, say=print) -> dict[str, str]:
    """Program -> path for each of ``programs``, installing what is missing.

    Installs with ``apt-get`` (after ``apt-get update``) only when ``install``
    is true and this runs as root on a system with apt-get; otherwise, or if
    installing fails, ToolError names the exact command to run.
    """
    programs = list(dict.fromkeys(programs))
    missing = [p for p in programs if find(p) is None]
    if missing:
        packages = sorted({PACKAGES[p] for p in missing})
        line = install_line(packages)
        why = None
        if not install:
            why = "not installing (--no-install)"
        elif os.geteuid() != 0:
            why = "not root"
        elif not shutil.which("apt-get"):
            why = "no apt-get here"
        if why:
            raise ToolError(f"missing {', '.join(missing)}; {why}; run: {line}")
        say(f"installing {' '.join(packages)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", *packages],
        ):
            r = subprocess.run(argv, env=env, capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                raise ToolError(
                    f"{' '.join(argv)} failed: {' / '.join(tail)}; run: {line}"
                )
        still = [p for p in programs if find(p) is None]
        if still:
            raise ToolError(f"still missing after install: {', '.join(still)}")
    return {p: str(find(p)) for p in programs}


def version(argv: list[str]) -> str:
    """First line a program prints about its version (stdout or stderr)."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


# -- iperf3 -------------------------------------------------------------------


@dataclass(frozen=True)
class Bulk:
    """One iperf3 run: what the receiver got."""

    bits_per_second: float
    bytes: int
    seconds: float


def iperf3_argv(
    iperf3: str,
    port: int,
    streams: int,
    reverse: bool,
    seconds: int | None = None,
    size: str | None = None,
) -> list[str]:
    """``iperf3 -c`` to 127.0.0.1:``port``, JSON out; by time or by bytes."""
    argv = [iperf3, "-c", "127.0.0.1", "-p", str(port), "-J"]
    argv += ["-P", str(streams), "--connect-timeout", "5000"]
    argv += ["-n", size] if size else ["-t", str(seconds or 1)]
    return argv + (["-R"] if reverse else [])


def parse_iperf3(text: str) -> Bulk:
    """The receiver's total from ``iperf3 -J`` output (either direction).

    ``sum_received`` is what the receiving end counted: with ``-R`` the
    client, otherwise the server (which sends its figures back at the end).
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolError(f"iperf3 printed no JSON ({e}): {text[:200]!r}") from None
    if doc.get("error"):
        raise ToolError(f"iperf3: {doc['error']}")
    try:
        total = doc["end"]["sum_received"]
        out = Bulk(
            bits_per_second=float(total["bits_per_second"]),
            bytes=int(total["bytes"]),
            seconds=float(total["seconds"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ToolError(f"iperf3 JSON without end.sum_received ({e!r})") from None
    if out.bytes <= 0 or out.seconds <= 0:
        # Seen on a very busy machine: a test that ends having moved nothing.
        raise ToolError(f"iperf3 received {out.bytes} bytes in {out.seconds} s")
    return out


# -- wrk ----------------------------------------------------------------------


@dataclass(frozen=True)
class Http:
    """One wrk run."""

    requests: int
    seconds: float
    rate: float
    errors: int
    #: Latency percentiles in seconds (with ``--latency``), e.g. {"50": 0.0004}.
    latency: dict[str, float]


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", re.M)
_WRK_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)


def wrk_argv(
    wrk: str, url: str, connections: int, seconds: int, close: bool, threads: int = 2
) -> list[str]:
    """``wrk`` on ``url``; ``close`` adds ``Connection: close`` (a new
    connection per request)."""
    argv = [wrk, "-t", str(min(threads, connections)), "-c", str(connections)]
    argv += ["-d", f"{seconds}s", "--timeout", "10s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, url]


def parse_wrk(text: str) -> Http:
    """Requests, rate, errors and latency percentiles from wrk's report.

    Errors: socket errors (connect, read, write, timeout) plus responses
    that were not 2xx or 3xx.
    """
    total, rate = _WRK_TOTAL.search(text), _WRK_RATE.search(text)
    if not total or not rate:
        raise ToolError(f"wrk printed no totals: {text.strip()[-300:]!r}")
    errors = 0
    if m := _WRK_SOCKET.search(text):
        errors += sum(int(x) for x in m.groups())
    if m := _WRK_NON2XX.search(text):
        errors += int(m.group(1))
    latency = {
        p: float(value) * _UNITS[unit]
        for p, value, unit in _WRK_PERCENTILE.findall(text)
    }
    return Http(
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNITS[total.group(3)],
        rate=float(rate.group(1)),
        errors=errors,
        latency=latency,
    )


# -- ab -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sequential:
    """One ab run: one request at a time."""

    complete: int
    failed: int
    #: Responses whose status was not 2xx (ab counts them apart).
    non_2xx: int
    #: Body length of the responses, as ab read it from the first one.
    document_length: int
    #: Median time per request (connect to last byte), seconds.
    p50: float
    p90: float


def ab_argv(
    ab: str, url: str, requests: int, keepalive: bool, csv_path: str
) -> list[str]:
    """``ab -c 1``; ``-e`` writes the percentiles with microsecond precision
    (the report's table is in whole milliseconds)."""
    argv = [ab, "-q", "-r", "-s", "10", "-c", "1", "-n", str(requests)]
    argv += ["-e", csv_path]
    if keepalive:
        argv.append("-k")
    return [*argv, url]


def parse_ab(report: str, percentiles_csv: str) -> Sequential:
    """Counts from ab's report, p50 and p90 from its ``-e`` CSV file."""

    def number(label: str, default: int | None = None) -> int:
        m = re.search(rf"^{label}:\s+(\d+)", report, re.M)
        if m:
            return int(m.group(1))
        if default is None:
            raise ToolError(f"ab report without {label!r}: {report.strip()[-300:]!r}")
        return default

    points: dict[int, float] = {}
    rows = csv.reader(io.StringIO(percentiles_csv))
    for row in rows:
        if len(row) == 2 and row[0].isdigit():
            points[int(row[0])] = float(row[1]) / 1000
    if 50 not in points or 90 not in points:
        raise ToolError("ab percentile file without the 50% and 90% lines")
    return Sequential(
        complete=number("Complete requests"),
        failed=number("Failed requests"),
        non_2xx=number("Non-2xx responses", 0),
        document_length=number("Document Length"),
        p50=points[50],
        p90=points[90],
    )
