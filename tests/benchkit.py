"""What a benchmark's smoke test checks it left behind: ports, processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["listening", "processes_mentioning"]


def listening(port: int) -> bool:
    """Whether something still accepts TCP connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def processes_mentioning(text: str) -> list[str]:
    """The command lines of the running processes that contain ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found
