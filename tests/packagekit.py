"""A copy of the checkout to build and install, as a packager would."""

from __future__ import annotations

import os
import shutil

__all__ = ["ROOT", "copy_checkout"]

#: The top of the checkout the tests run from.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_checkout(source: str) -> None:
    """Copy what an install builds from (package, plugin, metadata) to ``source``.

    Caches are left out, so what is built is what is committed.
    """
    ignore = shutil.ignore_patterns("__pycache__", "dropin.cache")
    shutil.copytree(os.path.join(ROOT, "threshold"), f"{source}/threshold",
                    ignore=ignore)  # fmt: skip
    os.makedirs(f"{source}/twisted/plugins")
    shutil.copy(
        os.path.join(ROOT, "twisted", "plugins", "threshold_plugins.py"),
        f"{source}/twisted/plugins/",
    )
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
