"""The ADMM-QP step and its drivers (fold_plugins/steps/quadprog.py): general QPs against the
closed-form KKT gradient and finite differences, batched vs shared data, weakly active rows,
infeasibility, float32 tolerances."""

from __future__ import annotations

import pytest
import torch
from step_checks import DT, TOL, _general_qp, _qp_truth, fd_directional, leaves, rel

import fold_plugins as fp
from fold_plugins import steps as S


def test_admm_qp_general_qp():
    P, q, A, l, u = _general_qp()
    (xs, zs, ys), info = S.solve_qp_admm(P, q, A, l, u, tol=1e-12)
    assert all(s == "solved" for s in info.status)
    assert int((ys.abs() > 1e-9).sum()) > 2 * 2  # some inequalities active besides equalities
    w = torch.randn_like(xs)

    def solve(P, q, A, l, u):
        return S.solve_qp_admm(P, q, A, l, u, tol=1e-12)[0][0]

    Pl, ql, Al, ll, ul = leaves(P, q, A, l, u)
    x, finfo, qinfo = S.qp(Pl, ql, Al, ll, ul, return_info=True, admm_options={"tol": 1e-12})
    g = torch.autograd.grad((x * w).sum(), [Pl, ql, Al, ll, ul])
    assert all(torch.isfinite(t).all() for t in g)
    assert float(g[3][2:-1].abs().max()) == 0.0  # infinite lower bounds: zero gradient
    Pt, qt, At, lt, ut = leaves(P, q, A, l, u)
    gref = list(
        torch.autograd.grad((_qp_truth(Pt, qt, At, lt, ut, ys) * w).sum(), [Pt, qt, At, lt, ut])
    )
    gref[0] = 0.5 * (gref[0] + gref[0].T)  # documented: P's gradient is the symmetric one
    err_kkt = max(rel(a, b) for a, b in zip(g, gref) if b.norm() > 0)
    # FD on the finite data: -inf entries of l stay fixed; equality rows move l = u together
    fin = torch.isfinite(l)
    eq = l == u
    l0 = torch.where(fin & ~eq, l, torch.zeros_like(l))

    def loss(P, q, A, lf, u):
        ll = torch.where(eq, u, torch.where(fin, lf, l))
        return (solve(P, q, A, ll, u) * w).sum()

    zero = torch.zeros_like(l)
    err_fd = fd_directional(
        loss,
        [P, q, A, l0, u],
        [g[0], g[1], g[2], torch.where(fin & ~eq, g[3], zero), g[4] + torch.where(eq, g[3], zero)],
        sym=(0,),
    )
    # ADMM's Φ at a nondegenerate solution: ρ(Φ) < 1
    rho = fp.diagnostics.spectral_radius(
        S.admm_qp(rho=qinfo.rho), (xs, zs, ys), P, q, A, l.clamp(-S.INF, S.INF), u
    )
    print(
        f"[measured] admm_qp general QP: rel err vs KKT {err_kkt:.1e}, vs FD {err_fd:.1e}, "
        f"ρ(Φ) {float(rho.max()):.4f}, backward iters {int(finfo.backward_iterations.max())}, "
        f"forward iters {qinfo.iterations.tolist()}"
    )
    assert err_kkt < 1e-9, err_kkt
    assert err_fd < TOL, err_fd
    assert float(rho.max()) < 1.0


def test_admm_qp_batched_params_match_shared():
    P, q, A, l, u = _general_qp(B=2)
    Pb, Ab = P.expand(2, -1, -1).clone(), A.expand(2, -1, -1).clone()
    x1 = S.qp(P, q, A, l, u)
    x2 = S.qp(Pb, q, Ab, l.expand(2, -1), u.expand(2, -1))
    assert torch.allclose(x1, x2, atol=1e-12, rtol=0)


def test_kink_weakly_active_admm_qp_is_finite():
    """min ½‖x‖² + qᵀx s.t. x_0 ≤ 0 with q_0 = 0: x_0 = 0, y_0 = 0 (weakly active). Folded
    gradient: the free side, dx_0/dq_0 = −1, finite (no NaN), for every backward solver."""
    n = 3
    P = torch.eye(n, dtype=DT)
    A = torch.eye(n, dtype=DT)[:1]
    l = torch.tensor([-S.INF], dtype=DT)
    u = torch.zeros(1, dtype=DT)
    q = torch.tensor([[0.0, 0.5, -1.0]], dtype=DT, requires_grad=True)
    state = (
        torch.tensor([[0.0, -0.5, 1.0]], dtype=DT),
        torch.zeros(1, 1, dtype=DT),
        torch.zeros(1, 1, dtype=DT),
    )
    for solver in ("gmres", "dense"):
        x, _, _ = fp.fold(S.admm_qp(), state, P, q, A, l, u, solver=solver, strict=True)
        (g,) = torch.autograd.grad(x[0].sum(), q)
        assert torch.isfinite(g).all()
        assert torch.allclose(g, -torch.ones_like(g), atol=1e-10)


def test_infeasible_qp_raises_clear_error():
    inf = float("inf")
    P = torch.eye(2, dtype=DT)
    A = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DT)
    q = torch.zeros(3, 2, dtype=DT)
    l = torch.tensor([[1.0, -inf], [0.0, -inf], [1.0, -inf]], dtype=DT)
    u = torch.tensor([[inf, 2.0], [inf, 1.0], [inf, 0.0]], dtype=DT)  # instance 2: x ≥ 1, x ≤ 0
    with pytest.raises(S.QPInfeasibleError, match=r"primal infeasible for instance\(s\) \[2\]"):
        S.solve_qp_admm(P, q, A, l, u)
    with pytest.raises(S.QPInfeasibleError, match="primal infeasible"):
        S.qp(P, q, A, l, u)  # the differentiable layer raises from its forward, no gradient
    (_, _, _), info = S.solve_qp_admm(P, q, A, l, u, raise_infeasible=False)
    assert info.status == ["solved", "solved", "primal_infeasible"]
    # unbounded objective (dual infeasible): min −1ᵀx s.t. x ≥ 0
    with pytest.raises(S.QPInfeasibleError, match="dual infeasible"):
        S.solve_qp_admm(
            torch.zeros(2, 2, dtype=DT),
            -torch.ones(2, dtype=DT),
            torch.eye(2, dtype=DT),
            torch.zeros(2, dtype=DT),
            torch.full((2,), inf, dtype=DT),
        )
    with pytest.raises(S.QPInfeasibleError, match="l > u"):
        S.solve_qp_admm(P, q, A, torch.ones(2, dtype=DT), torch.zeros(2, dtype=DT))


def test_qp_default_backward_tol_float32_no_false_alarm_under_strict():
    """Issue 9 item 8: qp's default backward_tol (1e-12) is below float32's round-off floor;
    the solver's measured floor accepts the correct gradient instead of raising (an
    n-scaled singularity threshold once called this QP "not isolated")."""
    P, q, A, l, u = _general_qp(B=2)
    w = torch.randn(2, 8, dtype=DT)
    grads = {}
    for dt, tol in ((torch.float32, 1e-5), (DT, 1e-12)):
        Pl, ql, Al = leaves(P.to(dt), q.to(dt), A.to(dt))
        x = S.qp(Pl, ql, Al, l.to(dt), u.to(dt), admm_options={"tol": tol}, strict=True)
        grads[dt] = torch.autograd.grad((x * w.to(dt)).sum(), [Pl, ql, Al])
    err = max(rel(a.double(), b) for a, b in zip(grads[torch.float32], grads[DT]))
    assert err < 1e-3, err
