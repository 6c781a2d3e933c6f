"""The comparisons package: its truths, its memory meter, and its smallest runs, checked by number.

No timing is asserted anywhere: times depend on the machine. Every assertion compares a
measured number with an independent truth (finite differences, a closed form, exact byte
counts of known allocations).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from comparisons import cli
from comparisons.config import Config
from comparisons.measure import measure_memory
from comparisons.problems import (
    exact_solution,
    make_qp,
    max_rel_err,
    project_simplex,
    solve_qp,
    vjp_truth,
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(tmp_path) -> Config:
    return Config(mode="tiny", out=tmp_path, progress=False)


# ----------------------------------------------------------------------------- the truths

@pytest.mark.parametrize("kind", ["box", "simplex"])
def test_closed_form_vjp_matches_central_differences(kind, tmp_path):
    """The active-set/KKT gradient every suite measures against, vs central differences."""
    cfg = _tiny(tmp_path)
    qp = make_qp(kind, 8, 2, cfg, seed=4, mu=0.1, q_scale=None if kind == "box" else 0.1)

    def x_of(q: torch.Tensor) -> torch.Tensor:
        x, _, res = solve_qp(qp, q, tol=1e-14)
        assert float(res.max()) <= 1e-13
        return exact_solution(qp, x, q)

    xs = x_of(qp.q)
    g = torch.randn(2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    truth = vjp_truth(qp, xs, g)
    h = 1e-6
    fd = torch.zeros_like(qp.q)
    for j in range(8):
        e = torch.zeros_like(qp.q)
        e[:, j] = h
        fd[:, j] = ((x_of(qp.q + e) - x_of(qp.q - e)) * g).sum(-1) / (2 * h)
    assert max_rel_err(truth, fd) < 1e-7
    # the instance is not trivial: some coordinates free, some on a bound
    free = (xs > 1e-9) & ((xs < 1 - 1e-9) if kind == "box" else True)
    assert bool(free.any()) and not bool(free.all())


def test_simplex_projection_matches_sorting_free_reference():
    """Sort-based projection vs the bisection solution of Σ max(u − τ, 0) = 1."""
    u = torch.randn(5, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lo, hi = u.min(-1, keepdim=True).values - 1, u.max(-1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        over = torch.clamp(u - mid, min=0).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    ref = torch.clamp(u - (lo + hi) / 2, min=0)
    assert float((project_simplex(u) - ref).abs().max()) < 1e-13


# ----------------------------------------------------------------------------- the meter

def test_memory_meter_counts_known_allocations():
    """Peak of live torch bytes and saved-for-backward bytes of a known program."""
    n = 1_000_000  # 8 MB per float64 tensor

    def fn():
        a = torch.ones(n, dtype=torch.float64)
        b = torch.ones(n, dtype=torch.float64)  # peak: a and b live = 16 MB
        del a
        x = torch.ones(n, dtype=torch.float64, requires_grad=True)  # + 8 MB = 16 MB live
        y = x.exp()  # exp saves its output: 8 MB saved; 24 MB live
        del b
        y.sum().backward()

    stats = measure_memory(fn, torch.device("cpu"))
    assert stats.saved == 8 * n
    # a, b, x, y live at once at most: 3 tensors = 24 MB (x.grad appears after b is freed)
    assert 24 * n <= stats.torch_peak < 24 * n + 200_000


# ----------------------------------------------------------------------------- the suites

@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One CLI run of the unroll-convergence suite at the smallest size."""
    out = tmp_path_factory.mktemp("report")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["--tiny", "--suite", "unroll_convergence", "--out", str(out),
                         "--no-progress"])
    return code, out


def test_cli_report_unroll_convergence_numbers(tiny_report):
    code, out = tiny_report
    assert code == 0
    report = (out / "report.md").read_text()
    assert "torch.set_num_threads(1)" in report and "unroll_convergence.png" in report
    assert (out / "unroll_convergence.png").stat().st_size > 10_000
    data = json.loads((out / "results.json").read_text())["suites"]["unroll_convergence"]["data"]
    for kind in ("box", "simplex"):
        s = data[kind]
        # folded GMRES against the closed form, within rank(Φ) + 1 iterations
        assert s["gmres_final_err"] < 1e-8
        assert s["gmres_final_iters"] <= s["free"] + 1
        # LFPI decays at ρ(Φ) (the paper's claim), measured rate within 5 %
        assert abs(s["rate_lfpi"] / s["rho"] - 1) < 0.05
        # unrolling from x* computes exactly the LFPI iterates
        assert s["warm_vs_lfpi"] < 1e-10
        assert s["fold_fixed_point_vs_recorded"] < 1e-12


def test_failing_suite_is_reported_and_exit_is_nonzero(tmp_path, monkeypatch):
    from comparisons.suites import learning

    def boom(cfg):
        raise RuntimeError("dependency missing for this test")

    monkeypatch.setattr(learning, "run", boom)
    code = cli.main(["--tiny", "--suite", "learning", "--out", str(tmp_path), "--no-progress"])
    assert code == 1
    report = (tmp_path / "report.md").read_text()
    assert "This suite did not complete" in report and "dependency missing" in report


def test_scaling_point_errors_against_closed_form(tmp_path):
    """One scaling measurement: folded gmres/dense hit the closed form; memory is counted."""
    from comparisons.suites import scaling

    cfg = _tiny(tmp_path)
    qp = make_qp("box", 16, 2, cfg, seed=11)
    xs = exact_solution(qp, solve_qp(qp, tol=1e-13)[0])
    g = cfg.randn(2, 16, gen=cfg.generator(3))
    truth = vjp_truth(qp, xs, g)
    pts = {}
    for m in scaling._methods(cfg):
        if m.name in ("folded gmres", "folded dense", "unrolled K=100"):
            pts[m.name] = scaling._measure(m, m.prepare(qp, cfg), qp, g, truth, cfg, 60.0)
    assert pts["folded gmres"].error < 1e-8
    assert pts["folded dense"].error < 1e-8
    # unrolled K=100 keeps at least one (B, n) float64 tensor per step; folded keeps one step
    # (P once, plus a few state-sized tensors)
    row = 2 * 16 * 8
    assert pts["unrolled K=100"].memory.saved >= 100 * row
    assert pts["folded gmres"].memory.saved <= 16 * 16 * 8 + 4 * row
    assert pts["folded gmres"].timing.repeats == cfg.repeats


def test_learning_gradient_check_against_kkt(tmp_path):
    """The learning suite's ∂loss/∂μ̂: folded vs the closed-form KKT gradient."""
    from comparisons.suites import learning

    cfg = _tiny(tmp_path)
    n, p, N = 8, 5, 16
    z, mu, r = learning._data(cfg, n, p, N, seed=21)
    port = learning.Portfolio(learning._risk(cfg, n, seed=22), 5.0)
    data = {"z_train": z, "r_train": r}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        check = learning._grad_check(cfg, port, learning._cvxpy_layer(port), data, N)
    assert check["folded"] < 1e-8
    # cvxpylayers with SCS's default tolerances: close, not exact (what the report shows)
    assert check["cvxpylayers"] < 5e-2
    assert check["support"] > 1.5  # a non-vertex solution, so the gradient is not 0


def test_theseus_fd_truth_matches_implicit_at_zero_residual(tmp_path):
    """At zero residual JᵀJ is the full Hessian, so Theseus implicit must equal the FD truth."""
    th = pytest.importorskip("theseus")
    from comparisons.suites import theseus as suite

    cfg = _tiny(tmp_path)
    prob = suite._exp_problem(cfg, 2, 0.0, "zero-residual exp fit")
    fd = suite._fd_grad(prob)
    y = prob.wrt.clone().requires_grad_(True)
    values, _ = th.TheseusLayer(prob.make())({"y": y, **prob.init(2)},
                                             optimizer_kwargs={"backward_mode": "implicit"})
    (g,) = torch.autograd.grad(prob.loss(values).sum(), y)
    assert suite._rel(g, fd) < 1e-7
