"""Property-based checks (hypothesis) of the projections, proximal operators and a folded step.

Every case is drawn at random (shapes, scales, parameters), and its value and Jacobian are
checked against an independent truth: a NumPy re-implementation of the closed form (the
sort-based simplex threshold, bisection for the k-subset threshold, …) and central finite
differences of that re-implementation in float64. Points closer than ``MARGIN`` (relative) to a
kink are discarded, where finite differences are not a derivative; the kinks themselves are
checked against the documented "free" convention. The folded box-QP check compares the
gradient of ``fp.fold`` with the KKT (active-set) closed form. The examples are derandomized,
so CI sees the same cases every run; every failure prints the case that broke.

pytest's configuration turns the library's warnings into errors, so a warning on one of these
correct results (a false alarm) fails the case as surely as a wrong number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fold_plugins import fold
from fold_plugins import projections as PR
from fold_plugins import steps as S

DT = torch.float64
MARGIN = 1e-4  # relative distance to the nearest kink below which a case is discarded
H = 1e-6  # central-difference step (relative to the case's scale)
N_CASES = 150  # per property; 9 properties: > 1,000 generated cases

#: numpy's and the library's RuntimeWarnings (FoldConvergenceWarning is one) fail a case
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

CASES = settings(max_examples=N_CASES, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@st.composite
def batches(draw, n_min=1, n_max=7):
    """``(x (B, n) float64 numpy, scale)``: a random batch at a random scale."""
    B = draw(st.integers(1, 3))
    n = draw(st.integers(n_min, n_max))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, n)) * scale, scale, rng


def _jac_fd(ref, x, h):
    """``(B, n, n)`` Jacobian of the row-wise ``ref`` by central differences."""
    B, n = x.shape
    J = np.zeros((B, n, n))
    for j in range(n):
        e = np.zeros_like(x)
        e[:, j] = h
        J[:, :, j] = (ref(x + e) - ref(x - e)) / (2 * h)
    return J


def _jac_torch(fn, x):
    """``(B, n, n)`` Jacobian of the row-wise ``fn`` by autograd (one VJP per output)."""
    xt = torch.tensor(x, dtype=DT, requires_grad=True)
    y = fn(xt)
    B, n = x.shape
    J = np.zeros((B, n, y.shape[1]))
    for i in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, i].sum(), xt, retain_graph=True)
        J[:, i, :] = g.numpy()
    return y.detach().numpy(), J


def _check(fn, ref, x, scale, margin, *, val_tol=1e-12, jac_tol=1e-7):
    """Value of ``fn`` against ``ref`` and its Jacobian against differences of ``ref``."""
    assume(margin > MARGIN * scale)
    y, J = _jac_torch(fn, x)
    want = ref(x)
    assert np.allclose(y, want, rtol=val_tol, atol=val_tol * scale), (y, want)
    Jfd = _jac_fd(ref, x, H * scale)
    assert np.allclose(J, Jfd, rtol=jac_tol, atol=jac_tol), np.abs(J - Jfd).max()


# ------------------------------------------------------------------ independent references
def _simplex_tau(x, r):
    """Threshold of the projection onto {z ≥ 0, Σz = r} (Held, Wolfe & Crowder's sort)."""
    u = -np.sort(-x, axis=1)
    css = np.cumsum(u, axis=1) - r[:, None]
    k = np.arange(1, x.shape[1] + 1)
    rho = (u - css / k > 0).sum(axis=1)
    return css[np.arange(x.shape[0]), rho - 1] / rho


def _k_subset_tau(x, k):
    """Threshold of the projection onto {0 ≤ z ≤ 1, Σz = k}, by 200 bisection steps."""
    lo = x.min(axis=1) - 1.0
    hi = x.max(axis=1)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = np.clip(x - mid[:, None], 0, 1).sum(axis=1)
        lo, hi = np.where(s > k, mid, lo), np.where(s > k, hi, mid)
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------ projections
@CASES
@given(batches(), st.floats(-1.5, 0.0), st.floats(0.1, 1.5))
def test_box_matches_clip_and_its_jacobian(case, lo, hi):
    x, scale, _ = case
    lo, hi = lo * scale, hi * scale
    margin = min(np.abs(x - lo).min(), np.abs(x - hi).min())
    _check(lambda t: PR.box(t, lo, hi), lambda a: np.clip(a, lo, hi), x, scale, margin)


@CASES
@given(batches(n_min=2), st.floats(0.1, 3.0))
def test_simplex_matches_the_sort_threshold_and_its_jacobian(case, r):
    x, scale, _ = case
    r = r * scale
    rr = np.full(x.shape[0], r)
    tau = _simplex_tau(x, rr)
    margin = np.abs(x - tau[:, None]).min()

    def ref(a):
        return np.maximum(a - _simplex_tau(a, rr)[:, None], 0)

    _check(lambda t: PR.simplex(t, r), ref, x, scale, margin)


@CASES
@given(batches(n_min=2), st.floats(0.05, 0.95))
def test_k_subset_matches_bisection_and_its_jacobian(case, frac):
    x, scale, _ = case
    n = x.shape[1]
    k = frac * n
    tau = _k_subset_tau(x, k)
    margin = min(np.abs(x - tau[:, None]).min(), np.abs(x - tau[:, None] - 1).min())
    # the threshold is scale-free here (the box is [0, 1]): margins are absolute
    _check(lambda t: PR.k_subset(t, k),
           lambda a: np.clip(a - _k_subset_tau(a, k)[:, None], 0, 1), x, 1.0, margin,
           val_tol=1e-10)


@CASES
@given(batches(), st.floats(0.1, 3.0))
def test_l2_ball_matches_the_radial_scaling_and_its_jacobian(case, r):
    x, scale, _ = case
    r = r * scale
    nrm = np.linalg.norm(x, axis=1, keepdims=True)
    margin = np.abs(nrm - r).min()
    _check(lambda t: PR.l2_ball(t, r),
           lambda a: a * np.minimum(1, r / np.linalg.norm(a, axis=1, keepdims=True)),
           x, scale, margin)


@CASES
@given(batches(n_min=2), st.floats(0.1, 3.0))
def test_l1_ball_matches_the_simplex_of_magnitudes_and_its_jacobian(case, r):
    x, scale, _ = case
    r = r * scale
    rr = np.full(x.shape[0], r)

    def ref(a):
        inside = np.abs(a).sum(axis=1, keepdims=True) <= r
        tau = _simplex_tau(np.abs(a), rr)[:, None]
        return np.where(inside, a, np.sign(a) * np.maximum(np.abs(a) - tau, 0))

    tau = _simplex_tau(np.abs(x), rr)[:, None]
    margin = min(np.abs(np.abs(x).sum(axis=1) - r).min(), np.abs(np.abs(x) - tau).min(),
                 np.abs(x).min())
    _check(lambda t: PR.l1_ball(t, r), ref, x, scale, margin)


# ------------------------------------------------------------------ proximal operators
@CASES
@given(batches(), st.floats(0.0, 1.0), st.floats(0.2, 2.0))
def test_soft_threshold_matches_the_closed_form_and_its_jacobian(case, lam, s):
    x, scale, _ = case
    t = lam * s * scale
    margin = np.abs(np.abs(x) - t).min()
    _check(lambda a: PR.soft_threshold(a, lam * scale, scaling=s),
           lambda a: np.sign(a) * np.maximum(np.abs(a) - t, 0), x, scale, margin)


@CASES
@given(batches(), st.floats(0.0, 1.0), st.floats(0.0, 2.0), st.floats(0.2, 2.0))
def test_elastic_net_matches_the_closed_form_and_its_jacobian(case, l1, l2, s):
    x, scale, _ = case
    t1, t2 = l1 * s * scale, l2 * s
    margin = np.abs(np.abs(x) - t1).min()
    _check(lambda a: PR.elastic_net(a, l1 * scale, l2, scaling=s),
           lambda a: np.sign(a) * np.maximum(np.abs(a) - t1, 0) / (1 + t2), x, scale, margin)


@CASES
@given(batches(n_min=2), st.floats(0.0, 1.5), st.data())
def test_group_lasso_matches_block_soft_thresholding_and_its_jacobian(case, lam, data):
    x, scale, _ = case
    n = x.shape[1]
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    t = lam * scale
    bounds = np.cumsum([0, *sizes])

    def ref(a):
        out = np.zeros_like(a)
        for g0, g1 in zip(bounds[:-1], bounds[1:]):
            nrm = np.linalg.norm(a[:, g0:g1], axis=1, keepdims=True)
            out[:, g0:g1] = np.maximum(0, 1 - t / np.where(nrm > 0, nrm, 1)) * a[:, g0:g1]
        return out

    margin = min(np.abs(np.linalg.norm(x[:, g0:g1], axis=1) - t).min()
                 for g0, g1 in zip(bounds[:-1], bounds[1:]))
    _check(lambda a: PR.group_lasso(a, t, sizes), ref, x, scale, margin)


# ------------------------------------------------------------------ the documented kinks
@CASES
@given(batches(n_min=2), st.data())
def test_at_an_exact_kink_box_and_soft_threshold_take_their_documented_piece(case, data):
    """Coordinates exactly on a kink, as documented: the box takes its free piece
    (derivative 1 at a bound), the soft threshold its zero piece (derivative 0 at |x| = λ)."""
    x, scale, rng = case
    lo, hi = -0.5 * scale, 0.5 * scale
    on = data.draw(st.lists(st.booleans(), min_size=x.shape[1], max_size=x.shape[1]))
    on = np.array(on)[None, :] & (rng.random(x.shape) < 0.5)
    x = np.where(on, np.where(x > 0, hi, lo), x)
    x = np.where(~on & (np.abs(np.abs(x) - hi) < MARGIN * scale), 0.0, x)  # no near-ties
    xt = torch.tensor(x, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(PR.box(xt, lo, hi).sum(), xt)
    want = ((x >= lo) & (x <= hi)).astype(float)
    assert np.array_equal(g.numpy(), want)
    (g,) = torch.autograd.grad(PR.soft_threshold(xt, hi).sum(), xt)
    assert np.array_equal(g.numpy(), (np.abs(x) > hi).astype(float))  # the zero piece


@CASES
@given(st.integers(1, 3), st.integers(2, 7), st.integers(0, 2 ** 31 - 1),
       st.sampled_from([1e-6, 1.0, 1e6]), st.floats(0.5, 3.0))
def test_simplex_and_k_subset_on_ties_match_and_have_a_projector_jacobian(B, n, seed, scale, r):
    """Inputs drawn from a few values (many exact ties, kinks on purpose): the result is
    feasible and optimal (it matches the reference threshold), and the Jacobian is the
    documented orthogonal projector diag(1_S) − 1_S1_Sᵀ/|S|: symmetric, idempotent, and
    annihilating 1 (Σz is fixed)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (B, n)).astype(float) * scale * 0.5
    rr = np.full(B, r * scale)
    for fn, ref in ((lambda t: PR.simplex(t, r * scale),
                     lambda a: np.maximum(a - _simplex_tau(a, rr)[:, None], 0)),
                    (lambda t: PR.k_subset(t, min(r, n - 0.5)),
                     lambda a: np.clip(a - _k_subset_tau(a, min(r, n - 0.5))[:, None], 0, 1))):
        y, J = _jac_torch(fn, x)
        assert np.allclose(y, ref(x), rtol=1e-10, atol=1e-10 * max(scale, 1.0))
        assert np.allclose(J, np.swapaxes(J, 1, 2), atol=1e-12)
        assert np.allclose(J @ J, J, atol=1e-10)
        assert np.allclose(J.sum(axis=2), 0, atol=1e-10)


# ------------------------------------------------------------------ a folded step
@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(st.integers(0, 2 ** 31 - 1), st.integers(2, 6), st.integers(1, 3))
def test_folded_box_qp_gradient_matches_the_kkt_closed_form(seed, n, B):
    """min ½xᵀPx + qᵀx on a box, solved by projected gradient and folded: ∂L/∂q from the
    active set (x_F = −P_FF⁻¹(q_F + P_FA x_A)), strict complementarity assumed."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((B, n, n)))[0]
    P = Q @ (rng.uniform(1.0, 4.0, (B, n))[:, :, None] * np.swapaxes(Q, 1, 2))
    q = rng.standard_normal((B, n))
    lo, hi = -0.3, 0.4
    Pt, qt = torch.tensor(P, dtype=DT), torch.tensor(q, dtype=DT, requires_grad=True)
    step = S.projected_gradient(lambda x, P, q: (P @ x.unsqueeze(-1)).squeeze(-1) + q,
                                lambda y: PR.box(y, lo, hi), 0.25, n_grad_params=2)
    xs, _ = S.iterate(step, torch.zeros(B, n, dtype=DT), Pt, qt.detach(), tol=1e-15,
                      maxiter=5000, warn=False)
    x = xs.numpy()
    low, high = np.isclose(x, lo, atol=1e-12), np.isclose(x, hi, atol=1e-12)
    free = ~(low | high)
    grad_f = np.einsum("bij,bj->bi", P, x) + q
    # strict complementarity and interior free coordinates (else the derivative is one-sided)
    assume(np.all(np.abs(grad_f[~free]) > 1e-6) and np.all(np.abs(grad_f[free]) < 1e-9))
    assume(np.all(np.minimum(x[free] - lo, hi - x[free]) > 1e-6))
    xf = fold(step, xs, Pt, qt)
    cot = rng.standard_normal((B, n))
    (g,) = torch.autograd.grad(xf, qt, torch.tensor(cot, dtype=DT))
    want = np.zeros((B, n))
    for b in range(B):
        F = free[b]
        if F.any():
            want[b, F] = -np.linalg.solve(P[b][np.ix_(F, F)], cot[b, F])
    assert np.allclose(g.numpy(), want, rtol=1e-8, atol=1e-10), np.abs(g.numpy() - want).max()

