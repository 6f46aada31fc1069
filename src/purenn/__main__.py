"""``python -m purenn``: the ``purenn`` command (see :mod:`purenn.cli`)."""

import sys

from purenn.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
