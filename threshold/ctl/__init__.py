"""``threshold-ctl``: a command-line client of the management API.

For scripts and operators: ``ping``, ``clients``, ``tunnels get``,
``tunnels put FILE``, ``status`` and ``doctor``, JSON or tables on stdout,
one line per error on stderr, and exit statuses a script can rely on
(docs/ctl.md, docs/doctor.md):

- 0: success;
- 1: the API answered with an error (any 4xx or 5xx), or with something
  that is not the API's answer;
- 2: a usage error (arguments, certificate files, the tunnels FILE), found
  before any request is sent;
- 3: the server could not be reached (refused, TLS failure, timeout);
- 4, 5: ``doctor`` found warnings only, or a broken link;
- 70: a bug in threshold-ctl itself.

The command line is in :mod:`threshold.ctl.cli`, the request and what its
failures mean in :mod:`threshold.ctl.exchange`, the exit statuses and
errors in :mod:`threshold.ctl.errors`.
"""

from threshold.ctl.cli import main, run
from threshold.ctl.errors import (
    EXIT_API_ERROR,
    EXIT_BUG,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    AnswerError,
    CtlError,
    UnreachableError,
    UsageError,
)

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_BUG",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "AnswerError",
    "CtlError",
    "UnreachableError",
    "UsageError",
    "main",
    "run",
]
