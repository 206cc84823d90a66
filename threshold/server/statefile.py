"""The state file: the tunnel set in force, saved so a restart brings it back.

Written atomically (a temporary file, fsync, rename, fsync of the
directory; mode 0600), so a crash leaves the old set or the new one, never
a mix. :class:`StateFile` writes off the reactor thread (fsync can take
long on a busy disk) and one write at a time, in the order asked: the last
set saved is the last set asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThread

from threshold.server.tunnels import TunnelError, parse_tunnels
from threshold.wire import strictjson

if TYPE_CHECKING:
    from threshold.server.tunnels import Tunnel

__all__ = ["StateFile", "StateFileError", "read_state", "write_state"]

#: Runs a blocking call elsewhere and fires with its result (deferToThread).
ThreadRunner = Callable[..., Deferred[Any]]


class StateFileError(Exception):
    """The state file cannot be read or written, or is not a tunnel list."""


def encode_state(tunnels: list[Tunnel]) -> bytes:
    """The file's content for a tunnel set: the API's JSON list."""
    return json.dumps([t.to_json() for t in tunnels], indent=2).encode() + b"\n"


def write_state(path: str, tunnels: list[Tunnel]) -> None:
    """Write the tunnel set atomically; blocking (run it in a thread)."""
    body = encode_state(tunnels)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise StateFileError(f"{path}: cannot write: {e.strerror}") from None


def read_state(path: str) -> list[Tunnel]:
    """Read a state file written by :func:`write_state`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise StateFileError(f"{path}: cannot read: {e.strerror}") from None
    try:
        body = strictjson.loads(data)
    except ValueError as e:
        # JsonError, and the int() limit on huge numbers (also a ValueError).
        raise StateFileError(f"{path}: not valid JSON: {e}") from None
    try:
        return parse_tunnels(body)
    except TunnelError as e:
        raise StateFileError(f"{path}: {e.message}") from None


class StateFile:
    """The state file at ``path``, saved off the reactor thread, in order.

    ``run_in_thread(f, *args)`` runs the blocking write (default
    :func:`~twisted.internet.threads.deferToThread`; tests pass one that
    runs at once).
    """

    def __init__(self, path: str, run_in_thread: ThreadRunner = deferToThread) -> None:
        self.path = path
        self._run = run_in_thread
        self._lock = DeferredLock()

    def save(self, tunnels: list[Tunnel]) -> Deferred[None]:
        """Write ``tunnels``; fails with StateFileError, the file unchanged.

        Saves run one at a time in the order they were asked for.
        """
        tunnels = list(tunnels)
        return self._lock.run(self._run, write_state, self.path, tunnels)

    def load(self) -> list[Tunnel]:
        """The saved set; empty when there is no file yet."""
        if not os.path.exists(self.path):
            return []
        return read_state(self.path)
