"""Gradient-type steps (fold_plugins/steps/gradient.py): projected gradient on a box QP, gradient
descent, mirror descent, Newton, the projection kink; each folded gradient against central
finite differences of the re-solve and a closed-form KKT/IFT gradient."""

from __future__ import annotations

import pytest
import torch
from step_checks import (
    DT,
    TOL,
    _bmv,
    _box_qp,
    _box_truth,
    _logreg,
    _pg_step,
    fd_directional,
    leaves,
    rel,
)

import fold_plugins as fp
from fold_plugins import projections as PR
from fold_plugins import steps as S


def test_projected_gradient_box_qp():
    P, q, lo, hi = _box_qp()
    step = _pg_step(P)

    def solve(P, q, lo, hi):
        x, info = S.iterate(
            _pg_step(P), torch.zeros_like(q), P, q, lo, hi, tol=1e-15, maxiter=20000, warn=False
        )
        return x

    xs = solve(P, q, lo, hi)
    assert torch.allclose(xs, _box_truth(P, q, lo, hi, xs), atol=1e-13, rtol=0)
    n_act = int(((xs <= lo + 1e-12) | (xs >= hi - 1e-12)).sum())
    assert 0 < n_act < xs.numel()  # both free and active coordinates
    w = torch.randn_like(xs)
    Pl, ql, lol, hil = leaves(P, q, lo, hi)
    x, info = fp.fold(step, xs, Pl, ql, lol, hil, tol=1e-12, return_info=True)
    grads = torch.autograd.grad((x * w).sum(), [Pl, ql, lol, hil])
    Pt, qt, lot, hit = leaves(P, q, lo, hi)
    gref = torch.autograd.grad((_box_truth(Pt, qt, lot, hit, xs) * w).sum(), [Pt, qt, lot, hit])
    err_kkt = max(rel(g, r) for g, r in zip(grads, gref))
    err_fd = fd_directional(lambda *t: (solve(*t) * w).sum(), [P, q, lo, hi], list(grads), sym=(0,))
    print(
        f"[measured] projected_gradient box QP: rel err vs KKT {err_kkt:.1e}, vs FD "
        f"{err_fd:.1e}, backward iters {int(info.backward_iterations.max())}"
    )
    assert err_kkt < 1e-9, err_kkt
    assert err_fd < TOL, err_fd
    # ρ(Φ) ≤ (L − μ)/(L + μ) for α = 2/(L + μ)
    ev = torch.linalg.eigvalsh(P)
    bound = (ev[:, -1] - ev[:, 0]) / (ev[:, -1] + ev[:, 0])
    rho = fp.diagnostics.spectral_radius(step, xs, P, q, lo, hi)
    assert bool((rho <= bound + 1e-8).all()), (rho, bound)
    # the objective= form gives the same gradient
    f = lambda x, P, q: 0.5 * (x * _bmv(P, x)).sum(1) + (q * x).sum(1)  # noqa: E731
    step2 = S.projected_gradient(
        projection=PR.box, step_size=S.quadratic_step_size(P), objective=f, n_grad_params=2
    )
    ql2 = q.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((fp.fold(step2, xs, P, ql2, lo, hi) * w).sum(), ql2)
    assert rel(g2, gref[1]) < 1e-9


def test_objective_passed_as_grad_is_named_and_the_keyword_form_is_exact():
    """An objective f(x) -> (B,) given where the gradient belongs: the error says to pass it as
    objective=f. With the keyword the fold is exact: x* = clip(−q, −½, ½), ∂ℓ/∂q = −w on the
    free coordinates, 0 on the clipped ones."""
    f = lambda x, q: 0.5 * (x * x).sum(1) + (q * x).sum(1)  # noqa: E731
    box = lambda y: PR.box(y, -0.5, 0.5)  # noqa: E731
    q = torch.randn(3, 6, dtype=DT)
    with pytest.raises(
        S.ShapeError,
        match=r"projected_gradient: grad .* returned \(3,\)\. It "
        r"returned one value per instance.*objective=f",
    ):
        S.projected_gradient(f, box, 0.5)(torch.zeros(3, 6, dtype=DT), q)
    with pytest.raises(S.ShapeError, match=r"newton: .*objective=f"):
        S.newton(f)(torch.zeros(3, 6, dtype=DT), q)
    step = S.projected_gradient(objective=f, projection=box, step_size=0.5)
    xs = torch.clamp(-q, -0.5, 0.5)
    ql = q.clone().requires_grad_(True)
    w = torch.randn_like(q)
    (g,) = torch.autograd.grad((fp.fold(step, xs, ql, strict=True) * w).sum(), ql)
    free = q.abs() < 0.5
    assert 0 < int(free.sum()) < free.numel()
    err = rel(g, torch.where(free, -w, torch.zeros_like(w)))
    assert err < 1e-12, err


def test_iterate_reports_slow_and_nan_instances_and_runs_unbatched():
    """steps.iterate: per-instance freezing, residuals in closed form, report_unconverged
    (warn / strict), the NaN guard, and batched=False."""
    q = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=DT)
    a = torch.tensor([1.0, 0.25], dtype=DT)  # instance 0: one exact step; 1: x_k = −(1−¾^k)q
    step = S.gradient_descent(lambda x, q: x + q, a)
    with pytest.warns(
        fp.FoldConvergenceWarning,
        match=r"iterate \(tol 1\.0e-12, maxiter 5.*instance\(s\) \[1\] of 2",
    ):
        x, info = S.iterate(step, torch.zeros_like(q), q, tol=1e-12, maxiter=5)
    assert info.iterations.tolist() == [2, 5] and info.converged.tolist() == [True, False]
    xk = [-(1 - 0.75**k) * q[1] for k in (4, 5)]
    assert torch.allclose(x[1], xk[1], rtol=0, atol=1e-15) and torch.equal(x[0], -q[0])
    r5 = (xk[1] - xk[0]).norm() / (1 + xk[0].norm())
    assert abs(float(info.residual[1]) - float(r5)) < 1e-15
    with pytest.raises(fp.FoldError, match=rf"\[1\] of 2 \(error up to {float(r5):.2e}\)"):
        S.iterate(step, torch.zeros_like(q), q, tol=1e-12, maxiter=5, strict=True)
    # NaN guard: x ← log(x − c) + 3 from x = 3; instance 1 (c = 2.9) reaches 3 + log(0.1) < c
    # at its first step, so its second step is NaN: it keeps that iterate and is reported
    c = torch.tensor([[0.0], [2.9]], dtype=DT)
    nan_step = lambda x: torch.log(x - c) + 3.0  # noqa: E731
    x0 = torch.full((2, 1), 3.0, dtype=DT)
    with pytest.warns(fp.FoldConvergenceWarning, match=r"NaN/Inf for instance\(s\) \[1\] of 2"):
        x, info = S.iterate(nan_step, x0, tol=1e-13, maxiter=200)
    assert info.diverged.tolist() == [False, True] and info.converged.tolist() == [True, False]
    assert info.iterations[1] == 2 and torch.isnan(info.residual[1])
    assert float(x[1, 0]) == float(torch.log(x0[1, 0] - 2.9) + 3.0)
    # instance 0 converged to the root of x = log x + 3 (Newton to machine precision)
    r = torch.tensor(4.5, dtype=DT)
    for _ in range(30):
        r = r - (r - torch.log(r) - 3) / (1 - 1 / r)
    assert abs(float(x[0, 0] - r)) < 1e-12
    # batched=False: a 0-d state is one problem; x ← x/2 + 1 → 2
    xu, iu = S.iterate(
        lambda x: 0.5 * x + 1,
        torch.tensor(0.0, dtype=DT),
        tol=1e-14,
        maxiter=100,
        batched=False,
        strict=True,
    )
    assert xu.shape == () and abs(float(xu) - 2.0) < 1e-13 and iu.iterations.shape == (1,)


def test_gradient_descent_quadratic_fixed_point_solver():
    P, q, _, _ = _box_qp(B=2, n=5)
    xs = -torch.linalg.solve(P, q.unsqueeze(-1)).squeeze(-1)
    ql = q.clone().requires_grad_(True)
    step = S.gradient_descent(lambda x, q: _bmv(P, x) + q, S.quadratic_step_size(P))
    w = torch.randn_like(xs)
    (g,) = torch.autograd.grad(
        (fp.fold(step, xs, ql, solver="fixed_point", tol=1e-13, maxiter=20000) * w).sum(), ql
    )
    ref = -torch.linalg.solve(P, w.unsqueeze(-1)).squeeze(-1)  # P symmetric
    print(f"[measured] gradient_descent (LFPI backward): rel err vs closed form {rel(g, ref):.1e}")
    assert rel(g, ref) < 1e-10


@pytest.mark.parametrize("eta_scale,expected_rho", [(1.0, 0.0), (0.5, 0.5)])
def test_mirror_descent_entropy_lp(eta_scale, expected_rho):
    B, n = 3, 6
    c = torch.randn(B, n, dtype=DT)
    eps = torch.tensor(0.3, dtype=DT)
    r = torch.tensor(2.0, dtype=DT, requires_grad=True)

    def grad(x, c, eps):
        return c + eps * (1 + torch.log(x))

    step = S.mirror_descent(grad, step_size=eta_scale / float(eps), radius=r)
    xs, it = S.iterate(step, torch.full((B, n), 2.0 / n, dtype=DT), c, eps, tol=1e-15, maxiter=500)
    closed = 2.0 * torch.softmax(-c / eps, dim=1)
    assert torch.allclose(xs, closed, atol=1e-14, rtol=0)
    cl, el = leaves(c, eps)
    x, info = fp.fold(step, xs, cl, el, return_info=True)
    w = torch.randn_like(xs)
    g = torch.autograd.grad((x * w).sum(), [cl, el, r])
    ct, et, rt = leaves(c, eps, r)
    gref = torch.autograd.grad((rt * torch.softmax(-ct / et, 1) * w).sum(), [ct, et, rt])
    err = max(rel(a, b) for a, b in zip(g, gref))
    rho = fp.diagnostics.spectral_radius(step, xs, c, eps)
    print(
        f"[measured] mirror_descent η={eta_scale}/ε: rel err vs closed form {err:.1e}, "
        f"ρ(Φ) {float(rho.max()):.3g}, backward iters {int(info.backward_iterations.max())}"
    )
    assert err < 1e-9, err
    assert float((rho - expected_rho).abs().max()) < 1e-6
    if expected_rho == 0.0:
        assert int(info.backward_iterations.max()) <= 1  # Φ = 0: one GMRES iteration


def test_newton_logistic_regression():
    B, N, n = 2, 20, 4
    A = torch.randn(B, N, n, dtype=DT)
    lab = torch.sign(torch.randn(B, N, dtype=DT))
    mu = torch.tensor(0.3, dtype=DT)

    def solve(A, mu):
        return S.minimize_newton(
            _logreg, torch.zeros(B, n, dtype=DT), A, lab, mu, tol=1e-15, maxiter=50
        )[0]

    xs = solve(A, mu)
    step = S.newton(objective=_logreg)
    Al, ml = leaves(A, mu)
    x, info = fp.fold(step, xs, Al, lab, ml, return_info=True)
    w = torch.randn_like(xs)
    g = torch.autograd.grad((x * w).sum(), [Al, ml])
    assert int(info.backward_iterations.max()) <= 1  # Φ = 0 at t = 1
    # IFT: dL/dθ = −∂θ⟨∇f(x*, θ), H⁻¹w⟩ with x* and v = H⁻¹w held fixed
    H = S._common.autograd_hessian(_logreg, xs, (A, lab, mu))
    v = torch.linalg.solve(H, w.unsqueeze(-1)).squeeze(-1)
    At, mt = leaves(A, mu)
    xg = xs.clone().requires_grad_(True)
    (gf,) = torch.autograd.grad(_logreg(xg, At, lab, mt).sum(), xg, create_graph=True)
    gref = torch.autograd.grad(-(gf * v).sum(), [At, mt])
    err_ift = max(rel(a, b) for a, b in zip(g, gref))
    err_fd = fd_directional(lambda A, mu: (solve(A, mu) * w).sum(), [A, mu], list(g))
    print(f"[measured] newton logreg: rel err vs IFT {err_ift:.1e}, vs FD {err_fd:.1e}")
    assert err_ift < 1e-9, err_ift
    assert err_fd < TOL, err_fd


def test_kink_weakly_active_box_qp_gradient_is_free_side():
    """x*_0 = 0 = lower with ∂f/∂x_0 = 0 exactly: the PG step sits on the projection's kink.
    Documented gradient: the free side, dx_0/dq_0 = −1 (equal to the one-sided FD for q_0↓)."""
    P = torch.eye(3, dtype=DT)
    q = torch.tensor([[0.0, 0.7, -2.0]], dtype=DT, requires_grad=True)
    lo, hi = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    xs = torch.tensor([[0.0, 0.0, 1.0]], dtype=DT)
    x = fp.fold(_pg_step(P), xs, P, q, lo, hi, strict=True)
    (g,) = torch.autograd.grad(x[0, 0], q)
    assert torch.isfinite(g).all()
    assert g.tolist() == [[-1.0, 0.0, 0.0]]

    def resolve(q0: float) -> float:
        """x*_0 re-solved from scratch (projected gradient to 1e-15) at q_0 = q0."""
        qq = q.detach().clone()
        qq[0, 0] = q0
        x, info = S.iterate(
            _pg_step(P),
            torch.full_like(qq, 0.5),
            P,
            qq,
            lo,
            hi,
            tol=1e-15,
            maxiter=1000,
            strict=True,
        )
        return float(x[0, 0])

    h = 1e-6
    x0 = resolve(0.0)
    assert x0 == 0.0
    free_side = (resolve(-h) - x0) / (-h)  # q_0 ↓: x_0 = h leaves the bound (free side)
    active_side = (resolve(h) - x0) / h  # q_0 ↑: x_0 stays at the bound
    print(
        f"[measured] PG kink: folded dx0/dq0 {g[0, 0].item()}, one-sided FD free side "
        f"{free_side:.12f}, active side {active_side}"
    )
    assert abs(free_side - g[0, 0].item()) < 1e-9
    assert active_side == 0.0  # a genuine kink: the two one-sided derivatives differ
