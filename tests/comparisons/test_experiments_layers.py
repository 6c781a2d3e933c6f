"""The learning experiments' layers and the active-set SQP step against independent truths:
cvxpylayers with tight tolerances, central differences of the forward solvers, unrolling to
convergence."""

from __future__ import annotations

import warnings

import pytest
import torch

import fold_plugins as fp
from comparisons.experiments.generators import nonconvex_qp_data, portfolio_data
from comparisons.experiments.portfolio import Portfolio

DT = torch.float64


def _portfolio(n: int = 6, B: int = 2):
    d = portfolio_data(B, 3, n, 4, 0.1, seed=5)
    port = Portfolio(d.cov, gamma_factor=1.0)  # a tight budget: the risk constraint is active
    g = torch.Generator().manual_seed(0)
    c = d.c + 0.05 * torch.randn(B, n, generator=g, dtype=DT)
    return port, c


def test_clarabel_duals_satisfy_kkt_and_risk_constraint_is_active():
    port, c = _portfolio()
    x, lam = port.solve(c)
    nu = c.new_zeros(c.shape[0], 0)
    assert float(fp.steps.sqp_kkt_residual(port.f, port.g, None, x, lam, nu, c).max()) < 1e-6
    assert bool((lam[:, 0] > 1e-6).all())  # λ_risk > 0: the quadratic constraint binds


def test_active_set_sqp_step_matches_cvxpylayers_and_admm_step():
    """Folded SQP (active-set subproblem) vs cvxpylayers (Clarabel, tight) and vs the folded
    SQP with the ADMM subproblem, on a portfolio whose risk constraint binds."""
    cp = pytest.importorskip("cvxpy")
    from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference

    port, c = _portfolio()
    n = port.n
    xv, cv = cp.Variable(n), cp.Parameter(n)
    F = port.F.numpy()
    prob = cp.Problem(cp.Maximize(cv @ xv - port.reg * cp.sum_squares(xv)),
                      [cp.sum_squares(F @ xv) <= port.gamma, cp.sum(xv) <= 1, xv >= 0])
    ref = cvxpylayers_reference(prob, [cv], [xv], solver="CLARABEL")
    w = torch.randn(*c.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    grads = {}
    for name, fn in (("active", lambda t: port.folded(t)),
                     ("admm", lambda t: port.folded(t, "admm")),
                     ("cvx", lambda t: ref(t)[0])):
        cc = c.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            (grads[name],) = torch.autograd.grad((fn(cc) * w).sum(), cc)
    scale = grads["cvx"].norm()
    assert float((grads["active"] - grads["cvx"]).norm() / scale) < 1e-5  # Clarabel's accuracy
    assert float((grads["active"] - grads["admm"]).norm() / scale) < 1e-8


def test_active_set_step_is_newton_at_kkt_point():
    """Near a nondegenerate KKT point the active-set SQP step is Newton's method on the KKT
    system: from Clarabel's ~1e-7-accurate point one step lands within round-off of the fixed
    point (quadratic convergence), and there Φ = 0, so GMRES needs one iteration."""
    port, c = _portfolio()
    x, lam = port.solve(c)
    nu = c.new_zeros(c.shape[0], 0)
    with torch.no_grad():
        xn, ln, _ = port.fold_step((x, lam, nu), c)
        x2, l2, _ = port.fold_step((xn, ln, nu), c)
    assert float((xn - x).abs().max()) < 1e-6
    assert float((x2 - xn).abs().max()) < 1e-11 and float((l2 - ln).abs().max()) < 1e-10
    cc = c.clone().requires_grad_(True)
    (xo, _, _), info = fp.fold(port.fold_step, (xn.detach(), ln.detach(), nu), cc,
                               return_info=True)
    xo.sum().backward()
    assert int(info.backward_iterations.max()) <= 2


def test_spo_plus_is_zero_at_truth_nonnegative_and_has_its_subgradient():
    """SPO+ (maximisation form): 0 at ĉ = c, ≥ 0 elsewhere, gradient 2(x*(2ĉ − c) − x*(c))
    matching central differences at a point where the adversarial solution is locally fixed."""
    port, c = _portfolio()
    x_lin, _ = port.solve(c, quadratic=False)
    assert float(port.spo_plus(c, c, x_lin).abs().max()) < 1e-8
    g = torch.Generator().manual_seed(2)
    c_hat = (c + 0.05 * torch.randn(*c.shape, generator=g, dtype=DT)).requires_grad_(True)
    loss = port.spo_plus(c_hat, c, x_lin)
    assert bool((loss > -1e-8).all())
    (gr,) = torch.autograd.grad(loss.sum(), c_hat)
    v = torch.randn(*c.shape, generator=g, dtype=DT)
    h = 1e-7
    with torch.no_grad():
        fd = (port.spo_plus(c_hat + h * v, c, x_lin).sum()
              - port.spo_plus(c_hat - h * v, c, x_lin).sum()) / (2 * h)
    assert abs(float((gr * v).sum() - fd)) < 1e-5 * max(1.0, abs(float(fd)))


def test_sqp_rejects_unknown_subproblem():
    with pytest.raises(fp.FoldError, match="subproblem"):
        fp.steps.sqp(lambda x: x.sum(-1), subproblem="interior")


def test_nonconvex_folded_sqp_and_pgd_match_central_differences():
    pytest.importorskip("casadi")
    from comparisons.experiments.nonconvex import NonconvexLayer
    from comparisons.suites.nonconvex import grad_check

    d = nonconvex_qp_data(3, 8, 3, 3, seed=2)
    layer = NonconvexLayer(d)
    ck = grad_check(layer, d.p + 0.5)
    assert ck["folded SQP"] < 1e-6 and ck["folded PGD"] < 1e-6
    assert layer.ipopt_failures == 0


def test_unrolled_fdpg_converges_to_folded_tv():
    """Unrolled FDPG with many iterations: same denoised signal and same gradient in D."""
    from comparisons.experiments.tv import folded_tv, unrolled_tv

    g = torch.Generator().manual_seed(3)
    y = 5 * torch.randn(2, 8, generator=g, dtype=DT)
    D0 = fp.steps.difference_matrix(8) + 0.1 * torch.randn(7, 8, generator=g, dtype=DT)
    w = torch.randn(2, 8, generator=g, dtype=DT)
    out = {}
    for name, fn in (("folded", lambda D: folded_tv(y, 1.5, D)),
                     ("unrolled", lambda D: unrolled_tv(y, 1.5, D, 800))):
        D = D0.clone().requires_grad_(True)
        x = fn(D)
        (gD,) = torch.autograd.grad((x * w).sum(), D)
        out[name] = (x.detach(), gD)
    assert float((out["folded"][0] - out["unrolled"][0]).abs().max()) < 1e-8
    assert float((out["folded"][1] - out["unrolled"][1]).norm() / out["folded"][1].norm()) < 1e-6


def test_cvxpy_refuses_the_nonconvex_problem():
    pytest.importorskip("cvxpy")
    from comparisons.experiments.nonconvex import cvxpy_verdict

    v = cvxpy_verdict()
    assert "no attribute 'sin'" in v and "DPP" in v
