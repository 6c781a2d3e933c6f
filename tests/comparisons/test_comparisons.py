"""The comparisons package: its truths, its memory meter, and its smallest runs, checked by number.

No timing is asserted anywhere: times depend on the machine. Every assertion compares a
measured number with an independent truth (finite differences, a closed form, exact byte
counts of known allocations).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from comparisons import cli
from comparisons.config import Config
from comparisons.measure import MemoryStats, measure_memory
from comparisons.problems import (
    exact_solution,
    make_qp,
    max_rel_err,
    project_simplex,
    solve_qp,
    vjp_truth,
)


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
    # BLAS/OpenMP pools read back with threadpoolctl after the run: every one at 1 thread
    assert "threadpool_limits(1)" in report and "after the last suite: all 1 thread" in report
    assert (out / "unroll_convergence.png").stat().st_size > 10_000
    data = json.loads((out / "results.json").read_text())["suites"]["unroll_convergence"]["data"]
    for kind in ("box", "simplex"):
        s = data[kind]
        # rank Φ measured from n VJPs vs the closed form: |F| on the box, |S| − 1 on the simplex
        assert s["rank_phi"] == s["free"] - (kind == "simplex")
        # folded GMRES against the closed form, within rank(Φ) + 1 iterations
        assert s["gmres_final_err"] < 1e-8 and s["gmres_final_converged"]
        assert s["gmres_final_iters"] <= s["rank_phi"] + 1
        # LFPI decays at ρ(Φ) (the paper's claim), measured rate within 5 %
        assert abs(s["rate_lfpi"] / s["rho"] - 1) < 0.05
        # unrolling from x* computes exactly the LFPI iterates
        assert s["warm_vs_lfpi"] < 1e-10
        assert s["fold_fixed_point_vs_recorded"] < 1e-12


def test_failing_suite_is_reported_and_exit_is_nonzero(tmp_path, monkeypatch):
    from comparisons.suites import portfolio

    def boom(cfg):
        raise RuntimeError("dependency missing for this test")

    monkeypatch.setattr(portfolio, "run", boom)
    code = cli.main(["--tiny", "--suite", "portfolio", "--out", str(tmp_path), "--no-progress"])
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


def test_theseus_fd_truth_matches_implicit_at_zero_residual(tmp_path):
    """At zero residual JᵀJ is the full Hessian, so Theseus implicit must equal the FD truth."""
    th = pytest.importorskip("theseus")
    from comparisons.suites import _theseus_problems as suite

    cfg = _tiny(tmp_path)
    prob = suite._exp_problem(cfg, 2, 0.0, "zero-residual exp fit")
    fd = suite._fd_grad(prob)
    y = prob.wrt.clone().requires_grad_(True)
    values, _ = th.TheseusLayer(prob.make())({"y": y, **prob.init(2)},
                                             optimizer_kwargs={"backward_mode": "implicit"})
    (g,) = torch.autograd.grad(prob.loss(values).sum(), y)
    assert suite._rel(g, fd) < 1e-7


def test_pose_graph_ift_truth_matches_full_central_differences(tmp_path):
    """The pose graph's IFT truth (full Hessian) vs central differences of every data entry
    through Theseus's own Gauss-Newton solve, on a 4-pose loop (12 tangent dimensions)."""
    th = pytest.importorskip("theseus")
    from comparisons.suites import _theseus_pose_graph as suite
    from comparisons.suites._theseus_problems import POSE_TRUTH_OPT, _rel

    cfg = _tiny(tmp_path)
    B, N = 2, 4
    prob = suite._pose_graph_problem(cfg, B, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth, stats = suite._pose_graph_truth(prob)
    assert stats["stationarity_after"] < 1e-12 and stats["hessian_min_eig"] > 0
    y = prob.wrt.detach()
    m = y.shape[1]
    layer = th.TheseusLayer(prob.make(max_iterations=POSE_TRUTH_OPT["max_iterations"]))
    h = 1e-5
    eye = torch.eye(m, dtype=y.dtype)
    data = torch.cat([(y[:, None] + h * eye).reshape(B * m, m),
                      (y[:, None] - h * eye).reshape(B * m, m)])
    with torch.no_grad():
        f = suite._solve_loss(prob, layer, data)
    fd = ((f[:B * m] - f[B * m:]) / (2 * h)).reshape(B, m)
    assert _rel(truth, fd) < 1e-7  # measured 9.8e-10


def test_gradient_agreement_tiny_case_within_tolerances(tmp_path):
    """The suite on the sparsemax case: every reference within the tolerance it is judged at."""
    from comparisons.cases import CASES
    from comparisons.suites import gradient_agreement as ga

    cfg = _tiny(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ga.run(cfg, cases=["sparsemax"])
    assert res.ok, res.errors
    case = CASES["sparsemax"]()
    entry = res.data["cases"]["sparsemax"]
    assert entry["backward_converged"] is True
    for ref in ga.REFERENCES:
        assert entry[ref]["worst"] < ga._judge_tol(case, ref), (ref, entry[ref])
    # SCS/diffcp are held to the case's own tolerance (1e-10), not the loose bound
    assert entry["diffcp"]["worst"] < case.rtol == 1e-10
    table_rows = [ln for ln in res.markdown.splitlines() if ln.startswith("| sparsemax")]
    assert len(table_rows) == 1 and "✗" not in table_rows[0]


def test_first_k_and_fit_rate_against_geometric_closed_form():
    """err_k = c·r^k: the fitted rate is r and the first K below acc is log(acc/c)/log(r)."""
    from comparisons.suites.unroll_convergence import _first_k, _fit_rate

    c, r = 3.0, 0.9
    ks = list(range(0, 400, 7))
    errs = [c * r ** k for k in ks]
    assert abs(_fit_rate(ks, errs) - r) < 1e-12
    for acc in (1e-4, 1e-8):
        exact = math.log(acc / c) / math.log(r)
        assert abs(_first_k(ks, errs, acc) - exact) < 1e-9
    assert _first_k(ks, errs, 1e-300) == math.inf
    assert _first_k(ks, errs, 10.0) == 0.0  # met at the first point: no interpolation
    assert math.isnan(_fit_rate([0, 1], [1e-3, 1e-4]))  # fewer than 3 points in range


@pytest.mark.parametrize("argv, what", [(["--repeats", "0"], "--repeats"),
                                        (["--repeats", "two"], "--repeats"),
                                        (["--seed", "-1"], "--seed")])
def test_cli_rejects_bad_numbers_with_a_message(argv, what, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{what} must be an integer >=" in err and "Traceback" not in err


def test_ratio_format_keeps_significant_figures_and_memory_peak_is_the_larger():
    from comparisons.report import fmt_ratio

    assert [fmt_ratio(x) for x in (123.4, 12.34, 1.234, 0.8996, 0.4321, 0.004321, 0.0)] == \
        ["123×", "12.3×", "1.23×", "0.90×", "0.43×", "0.0043×", "0×"]
    assert MemoryStats(1000, 0, 500, 58_700).peak == 58_700
    assert MemoryStats(1000, 0, 500, 10).peak == 1500


def test_scaling_keeps_results_when_plot_fails_and_flags_unconverged_backward(tmp_path,
                                                                              monkeypatch):
    """A failing plot is recorded in res.errors, the numbers and tables are still written, and
    a folded backward stopped before convergence is marked ✗ (FoldInfo.backward_converged)."""
    import fold_plugins as fp
    from comparisons.suites import scaling

    def capped(qp, cfg):  # fixed-point backward cut at 2 iterations: cannot converge (ρ ≈ 0.9)
        def call(q, g, sw):
            sw.start()
            xs, _, _ = scaling.solve_qp(qp, q, tol=1e-10)
            x, info = fp.fold(qp.step, xs, q, solver="fixed_point", maxiter=2,
                              return_info=True)
            sw.lap("forward")
            (x * g).sum().backward()
            sw.lap("backward")
            return q.grad, 2, bool(info.backward_converged.all())
        return call

    def boom(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(scaling, "_grid", lambda cfg: ([(12, 2)], [(12, 2)]))
    monkeypatch.setattr(scaling, "_methods", lambda cfg: [
        scaling.Method("folded gmres", scaling._folded("gmres")),
        scaling.Method("folded capped", capped)])
    monkeypatch.setattr(scaling, "_plot", boom)
    cfg = _tiny(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = scaling.run(cfg)
    assert [e for e in res.errors if "plot" in e and "no display" in e]
    d = res.data
    assert d["n=12,B=2,folded gmres"]["error"] < 1e-8
    assert d["n=12,B=2,folded gmres"]["backward_converged"] is True
    assert d["n=12,B=2,folded capped"]["backward_converged"] is False
    assert d["n=12,B=2,folded capped"]["error"] > 1e-3  # two terms of the Neumann series
    assert "✗" in res.markdown and "folded capped at n=12, B=2" in res.markdown
    assert res.headline == []  # no cvxpylayers/unrolled column: nothing to quote
