"""``python -m purenn``: the ``purenn`` command (see :mod:`purenn.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
