"""Side-by-side comparisons of folded backward passes with what people use today.

``python -m comparisons`` runs the suites in :mod:`comparisons.suites` and writes
``comparisons/out/report.md`` with PNG plots; see :mod:`comparisons.cli` for the options.
"""

from __future__ import annotations

__all__: list[str] = []
