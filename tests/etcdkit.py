"""A real etcd for tests: one member on 127.0.0.1, random ports, a temp dir.

``EtcdProcess(directory)`` runs Debian's ``etcd`` (``etcd-server``) with
its data in ``directory``; ``start()`` blocks until it serves (a lone
member does in a fraction of a second), ``restart(reactor)`` and
``wait_ready(reactor)`` wait without blocking the reactor (for a test in
progress). ``kill()`` ends it with SIGKILL and ``freeze()``/``thaw()`` stop
and continue it (a member that holds its connections but answers nothing).

trial has no per-class set-up, so tests that only read and write share one
member per test process (``shared_etcd()``, each test under its own key
prefix), and tests that kill, freeze or compact start their own in their
temp dir (``etcd_for_test(case)``, killed by the test's clean-up). Every
process started is killed at exit and, on Linux, when the test process
dies (PR_SET_PDEATHSIG), so none outlives the run.

With ``tls=True`` the client port is HTTPS with ``--client-cert-auth``:
the CA is tests/certs.py's and clients use its certificates. etcd's own
certificate has both serverAuth and clientAuth usages: etcd's JSON gateway
dials the member's gRPC port with it as a client certificate, so a
serverAuth-only certificate makes every gateway call fail ("connection
closed", code 14) while /health still answers.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import defer, task

from tests.certs import signed_by_test_ca, test_pki
from tests.components import require_tool

__all__ = [
    "EtcdProcess",
    "EtcdTlsFiles",
    "etcd_for_test",
    "etcd_tls_files",
    "free_port",
    "shared_etcd",
]

#: Bounds for waiting: a single member serves in about half a second.
START_TIMEOUT = 15.0
PROBE_INTERVAL = 0.02

_running: set[subprocess.Popen[bytes]] = set()


def _kill_all() -> None:
    for proc in list(_running):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _running.clear()


atexit.register(_kill_all)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class EtcdTlsFiles:
    """etcd's certificate (server and client usage) and the test CA."""

    ca: str
    cert: str
    key: str

    def client(self, name: str = "operator") -> tuple[str, str, str]:
        """``(ca, cert, key)`` for EtcdClient: a client certificate of the CA."""
        pki = test_pki()
        return (self.ca, pki.client_cert(name), pki.client_key(name))


_tls_cache: EtcdTlsFiles | None = None


def etcd_tls_files() -> EtcdTlsFiles:
    """etcd's certificate from the test CA, for 127.0.0.1 and localhost.

    etcd's JSON gateway presents it as a client certificate to etcd's own
    gRPC port under --client-cert-auth, so it needs clientAuth as well.
    """
    global _tls_cache
    if _tls_cache is None:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        key = ec.generate_private_key(ec.SECP256R1())
        cert, key_path = signed_by_test_ca("etcd", key, "etcd", ("127.0.0.1",), usages)
        _tls_cache = EtcdTlsFiles(test_pki().ca_cert, cert, key_path)
    return _tls_cache


class EtcdProcess:
    """One etcd member on loopback; the data dir survives ``kill()``."""

    def __init__(
        self,
        directory: str,
        *,
        name: str = "etcd0",
        tls: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.binary = require_tool("etcd")
        self.directory = directory
        self.name = name
        self.data_dir = os.path.join(directory, f"{name}.data")
        self.log_path = os.path.join(directory, f"{name}.log")
        self.tls = etcd_tls_files() if tls else None
        self.extra_args = extra_args
        self._pick_ports()
        self.proc: subprocess.Popen[bytes] | None = None
        #: Seconds the last start took, until the member served.
        self.start_seconds: float | None = None
        self._started_at = 0.0

    def _pick_ports(self) -> None:
        scheme = "https" if self.tls else "http"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"

    def _args(self) -> list[str]:
        args = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.name}={self.peer_url}",
            "--initial-cluster-state=new",
            # A lone member elects itself after one election timeout.
            "--heartbeat-interval=20",
            "--election-timeout=200",
            "--log-level=warn",
        ]
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.cert}",
                f"--key-file={self.tls.key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        return args + list(self.extra_args)

    def spawn(self) -> None:
        """Start the process (without waiting for it to serve)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self._args(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        _running.add(self.proc)
        self._started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> float:
        """Start and block until the member serves; the seconds it took.

        The ports were free when picked; another process may have taken one
        since, so a member that exits for an address in use gets new ports
        (a few times, on its first start only). Blocking also in a test in
        progress is a tool: nothing else runs until it returns (see
        ``restart_blocking``).
        """
        if self.start_seconds is not None:
            return self.restart_blocking()
        for _ in range(3):
            self.spawn()
            deadline = time.monotonic() + START_TIMEOUT
            while not self.probe():
                if not self.running and "address already in use" in self.log_tail():
                    break
                self._check_alive()
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"{self.name} did not serve: {self.log_tail()}")
                time.sleep(PROBE_INTERVAL)
            else:
                return self._served()
            self.kill()
            os.truncate(self.log_path, 0)
            self._pick_ports()
        raise RuntimeError(f"{self.name}: no free ports: {self.log_tail()}")

    def restart_blocking(self) -> float:
        """Start again on the same ports and data, blocking until it serves.

        The reactor stands still meanwhile, so no watch or timer of the test
        runs until the caller yields: what the caller writes right after
        this happens before any client notices that etcd is back.
        """
        self.spawn()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.probe():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not serve: {self.log_tail()}")
            time.sleep(PROBE_INTERVAL)
        return self._served()

    def _served(self) -> float:
        self.start_seconds = time.monotonic() - self._started_at
        return self.start_seconds

    def _check_alive(self) -> None:
        if not self.running:
            raise RuntimeError(f"{self.name} exited: {self.log_tail()}")

    def wait_ready(self, reactor: Any) -> defer.Deferred[float]:
        """Wait, without blocking the reactor for long, until the member serves."""

        async def wait() -> float:
            deadline = time.monotonic() + START_TIMEOUT
            while not self.probe():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not serve: {self.log_tail()}")
                await task.deferLater(reactor, PROBE_INTERVAL, lambda: None)
            return self._served()

        return defer.Deferred.fromCoroutine(wait())

    def restart(self, reactor: Any) -> defer.Deferred[float]:
        """Start again on the same ports and data; fires once it serves."""
        self.spawn()
        return self.wait_ready(reactor)

    def probe(self) -> bool:
        """True when the member answers a KV read (not just /health)."""
        try:
            self.call("/v3/kv/range", {"key": "AA=="}, timeout=0.5)
        except (OSError, http.client.HTTPException, ValueError):
            return False
        return True

    def call(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> Any:
        """One blocking gateway call (for setting up and checking tests)."""
        if self.tls is not None:
            ctx = ssl.create_default_context(cafile=self.tls.ca)
            ctx.load_cert_chain(self.tls.cert, self.tls.key)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.client_port, timeout=timeout, context=ctx
            )
        else:
            conn = http.client.HTTPConnection(
                "127.0.0.1", self.client_port, timeout=timeout
            )
        try:
            conn.request("POST", path, json.dumps(body))
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise ValueError(f"{path}: HTTP {response.status}: {data[:200]!r}")
        return json.loads(data)

    def put(self, key: bytes, value: bytes) -> int:
        """A blocking put (see ``restart_blocking``): the new revision."""
        body = {"key": _b64(key), "value": _b64(value)}
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def revision(self) -> int:
        """The member's current store revision."""
        answer = self.call("/v3/kv/range", {"key": "AA=="})
        return int(answer["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact the history up to ``revision`` (default: the current one)."""
        rev = self.revision() if revision is None else revision
        self.call("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def kill(self) -> None:
        """SIGKILL the member and wait for it to exit (no clean shutdown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen one too
            self.proc.kill()
        self.proc.wait()
        _running.discard(self.proc)

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, etcd answers none."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"


_shared: dict[bool, EtcdProcess] = {}


def shared_etcd(tls: bool = False) -> EtcdProcess:
    """The member this test process shares (started on first use).

    Only for tests that read and write under their own key prefix; its data
    directory is removed at exit.
    """
    etcd = _shared.get(tls)
    if etcd is None or not etcd.running:
        directory = tempfile.mkdtemp(prefix="threshold-etcd-")
        atexit.register(shutil.rmtree, directory, True)
        etcd = EtcdProcess(directory, name="shared", tls=tls)
        etcd.start()
        atexit.register(etcd.kill)  # runs before the rmtree registered above
        _shared[tls] = etcd
    return etcd


def etcd_for_test(case: Any, **kwargs: Any) -> EtcdProcess:
    """A member of the test's own, in its temp dir, killed when it ends."""
    directory = case.mktemp()
    os.makedirs(directory)
    etcd = EtcdProcess(directory, **kwargs)
    etcd.start()
    case.addCleanup(etcd.kill)
    return etcd
