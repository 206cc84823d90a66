"""Run one fuzz target under atheris: python -m tests.fuzz.main NAME [args]."""

from __future__ import annotations

import sys


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        from tests.fuzz.targets import TARGETS
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.main {{{'|'.join(TARGETS)}}} [args]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
