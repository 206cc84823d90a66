"""Real components the tests use (openssl, curl, node, IPv6 loopback, ...).

Outside CI a missing component skips the tests that need it, with the
reason. With ``CI=true`` it fails them instead: tests that were written must
run there, and ``.ci/run`` installs what they need.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SkipTest

IN_CI = os.environ.get("CI") == "true"


class MissingComponent(AssertionError):
    """A component the test needs is missing where every test must run."""


def missing(why: str) -> Exception:
    """The exception to raise for a missing component: skip, or fail in CI."""
    if IN_CI:
        return MissingComponent(f"{why} (CI=true: every test must run)")
    return SkipTest(why)


def require_tool(name: str) -> str:
    """The path of command ``name``; skips (fails in CI) when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise missing(f"{name} is not installed")
    return path
