"""What the standard benchmark runs: the backends and the four tunnels.

Backends: nginx serving a 1 KiB file and an iperf3 server, both on
127.0.0.1, in the foreground, with their own config and prefix in the
working directory (no system service, nothing outside it).

Tunnels, each offering an HTTP port (to nginx) and an iperf3 port:

- haproxy, a one-hop TCP proxy (``mode tcp``), foreground, temporary config;
- ``ssh -R`` to a private sshd (``sshtunnel.py``), one ssh with two ``-R``;
- threshold under twistd with a JSON config per role, plaintext or mutual
  TLS (certificates from ``threshold-keygen``), the two tunnels opened with
  ``PUT /tunnels`` on the management API.

Each tunnel's ``start()`` times its start-up: from the first process
started until an HTTP request through it is answered, a supervisor starting
the client once the server listens, as a provisioning tool would; and reads
each process's RSS right after.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tunnel_bench
from sshtunnel import OpenSsh, SshServer, privsep_directory, sends_ssh_banner
from tunnel_bench import (
    TWISTD,
    BenchError,
    Children,
    free_port,
    management_call,
    rss_bytes,
)

#: The file nginx serves, and its size.
PAGE = "/1k.bin"
PAGE_SIZE = 1024
#: How often start-up is polled: small beside the times measured.
POLL = 0.005

#: (server side pids, client side pids) of a tunnel; see tunnel_bench.Groups.
Groups = tuple[list[int], list[int]]


def accepts(port: int) -> bool:
    """Whether 127.0.0.1:``port`` accepts a TCP connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def page_served(port: int) -> bool:
    """Whether an HTTP/1.0 GET of the page through ``port`` gets it whole."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {PAGE} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
    except OSError:
        return False
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and len(body) == PAGE_SIZE


def wait(
    what: str,
    ready: Callable[[], bool],
    alive: Callable[[], bool],
    tail: Callable[[], str],
    timeout: float = 30,
) -> float:
    """Poll ``ready`` until true; return when (monotonic); BenchError if the
    process dies or on timeout."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive():
            raise BenchError(f"{what}: the process exited; log:{tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:.0f}s; log:{tail()}")
        time.sleep(POLL)
    return time.monotonic()


def rss_of(pids: list[int]) -> int:
    """Sum of VmRSS over ``pids`` (bytes); processes gone meanwhile count 0."""
    total = 0
    for pid in pids:
        try:
            total += rss_bytes(pid)
        except (FileNotFoundError, ProcessLookupError, BenchError):
            pass
    return total


# -- backends -----------------------------------------------------------------


class Nginx:
    """nginx in the foreground, one worker, serving PAGE from its own prefix."""

    def __init__(self, nginx: str, directory: Path, children: Children) -> None:
        self.nginx = nginx
        self.dir = directory
        self.children = children
        self.port = free_port()
        self.child: Any = None

    def start(self) -> None:
        d = self.dir
        (d / "html").mkdir(parents=True)
        (d / "logs").mkdir()
        (d / "html" / PAGE.lstrip("/")).write_bytes(os.urandom(PAGE_SIZE))
        # As root, nginx's worker runs as nobody: it must be able to read.
        for path in (d, d / "html", d.parent):
            path.chmod(0o755)
        (d / "html" / PAGE.lstrip("/")).chmod(0o644)
        temps = "\n".join(
            f"  {kind}_temp_path {d / ('tmp_' + kind)};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (d / "nginx.conf").write_text(
            f"""daemon off;
master_process on;
worker_processes 1;
pid {d / "nginx.pid"};
error_log {d / "logs" / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temps}
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  server {{ listen 127.0.0.1:{self.port} backlog=4096; root {d / "html"}; }}
}}
"""
        )
        argv = [self.nginx, "-p", str(d), "-c", str(d / "nginx.conf")]
        argv += ["-e", str(d / "logs" / "error.log")]
        self.child = self.children.start(
            "nginx", argv, line_output=False, kill_tree=True
        )
        wait(
            "nginx",
            lambda: page_served(self.port),
            self.child.alive,
            self.child.tail,
        )


class Iperf3Server:
    """``iperf3 -s`` on 127.0.0.1; restarted after a failed test."""

    def __init__(self, iperf3: str, children: Children) -> None:
        self.iperf3 = iperf3
        self.children = children
        self.port = free_port()
        self.child: Any = None

    def start(self) -> None:
        argv = [self.iperf3, "-s", "-B", "127.0.0.1", "-p", str(self.port)]
        self.child = self.children.start(
            "iperf3-server", argv, line_output=False, kill_tree=True
        )
        wait("iperf3 -s", lambda: accepts(self.port), self.child.alive, self.child.tail)

    def restart(self) -> None:
        """A test that failed half-way can leave the server busy: start anew."""
        if self.child is not None:
            self.children.stop(self.child)
        self.start()


# -- tunnels ------------------------------------------------------------------


class Tunnel:
    """A way from a public port to the backends, started and stopped per round."""

    name = ""
    #: Backend name ("http", "iperf") -> the port users connect to.
    ports: dict[str, int]

    def start(self) -> dict[str, Any]:
        """Start, time the start-up, read RSS; return those figures."""
        raise NotImplementedError

    def processes(self) -> Groups:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _started(
        self, t0: float, phases: dict[str, float], last: Any
    ) -> dict[str, Any]:
        """Wait for the first page through the tunnel (``last``: the process
        started last); the start-up figures."""
        ready = wait(
            f"{self.name}: first page through the tunnel",
            lambda: page_served(self.ports["http"]),
            last.alive,
            last.tail,
        )
        server, client = self.processes()
        return {
            "ready": ready - t0,
            "phases": {k: v - t0 for k, v in phases.items()},
            "rss_server": rss_of(server),
            "rss_client": rss_of(client),
        }


class Direct(Tunnel):
    """No tunnel: the load generators talk to the backends."""

    name = "direct"

    def __init__(self, backends: dict[str, int]) -> None:
        self.ports = dict(backends)

    def start(self) -> dict[str, Any]:
        return {}

    def processes(self) -> Groups:
        return [], []

    def stop(self) -> None:
        pass


class Haproxy(Tunnel):
    """haproxy in TCP mode, one frontend per backend, foreground (``-db``)."""

    name = "haproxy"

    def __init__(
        self,
        haproxy: str,
        directory: Path,
        children: Children,
        backends: dict[str, int],
    ) -> None:
        self.haproxy = haproxy
        self.dir = directory
        self.dir.mkdir()
        self.children = children
        self.backends = backends
        self.ports = {}
        self.child: Any = None

    def start(self) -> dict[str, Any]:
        self.ports = {name: free_port() for name in self.backends}
        lines = [
            "global",
            "  maxconn 8000",  # twice that in descriptors: under the usual 20,000
            "defaults",
            "  mode tcp",
            "  timeout connect 5s",
            "  timeout client 60s",
            "  timeout server 60s",
        ]
        for name, port in self.backends.items():
            lines += [
                f"listen {name}",
                f"  bind 127.0.0.1:{self.ports[name]}",
                f"  server {name} 127.0.0.1:{port}",
            ]
        config = self.dir / "haproxy.cfg"
        config.write_text("\n".join(lines) + "\n")
        t0 = time.monotonic()
        self.child = self.children.start(
            "haproxy",
            [self.haproxy, "-db", "-f", str(config)],
            line_output=False,
            kill_tree=True,
        )
        return self._started(t0, {}, self.child)

    def processes(self) -> Groups:
        return [self.child.pid], []

    def stop(self) -> None:
        if self.child is not None:
            self.children.stop(self.child)
            self.child = None


class SshReverse(Tunnel):
    """sshd and one ``ssh -N -R`` with a forward per backend."""

    name = "ssh -R"

    def __init__(
        self,
        tools: OpenSsh,
        directory: Path,
        children: Children,
        backends: dict[str, int],
    ) -> None:
        self.tools = tools
        self.base = directory
        self.base.mkdir()
        self.children = children
        self.backends = backends
        self.ports = {}
        self.round = 0
        self.ssh: SshServer | None = None
        privsep_directory()

    def start(self) -> dict[str, Any]:
        self.round += 1
        ssh = SshServer(
            self.tools, self.base / f"ssh{self.round}", self.children, name="ssh"
        )
        self.ssh = ssh
        ssh.write_config()
        self.ports = {name: free_port() for name in self.backends}
        t0 = time.monotonic()
        ssh.server = self.children.start(
            "sshd",
            [self.tools.sshd, "-f", str(ssh.config), "-D", "-e"],
            line_output=False,
            kill_tree=True,
        )
        listening = wait(
            "sshd",
            lambda: sends_ssh_banner(ssh.port),
            ssh.server.alive,
            ssh.server.tail,
        )
        names = list(self.backends)
        argv = ssh.client_argv(self.ports[names[0]], self.backends[names[0]])
        for name in names[1:]:
            argv[-1:-1] = ["-R", f"{self.ports[name]}:127.0.0.1:{self.backends[name]}"]
        ssh.clients["bench"] = self.children.start(
            "ssh-client", argv, line_output=False, kill_tree=True
        )
        return self._started(t0, {"server_listening": listening}, ssh.clients["bench"])

    def processes(self) -> Groups:
        assert self.ssh is not None
        return self.ssh.processes("bench")

    def stop(self) -> None:
        if self.ssh is not None:
            self.ssh.stop()
            self.ssh = None


class Threshold(Tunnel):
    """threshold-server and threshold-client under twistd, plaintext or TLS."""

    def __init__(
        self,
        tls: bool,
        directory: Path,
        children: Children,
        backends: dict[str, int],
        pki: Path,
        server_fields: dict[str, Any] | None = None,
        root: Path | None = None,
        name: str | None = None,
    ) -> None:
        self.tls = tls
        self.name = name or ("threshold TLS" if tls else "threshold")
        #: The checkout whose code runs (std_bench --before); None: this one.
        self.root = root
        #: More fields of server.json (std_ab.py: ``DIR:LogConnections=false``).
        self.server_fields = dict(server_fields or {})
        self.dir = directory
        self.dir.mkdir()
        self.children = children
        self.backends = backends
        self.pki = pki
        self.ports = {}
        self.server: Any = None
        self.client: Any = None
        self._ssl: ssl.SSLContext | None = None
        if tls:
            self._ssl = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            self._ssl.load_cert_chain(pki / "operator.crt", pki / "operator.key")

    def _twistd(self, role: str, config: dict) -> Any:
        path = self.dir / f"{role}.json"
        path.write_text(json.dumps(config, indent=2))
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile="]
        argv += [f"threshold-{role}", "-c", str(path)]
        name = f"{self.name.replace(' ', '-')}-{role}"
        saved = tunnel_bench.ROOT  # the PYTHONPATH Child gives twistd
        tunnel_bench.ROOT = self.root or saved
        try:
            return self.children.start(name, argv, cwd=self.dir, line_output=False)
        finally:
            tunnel_bench.ROOT = saved

    def start(self) -> dict[str, Any]:
        control, management = free_port(), free_port()
        self.management = management
        server: dict[str, Any] = {
            "TunnelControlPort": control,
            "ManagementPort": management,
            "ListenAddress": "127.0.0.1",
            "ManagementListenAddress": "127.0.0.1",
            "UseTls": self.tls,
            **self.server_fields,
        }
        client: dict[str, Any] = {
            "ClientId": "bench",
            "ServerHost": "127.0.0.1",
            "ServerTunnelControlPort": control,
            "ServerManagementPort": management,
            "UseTls": self.tls,
            "ServiceToLocalAddrMap": {
                name: f"127.0.0.1:{port}" for name, port in self.backends.items()
            },
        }
        if self.tls:
            server.update(
                CaCertificateFile=str(self.pki / "ca.crt"),
                ServerTlsCertificateFile=str(self.pki / "server.crt"),
                ServerTlsKeyFile=str(self.pki / "server.key"),
                ManagementAllowedCommonNames=["operator"],
            )
            client.update(
                CaCertificateFile=str(self.pki / "ca.crt"),
                ClientTlsCertificateFile=str(self.pki / "bench.crt"),
                ClientTlsKeyFile=str(self.pki / "bench.key"),
            )
        t0 = time.monotonic()
        self.server = self._twistd("server", server)
        listening = wait(
            f"{self.name} server",
            lambda: accepts(control),
            self.server.alive,
            self.server.tail,
        )
        self.client = self._twistd("client", client)
        connected = wait(
            f"{self.name} client",
            self._connected,
            self.client.alive,
            self.client.tail,
        )
        self.ports = {name: free_port() for name in self.backends}
        body = [
            {
                "ClientId": "bench",
                "ListenAddress": "127.0.0.1",
                "ListenPort": self.ports[name],
                "ListenHostnameGlob": "*",
                "BackEndService": name,
                "HaProxyProxyProtocol": False,
            }
            for name in self.backends
        ]
        self.api("PUT", "/tunnels", body)
        return self._started(
            t0,
            {
                "server_listening": listening,
                "client_connected": connected,
                "tunnels_put": time.monotonic(),
            },
            self.server,
        )

    def _connected(self) -> bool:
        try:
            clients = json.loads(self.api("GET", "/clients"))
        except BenchError:
            return False  # the API is not up yet
        return clients.get("bench", {}).get("CurrentState") == "ClientConnected"

    def api(self, method: str, path: str, body: object = None) -> bytes:
        """One management API call; the answer's body."""
        return management_call(self.management, self._ssl, method, path, body)

    def processes(self) -> Groups:
        return [self.server.pid], [self.client.pid]

    def stop(self) -> None:
        for child in (self.client, self.server):
            if child is not None:
                self.children.stop(child)
        self.server = self.client = None


def make_pki(directory: Path) -> Path:
    """CA, server certificate and the ``bench`` and ``operator`` client
    certificates, made with ``threshold-keygen`` (``python -m threshold.keygen``)."""
    keygen = [sys.executable, "-m", "threshold.keygen"]
    # The checkout these benchmarks belong to, as for the twistd processes.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = str(directory)
    for args in (
        ["ca", "--out", out],
        ["server", "--ca-dir", out, "--out", out, "--name", "localhost"]
        + ["--ip", "127.0.0.1"],
        ["client", "--ca-dir", out, "--out", out, "bench"],
        ["client", "--ca-dir", out, "--out", out, "operator"],
    ):
        r = subprocess.run([*keygen, *args], capture_output=True, text=True, env=env)
        if r.returncode:
            raise BenchError(f"threshold-keygen {args[0]}: {r.stderr.strip()}")
    return directory
