"""Update steps: each small float64 problem is solved tightly, folded, and its gradient checked
against central finite differences of the full re-solve and a closed-form KKT/IFT gradient.
Also: weakly active constraints (kinks), infeasible QPs, wrong shapes."""

from __future__ import annotations

import warnings

import pytest
import torch

import fold_plugins as fp
from fold_plugins import projections as PR
from fold_plugins import steps as S

DT = torch.float64
TOL = 1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fd_directional(loss_of, params: list[torch.Tensor], grads: list[torch.Tensor],
                   n_dirs: int = 4, h: float = 1e-6, sym: tuple[int, ...] = ()) -> float:
    """Relative error of ⟨∇L, δ⟩ against (L(θ+hδ) − L(θ−hδ))/2h over random directions δ.

    ``loss_of(*params)`` re-solves the problem from scratch (no graph). ``sym``: indices of
    matrix params whose perturbation is symmetrised.
    """
    got, ref = [], []
    for _ in range(n_dirs):
        dirs = []
        for i, p in enumerate(params):
            d = torch.randn_like(p)
            if i in sym:
                d = 0.5 * (d + d.transpose(-1, -2))
            dirs.append(d)
        plus = loss_of(*[p + h * d for p, d in zip(params, dirs)])
        minus = loss_of(*[p - h * d for p, d in zip(params, dirs)])
        ref.append((plus - minus) / (2 * h))
        got.append(sum((g * d).sum() for g, d in zip(grads, dirs)))
    return rel(torch.stack(got), torch.stack(ref))


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


# ----------------------------------------------------------------------------- box QP (PG)

def _box_qp(B=3, n=8):
    M = torch.randn(B, n, n, dtype=DT)
    P = M @ M.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=DT)
    q = torch.randn(B, n, dtype=DT)
    lo = -0.4 * torch.ones(n, dtype=DT)
    hi = 0.5 * torch.ones(n, dtype=DT)
    return P, q, lo, hi


def _pg_step(P):
    return S.projected_gradient(lambda x, P, q: S._common.bmv(P, x) + q, PR.box,
                                S.quadratic_step_size(P), n_grad_params=2)


def _box_truth(P, q, lo, hi, xs):
    """Closed-form active-set solution (masks from xs), differentiable in P, q, lo, hi."""
    low, high = xs <= lo + 1e-12, xs >= hi - 1e-12
    F = ~(low | high)
    xA = torch.where(low, lo.expand_as(xs), torch.where(high, hi.expand_as(xs),
                                                        torch.zeros_like(xs)))
    rhs = torch.where(F, -(q + S._common.bmv(P, xA)), torch.zeros_like(xs))
    eye = torch.eye(xs.shape[1], dtype=DT).expand_as(P)
    M = torch.where(F.unsqueeze(2) & F.unsqueeze(1), P, eye)
    xF = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
    return torch.where(F, xF, xA)


def test_projected_gradient_box_qp():
    P, q, lo, hi = _box_qp()
    step = _pg_step(P)

    def solve(P, q, lo, hi):
        x, info = S.iterate(_pg_step(P), torch.zeros_like(q), P, q, lo, hi, tol=1e-15,
                            maxiter=20000, warn=False)
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
    err_fd = fd_directional(lambda *t: (solve(*t) * w).sum(), [P, q, lo, hi], list(grads),
                            sym=(0,))
    print(f"[measured] projected_gradient box QP: rel err vs KKT {err_kkt:.1e}, vs FD "
          f"{err_fd:.1e}, backward iters {int(info.backward_iterations.max())}")
    assert err_kkt < 1e-9, err_kkt
    assert err_fd < TOL, err_fd
    # ρ(Φ) ≤ (L − μ)/(L + μ) for α = 2/(L + μ)
    ev = torch.linalg.eigvalsh(P)
    bound = (ev[:, -1] - ev[:, 0]) / (ev[:, -1] + ev[:, 0])
    rho = fp.diagnostics.spectral_radius(step, xs, P, q, lo, hi)
    assert bool((rho <= bound + 1e-8).all()), (rho, bound)
    # the objective= form gives the same gradient
    f = lambda x, P, q: 0.5 * (x * S._common.bmv(P, x)).sum(1) + (q * x).sum(1)  # noqa: E731
    step2 = S.projected_gradient(projection=PR.box, step_size=S.quadratic_step_size(P),
                                 objective=f, n_grad_params=2)
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
    with pytest.raises(S.ShapeError, match=r"projected_gradient: grad .* returned \(3,\)\. It "
                                           r"returned one value per instance.*objective=f"):
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
    with pytest.warns(fp.FoldConvergenceWarning,
                      match=r"iterate \(tol 1\.0e-12, maxiter 5.*instance\(s\) \[1\] of 2"):
        x, info = S.iterate(step, torch.zeros_like(q), q, tol=1e-12, maxiter=5)
    assert info.iterations.tolist() == [2, 5] and info.converged.tolist() == [True, False]
    xk = [-(1 - 0.75 ** k) * q[1] for k in (4, 5)]
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
    xu, iu = S.iterate(lambda x: 0.5 * x + 1, torch.tensor(0.0, dtype=DT), tol=1e-14,
                       maxiter=100, batched=False, strict=True)
    assert xu.shape == () and abs(float(xu) - 2.0) < 1e-13 and iu.iterations.shape == (1,)


# ----------------------------------------------------------------------------- gradient descent

def test_gradient_descent_quadratic_fixed_point_solver():
    P, q, _, _ = _box_qp(B=2, n=5)
    xs = -torch.linalg.solve(P, q.unsqueeze(-1)).squeeze(-1)
    ql = q.clone().requires_grad_(True)
    step = S.gradient_descent(lambda x, q: S._common.bmv(P, x) + q, S.quadratic_step_size(P))
    w = torch.randn_like(xs)
    (g,) = torch.autograd.grad((fp.fold(step, xs, ql, solver="fixed_point", tol=1e-13,
                                        maxiter=20000) * w).sum(), ql)
    ref = -torch.linalg.solve(P, w.unsqueeze(-1)).squeeze(-1)  # P symmetric
    print(f"[measured] gradient_descent (LFPI backward): rel err vs closed form {rel(g, ref):.1e}")
    assert rel(g, ref) < 1e-10


# ----------------------------------------------------------------------------- mirror descent

@pytest.mark.parametrize("eta_scale,expected_rho", [(1.0, 0.0), (0.5, 0.5)])
def test_mirror_descent_entropy_lp(eta_scale, expected_rho):
    B, n = 3, 6
    c = torch.randn(B, n, dtype=DT)
    eps = torch.tensor(0.3, dtype=DT)
    r = torch.tensor(2.0, dtype=DT, requires_grad=True)

    def grad(x, c, eps):
        return c + eps * (1 + torch.log(x))

    step = S.mirror_descent(grad, step_size=eta_scale / float(eps), radius=r)
    xs, it = S.iterate(step, torch.full((B, n), 2.0 / n, dtype=DT), c, eps, tol=1e-15,
                       maxiter=500)
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
    print(f"[measured] mirror_descent η={eta_scale}/ε: rel err vs closed form {err:.1e}, "
          f"ρ(Φ) {float(rho.max()):.3g}, backward iters {int(info.backward_iterations.max())}")
    assert err < 1e-9, err
    assert float((rho - expected_rho).abs().max()) < 1e-6
    if expected_rho == 0.0:
        assert int(info.backward_iterations.max()) <= 1  # Φ = 0: one GMRES iteration


# ----------------------------------------------------------------------------- Newton

def _logreg(x, A, lab, mu):
    z = (A @ x.unsqueeze(-1)).squeeze(-1) * lab
    return torch.nn.functional.softplus(-z).sum(1) + 0.5 * mu * (x * x).sum(1)


def test_newton_logistic_regression():
    B, N, n = 2, 20, 4
    A = torch.randn(B, N, n, dtype=DT)
    lab = torch.sign(torch.randn(B, N, dtype=DT))
    mu = torch.tensor(0.3, dtype=DT)

    def solve(A, mu):
        return S.minimize_newton(_logreg, torch.zeros(B, n, dtype=DT), A, lab, mu, tol=1e-15,
                                 maxiter=50)[0]

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


# ----------------------------------------------------------------------------- ADMM QP

def _general_qp(B=2, n=8, me=2, mi=6):
    M = torch.randn(n, n, dtype=DT)
    P = M @ M.T / n + 0.1 * torch.eye(n, dtype=DT)            # shared
    q = torch.randn(B, n, dtype=DT)                            # batched
    A = torch.randn(me + mi, n, dtype=DT)
    x0 = torch.randn(n, dtype=DT) * 0.3                        # a feasible point
    b = A[:me] @ x0
    l = torch.cat([b, torch.full((mi,), -float("inf"), dtype=DT)])
    u = torch.cat([b, A[me:] @ x0 + 0.1 * torch.rand(mi, dtype=DT)])
    l[me + mi - 1] = A[-1] @ x0 - 0.05                          # one two-sided row
    return P, q, A, l, u


def _qp_truth(P, q, A, l, u, y):
    """Active-set KKT solve (masks from the multipliers y), differentiable in P, q, A, l, u."""
    B, n = q.shape
    m = A.shape[0]
    up, lo = y > 1e-9, y < -1e-9
    act = (up | lo).to(DT)
    bval = torch.where(up, u.expand(B, m), torch.where(lo, l.expand(B, m),
                                                       torch.zeros(B, m, dtype=DT)))
    K = torch.cat([torch.cat([P.expand(B, n, n), A.T.expand(B, n, m)], 2),
                   torch.cat([act.unsqueeze(2) * A.expand(B, m, n), torch.diag_embed(act - 1)],
                             2)], 1)
    s = torch.linalg.solve(K, torch.cat([-q, act * bval], 1).unsqueeze(-1)).squeeze(-1)
    return s[:, :n]


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
    gref = list(torch.autograd.grad((_qp_truth(Pt, qt, At, lt, ut, ys) * w).sum(),
                                    [Pt, qt, At, lt, ut]))
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
    err_fd = fd_directional(loss, [P, q, A, l0, u],
                            [g[0], g[1], g[2], torch.where(fin & ~eq, g[3], zero),
                             g[4] + torch.where(eq, g[3], zero)], sym=(0,))
    # ADMM's Φ at a nondegenerate solution: ρ(Φ) < 1
    rho = fp.diagnostics.spectral_radius(S.admm_qp(rho=qinfo.rho), (xs, zs, ys), P, q, A,
                                         l.clamp(-S.INF, S.INF), u)
    print(f"[measured] admm_qp general QP: rel err vs KKT {err_kkt:.1e}, vs FD {err_fd:.1e}, "
          f"ρ(Φ) {float(rho.max()):.4f}, backward iters {int(finfo.backward_iterations.max())}, "
          f"forward iters {qinfo.iterations.tolist()}")
    assert err_kkt < 1e-9, err_kkt
    assert err_fd < TOL, err_fd
    assert float(rho.max()) < 1.0


def test_admm_qp_batched_params_match_shared():
    P, q, A, l, u = _general_qp(B=2)
    Pb, Ab = P.expand(2, -1, -1).clone(), A.expand(2, -1, -1).clone()
    x1 = S.qp(P, q, A, l, u)
    x2 = S.qp(Pb, q, Ab, l.expand(2, -1), u.expand(2, -1))
    assert torch.allclose(x1, x2, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- SQP (DC3 form)

def _dc3(B=2, n=8, me=3, mi=3):
    Q = torch.diag(torch.rand(n, dtype=DT))
    p = torch.rand(n, dtype=DT)
    A = torch.randn(me, n, dtype=DT)
    G = torch.randn(mi, n, dtype=DT)
    b = torch.randn(B, me, dtype=DT)
    h = (G @ torch.linalg.pinv(A) @ b.T).T.abs() + 0.1
    f = lambda x, Q, p, A, b, G, h: 0.5 * ((x @ Q) * x).sum(1) + (p * torch.sin(x)).sum(1)  # noqa
    g = lambda x, Q, p, A, b, G, h: x @ G.T - h  # noqa: E731
    he = lambda x, Q, p, A, b, G, h: x @ A.T - b  # noqa: E731
    return f, g, he, (Q, p, A, b, G, h)


def test_sqp_dc3_nonconvex_vs_fd():
    f, g, he, params = _dc3()
    Q, p, A, b, G, h = params
    B, n = b.shape[0], Q.shape[0]
    (xs, lam, nu), info = S.solve_sqp(f, g, he, torch.zeros(B, n, dtype=DT), *params, tol=1e-12)
    assert bool(info.converged.all())
    assert float(lam.max()) > 1e-3  # an inequality is active
    assert float(S.sqp_kkt_residual(f, g, he, xs, lam, nu, *params).max()) < 1e-12
    w = torch.randn(B, n, dtype=DT)
    pl = leaves(*params)
    (x, _, _), finfo = fp.fold(S.sqp(f, g, he), (xs, lam, nu), *pl, return_info=True)
    grads = torch.autograd.grad((x * w).sum(), pl)
    assert int(finfo.backward_iterations.max()) <= 2  # exact-Hessian SQP: Φ ≈ 0

    def loss(*t):
        (xx, _, _), _ = S.solve_sqp(f, g, he, xs, *t, lam0=lam, nu0=nu, tol=1e-13, warn=False)
        return (xx * w).sum()

    err_fd = fd_directional(loss, list(params), list(grads), n_dirs=3)
    print(f"[measured] sqp DC3: rel err vs FD {err_fd:.1e}, SQP iters {info.iterations.tolist()}"
          f", backward iters {int(finfo.backward_iterations.max())}")
    assert err_fd < TOL, err_fd


def test_sqp_indefinite_lagrangian_hessian_is_shifted():
    """Strongly nonconvex (p scaled ×3): ∇²L is indefinite at the solution, hessian="auto"
    shifts it; the fixed point (and the folded gradient) is unchanged."""
    from fold_plugins.steps.nlp import _lagrangian_hessian

    f, g, he, params = _dc3(B=2, n=10, me=3, mi=4)
    params = (params[0], 3 * params[1], *params[2:])
    (xs, lam, nu), info = S.solve_sqp(f, g, he, torch.zeros(2, 10, dtype=DT), *params, tol=1e-12,
                                      maxiter=300)
    assert bool(info.converged.all())
    min_eig = torch.linalg.eigvalsh(_lagrangian_hessian(f, g, he, xs, lam, nu, params))[:, 0]
    assert float(min_eig.min()) < 0
    w = torch.randn(2, 10, dtype=DT)
    pl = leaves(*params)
    (x, _, _), finfo = fp.fold(S.sqp(f, g, he), (xs, lam, nu), *pl, return_info=True)
    grads = torch.autograd.grad((x * w).sum(), pl)

    def loss(*t):
        (xx, _, _), _ = S.solve_sqp(f, g, he, xs, *t, lam0=lam, nu0=nu, tol=1e-13, warn=False,
                                    maxiter=300)
        return (xx * w).sum()

    err_fd = fd_directional(loss, list(params), list(grads), n_dirs=2)
    print(f"[measured] sqp indefinite ∇²L (min eig {float(min_eig.min()):.2f}): rel err vs FD "
          f"{err_fd:.1e}, SQP iters {info.iterations.tolist()}, backward iters "
          f"{finfo.backward_iterations.tolist()}")
    assert err_fd < TOL, err_fd


def _one_iteration_gmres(matvec, b, *, x0=None, tol=1e-10, maxiter=None):
    """A backward solver that gives up after one GMRES iteration (forces non-convergence)."""
    return fp.solvers.gmres(matvec, b, x0=x0, tol=tol, maxiter=1)


def test_sqp_strict_and_qp_options_reach_the_inner_qp_fold(monkeypatch):
    """The inner (QP) fold of the SQP step gets the step's strict flag and qp_options'
    rho_eq_scale; an inner backward failure raises under strict=True and warns otherwise."""
    from fold_plugins.steps import nlp

    f, g, he, params = _dc3()
    B, n = params[3].shape[0], params[0].shape[0]
    (xs, lam, nu), _ = S.solve_sqp(f, g, he, torch.zeros(B, n, dtype=DT), *params, tol=1e-12)
    seen: dict = {}
    real_admm_qp = nlp.admm_qp

    def spy(**kw):
        seen.update(kw)
        return real_admm_qp(**kw)

    monkeypatch.setattr(nlp, "admm_qp", spy)
    w = torch.randn(B, n, dtype=DT)
    pl = leaves(*params)
    grads = {}
    for scale in (1e3, 50.0):
        step = S.sqp(f, g, he, qp_options={"rho_eq_scale": scale})
        (x, _, _) = fp.fold(step, (xs, lam, nu), *pl)
        grads[scale] = torch.autograd.grad((x * w).sum(), pl)
        assert seen["rho_eq_scale"] == scale
    # ρ changes the inner ADMM's Φ but not its fixed point: the same gradient
    diff = max(rel(a, b) for a, b in zip(grads[50.0], grads[1e3]) if b.norm() > 0)
    print(f"[measured] sqp gradient with inner rho_eq_scale 50 vs 1e3: rel diff {diff:.1e}")
    assert diff < 1e-9, diff
    step = S.sqp(f, g, he, qp_backward=_one_iteration_gmres, strict=True)
    (x, _, _) = fp.fold(step, (xs, lam, nu), *pl)
    # (instance 1's inner system is solved exactly by its one Krylov vector: residual 0)
    with pytest.raises(fp.FoldError, match=r"folded backward \(_one_iteration_gmres.*did not "
                                           r"converge for instance\(s\) \[0(, 1)?\] of 2"):
        torch.autograd.grad((x * w).sum(), pl)
    step = S.sqp(f, g, he, qp_backward=_one_iteration_gmres)
    (x, _, _) = fp.fold(step, (xs, lam, nu), *pl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autograd.grad((x * w).sum(), pl)
    msgs = [str(c.message) for c in caught if c.category is fp.FoldConvergenceWarning]
    # the inner QP backward warns (and the outer one, fed inexact inner VJPs, may too)
    assert any(m.startswith("folded backward (_one_iteration_gmres") for m in msgs), msgs


# ----------------------------------------------------------------------------- TV (FDPG)

def _tv_truth(y, lam, D, u):
    """Dual active-set solution (masks and signs from u), x = y − Dᵀu; differentiable."""
    B, m = u.shape
    lm = lam.reshape(B, 1).expand(B, m)
    act = u.abs() >= lm * (1 - 1e-9)
    G = D @ D.T
    M = torch.where(act.unsqueeze(2), torch.eye(m, dtype=DT).expand(B, m, m), G.expand(B, m, m))
    rhs = torch.where(act, torch.sign(u) * lm, y @ D.T)
    uu = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
    return y - uu @ D


def test_fdpg_tv_learnable_D_and_lambda():
    B, n = 3, 25
    y = torch.cumsum(torch.randn(B, n, dtype=DT), 1) * 0.3 + 0.2 * torch.randn(B, n, dtype=DT)
    lam = torch.tensor([0.3, 0.6, 1.0], dtype=DT)
    D = S.difference_matrix(n) + 0.05 * torch.randn(n - 1, n, dtype=DT)

    def solve(y, lam, D):
        u, info = S.solve_tv(y, lam, D, tol=1e-15, maxiter=50000, warn=False)
        return S.tv_primal(u, y, D)

    u, info = S.solve_tv(y, lam, D, tol=1e-14)
    assert bool(info.converged.all())
    act = u.abs() >= lam[:, None] * (1 - 1e-9)
    assert 0 < int(act.sum()) < act.numel()
    w = torch.randn(B, n, dtype=DT)
    yl, ll, Dl = leaves(y, lam, D)
    x = S.tv_denoise(yl, ll, Dl, tol=1e-14)
    g = torch.autograd.grad((x * w).sum(), [yl, ll, Dl])
    yt, lt, Dt = leaves(y, lam, D)
    gref = torch.autograd.grad((_tv_truth(yt, lt, Dt, u) * w).sum(), [yt, lt, Dt])
    err_kkt = max(rel(a, b) for a, b in zip(g, gref))
    err_fd = fd_directional(lambda *t: (solve(*t) * w).sum(), [y, lam, D], list(g))
    # ρ(Φ) < 1 with the default t = 1/‖D‖²
    rho = fp.diagnostics.spectral_radius(S.fdpg_tv(), u, y, lam, D)
    print(f"[measured] fdpg_tv: rel err vs KKT {err_kkt:.1e}, vs FD {err_fd:.1e}, ρ(Φ) "
          f"{float(rho.max()):.4f}, forward iters {info.iterations.tolist()}")
    assert err_kkt < 1e-9, err_kkt
    assert err_fd < TOL, err_fd
    assert float(rho.max()) < 1.0


def test_fdpg_tv_lambda_shape_convention_when_batch_equals_rows():
    """B = m = 4: λ (B, 1) is one weight per instance, (1, m) one per row of D; a bare (4,)
    could be either and is rejected naming both readings. Values against cvxpy (Clarabel),
    λ-gradients against central differences of the re-solve."""
    cp = pytest.importorskip("cvxpy")
    B, n = 4, 5
    D = S.difference_matrix(n)
    y = torch.cumsum(torch.randn(B, n, dtype=DT), 1)
    per_instance = torch.tensor([[0.3], [0.6], [0.1], [0.9]], dtype=DT)   # (B, 1)
    per_row = torch.tensor([[0.1, 0.5, 0.2, 0.8]], dtype=DT)             # (1, m)
    with pytest.raises(S.ShapeError, match=r"lam has shape \(4,\) and B = m = 4.*per instance"
                       r".*per row of D.*\(4, 1\).*\(1, 4\)"):
        S.solve_tv(y, per_instance.reshape(-1), D)
    with pytest.raises(S.ShapeError, match="B = m = 4"):
        S.fdpg_tv()(torch.zeros(B, 4, dtype=DT), y, per_row.reshape(-1), D)

    def cvx(lam_rows: torch.Tensor) -> torch.Tensor:  # lam_rows (B, m)
        out = []
        for b in range(B):
            x = cp.Variable(n)
            cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y[b].numpy())
                                   + cp.sum(cp.multiply(lam_rows[b].numpy(),
                                                        cp.abs(D.numpy() @ x))))).solve(
                solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
            out.append(torch.as_tensor(x.value))
        return torch.stack(out)

    errs = []
    for lam in (per_instance, per_row):
        ll = lam.clone().requires_grad_(True)
        x = S.tv_denoise(y, ll, D, tol=1e-14, strict=True)
        truth = cvx(lam.expand(B, 4))
        err_val = float((x.detach() - truth).abs().max())
        w = torch.randn(B, n, dtype=DT)
        (g,) = torch.autograd.grad((x * w).sum(), ll)
        assert g.shape == lam.shape

        def loss(t, w=w):
            u, _ = S.solve_tv(y, t, D, tol=1e-15, maxiter=50000, warn=False)
            return (S.tv_primal(u, y, D) * w).sum()

        err_fd = fd_directional(loss, [lam], [g])
        errs.append((err_val, err_fd))
        assert err_val < 1e-7, err_val
        assert err_fd < TOL, err_fd
    x_inst = S.tv_denoise(y, per_instance, D, tol=1e-14)
    x_row = S.tv_denoise(y, per_row, D, tol=1e-14)
    gap = float((x_inst - x_row).abs().max())
    print("[measured] TV λ conventions (B = m): value vs cvxpy / λ-grad vs FD: per instance "
          f"{errs[0][0]:.1e} / {errs[0][1]:.1e}, per row {errs[1][0]:.1e} / {errs[1][1]:.1e}; "
          f"the two readings differ by {gap:.2f}")
    assert gap > 1e-2  # two different problems: the shape decides, unambiguously


# ----------------------------------------------------------------------------- degenerate cases

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
        x, info = S.iterate(_pg_step(P), torch.full_like(qq, 0.5), P, qq, lo, hi, tol=1e-15,
                            maxiter=1000, strict=True)
        return float(x[0, 0])

    h = 1e-6
    x0 = resolve(0.0)
    assert x0 == 0.0
    free_side = (resolve(-h) - x0) / (-h)   # q_0 ↓: x_0 = h leaves the bound (free side)
    active_side = (resolve(h) - x0) / h     # q_0 ↑: x_0 stays at the bound
    print(f"[measured] PG kink: folded dx0/dq0 {g[0, 0].item()}, one-sided FD free side "
          f"{free_side:.12f}, active side {active_side}")
    assert abs(free_side - g[0, 0].item()) < 1e-9
    assert active_side == 0.0  # a genuine kink: the two one-sided derivatives differ


def test_kink_weakly_active_admm_qp_is_finite():
    """min ½‖x‖² + qᵀx s.t. x_0 ≤ 0 with q_0 = 0: x_0 = 0, y_0 = 0 (weakly active). Folded
    gradient: the free side, dx_0/dq_0 = −1, finite (no NaN), for every backward solver."""
    n = 3
    P = torch.eye(n, dtype=DT)
    A = torch.eye(n, dtype=DT)[:1]
    l = torch.tensor([-S.INF], dtype=DT)
    u = torch.zeros(1, dtype=DT)
    q = torch.tensor([[0.0, 0.5, -1.0]], dtype=DT, requires_grad=True)
    state = (torch.tensor([[0.0, -0.5, 1.0]], dtype=DT), torch.zeros(1, 1, dtype=DT),
             torch.zeros(1, 1, dtype=DT))
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
        S.solve_qp_admm(torch.zeros(2, 2, dtype=DT), -torch.ones(2, dtype=DT),
                        torch.eye(2, dtype=DT), torch.zeros(2, dtype=DT),
                        torch.full((2,), inf, dtype=DT))
    with pytest.raises(S.QPInfeasibleError, match="l > u"):
        S.solve_qp_admm(P, q, A, torch.ones(2, dtype=DT), torch.zeros(2, dtype=DT))


def test_forward_drivers_report_unconverged_instances_and_strict_raises():
    """Every forward driver reports non-convergence the one way (fp._errors.report_unconverged):
    a FoldConvergenceWarning naming the instances and the worst error, or FoldError when
    strict; the reported error is the driver's own measure (checked against its info)."""
    P, q, A, l, u = _general_qp(B=2)
    y = torch.cumsum(torch.randn(2, 12, dtype=DT), 1)
    f, g, he, params = _dc3()
    cases = {
        "solve_qp_admm": lambda **kw: S.solve_qp_admm(P, q, A, l, u, maxiter=5, polish=False,
                                                     **kw),
        "solve_tv": lambda **kw: S.solve_tv(y, 0.5, maxiter=3, polish=False, **kw),
        "solve_sqp": lambda **kw: S.solve_sqp(f, g, he, torch.zeros(2, 8, dtype=DT), *params,
                                              maxiter=1, **kw),
        "minimize_newton": lambda **kw: S.minimize_newton(
            _logreg, torch.zeros(2, 3, dtype=DT), torch.randn(2, 10, 3, dtype=DT),
            torch.sign(torch.randn(2, 10, dtype=DT)), torch.tensor(0.1, dtype=DT), maxiter=1,
            **kw),
    }
    for name, run in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, info = run()
        msgs = [str(c.message) for c in caught if c.category is fp.FoldConvergenceWarning]
        assert len(msgs) == 1 and msgs[0].startswith(name), (name, msgs)
        assert "did not converge for instance(s) [0, 1] of 2" in msgs[0], msgs[0]
        if name == "solve_qp_admm":
            err = torch.maximum(info.primal_residual, info.dual_residual)
        elif name == "solve_sqp":
            err = info.kkt_residual
        else:
            err = info.residual
        assert f"(error up to {float(err.max()):.2e})" in msgs[0], (msgs[0], err)
        with pytest.raises(fp.FoldError, match=rf"^{name} .*\[0, 1\] of 2"):
            run(strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(warn=False)  # silenced on request (strict still raises)


def test_autograd_jacobian_batched_matches_closed_form_and_falls_back():
    """(B, k, n) Jacobian in one batched backward pass; exact against the closed form, with a
    differentiable result under create_graph; ops without a batching rule fall back to one
    pass per output row with the same values."""
    from fold_plugins.steps._common import autograd_jacobian

    B, k, n = 3, 4, 5
    M = torch.randn(B, k, n, dtype=DT)
    x = torch.randn(B, n, dtype=DT, requires_grad=True)
    z = (M @ x.unsqueeze(-1)).squeeze(-1)
    J = autograd_jacobian(torch.sin(z), x, create_graph=True)
    J_true = torch.cos(z).unsqueeze(-1) * M
    assert J.shape == (B, k, n)
    assert float((J.detach() - J_true.detach()).abs().max()) < 1e-15
    # second order through J: ∂/∂x Σ J = −Σ_i sin(z_i) M_i (M_i ᵀ1)
    (h,) = torch.autograd.grad(J.sum(), x)
    h_true = -(torch.sin(z).unsqueeze(-1) * M * M.sum(-1, keepdim=True)).sum(1)
    assert float((h - h_true.detach()).abs().max()) < 1e-13
    calls = []

    class NoBatchingRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t ** 3

        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            calls.append(1)
            if float(grad.abs().sum()) < 0:  # data-dependent Python: cannot run under vmap
                raise AssertionError
            return 3 * t ** 2 * grad

    xd = x.detach().requires_grad_(True)
    Jf = autograd_jacobian(NoBatchingRule.apply(xd[:, :k]), xd, create_graph=False)
    Jf_true = torch.cat([torch.diag_embed(3 * xd.detach()[:, :k] ** 2),
                         torch.zeros(B, k, n - k, dtype=DT)], dim=2)
    assert torch.equal(Jf, Jf_true)
    assert len(calls) == 1 + k  # the failed batched attempt, then one pass per row
    calls.clear()

    class WithRule(NoBatchingRule):
        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            calls.append(1)
            return 3 * t ** 2 * grad

    Jb = autograd_jacobian(WithRule.apply(xd[:, :k]), xd, create_graph=False)
    assert torch.equal(Jb, Jf_true) and len(calls) == 1  # one batched pass
    assert autograd_jacobian(xd[:, :0], xd, create_graph=False).shape == (B, 0, n)


def test_wrong_shapes_rejected_with_shapes_named():
    P, q, A, l, u = _general_qp(B=2, n=8)
    with pytest.raises(S.ShapeError, match=r"P has shape \(7, 7\).*\(8, 8\)"):
        S.solve_qp_admm(torch.eye(7, dtype=DT), q, A, l, u)
    state = (torch.zeros(2, 8, dtype=DT), torch.zeros(2, 8, dtype=DT), torch.zeros(2, 8, dtype=DT))
    with pytest.raises(S.ShapeError, match=r"q has shape \(3, 8\).*\(2, 8\)"):
        S.admm_qp()(state, P, torch.zeros(3, 8, dtype=DT), A, l, u)
    with pytest.raises(S.ShapeError, match=r"A has shape \(8, 5\)"):
        S.admm_qp()(state, P, q, A[:, :5], l, u)
    with pytest.raises(S.ShapeError, match=r"D has shape \(4, 6\), expected \(9, 10\)"):
        S.fdpg_tv()(torch.zeros(2, 9, dtype=DT), torch.zeros(2, 10, dtype=DT), 0.1,
                    torch.zeros(4, 6, dtype=DT))
    with pytest.raises(S.ShapeError, match=r"step_size has shape \(5,\)"):
        S.gradient_descent(lambda x: x, torch.ones(5, dtype=DT))(torch.zeros(2, 3, dtype=DT))
    with pytest.raises(S.ShapeError, match=r"state must be a \(B, n\) tensor, got \(3,\)"):
        S.mirror_descent(lambda x: x)(torch.ones(3, dtype=DT))
    f, g, he, params = _dc3()
    st = (torch.zeros(2, 8, dtype=DT), torch.zeros(2, 5, dtype=DT), torch.zeros(2, 3, dtype=DT))
    with pytest.raises(S.ShapeError, match=r"λ has shape \(2, 5\).*\(2, 3\)"):
        S.sqp(f, g, he)(st, *params)


def test_steps_keep_dtype_float32_and_match_float64():
    """float32 in, float32 out — and the float32 values and folded gradients agree with the
    float64 solve to float32 accuracy (measured: QP x 1.1e-7, ∂/∂(P, q, A) 3.9e-5, 3.0e-5,
    8.6e-5; mirror descent x 9.0e-8 and ∂/∂c 1.9e-7 vs the closed form 2·softmax)."""
    P, q, A, l, u = _general_qp(B=2)
    w = torch.randn(2, 8, dtype=DT)

    def solve(dt, tol, backward_tol):
        Pl, ql, Al = leaves(P.to(dt), q.to(dt), A.to(dt))
        x, finfo, qinfo = S.qp(Pl, ql, Al, l.to(dt), u.to(dt), return_info=True,
                               admm_options={"tol": tol}, backward_tol=backward_tol,
                               strict=True)
        return x, torch.autograd.grad((x * w.to(dt)).sum(), [Pl, ql, Al]), qinfo

    # float32: the backward residual's own round-off floor is ~1e-5 here (measured 6e-6 to
    # 3e-5 depending on the cotangent), so 1e-4 is the honest tolerance to ask for
    x32, g32, info32 = solve(torch.float32, 1e-6, 1e-4)
    x64, g64, _ = solve(DT, 1e-12, 1e-12)
    assert x32.dtype == torch.float32 and all(t.dtype == torch.float32 for t in g32)
    assert all(st == "solved" for st in info32.status)
    err_x = rel(x32.double(), x64)
    err_g = [rel(a.double(), b) for a, b in zip(g32, g64)]
    print(f"[measured] float32 QP vs float64: x {err_x:.1e}, grads (P, q, A) "
          + ", ".join(f"{e:.1e}" for e in err_g))
    assert err_x < 1e-5, err_x
    assert max(err_g) < 1e-3, err_g
    # entropic mirror descent in float32: x* = 2·softmax(−c/ε)
    B, n, eps = 3, 6, 0.3
    c = torch.randn(B, n, dtype=DT)
    step = S.mirror_descent(lambda x, c: c + eps * (1 + torch.log(x)), step_size=1 / eps,
                            radius=2.0)
    c32 = c.float().requires_grad_(True)
    xs, info = S.iterate(step, torch.full((B, n), 2 / n), c32, tol=1e-6, maxiter=200,
                         strict=True)
    wm = torch.randn(B, n, dtype=DT)
    (gc,) = torch.autograd.grad((fp.fold(step, xs, c32, strict=True) * wm.float()).sum(), c32)
    ct = c.clone().requires_grad_(True)
    closed = 2 * torch.softmax(-ct / eps, 1)
    (gref,) = torch.autograd.grad((closed * wm).sum(), ct)
    assert xs.dtype == torch.float32 and gc.dtype == torch.float32
    err_md, err_mg = rel(xs.double(), closed), rel(gc.double(), gref)
    print(f"[measured] float32 mirror descent vs closed form: x {err_md:.1e}, grad {err_mg:.1e}")
    assert err_md < 1e-6 and err_mg < 1e-5, (err_md, err_mg)


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
