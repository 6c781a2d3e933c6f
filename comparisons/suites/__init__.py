"""The report's suites, in report order. Each module has ``TITLE`` and ``run(cfg) -> SuiteResult``.

Suites are imported lazily by the runner so that one whose dependencies are missing fails on
its own (its section records the error) without stopping the others.
"""

from __future__ import annotations

SUITES: tuple[str, ...] = ("gradient_agreement", "unroll_convergence", "scaling", "theseus",
                           "portfolio", "tv_denoising", "nonconvex", "acopf",
                           "multilabel", "cvxpylayers")

__all__ = ["SUITES"]
