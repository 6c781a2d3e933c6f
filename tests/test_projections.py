"""Projections: values against closed forms / cvxpy, Jacobians against float64 central
differences, the documented kink convention, and shape errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fold_plugins as fp
from fold_plugins import projections as P
from fold_plugins.steps import QPInfeasibleError, ShapeError

DT = torch.float64


def fd_jacobian(fn, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central-difference Jacobian of ``fn`` (any-shape in/out) in float64: (out.numel, x.numel)."""
    x = x.detach()
    cols = []
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        cols.append(((fn(x + e) - fn(x - e)) / (2 * h)).reshape(-1))
    return torch.stack(cols, dim=1)


def ad_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    y = fn(x).reshape(-1)
    rows = [torch.autograd.grad(y[i], x, retain_graph=True, allow_unused=True)[0]
            for i in range(y.numel())]
    return torch.stack([torch.zeros_like(x).reshape(-1) if r is None else r.reshape(-1)
                        for r in rows])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_jac(fn, x, tol=1e-6):
    Ja, Jf = ad_jacobian(fn, x), fd_jacobian(fn, x)
    assert torch.isfinite(Ja).all()
    assert float(Jf.norm()) > 0  # never a vacuous comparison
    err = rel(Ja, Jf)
    print(f"[measured] jacobian vs FD {err:.1e}")
    assert err <= tol, err
    return err


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# ----------------------------------------------------------------------------- simple sets

def test_nonnegative_and_box_values_jacobians():
    x = torch.randn(4, 6, dtype=DT)
    assert torch.equal(P.nonnegative(x), x.clamp_min(0))
    lo, hi = -0.3 * torch.rand(6, dtype=DT), 0.4 * torch.rand(6, dtype=DT)
    assert torch.equal(P.box(x, lo, hi), torch.maximum(torch.minimum(x, hi), lo))
    check_jac(P.nonnegative, x)
    check_jac(lambda t: P.box(t, lo, hi), x)
    # gradients to the bounds: d out/d lo = 1 where x < lo
    check_jac(lambda t: P.box(x, t, hi), lo)
    check_jac(lambda t: P.box(x, lo, t), hi)
    assert P.box(x.float(), -0.1, 0.2).dtype == torch.float32


def test_kink_convention_box_nonnegative():
    """x exactly on a bound: derivative 1 (free side), finite; bounds get 0."""
    x = torch.tensor([[0.0, -1.0, 2.0, 0.5]], dtype=DT, requires_grad=True)
    lo = torch.tensor(0.0, dtype=DT, requires_grad=True)
    hi = torch.tensor(0.5, dtype=DT, requires_grad=True)
    P.box(x, lo, hi).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert lo.grad.item() == 1.0 and hi.grad.item() == 1.0  # from x=-1 and x=2 only
    x2 = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    P.nonnegative(x2).sum().backward()
    assert x2.grad.tolist() == [[1.0, 1.0, 1.0]]


def _simplex_ref(v: np.ndarray, r: float) -> np.ndarray:
    """Independent reference: bisection on τ for Σ max(v − τ, 0) = r."""
    lo, hi = v.min() - r, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > r:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


def test_simplex_value_and_jacobian():
    x = torch.randn(5, 7, dtype=DT)
    r = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=DT)
    z = P.simplex(x, r)
    ref = np.stack([_simplex_ref(x[i].numpy(), float(r[i])) for i in range(5)])
    assert np.abs(z.numpy() - ref).max() < 1e-12
    check_jac(lambda t: P.simplex(t, r), x)
    check_jac(lambda t: P.simplex(x, t), r)
    # sparsemax closed form on a 2-vector: z1 = clip((x1 - x2 + 1)/2, 0, 1)
    v = torch.tensor([[0.3, 0.1]], dtype=DT)
    assert torch.allclose(P.simplex(v), torch.tensor([[0.6, 0.4]], dtype=DT), atol=1e-15)


def test_simplex_kink_tie_is_finite_and_free():
    """x3 exactly at the threshold τ = 0: counted in the support (free convention)."""
    x = torch.tensor([[0.5, 0.5, 0.0]], dtype=DT)
    J = ad_jacobian(lambda t: P.simplex(t), x)
    assert torch.isfinite(J).all()
    expected = torch.eye(3, dtype=DT) - torch.full((3, 3), 1 / 3, dtype=DT)
    assert torch.allclose(J, expected, atol=1e-15)
    # equals the one-sided FD from the free side (raise x3 slightly)
    Jf = fd_jacobian(lambda t: P.simplex(t), x + torch.tensor([[0, 0, 1e-4]], dtype=DT), h=1e-7)
    assert rel(J, Jf) < 1e-6


def test_k_subset_value_vs_cvxpy_and_jacobian():
    cp = pytest.importorskip("cvxpy")
    x = torch.randn(3, 8, dtype=DT)
    k = torch.tensor([2.0, 3.5, 5.0], dtype=DT)
    z = P.k_subset(x, k)
    for i in range(3):
        zv = cp.Variable(8)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(zv - x[i].numpy())),
                          [zv >= 0, zv <= 1, cp.sum(zv) == float(k[i])])
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert np.abs(zv.value - z[i].numpy()).max() < 1e-7
    assert torch.allclose(z.sum(-1), k, atol=1e-13)
    check_jac(lambda t: P.k_subset(t, k), x)
    check_jac(lambda t: P.k_subset(x, t), k)


def test_k_subset_empty_free_set_zero_gradient():
    """k integer and a wide gap: the solution is a vertex, locally constant → zero gradient."""
    x = torch.tensor([[3.0, 2.9, -1.0, -2.0]], dtype=DT, requires_grad=True)
    z = P.k_subset(x, 2)
    assert z.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    (z * torch.arange(4, dtype=DT)).sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().max()) == 0.0


def _k_subset_ref(v: np.ndarray, k: float) -> np.ndarray:
    """Independent reference: 200 bisection halvings on τ for Σ clip(v − τ, 0, 1) = k."""
    lo, hi = v.min() - 1, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(v - mid, 0, 1).sum() > k:
            lo = mid
        else:
            hi = mid
    return np.clip(v - 0.5 * (lo + hi), 0, 1)


def test_k_subset_exact_threshold_ties_bounds_and_leading_dims():
    """The sort-based threshold against a 200-step bisection in numpy: random rows, rows with
    ties (x on a 0.5 grid, so breakpoints x_i and x_j − 1 coincide), k ∈ {0, n}, integer k,
    leading batch dims and float32."""
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for n, scale, grid in ((1, 1.0, False), (7, 1.0, False), (12, 0.2, False), (12, 4.0, False),
                           (9, 1.0, True), (30, 2.0, True)):
        x = scale * torch.randn(2, 3, n, generator=g, dtype=DT)
        if grid:
            x = torch.round(2 * x) / 2
        k = n * torch.rand(2, 3, generator=g, dtype=DT)
        k[0, 0], k[0, 1], k[1, 0] = 0.0, float(n), float(n // 2)
        z = P.k_subset(x, k)
        assert z.shape == x.shape
        for idx in np.ndindex(2, 3):
            ref = _k_subset_ref(x[idx].numpy(), float(k[idx]))
            worst = max(worst, float(np.abs(z[idx].numpy() - ref).max()))
        worst = max(worst, float((z.sum(-1) - k).abs().max()))
    print(f"[measured] k_subset vs bisection reference (and |Σz − k|): {worst:.1e}")
    assert worst < 1e-13, worst
    x32 = torch.randn(4, 10, generator=g)
    z32 = P.k_subset(x32, 3.5)
    assert z32.dtype == torch.float32
    ref32 = np.stack([_k_subset_ref(r.double().numpy(), 3.5) for r in x32])
    assert np.abs(z32.double().numpy() - ref32).max() < 1e-6
    with pytest.warns(DeprecationWarning, match="iters is deprecated"):
        P.k_subset(x32, 3.5, iters=50)


def test_l2_ball():
    x = torch.randn(4, 5, dtype=DT) * torch.tensor([[0.1], [1.0], [3.0], [0.2]], dtype=DT)
    r = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=DT)
    z = P.l2_ball(x, r)
    nx = x.norm(dim=1, keepdim=True)
    assert torch.allclose(z, torch.where(nx > r[:, None], x * r[:, None] / nx, x), atol=1e-15)
    check_jac(lambda t: P.l2_ball(t, r), x)
    check_jac(lambda t: P.l2_ball(x, t), r)
    # on the sphere: identity Jacobian (free convention); at 0: identity, no NaN
    s = torch.tensor([[0.6, 0.8]], dtype=DT)
    assert torch.equal(ad_jacobian(lambda t: P.l2_ball(t, 1.0), s), torch.eye(2, dtype=DT))
    assert torch.equal(ad_jacobian(lambda t: P.l2_ball(t, 1.0), torch.zeros(1, 2, dtype=DT)),
                       torch.eye(2, dtype=DT))


def test_l1_ball_vs_cvxpy_and_jacobian():
    cp = pytest.importorskip("cvxpy")
    x = torch.randn(3, 6, dtype=DT)
    x[2] *= 0.05  # inside the ball
    z = P.l1_ball(x, 1.0)
    for i in range(3):
        zv = cp.Variable(6)
        cp.Problem(cp.Minimize(cp.sum_squares(zv - x[i].numpy())), [cp.norm1(zv) <= 1]).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert np.abs(zv.value - z[i].numpy()).max() < 1e-7
    assert torch.equal(z[2], x[2])
    check_jac(lambda t: P.l1_ball(t, 1.0), x)
    rr = torch.tensor([1.0, 0.7, 1.0], dtype=DT)
    check_jac(lambda t: P.l1_ball(x, t), rr)


def test_affine_and_halfspace():
    x = torch.randn(3, 6, dtype=DT)
    A = torch.randn(2, 6, dtype=DT)
    b = torch.randn(3, 2, dtype=DT)
    z = P.affine(x, A, b)
    assert torch.allclose(z @ A.T, b, atol=1e-13)
    # closed form via the pseudo-inverse
    zp = x - (torch.linalg.pinv(A) @ (x @ A.T - b).T).T
    assert torch.allclose(z, zp, atol=1e-13)
    check_jac(lambda t: P.affine(t, A, b), x)
    check_jac(lambda t: P.affine(x, t, b), A)
    check_jac(lambda t: P.affine(x, A, t), b)
    a = torch.randn(6, dtype=DT)
    bb = x @ a - torch.tensor([0.5, -0.5, 1.0], dtype=DT)  # rows 0 and 2 violated
    zh = P.halfspace(x, a, bb)
    assert float((zh @ a - bb).max()) < 1e-13
    viol = (x @ a - bb).clamp_min(0)
    assert torch.allclose(zh, x - viol[:, None] * a / (a @ a), atol=1e-15)
    check_jac(lambda t: P.halfspace(t, a, bb), x)
    check_jac(lambda t: P.halfspace(x, t, bb), a)
    # on the hyperplane: identity (free convention)
    on = torch.tensor([[1.0, 0.0]], dtype=DT)
    assert torch.equal(ad_jacobian(lambda t: P.halfspace(t, torch.tensor([1.0, 0.0],
                                                                         dtype=DT), 1.0), on),
                       torch.eye(2, dtype=DT))


# ----------------------------------------------------------------------------- polytope

def _poly_data(B=2, n=6, m=2, p=4):
    x = torch.randn(B, n, dtype=DT) * 2
    A = torch.randn(m, n, dtype=DT)
    b = torch.randn(B, m, dtype=DT) * 0.3
    G = torch.randn(p, n, dtype=DT)
    h = torch.rand(p, dtype=DT) * 0.2 + (G @ torch.linalg.pinv(A) @ b.T).T.amax(0)
    return x, A, b, G, h


def test_polytope_value_vs_cvxpy():
    cp = pytest.importorskip("cvxpy")
    x, A, b, G, h = _poly_data()
    z = P.polytope(x, A, b, G, h)
    for i in range(x.shape[0]):
        zv = cp.Variable(x.shape[1])
        cp.Problem(cp.Minimize(cp.sum_squares(zv - x[i].numpy())),
                   [A.numpy() @ zv == b[i].numpy(), G.numpy() @ zv <= h.numpy()]).solve(
            solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert np.abs(zv.value - z[i].detach().numpy()).max() < 1e-7
    # some inequality is active (the test exercises the active set)
    assert float((z.detach() @ G.T - h).abs().min()) < 1e-10


def check_dirs(fn, t: torch.Tensor, n_dirs: int = 4, h: float = 1e-6) -> float:
    """Random-cotangent, random-direction check: ⟨Jᵀw, d⟩ vs ⟨w, (f(t+hd) − f(t−hd))/2h⟩."""
    tl = t.detach().clone().requires_grad_(True)
    out = fn(tl)
    got, ref = [], []
    for _ in range(n_dirs):
        w, d = torch.randn_like(out), torch.randn_like(t)
        (g,) = torch.autograd.grad(out, tl, w, retain_graph=True)
        got.append((g * d).sum())
        ref.append((w * (fn(t + h * d) - fn(t - h * d))).sum() / (2 * h))
    err = rel(torch.stack(got), torch.stack(ref))
    assert err <= 1e-6, err
    return err


def test_polytope_jacobians_fd():
    """Folded ADMM backward vs central differences of the full re-solve, all five inputs
    (full Jacobians for x, b, h; random directions for the matrices A, G)."""
    x, A, b, G, h = _poly_data()
    errs = [check_jac(lambda t: P.polytope(t, A, b, G, h), x),
            check_dirs(lambda t: P.polytope(x, t, b, G, h), A),
            check_jac(lambda t: P.polytope(x, A, t, G, h), b),
            check_dirs(lambda t: P.polytope(x, A, b, t, h), G),
            check_jac(lambda t: P.polytope(x, A, b, G, t), h)]
    print("[measured] polytope Jacobians vs FD (x, A, b, G, h): "
          + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < 1e-6


def _one_iteration_gmres(matvec, b, *, x0=None, tol=1e-10, maxiter=None):
    """A backward solver that gives up after one GMRES iteration (forces non-convergence)."""
    return fp.solvers.gmres(matvec, b, x0=x0, tol=tol, maxiter=1)


def test_polytope_strict_reaches_the_inner_fold():
    """polytope's inner folded backward failing: FoldError with strict=True (naming the
    instances), a FoldConvergenceWarning without; the default solver meets FD (above)."""
    x, A, b, G, h = _poly_data()
    xl = x.clone().requires_grad_(True)
    z = P.polytope(xl, A, b, G, h, backward=_one_iteration_gmres, strict=True)
    with pytest.raises(fp.FoldError, match=r"folded backward \(_one_iteration_gmres.*instance"
                                           r"\(s\) \[0, 1\] of 2"):
        torch.autograd.grad(z.sum(), xl)
    z = P.polytope(xl, A, b, G, h, backward=_one_iteration_gmres)
    with pytest.warns(fp.FoldConvergenceWarning, match=r"\[0, 1\] of 2"):
        torch.autograd.grad(z.sum(), xl)


def test_polytope_empty_raises():
    x = torch.randn(1, 2, dtype=DT)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=DT)
    h = torch.tensor([0.0, -1.0], dtype=DT)  # x1 ≤ 0 and x1 ≥ 1
    with pytest.raises(QPInfeasibleError, match="primal infeasible"):
        P.polytope(x, G=G, h=h)


# ----------------------------------------------------------------------------- bad input

def test_shape_errors_name_shapes():
    x = torch.randn(3, 5, dtype=DT)
    with pytest.raises(ShapeError, match=r"radius has shape \(4,\).*\(3,\)"):
        P.simplex(x, torch.ones(4, dtype=DT))
    with pytest.raises(ShapeError, match=r"A has shape \(2, 4\)"):
        P.affine(x, torch.randn(2, 4, dtype=DT), torch.randn(2, dtype=DT))
    with pytest.raises(ShapeError, match=r"h has shape \(3,\).*\(2,\)"):
        P.polytope(x, G=torch.randn(2, 5, dtype=DT), h=torch.randn(3, dtype=DT))
    with pytest.raises(fp.FoldError, match="lower > upper"):
        P.box(x, 1.0, 0.0)
    with pytest.raises(fp.FoldError, match=r"k must lie in \[0, n=5\]"):
        P.k_subset(x, 6)


def test_projections_inside_fold_projected_gradient_sparsemax():
    """sparsemax as the fixed point of PG on min ½‖z − x‖² over the simplex; the folded VJP
    against the closed-form sparsemax Jacobian J = diag(s) − s sᵀ/|S| (s: support indicator),
    i.e. Jᵀw = s ⊙ (w − ⟨s, w⟩/|S|)."""
    x = (0.3 * torch.randn(4, 6, dtype=DT)).requires_grad_(True)
    step = fp.steps.projected_gradient(lambda z, x: z - x, P.simplex, 0.7)
    zs = P.simplex(x).detach()
    z = fp.fold(step, zs, x, strict=True)
    w = torch.randn(4, 6, dtype=DT)
    (gx,) = torch.autograd.grad((z * w).sum(), x)
    s = (zs > 0).to(DT)
    assert bool((s.sum(1) >= 2).all()) and bool((s.sum(1) < 6).any())  # nontrivial supports
    gref = s * (w - (s * w).sum(1, keepdim=True) / s.sum(1, keepdim=True))
    err = rel(gx, gref)
    print(f"[measured] folded sparsemax VJP vs closed-form Jacobian: {err:.1e}")
    assert err < 1e-12, err


# ----------------------------------------------------------------------------- weakly active

def _noted(fn, x):
    """``fn(x)`` with a graph inside a notes block: (value, weakly-active counts or None)."""
    from fold_plugins import _record

    with _record.collect() as notes:
        out = fn(x)
    counts = notes.get("weakly_active")
    return out, (None if counts is None else sum(counts))


def test_weakly_active_band_is_decided_by_the_problem_not_round_off():
    """Issue 9 item 7: x within √eps·scale of a bound takes the free derivative whichever side
    of the bound round-off put it on; 1e-6 away it does not. Values stay the exact clip."""
    lo, hi = 0.0, 2.0  # scale 2: band 2·√eps ≈ 3e-8
    x = torch.tensor([[-1e-12, 1e-12, -1e-6, 2 + 1e-12, 2 - 1e-12, 2 + 1e-6, 1.0]], dtype=DT,
                     requires_grad=True)
    z, counts = _noted(lambda t: P.box(t, lo, hi), x)
    assert z.tolist() == [[0.0, 1e-12, 0.0, 2.0, 2 - 1e-12, 2.0, 1.0]]
    (g,) = torch.autograd.grad(z.sum(), x)
    assert g.tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]]
    assert counts.tolist() == [4]
    # the same rule in the other projections: both sides of the kink give the free piece
    for s in (-1e-12, 1e-12):
        xs = torch.tensor([[0.5, 0.5, s]], dtype=DT)  # simplex threshold τ = 0
        J = ad_jacobian(lambda t: P.simplex(t), xs)
        free = torch.eye(3, dtype=DT) - torch.full((3, 3), 1 / 3, dtype=DT)
        assert torch.allclose(J, free, atol=1e-15)
        assert torch.allclose(P.simplex(xs), torch.tensor([[0.5, 0.5, 0.0]], dtype=DT),
                              atol=1e-12)
        v = torch.tensor([[0.6, 0.8]], dtype=DT) * (1 + s)  # ‖v‖ = 1 ± 1e-12
        assert torch.allclose(ad_jacobian(lambda t: P.l2_ball(t, 1.0), v),
                              torch.eye(2, dtype=DT), atol=1e-15)
        assert P.l2_ball(v, 1.0).norm() <= 1.0 + 1e-15  # value: the exact projection
        a = torch.tensor([1.0, 1.0], dtype=DT)
        h = torch.tensor([[0.5, 0.5 + s]], dtype=DT)  # aᵀh − 1 = s
        assert torch.allclose(ad_jacobian(lambda t: P.halfspace(t, a, 1.0), h),
                              torch.eye(2, dtype=DT), atol=1e-15)
        assert float((P.halfspace(h, a, 1.0) * a).sum()) <= 1.0 + 1e-15
    # simplex exact value with a coordinate 1e-12 below τ: still 0, support sum still r
    zs = P.simplex(torch.tensor([[0.5, 0.5, -1e-12]], dtype=DT))
    assert zs[0, 2].item() == 0.0 and abs(float(zs.sum()) - 1.0) < 1e-15
    # and 1e-6 away from the sphere (outside the band) the exact projection's Jacobian
    v = torch.tensor([[0.6, 0.8]], dtype=DT) * (1 + 1e-6)
    check_jac(lambda t: P.l2_ball(t, 1.0), v)


def test_weakly_active_counts_reach_fold_info_and_verify():
    """Inside fold, the projections' counts land in FoldInfo.extra["weakly_active"] per
    instance; the gradient is the free piece's (closed form of a projected-gradient step)."""
    c = torch.tensor([[0.0, 0.3, 1.0, 1.7], [0.5, -0.2, 1.0 + 1e-13, 0.2]], dtype=DT,
                     requires_grad=True)

    def step(x, c):  # projected gradient on ½‖x − c‖², box [0, 1]: x* = clip(c)
        return P.box(x - 0.5 * (x - c), 0.0, 1.0)

    xs = c.detach().clamp(0, 1)
    x, info = fp.fold(step, xs, c, return_info=True, strict=True)
    assert info.extra["weakly_active"].tolist() == [2, 1]
    (g,) = torch.autograd.grad(x.sum(), c)
    # dx*/dc = 1 on the free set (weakly active counted free), 0 where strictly active
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]], dtype=DT)
    assert torch.allclose(g, expected, atol=1e-14)
    report = fp.verify.compare_gradients(lambda t: P.box(t, 0.0, 1.0), lambda t: t.clamp(0, 1),
                                         (c.detach(),))
    assert report.weakly_active == 3 and "weakly active" in str(report)
