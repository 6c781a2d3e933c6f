"""The cvxpylayers comparisons suite at --tiny: every method ran, and the numbers it reports
are checked against independent truths (closed-form solutions of the suite's problems)."""

from __future__ import annotations

import pytest

pytest.importorskip("cvxpy")
pytest.importorskip("cvxpylayers")
pytest.importorskip("clarabel")
pytest.importorskip("matplotlib")

from comparisons.config import Config  # noqa: E402
from comparisons.suites import SUITES  # noqa: E402
from comparisons.suites import cvxpylayers as suite  # noqa: E402


def test_truths_are_solutions_of_the_layers():
    """The suite's closed-form truths agree with a tight cvxpylayers reference (values and
    VJPs), so the gradient errors it reports are measured against the right thing."""
    from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference
    from fold_plugins.verify import assert_gradients_close

    for kind, n in (("LP", 6), ("QP", 8), ("SOCP", 5), ("exp", 5)):
        prob, params, variables, theta, truth = suite._build(kind, n, 2, seed=3)
        ref = cvxpylayers_reference(prob, params, variables)
        assert_gradients_close(truth, lambda t, r=ref: r(t)[0], (theta,), rtol=1e-6,
                               atol=1e-9, value_rtol=1e-7, n_directions=1)


def test_tiny_run_reports_every_method(tmp_path):
    assert "cvxpylayers" in SUITES
    res = suite.run(Config(mode="tiny", out=tmp_path, progress=False))
    assert res.ok, res.errors
    pts = res.data["points"]
    assert set(pts) == {"QP n=20 B=2", "SOCP n=10 B=2"}
    qp = pts["QP n=20 B=2"]
    assert set(qp) == set(suite.METHODS)
    for method in ("FoldedSolver", "FoldedSolver torch"):
        assert qp[method]["error"] < 1e-8  # folded: exact up to the tolerances
        assert qp[method]["forward"] > 0 and qp[method]["memory"] > 0
    assert pts["SOCP n=10 B=2"]["FoldedSolver"]["error"] < 1e-8
    # the table quotes every measured error (same numbers as the data)
    for r in qp.values():
        assert f"{r['error']:.1e}" in res.markdown
    assert (tmp_path / "cvxpylayers_times.png").stat().st_size > 0
    assert len(res.figures) == 1
