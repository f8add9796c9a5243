"""``python -m applications.meta_learning``: see :mod:`applications.meta_learning.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
