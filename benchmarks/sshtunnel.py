"""A private OpenSSH server and ``ssh -R`` clients, for the tunnel benchmark.

``tunnel_bench.py`` compares threshold with what a self-hoster would most
often run instead: an SSH reverse tunnel,
``ssh -N -R PUBLICPORT:127.0.0.1:BACKENDPORT user@server``. This module
starts that set-up on one machine, with nothing outside a temporary
directory (except ``/run/sshd``, which a root sshd insists on; see
``privsep_directory``):

- ``sshd -f CONFIG -D -e`` on 127.0.0.1 and a free port, with a throwaway
  host key, and an ``AuthorizedKeysFile`` holding a throwaway client key;
  ``AllowTcpForwarding remote``, ``GatewayPorts no`` (the forwarded port
  listens on loopback only), no PAM, no passwords;
- ``ssh -N -R FWDPORT:127.0.0.1:BACKEND`` clients logging in with that key as
  the current user (root here), optionally through another port (a delay
  line in front of sshd).

The benchmark's process handling starts and stops the processes (its
``Children``); this module builds their command lines and finds their
process ids. sshd forks one process per SSH connection and that process
calls ``setsid``: it is in neither the listener's process group nor its
session, so ``server_pids`` walks the process tree instead.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

#: Where sshd usually is: not on the PATH of a user who is not root.
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
#: The privilege separation directory compiled into Debian's sshd.
PRIVSEP_DIR = Path("/run/sshd")
INSTALL_HINT = "apt-get install openssh-server openssh-client"


class SshError(Exception):
    """sshd or an ssh client could not be set up; the message says why."""


class Process(Protocol):
    """What this module needs of a started child process."""

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def tail(self) -> str: ...


class Starter(Protocol):
    """Starts and stops child processes (the benchmark's ``Children``)."""

    def start(self, name: str, argv: list[str], **kwargs: Any) -> Any: ...

    def stop(self, child: Any) -> None: ...


@dataclass(frozen=True)
class OpenSsh:
    """Paths of the OpenSSH programs the benchmark runs."""

    sshd: str
    ssh: str
    keygen: str

    @classmethod
    def find(cls) -> OpenSsh | None:
        """The programs on PATH (sshd also in the sbin directories), or None."""
        path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
        found = [shutil.which(name, path=path) for name in ("sshd", "ssh")]
        found.append(shutil.which("ssh-keygen", path=path))
        if not all(found):
            return None
        sshd, ssh, keygen = (str(p) for p in found)
        return cls(sshd=sshd, ssh=ssh, keygen=keygen)

    def version(self) -> str:
        """``ssh -V``: the OpenSSH and OpenSSL versions."""
        r = subprocess.run([self.ssh, "-V"], capture_output=True, text=True)
        return (r.stderr or r.stdout).strip()


def privsep_directory() -> bool:
    """Create ``/run/sshd`` if sshd runs as root and it is missing.

    A root sshd refuses to start without it (it is compiled in; the system
    unit usually creates it at boot). Returns whether it was created here.
    """
    if os.geteuid() != 0 or PRIVSEP_DIR.exists():
        return False
    PRIVSEP_DIR.mkdir(mode=0o755)
    return True


# -- processes ----------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot); None if gone or a zombie.

    Together with the pid it names one process: a pid can be reused once its
    process is gone, its start time then differs.
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def socket_count(pid: int) -> int:
    """How many sockets ``pid`` has open (0 if it is gone)."""
    count = 0
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                count += 1
        except FileNotFoundError:
            pass  # closed meanwhile
    return count


def wait_for(
    what: str,
    ready: Callable[[], bool],
    process: Process,
    timeout: float,
) -> None:
    """Poll ``ready`` until true; SshError if ``process`` exits or on timeout."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not process.alive():
            raise SshError(f"{what}: the process exited; log:{process.tail()}")
        if time.monotonic() > deadline:
            raise SshError(f"{what}: not within {timeout:.0f}s; log:{process.tail()}")
        time.sleep(0.05)


def sends_ssh_banner(port: int) -> bool:
    """Whether something on 127.0.0.1:``port`` greets with ``SSH-2.0-``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def accepts(port: int) -> bool:
    """Whether 127.0.0.1:``port`` accepts a connection."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the server and its clients -----------------------------------------------


class SshServer:
    """One private sshd and its ``ssh -R`` clients.

    It offers what the benchmark asks of a threshold deployment: ``tunnels``
    (client name -> public port), ``processes(name)`` (server and client
    process ids), ``open_streams(name)`` and ``stop()``.
    """

    def __init__(
        self,
        tools: OpenSsh,
        directory: Path,
        children: Starter,
        name: str = "ssh",
        cipher: str | None = None,
    ) -> None:
        self.tools = tools
        self.dir = directory
        self.dir.mkdir()
        self.children = children
        self.name = name
        self.cipher = cipher
        self.user = getpass.getuser()
        self.port = free_port()
        self.host_key = self.dir / "host_key"
        self.client_key = self.dir / "client_key"
        self.config = self.dir / "sshd_config"
        self.server: Any = None
        self.clients: dict[str, Any] = {}
        self.tunnels: dict[str, int] = {}

    def _keygen(self, path: Path) -> None:
        r = subprocess.run(
            [self.tools.keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            raise SshError(f"ssh-keygen for {path.name}: {r.stderr.strip()}")

    def write_config(self) -> None:
        """Make the keys and the sshd config in the directory."""
        self._keygen(self.host_key)
        self._keygen(self.client_key)
        authorized = self.dir / "authorized_keys"
        authorized.write_text(Path(f"{self.client_key}.pub").read_text())
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {authorized}",
            "PidFile none",
            # The temporary directory is not laid out as sshd expects ~/.ssh.
            "StrictModes no",
            "UsePAM no",
            "GatewayPorts no",
            "AllowTcpForwarding remote",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "PrintMotd no",
        ]
        self.config.write_text("\n".join(lines) + "\n")
        r = subprocess.run(
            [self.tools.sshd, "-t", "-f", str(self.config)],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            raise SshError(f"sshd -t rejects {self.config}: {r.stderr.strip()}")

    def start(self) -> None:
        """Start sshd and wait until it greets."""
        self.write_config()
        argv = [self.tools.sshd, "-f", str(self.config), "-D", "-e"]
        self.server = self.children.start(
            f"{self.name}-sshd", argv, line_output=False, kill_tree=True
        )
        wait_for(
            f"{self.name}-sshd on port {self.port}",
            lambda: sends_ssh_banner(self.port),
            self.server,
            20,
        )

    def client_argv(
        self, forward_port: int, backend_port: int, server_port: int | None = None
    ) -> list[str]:
        """``ssh -N -R ...``; ``server_port`` if it must go through another port."""
        argv = [self.tools.ssh, "-N", "-F", "/dev/null"]
        for option in (
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "ExitOnForwardFailure=yes",
            "ServerAliveInterval=30",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
        ):
            argv += ["-o", option]
        if self.cipher:
            argv += ["-c", self.cipher]
        argv += ["-i", str(self.client_key), "-p", str(server_port or self.port)]
        argv += ["-R", f"{forward_port}:127.0.0.1:{backend_port}"]
        return [*argv, f"{self.user}@127.0.0.1"]

    def start_client(
        self, client_id: str, backend_port: int, server_port: int | None = None
    ) -> int:
        """Start ``ssh -R`` for ``client_id``; wait for its port; return it."""
        forward_port = free_port()
        argv = self.client_argv(forward_port, backend_port, server_port)
        child = self.children.start(
            f"{self.name}-client-{client_id}", argv, line_output=False, kill_tree=True
        )
        self.clients[client_id] = child
        wait_for(
            f"ssh -R for {client_id} (port {forward_port})",
            lambda: accepts(forward_port),
            child,
            30,
        )
        self.tunnels[client_id] = forward_port
        # Idle, ssh holds one socket: its connection to sshd. The probe above
        # opened a channel (a socket to the backend); wait until it is gone.
        deadline = time.monotonic() + 5
        while socket_count(child.pid) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return forward_port

    def server_pids(self) -> list[int]:
        """The listener and every sshd process below it (one per connection)."""
        if self.server is None:
            return []
        return [self.server.pid, *descendants(self.server.pid)]

    def processes(self, client_id: str) -> tuple[list[int], list[int]]:
        """(every sshd process, the ``ssh`` client of ``client_id``)."""
        return self.server_pids(), [self.clients[client_id].pid]

    def open_streams(self, client_id: str) -> int:
        """Forwarded connections open in ``client_id``'s ssh (its sockets)."""
        return max(0, socket_count(self.clients[client_id].pid) - 1)

    def negotiated_cipher(self) -> str:
        """The cipher the clients get: the first of theirs that sshd offers."""

        def listed(argv: list[str]) -> list[str]:
            r = subprocess.run(argv, capture_output=True, text=True)
            for line in r.stdout.splitlines():
                key, _, value = line.partition(" ")
                if key == "ciphers":
                    return value.split(",")
            raise SshError(f"no cipher list from {argv[0]}: {r.stderr.strip()}")

        client = listed([*self.client_argv(1, 1)[:-1], "-G", "127.0.0.1"])
        server = listed([self.tools.sshd, "-T", "-f", str(self.config)])
        common = [c for c in client if c in server]
        return common[0] if common else "none in common"

    def stop(self) -> None:
        """Stop the clients, then sshd and every process below it."""
        for child in self.clients.values():
            self.children.stop(child)
        self.clients.clear()
        if self.server is not None:
            self.children.stop(self.server)
            self.server = None
