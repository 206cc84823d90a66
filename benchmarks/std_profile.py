"""py-spy profiles of a threshold tunnel under one of the standard workloads.

``std_bench.py --profile DIR`` starts the threshold TLS tunnel afresh,
attaches ``py-spy record`` (``pip install py-spy``) to its server and its
client, runs wrk with ``Connection: close`` through it, stops py-spy with
SIGINT, and summarises the raw stacks it wrote: the functions where the
samples were (self), and the functions on the stack (inclusive).
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import std_tools
from std_services import PAGE
from tunnel_bench import BenchError, say

#: Samples per second.
RATE = 200
#: Samples of a busy thread with no Python code on its stack.
NO_FRAME = "(no Python frame)"
#: Frames every sample of a twistd process runs under: the reactor loop and
#: the dispatch to a transport. Left out of the inclusive list.
PLUMBING = re.compile(
    r"^<module>|\(twisted/(scripts|application)/|\(twisted/internet/base\.py|"
    r"EPollReactor\.doPoll|_doReadOrWrite|\(twisted/python/(log|context)\.py"
)
#: What a sample's stack passes through (a sample may count in several):
#: name, pattern on the raw stack.
BUCKETS = [
    ("socket writes (send, in writeSomeData)", r"writeSomeData"),
    ("accepting user connections (Port.doRead)", r"Port\.doRead"),
    (
        "connecting to the service",
        r"doConnect|connectTCP|resolveAddress|Endpoint\.connect\b",
    ),
    (
        "closing (connectionLost, loseConnection)",
        r"connectionLost|_closeSocket|loseConnection",
    ),
    ("logging (twisted.logger, threshold.logs)", r"twisted/logger/|threshold/logs\.py"),
    ("TLS (twisted tls.py, pyOpenSSL)", r"protocols/tls\.py|OpenSSL/"),
    ("mux session and streams (threshold.mux)", r"threshold/mux/"),
    ("frame codec (threshold.wire)", r"threshold/wire/"),
    ("Deferreds", r"internet/defer\.py"),
    ("Failure objects", r"python/failure\.py"),
]
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def short_frame(frame: str) -> str:
    """``name (path:line)`` -> ``name (package/module.py)``, lines merged."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{m.group('name')} ({path})"


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    """Samples, and the top functions by self and by inclusive share.

    ``raw`` is py-spy's ``--format raw``: one line per distinct stack,
    frames root first separated by ``;``, then a space and the count.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    patterns = [(name, re.compile(p)) for name, p in BUCKETS]
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [short_frame(f) for f in stack.split(";") if f.strip()]
        # Thread and process labels that py-spy may put first are not code.
        frames = [f for f in frames if "(" in f] or [NO_FRAME]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            if not PLUMBING.search(f):
                inclusive[f] += n
        if frames[-1].startswith("EPollReactor.doPoll"):
            buckets["waiting in epoll (doPoll itself)"] += n
        for name, pattern in patterns:
            if pattern.search(stack):
                buckets[name] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, n / total) for f, n in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "self": share(own),
        "inclusive": share(inclusive),
        "buckets": share(buckets),
    }


def render(name: str, summary: dict[str, Any]) -> list[str]:
    lines = [f"{name}: {summary['samples']} samples (busy threads only)"]
    lines.append("  stacks passing through:")
    lines += [f"    {p:5.1%}  {f}" for f, p in summary["buckets"]]
    lines.append("  self:")
    lines += [f"    {p:5.1%}  {f}" for f, p in summary["self"]]
    lines.append("  inclusive (below the reactor loop):")
    lines += [f"    {p:5.1%}  {f}" for f, p in summary["inclusive"]]
    return lines


def py_spy() -> str:
    """The py-spy program: beside this Python (its venv), or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise BenchError(
            f"py-spy not found; install it: {sys.executable} -m pip install py-spy"
        )
    return found


def profile_close(
    tunnel: Any, tools: dict[str, str], seconds: int, outdir: Path, connections: int
) -> str:
    """Profile ``tunnel``'s processes under wrk with ``Connection: close``."""
    program = py_spy()
    outdir.mkdir(parents=True, exist_ok=True)
    say(f"profile: {tunnel.name} under wrk Connection: close, py-spy into {outdir}")
    tunnel.start()
    recorders = []
    try:
        (server,), (client,) = tunnel.processes()
        for role, pid in (("server", server), ("client", client)):
            raw = outdir / f"{role}.raw"
            argv = [program, "record", "--nonblocking", "-r", str(RATE), "-f", "raw"]
            argv += ["-o", str(raw), "-p", str(pid)]
            recorders.append(
                (
                    role,
                    raw,
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
        time.sleep(1.0)  # py-spy attaches
        url = f"http://127.0.0.1:{tunnel.ports['http']}{PAGE}"
        argv = std_tools.wrk_argv(tools["wrk"], url, connections, seconds, close=True)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        result = std_tools.parse_wrk(r.stdout)
    finally:
        for _, _, proc in recorders:
            proc.send_signal(signal.SIGINT)
        for role, _, proc in recorders:
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode:
                say(f"  py-spy ({role}) exited {proc.returncode}: {err.strip()[-300:]}")
        tunnel.stop()
    lines = [
        f"py-spy, {tunnel.name}, wrk -c {connections} Connection: close, {seconds} s: "
        f"{result.rate:.0f} connections/s while profiled "
        f"(py-spy --nonblocking, {RATE} Hz)"
    ]
    for role, raw, _ in recorders:
        if raw.exists():
            lines += render(role, summarise(raw.read_text()))
        else:
            lines.append(f"{role}: no profile written")
    (outdir / "summary.txt").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)
