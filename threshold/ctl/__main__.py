"""``python -m threshold.ctl``: the same as the ``threshold-ctl`` script."""

from threshold.ctl.cli import main

main()
