"""Cross-check suite helpers: a session record of the measured VJP errors, printed at the end."""

from __future__ import annotations

import pytest

#: case name -> {"cvxpylayers": worst rel. error, "diffcp": ..., "finite_differences": ...}
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture
def record():
    """``record(case, reference, report)`` stores ``report.worst`` for the session summary."""

    def _record(case: str, reference: str, report) -> None:
        MEASURED.setdefault(case, {})[reference] = report.worst

    return _record


def pytest_terminal_summary(terminalreporter):
    if not MEASURED:
        return
    tr = terminalreporter
    tr.section("cross-check: worst relative VJP error of the folded gradient")
    refs = ["cvxpylayers", "diffcp", "finite_differences"]
    tr.write_line(f"{'case':<16}" + "".join(f"{r:>20}" for r in refs))
    for case, vals in MEASURED.items():
        cells = "".join(f"{vals[r]:>20.2e}" if r in vals else f"{'—':>20}" for r in refs)
        tr.write_line(f"{case:<16}{cells}")
