"""``python -m comparisons`` (what ``make report`` runs); see :mod:`comparisons.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
