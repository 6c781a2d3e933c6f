"""cvxpylayers_reference and diffcp_reference against closed forms and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

cp = pytest.importorskip("cvxpy")
pytest.importorskip("diffcp")
pytest.importorskip("cvxpylayers")

from fold_plugins import FoldError  # noqa: E402
from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference  # noqa: E402
from fold_plugins.adapters.diffcp import diffcp_reference  # noqa: E402
from fold_plugins.verify import assert_gradients_close, compare_gradients  # noqa: E402

F64 = torch.float64
REFS = [("cvxpylayers", cvxpylayers_reference), ("diffcp", diffcp_reference)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- box QP

def _box_qp(n=8, B=3, seed=0):
    g = _gen(seed)
    M = torch.randn(n, n, generator=g, dtype=F64)
    P = M.T @ M / n + 0.2 * torch.eye(n, dtype=F64)
    Lc = torch.linalg.cholesky(P)  # P = Lc Lcᵀ
    q = 1.5 * torch.randn(B, n, generator=g, dtype=F64)
    lo = -0.5 - torch.rand(B, n, generator=g, dtype=F64)
    hi = 0.5 + torch.rand(B, n, generator=g, dtype=F64)
    x = cp.Variable(n)
    qp, lp, hp = cp.Parameter(n), cp.Parameter(n), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lc.T.numpy() @ x) + qp @ x),
                      [x >= lp, x <= hp])
    return P, (q, lo, hi), (prob, [qp, lp, hp], [x])


def _box_qp_exact(P):
    """x*(q, lo, hi) on the active set found by Clarabel, as a torch function (exact VJP)."""

    def fn(q, lo, hi):
        n = q.shape[1]
        out = []
        for i in range(q.shape[0]):
            xv = cp.Variable(n)
            cp.Problem(cp.Minimize(0.5 * cp.quad_form(xv, P.numpy()) + q[i].detach().numpy() @ xv),
                       [xv >= lo[i].detach().numpy(), xv <= hi[i].detach().numpy()]).solve(
                solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
            xs = torch.as_tensor(xv.value)
            at_lo = (xs - lo[i]).abs() < 1e-7
            at_hi = (xs - hi[i]).abs() < 1e-7
            free = ~(at_lo | at_hi)
            F, A = free.nonzero().flatten(), (~free).nonzero().flatten()
            xA = torch.where(at_lo, lo[i], hi[i])[A]
            xF = -torch.linalg.solve(P[F][:, F], q[i][F] + P[F][:, A] @ xA)
            x = torch.zeros(n, dtype=q.dtype).index_put((A,), xA).index_put((F,), xF)
            out.append(x)
        return torch.stack(out)

    return fn


@pytest.mark.parametrize("name,make", REFS)
def test_box_qp_matches_active_set_closed_form(name, make):
    P, params, (prob, ps, vs) = _box_qp()
    ref = make(prob, ps, vs)
    rep = assert_gradients_close(ref, _box_qp_exact(P), params, rtol=1e-8, value_rtol=1e-9,
                                 names=["q", "lo", "hi"])
    # measured: 3e-12 (SCS at eps 1e-12, dense derivative)
    assert rep.worst < 1e-8


# ----------------------------------------------------------------------------- equality LS

def _eq_ls(n=6, m=9, p=2, B=2, seed=1):
    g = _gen(seed)
    F = torch.randn(B, m, n, generator=g, dtype=F64)
    y = torch.randn(B, m, generator=g, dtype=F64)
    C = torch.randn(p, n, generator=g, dtype=F64)  # shared by the batch
    d = torch.randn(B, p, generator=g, dtype=F64)
    x = cp.Variable(n)
    Fp, yp, Cp, dp = cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((p, n)), cp.Parameter(p)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(Fp @ x - yp)), [Cp @ x == dp])
    return (F, y, C, d), (prob, [Fp, yp, Cp, dp], [x])


def _eq_ls_exact(F, y, C, d):
    """KKT system [2FᵀF Cᵀ; C 0][x; ν] = [2Fᵀy; d], solved by torch (exact VJP)."""
    B, n, p = F.shape[0], F.shape[2], C.shape[0]
    Cb = C.expand(B, p, n)
    K = torch.cat([torch.cat([2 * F.mT @ F, Cb.mT], 2),
                   torch.cat([Cb, torch.zeros(B, p, p, dtype=F.dtype)], 2)], 1)
    rhs = torch.cat([2 * (F.mT @ y.unsqueeze(-1)).squeeze(-1), d], 1)
    return torch.linalg.solve(K, rhs)[:, :n]


@pytest.mark.parametrize("name,make", REFS)
def test_equality_least_squares_matrix_and_shared_params(name, make):
    params, (prob, ps, vs) = _eq_ls()
    ref = make(prob, ps, vs)
    # C is shared (unbatched): its gradient is the sum over the batch
    rep = assert_gradients_close(ref, _eq_ls_exact, params, rtol=1e-7, value_rtol=1e-9,
                                 names=["F", "y", "C", "d"])
    assert rep.worst < 1e-7


# ----------------------------------------------------------------------------- exp and SO cones

@pytest.mark.parametrize("name,make", REFS)
def test_entropy_simplex_is_softmax(name, make):
    n, B = 6, 2
    th = torch.randn(B, n, generator=_gen(2), dtype=F64)
    x, tp = cp.Variable(n), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(-cp.sum(cp.entr(x)) - tp @ x), [cp.sum(x) == 1])
    ref = make(prob, [tp], [x])
    rep = compare_gradients(ref, lambda t: torch.softmax(t, -1), (th,))
    # x* = softmax(θ). Measured 1.1e-7 (SCS) / 9e-8 (Clarabel) while the values agree to 1e-12:
    # diffcp's derivative of the exponential-cone projection is the limiting factor
    assert rep.value_error < 1e-9
    assert rep.worst < 1e-6, rep


@pytest.mark.parametrize("name,make", REFS)
def test_l2_ball_projection_closed_form(name, make):
    n, B = 5, 3
    g = _gen(3)
    y = 2 * torch.randn(B, n, generator=g, dtype=F64)
    y[0] *= 0.05  # inside the ball: identity
    r = 0.5 + torch.rand(B, generator=g, dtype=F64)
    x, yp, rp = cp.Variable(n), cp.Parameter(n), cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - yp)), [cp.norm(x, 2) <= rp])
    ref = make(prob, [yp, rp], [x])

    def exact(y, r):
        s = torch.clamp(r / y.norm(dim=1), max=1.0)
        return y * s.unsqueeze(1)

    rep = assert_gradients_close(ref, exact, (y, r), rtol=1e-7, value_rtol=1e-9)
    assert rep.worst < 1e-7


# ----------------------------------------------------------------------------- finite differences

def _general_qp(n=6, m=2, k=4, B=2, seed=4):
    g = _gen(seed)
    M = torch.randn(n, n, generator=g, dtype=F64)
    L = (M / n ** 0.5 + torch.eye(n, dtype=F64)).numpy()
    q = torch.randn(B, n, generator=g, dtype=F64)
    A = torch.randn(B, m, n, generator=g, dtype=F64)
    b = torch.randn(B, m, generator=g, dtype=F64)
    G = torch.randn(k, n, generator=g, dtype=F64)
    h = 0.1 * torch.rand(k, generator=g, dtype=F64)
    x = cp.Variable(n)
    qp, Ap, bp = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    Gp, hp = cp.Parameter((k, n)), cp.Parameter(k)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L @ x) + qp @ x),
                      [Ap @ x == bp, Gp @ x <= hp])
    return (q, A, b, G, h), (prob, [qp, Ap, bp, Gp, hp], [x])


def test_diffcp_against_finite_differences():
    params, (prob, ps, vs) = _general_qp()
    ref = diffcp_reference(prob, ps, vs)
    # FD of an SCS solve (accurate to ~1e-12) with step 1e-4: noise ~1e-8; the active set is
    # locally constant so the solution map is smooth there
    rep = compare_gradients(ref, "finite_differences", params, n_directions=2, eps=1e-4)
    assert rep.worst < 1e-6, rep


def test_diffcp_and_cvxpylayers_agree_with_different_forward_solvers():
    params, (prob, ps, vs) = _general_qp(seed=5)
    a = cvxpylayers_reference(prob, ps, vs, solver="CLARABEL")
    b = diffcp_reference(prob, ps, vs, solve_method="SCS")
    rep = compare_gradients(a, b, params)
    # Clarabel on diffcp's SOC form of the QP stops 'AlmostSolved' (its primal residual grows at
    # the last iteration): measured value error 6.0e-7, VJP error 1.5e-6 on this seed, whatever
    # its tolerances. SCS (the default) reaches 1e-12. The two forward solvers still agree to:
    assert rep.value_error < 3e-6
    assert rep.worst < 1e-5, rep


def test_diffcp_reference_takes_solver_like_cvxpylayers():
    """diffcp_reference(solver=...) — the keyword cvxpylayers_reference uses — selects diffcp's
    forward solver; solve_method stays an alias; conflicting values are rejected. Values and
    VJPs against the active-set closed form of a box QP."""
    P, params, (prob, ps, vs) = _box_qp(B=2)
    ref = diffcp_reference(prob, ps, vs, solver="clarabel")
    assert ref.solve_method == "Clarabel" and ref.solver == "CLARABEL"
    alias = diffcp_reference(prob, ps, vs, solve_method="CLARABEL")
    assert alias.solve_method == "Clarabel"
    assert diffcp_reference(prob, ps, vs, solver="SCS", solve_method="scs").solve_method == "SCS"
    assert diffcp_reference(prob, ps, vs).solve_method == "SCS"  # default unchanged
    with pytest.raises(ValueError, match=r"solver='SCS' and solve_method='CLARABEL' disagree"):
        diffcp_reference(prob, ps, vs, solver="SCS", solve_method="CLARABEL")
    with pytest.raises(ValueError, match="solver must be one of"):
        diffcp_reference(prob, ps, vs, solver="GUROBI")
    rep = compare_gradients(ref, _box_qp_exact(P), params, names=["q", "lo", "hi"])
    print(f"[measured] diffcp_reference(solver='clarabel') vs closed form: value "
          f"{rep.value_error:.1e}, VJP {rep.worst:.1e}")
    assert rep.value_error < 1e-6 and rep.worst < 1e-5, rep


def test_several_variables_and_unbatched_call():
    n = 4
    x, t = cp.Variable(n), cp.Variable()
    yp = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - yp) + t), [t >= cp.sum(x), x >= 0])
    y = torch.tensor([0.3, -0.2, 1.1, 0.7], dtype=F64)
    for make in (cvxpylayers_reference, diffcp_reference):
        ref = make(prob, [yp], [x, t])
        xs, ts = ref(y)
        assert xs.shape == (n,) and ts.shape == ()
        # min ‖x − y‖² + 1ᵀx, x ≥ 0  ⇒  x = max(y − 1/2, 0), t = 1ᵀx
        exact = torch.clamp(y - 0.5, min=0)
        assert torch.allclose(xs, exact, atol=1e-9)
        assert abs(float(ts) - float(exact.sum())) < 1e-9

        def closed(y):
            xx = torch.clamp(y - 0.5, min=0)
            return xx, xx.sum()

        assert_gradients_close(ref, closed, (y,), rtol=1e-8)


def test_dtype_and_no_grad_path():
    P, (q, lo, hi), (prob, ps, vs) = _box_qp(B=2)
    ref = diffcp_reference(prob, ps, vs)
    with torch.no_grad():
        (x64,) = ref(q, lo, hi)
    (x32,) = ref(q.float(), lo.float(), hi.float())
    assert x32.dtype == torch.float32 and x64.dtype == F64
    assert torch.allclose(x32.double(), x64, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

def test_bad_shapes_and_problems_are_named():
    _, params, (prob, ps, vs) = _box_qp(n=8, B=2)
    for make in (cvxpylayers_reference, diffcp_reference):
        ref = make(prob, ps, vs)
        with pytest.raises(ValueError, match=r"has shape \(2, 7\); expected \(8,\)"):
            ref(params[0][:, :7], params[1], params[2])
        with pytest.raises(ValueError, match="batch sizes differ"):
            ref(params[0][:1], params[1], params[2])
        with pytest.raises(ValueError, match="expected 3 parameter tensor"):
            ref(params[0])
        with pytest.raises(ValueError, match="exactly the problem's parameters"):
            make(prob, ps[:2], vs)
    x, a = cp.Variable(), cp.Parameter()
    non_dpp = cp.Problem(cp.Minimize(cp.square(x - a * a)))
    with pytest.raises(ValueError, match="not DPP"):
        diffcp_reference(non_dpp, [a], [x])


def test_infeasible_instance_raises():
    x, bp = cp.Variable(2), cp.Parameter()
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= 1, cp.sum(x) <= bp])
    b = torch.tensor([[3.0], [1.0]], dtype=F64).squeeze(1)  # second instance: 2 ≤ 1
    with pytest.raises(FoldError, match="instance 1"):
        diffcp_reference(prob, [bp], [x])(b)
    with pytest.raises(FoldError, match="feasible"):
        cvxpylayers_reference(prob, [bp], [x])(b)
    # diffcp's Clarabel path reports no status: the KKT-residual check catches it
    with pytest.raises(FoldError, match="instance 1.*primal residual"):
        diffcp_reference(prob, [bp], [x], solve_method="CLARABEL")(b)


def test_values_match_cvxpy_solve():
    params, (prob, ps, vs) = _general_qp(seed=6)
    (xd,) = diffcp_reference(prob, ps, vs)(*params)
    for i in range(params[0].shape[0]):
        for p, v in zip(ps, params):
            p.value = (v[i] if v.dim() == len(p.shape) + 1 else v).numpy()
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
        assert np.allclose(vs[0].value, xd[i].numpy(), rtol=0, atol=1e-8)
