"""The whole tunnel against a direct connection, each piece in its own process.

Run from a checkout::

    .venv/bin/python benchmarks/tunnel_bench.py [--quick] [--keep]

One run starts a backend and a load generator (``tunnel_peers.py``), two
tunnel servers and their clients under ``twistd`` (one deployment with
``UseTls`` false, one with mutual TLS on the control connection and the
management API; certificates from ``threshold.keygen`` in a temporary
directory), opens the tunnels with ``PUT /tunnels``, and runs the same
workloads directly against the backend and through each tunnel:

- bulk throughput, upload and download, on 1 and on 8 connections at once,
  with the CPU seconds the server and the client spend per GB;
- ping-pong latency (100 bytes each way) on a kept-open connection;
- new connections per second (a few clients, each connection one small
  request and reply) and their time to first byte;
- over a user-space delay line (``delayline.py``; 20 and 100 ms round trip,
  100 Mbit/s) placed between the client and the server's control port, or
  between the user and the backend for the direct run: one connection's
  throughput, and at 100 ms the same while another stream of the same
  session is blocked by a user that never reads;
- resident memory of a fresh server and client, idle and with 1,000 and
  10,000 open tunneled connections.

When OpenSSH is installed (``sshd``, ``ssh`` and ``ssh-keygen`` on PATH or
in /usr/sbin; ``apt-get install openssh-server openssh-client``), every
workload also runs through an SSH reverse tunnel, ``ssh -N -R`` to a
private sshd (``sshtunnel.py``), the alternative a self-hoster would most
often pick; ``--no-ssh`` skips it, and it is skipped with a note when
OpenSSH is missing. SSH is always encrypted: compare it with tunnel+TLS.

Every short measurement is repeated and the median printed with its ratio
to the direct run. Progress goes to stderr, the report to stdout. Every
child runs in its own process group and is stopped at the end, on errors
and on Ctrl-C too. See docs/performance.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import os
import platform
import resource
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sshtunnel import (
    INSTALL_HINT,
    OpenSsh,
    SshError,
    SshServer,
    descendants,
    privsep_directory,
    start_time,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "tunnel_peers.py"
DELAYLINE = HERE / "delayline.py"
MiB = 1 << 20
MB = 1_000_000
GB = 1_000_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL = 100  # bytes of each small request and reply
PR_SET_PDEATHSIG = 1  # prctl option, linux/prctl.h
_libc = ctypes.CDLL(None, use_errno=True)
#: The columns of the report, in order; "ssh -R" only when OpenSSH is there.
PATHS = ("direct", "tunnel", "tunnel+TLS", "ssh -R")

# twistd as ``twistd -n --pidfile= threshold-server -c server.json``, plus a
# thread that stops it (SIGTERM, twistd's clean stop) when its stdin, a pipe
# from this benchmark, closes: it never outlives the benchmark.
TWISTD = """
import os, signal, sys, threading
def watch():
    while sys.stdin.buffer.read(4096):
        pass
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "twistd"
from twisted.scripts.twistd import run
run()
"""


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def management_call(
    port: int,
    context: ssl.SSLContext | None,
    method: str,
    path: str,
    body: object = None,
) -> bytes:
    """One call to a gateway's management API on 127.0.0.1 (HTTPS when
    ``context`` is given); the answer's body, or BenchError saying why not."""
    scheme = "https" if context is not None else "http"
    url = f"{scheme}://127.0.0.1:{port}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        raise BenchError(f"{method} {path}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise BenchError(f"{method} {url}: {e}") from None


def say(*parts: object) -> None:
    """Progress on stderr."""
    print(*parts, file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------


class Child:
    """A child process in its own process group, with a line-based stdout."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        logdir: Path,
        *,
        cwd: Path | None = None,
        line_output: bool = True,
        kill_tree: bool = False,
    ) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.kill_tree = kill_tree
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if line_output else self._log,
            stderr=self._log,
            cwd=cwd,
            env=env,
            start_new_session=True,
            # Programs that do not watch their stdin (sshd, ssh) get SIGTERM
            # from the kernel if the benchmark dies without stopping them.
            preexec_fn=_die_with_parent if kill_tree else None,
        )
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> bytes:
        """The next line of stdout; BenchError on timeout or exit."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise BenchError(
                        f"{self.name} exited (status {self.proc.wait()}); "
                        f"log: {self.tail()}"
                    )
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def read_json(self, timeout: float = 30) -> dict:
        return json.loads(self.readline(timeout))

    def request(self, timeout: float = 300, **command: Any) -> dict:
        """Send one JSON command, return the JSON answer; errors raise."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        answer = self.read_json(timeout)
        if "error" in answer:
            raise BenchError(f"{self.name}: {command['op']} failed: {answer['error']}")
        return answer

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n    ".join([""] + text[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if still there after 5 s.

        With ``kill_tree``, every process below the child goes the same way,
        also those that left its process group (sshd's per-connection
        processes call ``setsid``).
        """
        tree = []
        if self.kill_tree:
            tree = [(pid, start_time(pid)) for pid in descendants(self.proc.pid)]
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                say(f"  {self.name} did not stop on SIGTERM; killing it")
        if tree:
            _stop_processes(tree, self.name)
        # Whatever is left in the group (there should be nothing) goes too.
        self._signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _die_with_parent() -> None:
    """In the child before exec: ask for SIGTERM when the parent dies."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop_processes(tree: list[tuple[int, int | None]], name: str) -> None:
    """SIGTERM each (pid, start time) still alive; SIGKILL it after 5 s."""

    def living() -> list[int]:
        return [pid for pid, t in tree if t is not None and start_time(pid) == t]

    for pid in living():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while living() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in living():
        say(f"  process {pid} below {name} did not stop on SIGTERM; killing it")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Children:
    """Every child started, so that all of them are stopped in the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.all: list[Child] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> Child:
        child = Child(name, argv, self.logdir, **kwargs)
        self.all.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.all:
            self.all.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.all):
            try:
                child.stop()
            except Exception as e:  # keep stopping the others
                say(f"  stopping {child.name}: {e}")
        self.all.clear()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of ``pid`` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


#: The processes of one way to the backend: (server side, client side).
Groups = tuple[list[int], list[int]]
#: CPU seconds of each process, per side, at one moment.
CpuSnapshot = tuple[dict[int, float], dict[int, float]]


def cpu_snapshot(groups: Groups) -> CpuSnapshot:
    """CPU seconds so far of every process of both sides."""

    def side(pids: list[int]) -> dict[int, float]:
        seconds = {}
        for pid in pids:
            try:
                seconds[pid] = cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass  # gone meanwhile
        return seconds

    return side(groups[0]), side(groups[1])


def cpu_used(before: CpuSnapshot, after: CpuSnapshot) -> tuple[float, float]:
    """CPU seconds each side used between two snapshots.

    A process that appeared in between counts whole; one that ended in
    between is not seen (none does while a measurement runs).
    """

    def used(b: dict[int, float], a: dict[int, float]) -> float:
        return sum(t - b.get(pid, 0.0) for pid, t in a.items())

    return used(before[0], after[0]), used(before[1], after[1])


def rss_sides(groups: Groups) -> list[int]:
    """Resident memory of each side: the sum over its processes."""
    return [sum(rss_bytes(pid) for pid in pids) for pids in groups]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the deployment: PKI, server, clients, management API ---------------------


class Pki:
    """A throwaway CA, a server certificate and client certificates."""

    def __init__(self, directory: Path, clients: Iterable[str]) -> None:
        sys.path.insert(0, str(ROOT))
        from threshold.keygen import (
            make_ca,
            make_client_cert,
            make_server_cert,
            write_pair,
        )

        directory.mkdir()
        self.dir = directory
        ca = make_ca("threshold benchmark CA")
        write_pair(ca, str(self.ca), str(directory / "ca.key"))
        server = make_server_cert(ca, ["localhost"], ["127.0.0.1"])
        write_pair(server, str(directory / "server.crt"), str(directory / "server.key"))
        for name in [*clients, "operator"]:
            pair = make_client_cert(ca, name)
            write_pair(pair, str(self.cert(name)), str(self.key(name)))

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


class Deployment:
    """A tunnel server and its clients under twistd, driven over the API."""

    def __init__(
        self,
        name: str,
        tls: bool,
        workdir: Path,
        pki: Pki,
        children: Children,
        backend_port: int,
        max_streams: int,
    ) -> None:
        self.name = name
        self.tls = tls
        self.dir = workdir / name
        self.dir.mkdir()
        self.pki = pki
        self.children = children
        self.backend_port = backend_port
        self.max_streams = max_streams
        self.control_port = free_port()
        self.management_port = free_port()
        self.server: Child | None = None
        self.clients: dict[str, Child] = {}
        self.tunnels: dict[str, int] = {}  # client id -> public port
        self._ssl: ssl.SSLContext | None = None
        if tls:
            self._ssl = ssl.create_default_context(cafile=str(pki.ca))
            self._ssl.load_cert_chain(pki.cert("operator"), pki.key("operator"))

    def _twistd(self, name: str, plugin: str, config: dict) -> Child:
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(config, indent=2))
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile="]
        argv += [plugin, "-c", str(path)]
        return self.children.start(
            f"{self.name}-{name}", argv, cwd=self.dir, line_output=False
        )

    def start_server(self) -> None:
        config: dict[str, Any] = {
            "TunnelControlPort": self.control_port,
            "ManagementPort": self.management_port,
            "ListenAddress": "127.0.0.1",
            "ManagementListenAddress": "127.0.0.1",
            "UseTls": self.tls,
            # The defaults (4096 streams, 10,000 connections per tunnel, 256
            # per source IP) would stop the memory test early; every user
            # here comes from 127.0.0.1.
            "MaxStreamsPerSession": self.max_streams,
            "MaxConnectionsPerTunnel": 0,
            "MaxConnectionsPerSourceIp": 0,
        }
        if self.tls:
            config.update(
                CaCertificateFile=str(self.pki.ca),
                ServerTlsCertificateFile=str(self.pki.dir / "server.crt"),
                ServerTlsKeyFile=str(self.pki.dir / "server.key"),
                ManagementAllowedCommonNames=["operator"],
            )
        self.server = self._twistd("server", "threshold-server", config)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.api("GET", "/ping") == b"pong":
                    return
            except BenchError:
                pass  # not listening yet
            if not self.server.alive() or time.monotonic() > deadline:
                raise BenchError(
                    f"{self.server.name} did not start: {self.server.tail()}"
                )
            time.sleep(0.1)

    def start_client(self, client_id: str, control_port: int | None = None) -> Child:
        """Start a client (through ``control_port`` if given); wait for it."""
        config: dict[str, Any] = {
            "ClientId": client_id,
            "ServerHost": "127.0.0.1",
            "ServerTunnelControlPort": control_port or self.control_port,
            "UseTls": self.tls,
            "ServiceToLocalAddrMap": {"bench": f"127.0.0.1:{self.backend_port}"},
            "MaxStreamsPerSession": self.max_streams,
            "ReconnectInitialDelaySeconds": 0.2,
            "ReconnectMaxDelaySeconds": 2,
        }
        if self.tls:
            config.update(
                CaCertificateFile=str(self.pki.ca),
                ClientTlsCertificateFile=str(self.pki.cert(client_id)),
                ClientTlsKeyFile=str(self.pki.key(client_id)),
            )
        child = self._twistd(f"client-{client_id}", "threshold-client", config)
        self.clients[client_id] = child
        deadline = time.monotonic() + 30
        while True:
            clients = json.loads(self.api("GET", "/clients"))
            if clients.get(client_id, {}).get("CurrentState") == "ClientConnected":
                return child
            if not child.alive() or time.monotonic() > deadline:
                raise BenchError(f"{child.name} did not connect: {child.tail()}")
            time.sleep(0.1)

    def open_tunnel(self, client_id: str) -> int:
        """Give ``client_id`` a public port (PUT /tunnels); return the port."""
        self.tunnels[client_id] = free_port()
        body = [
            {
                "ClientId": cid,
                "ListenAddress": "127.0.0.1",
                "ListenPort": port,
                "ListenHostnameGlob": "*",
                "BackEndService": "bench",
                "HaProxyProxyProtocol": False,
            }
            for cid, port in self.tunnels.items()
        ]
        answer = json.loads(self.api("PUT", "/tunnels", body))
        if len(answer) != len(body):
            raise BenchError(f"PUT /tunnels answered {answer}")
        return self.tunnels[client_id]

    def open_streams(self, client_id: str) -> int:
        clients = json.loads(self.api("GET", "/clients"))
        return clients.get(client_id, {}).get("OpenStreams", 0)

    def api(self, method: str, path: str, body: object = None) -> bytes:
        """One management API call; the answer's body."""
        return management_call(self.management_port, self._ssl, method, path, body)

    def processes(self, client_id: str) -> Groups:
        """([server pid], [client pid])."""
        assert self.server is not None
        return [self.server.pid], [self.clients[client_id].pid]

    def stop(self) -> None:
        for child in self.clients.values():
            self.children.stop(child)
        self.clients.clear()
        if self.server is not None:
            self.children.stop(self.server)
            self.server = None


# -- measurements -------------------------------------------------------------


@dataclass
class Settings:
    """How much of each measurement one run does."""

    repeat: int
    bulk_seconds: float
    warm_bytes: int
    rr_count: int
    conn_seconds: float
    conn_clients: int
    memory_counts: tuple[int, ...]
    memory_modes: tuple[str, ...]
    memory_rounds: int
    far_bytes: int
    far_repeat: int
    rtts: tuple[int, ...]
    mbit: float


def settings_for(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            repeat=3,
            bulk_seconds=0.3,
            warm_bytes=32 * MiB,
            rr_count=1000,
            conn_seconds=0.5,
            conn_clients=4,
            memory_counts=(1000, 10000),
            memory_modes=("tls",),
            memory_rounds=args.memory_rounds,
            far_bytes=(args.far_mib or 8) * MiB,
            far_repeat=1,
            rtts=(20, 100),
            mbit=args.mbit,
        )
    return Settings(
        repeat=5,
        bulk_seconds=0.8,
        warm_bytes=64 * MiB,
        rr_count=3000,
        conn_seconds=1.5,
        conn_clients=4,
        memory_counts=(1000, 10000),
        memory_modes=("plain", "tls"),
        memory_rounds=args.memory_rounds,
        far_bytes=(args.far_mib or 24) * MiB,
        far_repeat=3,
        rtts=(20, 100),
        mbit=args.mbit,
    )


#: What the measurements need of a deployment: a threshold one or sshd.
Tunnels = Deployment | SshServer


@dataclass
class Target:
    """A way to the backend: directly, or through one deployment's tunnel."""

    name: str
    port: int
    #: The server's and the client's processes, looked up when measured.
    processes: Callable[[], Groups] | None = None


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


class Bench:
    """Runs the measurements and keeps the figures for the report."""

    def __init__(
        self, loadgen: Child, settings: Settings, figures: dict[str, Any]
    ) -> None:
        self.loadgen = loadgen
        self.s = settings
        self.figures = figures

    # bulk -------------------------------------------------------------------

    def bulk_once(
        self, path: Target, direction: str, conns: int, total: int, check: bool
    ) -> dict:
        per_conn = max(1, total // conns)
        before = cpu_snapshot(path.processes()) if path.processes else None
        r = self.loadgen.request(
            op="bulk",
            direction=direction,
            port=path.port,
            conns=conns,
            bytes=per_conn,
            check=check,
            timeout=300,
        )
        r["rate"] = r["bytes"] / r["elapsed"]
        if path.processes and before is not None:
            server, client = cpu_used(before, cpu_snapshot(path.processes()))
            gb = r["bytes"] / GB
            r["cpu_server"] = server / gb
            r["cpu_client"] = client / gb
        return r

    def bulk(self, paths: list[Target]) -> None:
        workloads = [
            ("bulk upload, 1 connection", "up", 1),
            ("bulk download, 1 connection", "down", 1),
            ("bulk upload, 8 connections", "up", 8),
            ("bulk download, 8 connections", "down", 8),
        ]
        table = {}
        for title, direction, conns in workloads:
            sizes = {}
            for path in paths:
                # The warm-up checks a SHA-256 of every byte and sizes the
                # measured runs to take about bulk_seconds each.
                warm = self.bulk_once(
                    path, direction, conns, self.s.warm_bytes, check=True
                )
                total = int(warm["rate"] * self.s.bulk_seconds)
                sizes[path.name] = min(max(total, 16 * MiB), 8 << 30)
            runs: dict[str, list[dict]] = {p.name: [] for p in paths}
            for _ in range(self.s.repeat):
                for path in paths:
                    runs[path.name].append(
                        self.bulk_once(
                            path, direction, conns, sizes[path.name], check=False
                        )
                    )
            row = {}
            for path in paths:
                rs = runs[path.name]
                row[path.name] = {
                    "rate": median(r["rate"] for r in rs),
                    "runs": [round(r["rate"] / MB) for r in rs],
                    "bytes": sizes[path.name],
                }
                if path.processes:
                    row[path.name]["cpu_server"] = median(r["cpu_server"] for r in rs)
                    row[path.name]["cpu_client"] = median(r["cpu_client"] for r in rs)
            say(
                f"  {title}: MB/s per run "
                + "; ".join(f"{p.name} {row[p.name]['runs']}" for p in paths)
            )
            table[title] = row
        self.figures["bulk"] = table

    # latency and connection rate -------------------------------------------

    def rr(self, paths: list[Target]) -> None:
        runs: dict[str, list[dict]] = {p.name: [] for p in paths}
        for _ in range(self.s.repeat):
            for path in paths:
                runs[path.name].append(
                    self.loadgen.request(
                        op="rr", port=path.port, size=SMALL, count=self.s.rr_count
                    )
                )
        self.figures["rr"] = {
            name: {
                "p50": median(r["p50"] for r in rs),
                "p99": median(r["p99"] for r in rs),
            }
            for name, rs in runs.items()
        }
        say(
            "  ping-pong p50/p99 µs: "
            + "; ".join(
                f"{n} {[(round(r['p50'] * 1e6), round(r['p99'] * 1e6)) for r in rs]}"
                for n, rs in runs.items()
            )
        )

    def conn(self, paths: list[Target]) -> None:
        """Connection rate and time to first byte: a few clients, then one."""
        table: dict[int, dict] = {}
        for clients in (self.s.conn_clients, 1):
            runs: dict[str, list[dict]] = {p.name: [] for p in paths}
            for _ in range(self.s.repeat):
                for path in paths:
                    before = cpu_snapshot(path.processes()) if path.processes else None
                    r = self.loadgen.request(
                        op="conn",
                        port=path.port,
                        size=SMALL,
                        seconds=self.s.conn_seconds,
                        clients=clients,
                        timeout=self.s.conn_seconds + 120,
                    )
                    if path.processes and before is not None:
                        after = cpu_snapshot(path.processes())
                        server, client = cpu_used(before, after)
                        r["cpu_server"] = server / r["count"]
                        r["cpu_client"] = client / r["count"]
                    runs[path.name].append(r)
            row = {}
            for path in paths:
                rs = runs[path.name]
                row[path.name] = {
                    "rate": median(r["rate"] for r in rs),
                    "ttfb_p50": median(r["ttfb_p50"] for r in rs),
                    "ttfb_p99": median(r["ttfb_p99"] for r in rs),
                    "errors": sum(r["errors"] for r in rs),
                    "first_errors": [e for r in rs for e in r["first_errors"]][:3],
                }
                if path.processes:
                    row[path.name]["cpu_server"] = median(r["cpu_server"] for r in rs)
                    row[path.name]["cpu_client"] = median(r["cpu_client"] for r in rs)
            table[clients] = row
            say(
                f"  {clients} client(s), connections/s per run: "
                + "; ".join(
                    f"{n} {[round(r['rate']) for r in rs]}" for n, rs in runs.items()
                )
            )
        self.figures["conn"] = table

    # long-distance paths ---------------------------------------------------

    def far(self, rtt: int, paths: list[Target]) -> None:
        """One connection's throughput over the delay line, both ways."""
        result = {}
        for direction in ("down", "up"):
            runs: dict[str, list[dict]] = {p.name: [] for p in paths}
            for _ in range(self.s.far_repeat):
                for path in paths:
                    runs[path.name].append(
                        self.bulk_once(path, direction, 1, self.s.far_bytes, False)
                    )
            result[direction] = {
                name: {
                    "rate": median(r["rate"] for r in rs),
                    "second_half": (
                        median(r["second_half_rate"] for r in rs)
                        if direction == "down"
                        else None
                    ),
                    # From the request, sent right after connect, to the first
                    # byte of the download.
                    "first_byte": (
                        median(r["first_byte"] for r in rs)
                        if direction == "down"
                        else None
                    ),
                    "runs": [round(r["rate"] / MB, 2) for r in rs],
                }
                for name, rs in runs.items()
            }
            say(
                f"  {rtt} ms {direction}: MB/s per run "
                + "; ".join(f"{n} {v['runs']}" for n, v in result[direction].items())
            )
        self.figures.setdefault("far", {}).setdefault(rtt, {}).update(result)

    def blocked(self, tunnel: Target, deployment: Tunnels, client_id: str) -> None:
        """Download on one stream, without and with a blocked stream beside it."""

        def downloads() -> list[dict]:
            return [
                self.bulk_once(tunnel, "down", 1, self.s.far_bytes, False)
                for _ in range(self.s.far_repeat)
            ]

        assert tunnel.processes is not None
        rss_before = rss_sides(tunnel.processes())
        free = downloads()
        self.loadgen.request(op="block", port=tunnel.port, bytes=1 << 50)
        time.sleep(2.0)  # let the blocked stream fill its window and buffers
        streams = deployment.open_streams(client_id)
        rss_blocked = rss_sides(tunnel.processes())
        with_block = downloads()
        rss_after = rss_sides(tunnel.processes())
        self.loadgen.request(op="unblock")
        blocked = self.figures.setdefault("blocked", {})
        blocked[tunnel.name] = {
            "without": median(r["rate"] for r in free),
            "with": median(r["rate"] for r in with_block),
            "runs": (
                [round(r["rate"] / MB, 2) for r in free],
                [round(r["rate"] / MB, 2) for r in with_block],
            ),
            "streams": streams,
            "rss_before": rss_before,
            "rss_blocked": rss_blocked,
            "rss_after": rss_after,
        }
        say(f"  blocked stream, {tunnel.name}: {blocked[tunnel.name]['runs']}")

    # memory ----------------------------------------------------------------

    def memory(self, mode: str, deployment: Tunnels, client_id: str) -> None:
        """RSS of a fresh server and client, idle and with N connections."""
        port = deployment.tunnels[client_id]
        # Warm up: the first connections import and allocate what every
        # connection needs once; "idle" is measured after that.
        self.loadgen.request(op="hold", port=port, count=100)
        self.loadgen.request(op="release")
        self._wait_streams(deployment, client_id, 0)
        time.sleep(1.0)
        points = [{"count": 0, **self._rss(deployment, client_id)}]
        for round_ in range(self.s.memory_rounds):
            points += self._memory_round(mode, deployment, client_id, round_)
        self.figures.setdefault("memory", {})[mode] = points

    def _memory_round(
        self, mode: str, deployment: Tunnels, client_id: str, round_: int
    ) -> list[dict]:
        port = deployment.tunnels[client_id]
        points = []
        held = 0
        for count in self.s.memory_counts:
            r = self.loadgen.request(
                op="hold", port=port, count=count - held, timeout=900
            )
            held = r["held"]
            time.sleep(1.0)
            point = {
                "count": held,
                "asked": count,
                **self._rss(deployment, client_id),
                "seconds": r["elapsed"],
                "errors": r["errors"],
                "first_errors": r["first_errors"],
                "streams": deployment.open_streams(client_id),
                "round": round_,
            }
            points.append(point)
            say(
                f"  {mode}: {held} connections held (asked {count}, "
                f"{r['elapsed']:.1f}s, {r['errors']} errors), RSS server "
                f"{point['rss'][0] / MiB:.1f} MiB, client "
                f"{point['rss'][1] / MiB:.1f} MiB"
            )
            if held < count:
                break
        self.loadgen.request(op="release")
        drained = self._wait_streams(deployment, client_id, 0, timeout=60)
        time.sleep(1.0)
        points.append(
            {
                "count": "released",
                **self._rss(deployment, client_id),
                "ok": drained,
                "round": round_,
            }
        )
        return points

    @staticmethod
    def _rss(deployment: Tunnels, client_id: str) -> dict[str, list]:
        """RSS of each side (summed), and of each process as well."""
        groups = deployment.processes(client_id)
        each = [[rss_bytes(pid) for pid in pids] for pids in groups]
        return {"rss": [sum(side) for side in each], "rss_each": each}

    def _wait_streams(
        self, deployment: Tunnels, client_id: str, target: int, timeout: float = 30
    ) -> bool:
        deadline = time.monotonic() + timeout
        while deployment.open_streams(client_id) > target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


# -- the run ------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import twisted

    try:
        revision = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        revision = ""
    return {
        "revision": revision or "unknown",
        "cpus": f"{os.cpu_count()} CPUs ({model})",
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "twisted": twisted.__version__,
    }


def find_ssh(args: argparse.Namespace, info: dict[str, Any]) -> OpenSsh | None:
    """OpenSSH's programs, unless ``--no-ssh`` or missing; notes why in ``info``."""
    if args.no_ssh:
        info["ssh"] = "skipped (--no-ssh)"
        return None
    tools = OpenSsh.find()
    if tools is None:
        info["ssh"] = f"skipped: sshd, ssh or ssh-keygen not found ({INSTALL_HINT})"
        say(f"ssh -R columns {info['ssh']}")
        return None
    info["ssh"] = f"{tools.version()}, {tools.sshd}"
    if privsep_directory():
        say("created /run/sshd, which a root sshd needs")
    return tools


def run(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    """Start everything, measure into ``figures``, stop everything."""
    s = settings_for(args)
    sections = set(args.sections.split(","))
    started = time.monotonic()
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv
        ),
        "load_start": load_average(),
        **machine(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="threshold-tunnel-bench-"))
    say(f"working directory {workdir}; load average {info['load_start']}")
    children = Children(workdir)
    figures["info"] = info
    try:
        # Children inherit the limit (twistd cannot raise it itself); the
        # peers raise their own as well.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        info["nofile"] = hard
        client_ids = ["bench", "mem", *(f"far{rtt}" for rtt in s.rtts)]
        pki = Pki(workdir / "pki", client_ids)
        backend = children.start("backend", [sys.executable, str(PEERS), "backend"])
        backend_port = backend.read_json()["port"]
        loadgen = children.start("loadgen", [sys.executable, str(PEERS), "loadgen"])
        info["nofile_loadgen"] = loadgen.request(op="limits")["nofile"]
        bench = Bench(loadgen, s, figures)
        max_streams = max(s.memory_counts) * 2

        def deployment(name: str, tls: bool) -> Deployment:
            d = Deployment(name, tls, workdir, pki, children, backend_port, max_streams)
            d.start_server()
            return d

        tools = find_ssh(args, info)

        def ssh_server(name: str) -> SshServer:
            assert tools is not None
            server = SshServer(
                tools, workdir / name, children, name=name, cipher=args.ssh_cipher
            )
            server.start()
            info.setdefault("ssh_cipher", server.negotiated_cipher())
            return server

        if sections & {"bulk", "rr", "conn", "far"}:
            say("starting the tunnels (plain, TLS" + (", ssh -R)" if tools else ")"))
            plain = deployment("plain", False)
            tls = deployment("tls", True)
            plain.start_client("bench")
            tls.start_client("bench")
            paths = [
                Target("direct", backend_port),
                Target(
                    "tunnel",
                    plain.open_tunnel("bench"),
                    functools.partial(plain.processes, "bench"),
                ),
                Target(
                    "tunnel+TLS",
                    tls.open_tunnel("bench"),
                    functools.partial(tls.processes, "bench"),
                ),
            ]
            ssh = None
            if tools:
                ssh = ssh_server("ssh")
                paths.append(
                    Target(
                        "ssh -R",
                        ssh.start_client("bench", backend_port),
                        functools.partial(ssh.processes, "bench"),
                    )
                )
            if "bulk" in sections:
                say("bulk throughput")
                bench.bulk(paths)
            if "rr" in sections:
                say("ping-pong latency")
                bench.rr(paths)
            if "conn" in sections:
                say("new connections")
                bench.conn(paths)
            if "far" in sections:
                say(
                    f"long-distance paths ({s.mbit:g} Mbit/s, TLS tunnel"
                    + (", ssh -R)" if ssh else ")")
                )
                # (what, rtt) -> the port of a delay line to that target
                targets = [("direct", backend_port), ("tls", tls.control_port)]
                if ssh:
                    targets.append(("ssh", ssh.port))
                keys = [(what, rtt) for rtt in s.rtts for what, _ in targets]
                argv = [sys.executable, str(DELAYLINE), "--mbit", str(s.mbit)]
                for rtt in s.rtts:
                    for _, port in targets:
                        argv += ["--line", f"127.0.0.1:{port},{rtt}"]
                delay = children.start("delayline", argv)
                ports = dict(zip(keys, delay.read_json()["ports"], strict=True))
                for rtt in s.rtts:
                    client_id = f"far{rtt}"
                    tls.start_client(client_id, control_port=ports["tls", rtt])
                    far_paths = [
                        Target("direct", ports["direct", rtt]),
                        Target(
                            "tunnel+TLS",
                            tls.open_tunnel(client_id),
                            functools.partial(tls.processes, client_id),
                        ),
                    ]
                    if ssh:
                        far_paths.append(
                            Target(
                                "ssh -R",
                                ssh.start_client(
                                    client_id, backend_port, ports["ssh", rtt]
                                ),
                                functools.partial(ssh.processes, client_id),
                            )
                        )
                    bench.far(rtt, far_paths)
                    clients = json.loads(tls.api("GET", "/clients"))
                    figures["far"][rtt]["session_rtt_ms"] = clients[client_id].get(
                        "RttMilliseconds"
                    )
                    if rtt == max(s.rtts):
                        say(f"  {rtt} ms with a blocked stream on the same session")
                        bench.blocked(far_paths[1], tls, client_id)
                        if ssh:
                            say(f"  {rtt} ms with a blocked channel, ssh -R")
                            bench.blocked(far_paths[2], ssh, client_id)
                figures["far_info"] = {"mbit": s.mbit, "bytes": s.far_bytes}
                children.stop(delay)
            plain.stop()
            tls.stop()
            if ssh:
                ssh.stop()
        if "memory" in sections:
            for mode in s.memory_modes + (("ssh",) if tools else ()):
                say(f"memory ({mode}), fresh server and client")
                d: Tunnels
                if mode == "ssh":
                    d = ssh_server("mem-ssh")
                    d.start_client("mem", backend_port)
                else:
                    d = deployment(f"mem-{mode}", mode == "tls")
                    d.start_client("mem")
                    d.open_tunnel("mem")
                bench.memory(mode, d, "mem")
                d.stop()
    finally:
        info["load_end"] = load_average()
        info["seconds"] = time.monotonic() - started
        children.stop_all()
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# -- the report ---------------------------------------------------------------


def fmt_rate(bps: float) -> str:
    mb = bps / MB
    return f"{mb:.0f} MB/s" if mb >= 100 else f"{mb:.1f} MB/s"


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f} µs" if us < 10000 else f"{us / 1000:.1f} ms"


def present(fig: dict) -> list[str]:
    """The paths measured in ``fig``, in the report's column order."""
    return [name for name in PATHS if name in fig]


def ratio(value: float, direct: float, digits: int) -> str:
    return f"{value / direct:.{digits}f}" if direct else "-"


def report(figures: dict, settings: Settings, out: Callable[[str], None]) -> None:
    """Print the figures: medians and ratios to the direct run."""
    info = figures["info"]
    out("")
    out(f"threshold tunnel benchmark, {info['date']}")
    out(f"command: {info['command']} (checkout {info['revision']})")
    out(
        f"machine: {info['cpus']}, {info['system']}, Python {info['python']}, "
        f"Twisted {info['twisted']}; open files limit {info['nofile']}"
    )
    if info.get("nofile", 0) < 25000:
        out(
            f"  (the hard limit is {info.get('nofile')}: below 25,000 but enough, "
            "as no process here holds more than about 10,100 descriptors)"
        )
    ssh = info.get("ssh", "not run")
    if "ssh_cipher" in info:
        ssh += f"; cipher {info['ssh_cipher']}"
    out(f"ssh -R: {ssh}")
    out(
        f"load average (1, 5, 15 min): {info['load_start']} at start, "
        f"{info.get('load_end', '?')} at end; {info.get('seconds', 0):.0f} s"
    )
    out(
        f"median of {settings.repeat} runs (bulk: after a warm-up run that checks "
        "SHA-256); MB = 10^6 bytes; ratio = that path / direct"
    )

    def row(label: str, cells: list[str]) -> str:
        return (f"{label:<34}" + "".join(f"{c:>12}" for c in cells)).rstrip()

    def header(names: list[str]) -> str:
        return row("", ["direct", *(x for n in names[1:] for x in (n, "ratio"))])

    def sides(names: list[str]) -> str:
        """Which process is "server" and which "client" for ssh -R."""
        if "ssh -R" not in names:
            return ""
        return "; ssh -R: sshd (all its processes) / ssh"

    if "bulk" in figures:
        names = present(next(iter(figures["bulk"].values())))
        out("")
        out(header(names))
        for title, fig in figures["bulk"].items():
            d = fig["direct"]["rate"]
            cells = [fmt_rate(d)]
            for n in names[1:]:
                cells += [fmt_rate(fig[n]["rate"]), ratio(fig[n]["rate"], d, 2)]
            out(row(title, cells))
    if "rr" in figures:
        fig = figures["rr"]
        names = present(fig)
        out("")
        out(
            f"ping-pong, {SMALL} B each way, {settings.rr_count} round trips "
            "on one kept-open connection"
        )
        out(header(names))
        for key in ("p50", "p99"):
            d = fig["direct"][key]
            cells = [fmt_us(d)]
            for n in names[1:]:
                cells += [fmt_us(fig[n][key]), ratio(fig[n][key], d, 1)]
            out(row(f"  round trip {key}", cells))
    if "conn" in figures:
        for clients, fig in figures["conn"].items():
            names = present(fig)
            out("")
            who = "one client at a time" if clients == 1 else f"{clients} clients"
            out(
                f"new connections, {who}, {settings.conn_seconds:g} s; each: "
                f"connect, {SMALL} B request, {SMALL} B reply, backend closes"
            )
            out(header(names))
            d = fig["direct"]["rate"]
            cells = [f"{d:.0f}/s"]
            for n in names[1:]:
                cells += [f"{fig[n]['rate']:.0f}/s", ratio(fig[n]["rate"], d, 2)]
            out(row("  connections per second", cells))
            for key, label in (
                ("ttfb_p50", "first byte p50"),
                ("ttfb_p99", "first byte p99"),
            ):
                d = fig["direct"][key]
                cells = [fmt_us(d)]
                for n in names[1:]:
                    cells += [fmt_us(fig[n][key]), ratio(fig[n][key], d, 1)]
                out(row(f"  time to {label}", cells))
            cells = [""]
            for n in names[1:]:
                server, client = fig[n]["cpu_server"], fig[n]["cpu_client"]
                cells += [f"{server * 1e6:.0f} / {client * 1e6:.0f}", ""]
            out(row("  CPU µs per connection, srv / cli", cells))
            errors = {n: fig[n]["errors"] for n in names if fig[n]["errors"]}
            if errors:
                example = next(fig[n]["first_errors"] for n in errors)
                out(f"  failed connections: {errors}; e.g. {example}")
    if "bulk" in figures:
        names = present(next(iter(figures["bulk"].values())))
        out("")
        out(f"CPU seconds per GB moved, server / client{sides(names)}")
        out(row("", ["", *(x for n in names[1:] for x in (n, ""))]))
        for title, fig in figures["bulk"].items():
            cells = [""]
            for n in names[1:]:
                cells += [
                    f"{fig[n]['cpu_server']:.2f} / {fig[n]['cpu_client']:.2f}",
                    "",
                ]
            out(row(title, cells))
    if "far" in figures:
        far = figures["far_info"]
        out("")
        out(
            f"one connection over a delay line: {far['mbit']:g} Mbit/s, queue one "
            f"RTT, {far['bytes'] / MiB:.0f} MiB per run, median of "
            f"{settings.far_repeat}; through the line: the TLS tunnel's control "
            "connection, the ssh connection, the direct connection"
        )
        for rtt, result in figures["far"].items():
            names = present(result["down"])
            if rtt == next(iter(figures["far"])):
                out(header(names))
            session_rtt = result.get("session_rtt_ms")
            if session_rtt is not None:
                out(f"  {rtt} ms line: the session's RTT (Ping) {session_rtt:.1f} ms")
            for direction in ("down", "up"):
                fig = result[direction]
                d = fig["direct"]
                word = "download" if direction == "down" else "upload"
                cells = [fmt_rate(d["rate"])]
                for n in names[1:]:
                    cells += [
                        fmt_rate(fig[n]["rate"]),
                        ratio(fig[n]["rate"], d["rate"], 2),
                    ]
                out(row(f"  {rtt} ms RTT, {word}", cells))
                if d["second_half"]:
                    cells = [fmt_rate(d["second_half"])]
                    for n in names[1:]:
                        half = fig[n]["second_half"]
                        cells += [fmt_rate(half), ratio(half, d["second_half"], 2)]
                    out(row("    second half of the transfer", cells))
                if d.get("first_byte"):
                    cells = [fmt_us(d["first_byte"])]
                    for n in names[1:]:
                        first = fig[n]["first_byte"]
                        cells += [fmt_us(first), ratio(first, d["first_byte"], 1)]
                    out(row("    time to first byte", cells))
    if "blocked" in figures:
        rtt = max(settings.rtts)
        out("")
        out(
            f"{rtt} ms RTT, download on one connection while another connection "
            "through the same tunnel is blocked (its user never reads)"
        )
        out(row("", ["not blocked", "blocked", "ratio"]))
        for name, b in figures["blocked"].items():
            out(
                row(
                    f"  {name}",
                    [
                        fmt_rate(b["without"]),
                        fmt_rate(b["with"]),
                        ratio(b["with"], b["without"], 2),
                    ],
                )
            )
            out(
                "    RSS server / client (MiB): before "
                + " / ".join(f"{x / MiB:.1f}" for x in b["rss_before"])
                + ", blocked "
                + " / ".join(f"{x / MiB:.1f}" for x in b["rss_blocked"])
                + ", after the runs beside it "
                + " / ".join(f"{x / MiB:.1f}" for x in b["rss_after"])
            )
    if "memory" in figures:
        out("")
        out(
            "resident memory (VmRSS) of a fresh server and client, MiB; "
            "idle users that sent a few bytes"
        )
        out(row("", ["server", "client", "per conn", "server", "client", "opened in"]))
        labels = {
            "plain": "plain tunnel",
            "tls": "TLS tunnel",
            "ssh": "ssh -R (server: the sum over sshd's processes)",
        }
        for mode, points in figures["memory"].items():
            idle = points[0]["rss"]
            out(f"  {labels.get(mode, mode)}")
            for p in points:
                if p["count"] == "released":
                    label = "    all closed again"
                    if settings.memory_rounds > 1:
                        label += f" (round {p['round'] + 1})"
                    if not p["ok"]:
                        label += " (streams still open)"
                    per = ["", ""]
                elif p["count"] == 0:
                    label = "    idle"
                    per = ["", ""]
                else:
                    n = p["count"]
                    label = f"    {n} connections"
                    if n < p["asked"]:
                        label += f" (of {p['asked']})"
                    # Later rounds start from a higher mark, not from idle.
                    per = (
                        ["", ""]
                        if p["round"]
                        else [
                            f"{(p['rss'][0] - idle[0]) / n / 1024:.1f} KiB",
                            f"{(p['rss'][1] - idle[1]) / n / 1024:.1f} KiB",
                        ]
                    )
                out(
                    row(
                        label,
                        [
                            f"{p['rss'][0] / MiB:.1f}",
                            f"{p['rss'][1] / MiB:.1f}",
                            "",
                            *per,
                            f"{p['seconds']:.1f} s" if "seconds" in p else "",
                        ],
                    )
                )
                if p.get("errors"):
                    out(f"      {p['errors']} failed: {p['first_errors']}")
        out(
            "  (per conn = (RSS with N - RSS idle) / N, server and client; "
            "opened in: the time to open them, 8 at a time)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer and shorter runs (1-2 minutes)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the working directory (configs, certificates, logs)",
    )
    parser.add_argument(
        "--mbit",
        type=float,
        default=100.0,
        help="bandwidth of the delay line, Mbit/s (default 100)",
    )
    parser.add_argument(
        "--far-mib",
        type=int,
        default=None,
        help="MiB per run over the delay line (default 24, --quick 8)",
    )
    parser.add_argument(
        "--sections",
        default="bulk,rr,conn,far,memory",
        help="comma-separated subset of bulk,rr,conn,far,memory (default: all)",
    )
    parser.add_argument(
        "--memory-rounds",
        type=int,
        default=1,
        help="open and close the connections this many times (default 1); "
        "more rounds tell a leak from the allocator keeping its high-water mark",
    )
    parser.add_argument(
        "--no-ssh",
        action="store_true",
        help="skip the ssh -R columns; they run by default whenever sshd, ssh "
        "and ssh-keygen are found (on PATH or in /usr/sbin), and are skipped "
        f"with a note when not ({INSTALL_HINT})",
    )
    parser.add_argument(
        "--ssh-cipher",
        metavar="CIPHER",
        help="cipher for ssh -R (ssh -c); default: what OpenSSH picks "
        "(chacha20-poly1305@openssh.com)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"bulk", "rr", "conn", "far", "memory"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
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
    except (BenchError, SshError) as e:
        say(f"tunnel_bench: {e}")
        status = 1
    except KeyboardInterrupt:
        say("tunnel_bench: interrupted; every process it started is stopped")
        return 130
    if "info" in figures:
        if status:
            say("tunnel_bench: what was measured before the error:")
        report(figures, settings_for(args), print)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
