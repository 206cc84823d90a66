"""The state file: the tunnel set in force, and quota usage, kept across restarts.

Written atomically (a temporary file, fsync, rename, fsync of the
directory; mode 0600), so a crash leaves the old state or the new one,
never a mix. :class:`StateFile` writes off the reactor thread (fsync can
take long on a busy disk) and one write at a time, in the order asked:
the last tunnel set saved is the last set asked for, and a quota save
never writes back an older set.

The file is the API's tunnel list, as it always was, while there is no
quota usage to keep; with some, it is an object::

    {"Tunnels": [...], "QuotaUsage": {"home-a": {"Period": "month",
      "PeriodStart": "2025-01-01T00:00:00Z", "UsedBytes": 123}}}

Both forms are read, so older files keep working.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.threads import deferToThread

from threshold.config.policy import QUOTA_PERIODS
from threshold.schema import CLIENT_ID, SchemaError, show
from threshold.server.quota import SavedUsage, parse_iso
from threshold.server.tunnels import TunnelError, parse_tunnels
from threshold.wire import strictjson

if TYPE_CHECKING:
    from threshold.server.tunnels import Tunnel

__all__ = [
    "SavedState",
    "StateFile",
    "StateFileError",
    "read_state",
    "read_state_file",
    "write_state",
]

#: Runs a blocking call elsewhere and fires with its result (deferToThread).
ThreadRunner = Callable[..., Deferred[Any]]

_KEYS = ("Tunnels", "QuotaUsage")


class StateFileError(Exception):
    """The state file cannot be read or written, or is not a saved state."""


@dataclass(frozen=True)
class SavedState:
    """What the file holds: the tunnel set and each client's quota usage."""

    tunnels: list[Tunnel] = field(default_factory=list)
    quota: Mapping[str, SavedUsage] = field(default_factory=dict)


def encode_state(
    tunnels: list[Tunnel], quota: Mapping[str, SavedUsage] | None = None
) -> bytes:
    """The file's content: the API's JSON list, or the object with quota usage."""
    listed = [t.to_json() for t in tunnels]
    if not quota:
        body: object = listed
    else:
        body = {
            "Tunnels": listed,
            "QuotaUsage": {cid: u.to_json() for cid, u in sorted(quota.items())},
        }
    return json.dumps(body, indent=2).encode() + b"\n"


def write_state(
    path: str, tunnels: list[Tunnel], quota: Mapping[str, SavedUsage] | None = None
) -> None:
    """Write the state atomically; blocking (run it in a thread)."""
    body = encode_state(tunnels, quota)
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


def _usage(client_id: object, entry: object) -> SavedUsage:
    """One client's saved usage, or SchemaError naming what is wrong."""
    try:
        CLIENT_ID.check(client_id)
    except SchemaError:
        raise SchemaError(f"invalid ClientId {show(client_id)}") from None
    where = f"QuotaUsage.{client_id}"
    if not isinstance(entry, dict) or set(entry) != {
        "Period",
        "PeriodStart",
        "UsedBytes",
    }:
        raise SchemaError(
            'expected {"Period", "PeriodStart", "UsedBytes"}, got ' + show(entry),
            where,
        )
    period, start, used = entry["Period"], entry["PeriodStart"], entry["UsedBytes"]
    if period not in QUOTA_PERIODS:
        raise SchemaError(f'expected "day" or "month", got {show(period)}', where)
    try:
        started = parse_iso(start) if isinstance(start, str) else None
    except ValueError:
        started = None
    if started is None:
        raise SchemaError(f"expected a UTC time, got {show(start)}", where)
    if isinstance(used, bool) or not isinstance(used, int) or used < 0:
        raise SchemaError(f"expected a byte count, got {show(used)}", where)
    return SavedUsage(period, started, used)


def _decode(body: object) -> SavedState:
    if isinstance(body, list):  # the tunnel list alone, as before quotas
        return SavedState(parse_tunnels(body))
    if not isinstance(body, dict) or "Tunnels" not in body:
        raise TunnelError(422, "expected a tunnel list or a saved state object")
    unknown = [k for k in body if k not in _KEYS]
    if unknown:
        raise TunnelError(422, f"unknown key {show(unknown[0])}")
    usage = body.get("QuotaUsage", {})
    if not isinstance(usage, dict):
        raise TunnelError(422, f"QuotaUsage: expected an object, got {show(usage)}")
    try:
        quota = {str(cid): _usage(cid, entry) for cid, entry in usage.items()}
    except SchemaError as e:
        raise TunnelError(422, str(e)) from None
    return SavedState(parse_tunnels(body["Tunnels"]), quota)


def read_state_file(path: str) -> SavedState:
    """Read a state file written by :func:`write_state` (or an older one)."""
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
        return _decode(body)
    except TunnelError as e:
        raise StateFileError(f"{path}: {e.message}") from None


def read_state(path: str) -> list[Tunnel]:
    """The tunnel set of a state file."""
    return read_state_file(path).tunnels


class StateFile:
    """The state file at ``path``, saved off the reactor thread, in order.

    ``run_in_thread(f, *args)`` runs the blocking write (default
    :func:`~twisted.internet.threads.deferToThread`; tests pass one that
    runs at once). It keeps the tunnel set and the usage last written (or
    read by :meth:`load_quota`), so that saving one writes the other back
    as it is.
    """

    def __init__(self, path: str, run_in_thread: ThreadRunner = deferToThread) -> None:
        self.path = path
        self._run = run_in_thread
        self._lock = DeferredLock()
        self._tunnels: list[Tunnel] = []
        self._quota: Mapping[str, SavedUsage] = {}

    def save(self, tunnels: list[Tunnel]) -> Deferred[None]:
        """Write ``tunnels``; fails with StateFileError, the file unchanged.

        Saves run one at a time in the order they were asked for.
        """
        tunnels = list(tunnels)
        return self._lock.run(lambda: self._write(tunnels, self._quota))

    def save_quota(self, usage: Mapping[str, SavedUsage]) -> Deferred[None]:
        """Write quota usage next to the tunnel set last saved (in order)."""
        usage = dict(usage)
        return self._lock.run(lambda: self._write(self._tunnels, usage))

    def _write(
        self, tunnels: list[Tunnel], quota: Mapping[str, SavedUsage]
    ) -> Deferred[None]:
        def written(_: object) -> None:
            self._tunnels, self._quota = tunnels, quota

        # Without usage the write is the tunnel list alone, as before quotas.
        args = (self.path, tunnels, quota) if quota else (self.path, tunnels)
        d = self._run(write_state, *args)
        d.addCallback(written)
        return d

    def load(self) -> list[Tunnel]:
        """The saved set; empty when there is no file yet."""
        return self.read().tunnels

    def read(self) -> SavedState:
        """Everything saved (remembered for later saves); empty without a file."""
        if not os.path.exists(self.path):
            return SavedState()
        state = read_state_file(self.path)
        self._tunnels, self._quota = list(state.tunnels), dict(state.quota)
        return state

    def load_quota(self) -> Mapping[str, SavedUsage]:
        """The saved quota usage (:class:`~threshold.server.quota.QuotaStore`)."""
        return self.read().quota
