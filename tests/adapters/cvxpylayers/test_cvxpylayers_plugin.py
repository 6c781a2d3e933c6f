"""FoldedSolver / FoldedCvxpyLayer against cvxpylayers (diffcp, tight), diffcp_reference,
closed forms, and central finite differences of the Clarabel solution map."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

cp = pytest.importorskip("cvxpy")
pytest.importorskip("diffcp")
pytest.importorskip("cvxpylayers")
pytest.importorskip("clarabel")

from cvxpylayers.torch import CvxpyLayer  # noqa: E402

import fold_plugins as fp  # noqa: E402
from fold_plugins import cones  # noqa: E402
from fold_plugins.adapters.cvxpylayers import (  # noqa: E402
    FoldedCvxpyLayer,
    FoldedSolver,
    cvxpylayers_reference,
)
from fold_plugins.adapters.diffcp import diffcp_reference  # noqa: E402
from fold_plugins.verify import assert_gradients_close  # noqa: E402

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- problems

def _lp(B=3, seed=0):
    """max −cᵀx s.t. Ax ≤ b, x ≥ 0 with A, −c > 0: bounded, a generic vertex where the rows
    of A are active (so x depends on A and b)."""
    g = _gen(seed)
    n, m = 5, 4
    x = cp.Variable(n)
    c, A, b = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(c @ x), [A @ x <= b, x >= 0])
    vals = (-0.1 - torch.rand(B, n, generator=g, dtype=F64),
            0.1 + torch.rand(m, n, generator=g, dtype=F64),
            1 + torch.rand(B, m, generator=g, dtype=F64))
    return prob, [c, A, b], [x], vals


def _qp(B=3, seed=1):
    """min ½‖Lᵀx‖² + qᵀx s.t. Gx ≤ h, −1 ≤ x ≤ 1, 1ᵀx = s (L a parameter)."""
    g = _gen(seed)
    n, m = 6, 3
    x = cp.Variable(n)
    L, q, G, h, s = (cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)),
                     cp.Parameter(m), cp.Parameter())
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ x) + q @ x),
                      [G @ x <= h, x >= -1, x <= 1, cp.sum(x) == s])
    Lt = torch.eye(n, dtype=F64) + 0.3 * torch.randn(n, n, generator=g, dtype=F64)
    vals = (Lt, 2 * torch.randn(B, n, generator=g, dtype=F64),
            torch.randn(m, n, generator=g, dtype=F64),
            0.3 + torch.rand(B, m, generator=g, dtype=F64), torch.tensor(0.5, dtype=F64))
    return prob, [L, q, G, h, s], [x], vals


def _socp(B=3, seed=2):
    """min cᵀx + ½‖x‖² s.t. ‖Ax − b‖ ≤ 1 (an active second-order cone)."""
    g = _gen(seed)
    n, m = 4, 3
    x = cp.Variable(n)
    c, A, b = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(c @ x + 0.5 * cp.sum_squares(x)), [cp.norm(A @ x - b) <= 1])
    vals = (3 * torch.randn(B, n, generator=g, dtype=F64),
            torch.randn(m, n, generator=g, dtype=F64),
            0.3 * torch.randn(B, m, generator=g, dtype=F64))
    return prob, [c, A, b], [x], vals


def _exp(B=3, seed=3):
    """max entropy + cᵀx on the simplex with an upper bound u: exp cones, x = softmax(c) when u
    is slack."""
    g = _gen(seed)
    n = 4
    x = cp.Variable(n)
    c, u = cp.Parameter(n), cp.Parameter(n)
    prob = cp.Problem(cp.Maximize(cp.sum(cp.entr(x)) + c @ x), [cp.sum(x) == 1, x <= u])
    vals = (torch.randn(B, n, generator=g, dtype=F64),
            0.3 + torch.rand(B, n, generator=g, dtype=F64))
    return prob, [c, u], [x], vals


def _psd(B=2, seed=4):
    """min tr(CX) + ½‖X‖²_F s.t. X ⪰ 0: X = Π_PSD(−(C + Cᵀ)/2)."""
    g = _gen(seed)
    k = 3
    X = cp.Variable((k, k), symmetric=True)
    C = cp.Parameter((k, k))
    prob = cp.Problem(cp.Minimize(cp.trace(C @ X) + 0.5 * cp.sum_squares(X)), [X >> 0])
    return prob, [C], [X], (torch.randn(B, k, k, generator=g, dtype=F64),)


PROBLEMS = {"lp": _lp, "qp": _qp, "socp": _socp, "exp": _exp, "psd": _psd}


def _layer(prob, params, variables, **kw):
    return CvxpyLayer(prob, parameters=params, variables=variables,
                      solver=FoldedSolver(**kw))


def _fn(layer):
    return lambda *t: layer(*t)[0]


# ----------------------------------------------------------------------------- cross-checks

@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_matches_cvxpylayers_and_diffcp(kind):
    prob, ps, vs, vals = PROBLEMS[kind]()
    folded = _fn(_layer(prob, ps, vs, backward="dense"))
    for ref in (cvxpylayers_reference(prob, ps, vs), diffcp_reference(prob, ps, vs)):
        assert_gradients_close(folded, lambda *t, r=ref: r(*t)[0], vals, rtol=1e-7,
                                     atol=1e-10, value_rtol=1e-7, n_directions=2)


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_gmres_matches_finite_differences_of_clarabel(kind):
    prob, ps, vs, vals = PROBLEMS[kind](B=1 if kind == "exp" else 2)
    folded = _fn(_layer(prob, ps, vs))  # GMRES, Clarabel forward
    assert_gradients_close(folded, "finite_differences", vals, rtol=1e-6, atol=1e-8,
                           n_directions=1, eps=1e-6)


def test_closed_forms_softmax_and_psd_projection():
    # softmax: the entropy problem with slack upper bounds
    prob, ps, vs, (c, _) = _exp(B=3)
    lay = _fn(_layer(prob, ps, vs, backward="dense"))
    u = torch.full_like(c, 2.0)
    c = c.clone().requires_grad_(True)
    w = torch.randn_like(c)
    x = lay(c, u)
    torch.testing.assert_close(x, torch.softmax(c, -1), rtol=0, atol=1e-8)
    (g,) = torch.autograd.grad((x * w).sum(), c)
    (g_ref,) = torch.autograd.grad((torch.softmax(c, -1) * w).sum(), c)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-8)
    # PSD: X = Π(−C), gradient through the Löwner derivative of the projection
    prob, ps, vs, (C,) = _psd(B=2)
    lay = _fn(_layer(prob, ps, vs))
    C = C.clone().requires_grad_(True)
    X = lay(C)
    ref = cones.smat(cones.psd(cones.svec(-0.5 * (C + C.transpose(1, 2)))))
    torch.testing.assert_close(X, ref, rtol=0, atol=1e-8)
    W = torch.randn_like(X)
    (g,) = torch.autograd.grad((X * W).sum(), C)
    (g_ref,) = torch.autograd.grad((ref * W).sum(), C)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-7)


def test_unbatched_and_dual_variables_match_reference():
    n = 4
    x = cp.Variable(n)
    q, b = cp.Parameter(n), cp.Parameter()
    con = cp.sum(x) == b
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [con, x >= 0])
    g = _gen(5)
    vals = (torch.randn(n, generator=g, dtype=F64), torch.tensor(1.3, dtype=F64))
    folded = CvxpyLayer(prob, [q, b], [x, con.dual_variables[0]], solver=FoldedSolver())
    ref = CvxpyLayer(prob, [q, b], [x, con.dual_variables[0]])
    args = {"eps_abs": 1e-12, "eps_rel": 1e-12, "max_iters": 100_000, "mode": "dense",
            "acceleration_lookback": 0}

    def ref_fn(*t):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ref(*t, solver_args=args)

    out = folded(*vals)
    assert out[0].shape == (n,) and out[1].shape == ()
    rep = assert_gradients_close(lambda *t: folded(*t), ref_fn, vals, rtol=1e-7,
                                 value_rtol=1e-7, n_directions=2)
    assert rep.worst < 1e-7


def test_near_a_kink_active_set_changes():
    """q moves a box-QP coordinate across its bound: at 1e-4 on either side of the kink the
    folded gradient matches finite differences of Clarabel (steps smaller than the margin)."""
    n = 3
    x = cp.Variable(n)
    q = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [x >= 0, x <= 1])
    lay = _fn(_layer(prob, [q], [x]))
    for delta in (1e-4, -1e-4):
        # x = clip(−q, 0, 1): x_0 free, x_1 = max(0, −q_1) with its kink at q_1 = 0, x_2 at 1
        qv = torch.tensor([[-0.5, delta, -2.0]], dtype=F64)
        rep = assert_gradients_close(lay, "finite_differences", (qv,), rtol=1e-6, eps=1e-7,
                                     n_directions=2)
        assert rep.worst < 1e-6
        # and the closed form: ∂x_1/∂q_1 = −1 when free (q_1 < 0), 0 when at the bound
        xq = qv.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(lay(xq)[0, 1], xq)
        assert abs(float(g[0, 1]) - (-1.0 if delta < 0 else 0.0)) < 1e-8


def test_torch_forward_qp_and_lp_float64_and_float32():
    for make in (_qp, _lp):
        prob, ps, vs, vals = make(B=3)
        folded = _fn(_layer(prob, ps, vs, forward="torch"))
        ref = cvxpylayers_reference(prob, ps, vs)
        assert_gradients_close(folded, lambda *t, r=ref: r(*t)[0], vals, rtol=1e-7,
                                     atol=1e-10, value_rtol=1e-7, n_directions=2)
    prob, ps, vs, vals = _qp(B=3)
    for fwd in ("clarabel", "torch"):
        lay = _fn(_layer(prob, ps, vs, forward=fwd, tol=1e-6))
        v32 = tuple(t.float().requires_grad_(True) for t in vals)
        v64 = tuple(t.detach().clone().requires_grad_(True) for t in vals)
        x32 = lay(*v32)  # cvxpylayers builds the canonical data in float64 on the CPU
        x64 = cvxpylayers_reference(prob, ps, vs)(*v64)[0]
        assert float((x32.double() - x64).detach().abs().max()) < 1e-5
        w = torch.randn_like(x64)
        g32 = torch.autograd.grad((x32 * w.float()).sum(), v32[1])[0]
        g64 = torch.autograd.grad((x64 * w).sum(), v64[1])[0]
        assert float((g32.double() - g64).norm() / g64.norm()) < 1e-4


def test_folded_cvxpylayer_module_and_last_info():
    prob, ps, vs, vals = _socp(B=4)
    lay = FoldedCvxpyLayer(prob, ps, vs, backward="gmres", tol=1e-12)
    direct = CvxpyLayer(prob, ps, vs, solver=FoldedSolver(backward="gmres", tol=1e-12))
    v = tuple(t.clone().requires_grad_(True) for t in vals)
    (x,) = lay(*v)
    (xd,) = direct(*v)
    torch.testing.assert_close(x, xd, rtol=0, atol=0)
    w = torch.randn_like(x)
    g = torch.autograd.grad((x * w).sum(), v)
    gd = torch.autograd.grad((xd * w).sum(), v)
    for a, b in zip(g, gd):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    info = lay.last_info
    assert isinstance(info, fp.FoldInfo) and info.batch_size == 4
    assert bool(info.backward_converged.all()) and bool(info.forward_converged.all())
    assert float(info.forward_residual.max()) < 1e-8
    assert float(info.backward_residual.max()) <= 1e-12


def test_bad_input_errors():
    # infeasible instance: named in a FoldError, not a NaN
    x = cp.Variable(2)
    b = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(cp.sum(x)), [x >= b, x <= 1])
    lay = CvxpyLayer(prob, [b], [x], solver=FoldedSolver())
    with pytest.raises(fp.FoldError, match=r"instance\(s\).*\[1\]"):
        lay(torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=F64))
    # unbounded (forward='torch' too)
    prob_u = cp.Problem(cp.Minimize(cp.sum(x)), [x <= b])
    with pytest.raises(fp.FoldError):
        CvxpyLayer(prob_u, [b], [x], solver=FoldedSolver())(torch.zeros(2, dtype=F64))
    with pytest.raises(fp.FoldError):
        CvxpyLayer(prob_u, [b], [x], solver=FoldedSolver(forward="torch"))(
            torch.zeros(2, dtype=F64))
    # NaN parameters, unknown options, unsupported cones
    with pytest.raises(fp.FoldError, match="NaN"):
        lay(torch.tensor([0.0, float("nan")], dtype=F64))
    with pytest.raises(fp.FoldError, match="forward"):
        FoldedSolver(forward="scs")
    with pytest.raises(fp.FoldError, match="solver"):
        FoldedSolver(backward="nope")
    prob_s, ps, vs, vals = _socp(B=1)
    with pytest.raises(fp.FoldError, match="LPs and QPs"):
        CvxpyLayer(prob_s, ps, vs, solver=FoldedSolver(forward="torch"))(*vals)
    y = cp.Variable(3)
    a = cp.Parameter(3)
    prob_p = cp.Problem(cp.Minimize(a @ y), [cp.PowCone3D(y[0], y[1], y[2], 0.3), y <= 1])
    with pytest.raises(fp.FoldError, match="power-cone"):
        CvxpyLayer(prob_p, [a], [y], solver=FoldedSolver())


def test_shared_solver_between_layers():
    """One FoldedSolver instance serves two layers (structure kept per program)."""
    s = FoldedSolver(backward="dense")
    p1, ps1, vs1, v1 = _qp(B=2)
    p2, ps2, vs2, v2 = _socp(B=2)
    l1 = CvxpyLayer(p1, ps1, vs1, solver=s)
    l2 = CvxpyLayer(p2, ps2, vs2, solver=s)
    np.testing.assert_allclose(l1(*v1)[0].numpy(), cvxpylayers_reference(p1, ps1, vs1)(*v1)[0],
                               atol=1e-8)
    np.testing.assert_allclose(l2(*v2)[0].numpy(), cvxpylayers_reference(p2, ps2, vs2)(*v2)[0],
                               atol=1e-8)
