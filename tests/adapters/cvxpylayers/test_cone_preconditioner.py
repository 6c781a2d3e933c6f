"""The cone-program ADMM preconditioner (eq. (C1)–(C4) of
``adapters/cvxpylayers/preconditioner.py``): its cone Jacobians against autograd of the
projections, its inverse against the step's own Jacobian built from VJPs, and FoldedSolver's
preconditioned backward (a few VJPs) against cvxpylayers/diffcp at tight tolerances."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cvxpy")
pytest.importorskip("diffcp")
pytest.importorskip("cvxpylayers")
pytest.importorskip("clarabel")

from cvxpylayers.torch import CvxpyLayer  # noqa: E402
from test_cvxpylayers_plugin import PROBLEMS  # noqa: E402  (same folder, on sys.path)

from fold_plugins import cones as K  # noqa: E402
from fold_plugins.adapters.cvxpylayers import FoldedSolver, cvxpylayers_reference  # noqa: E402
from fold_plugins.adapters.cvxpylayers.preconditioner import cone_admm, cone_blocks  # noqa: E402
from fold_plugins.adapters.cvxpylayers.program import admm_step  # noqa: E402
from fold_plugins.adapters.diffcp import diffcp_reference  # noqa: E402
from fold_plugins.fold import linearize  # noqa: E402

F64 = torch.float64


def test_cone_jacobian_matches_autograd_of_the_projection():
    dims = K.ConeDims(zero=2, nonneg=4, soc=(3, 5, 5, 3), psd=(2, 3), exp=2)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, dims.size, generator=g, dtype=F64)
    # every second-order case: inside (‖u‖ < t), polar (‖u‖ < −t), boundary
    v[0, 6:9] = torch.tensor([2.0, 0.3, -0.4], dtype=F64)
    v[1, 6:9] = torch.tensor([-2.0, 0.3, -0.4], dtype=F64)
    v[2, 9:14] = torch.tensor([0.1, 1.0, -2.0, 0.5, 0.7], dtype=F64)
    D = cone_blocks(v, dims).function(lambda lam, s: lam, torch.zeros_like(v),
                                      torch.ones_like(v))
    for b in range(v.shape[0]):
        J = torch.autograd.functional.jacobian(lambda t: K.product(t, dims), v[b])
        eye = torch.eye(dims.size, dtype=F64)
        ours = torch.stack([D.mv(eye[j].expand(3, -1))[b] for j in range(dims.size)], 1)
        torch.testing.assert_close(ours, J, rtol=0, atol=1e-10)


def _solved(kind: str, **kw):
    """FoldedSolver's saved state at the solution of a test problem, after one backward."""
    prob, ps, vs, vals = PROBLEMS[kind]()
    sol = FoldedSolver(**kw)
    layer = CvxpyLayer(prob, parameters=ps, variables=vs, solver=sol)
    seen = {}
    inner = sol.derivative_torch_batch

    def spy(dp, dd, st):
        seen["state"] = st
        return inner(dp, dd, st)

    sol.derivative_torch_batch = spy
    ts = [t.clone().requires_grad_(True) for t in vals]
    layer(*ts)[0].sum().backward()
    return sol, seen["state"]


def _pc_error(state, sigma: float, eps: float | None) -> torch.Tensor:
    """Worst relative ``‖pc((I − Φᵀ)w) − w‖`` with Φ the step's Jacobian from its VJPs."""
    prog, P, q, A, x, s, y = state.prog, state.P, state.q, state.A, state.x, state.s, state.y
    R, L, dense = state.R, state.L, state.dense
    B, N = x.shape[0], prog.n + 2 * prog.m
    with torch.enable_grad():
        lin = linearize(admm_step(prog, L, R, dense), (x, s, y), P, q, A)
        eye = torch.eye(N, dtype=x.dtype)
        PhiT = lin.vjp_batched(eye[:, None, :].expand(N, B, N)).permute(1, 2, 0)
    pc = cone_admm(prog, state.data, (x, s, y), R, L, sigma, dense, eps=eps)
    w = torch.randn(B, N, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    r = w - (PhiT @ w.unsqueeze(-1)).squeeze(-1)
    return ((pc(r) - w).norm(dim=1) / w.norm(dim=1)).max()


@pytest.mark.parametrize("kind", ["lp", "qp", "socp", "exp", "psd"])
def test_preconditioner_is_the_inverse_up_to_the_shift(kind):
    sol, state = _solved(kind)
    # the inverse of I − Φᵀ with D + ε in place of D tends to the exact one linearly in ε:
    # two decades of ε take two decades off the error (until roundoff, below 1e-8)
    e5, e7 = (float(_pc_error(state, sol.sigma, e)) for e in (1e-5, 1e-7))
    assert 0.009 <= e7 / e5 <= 0.011, (e5, e7)
    if kind in ("lp", "socp"):  # well-conditioned here: the default shift is exact to 1e-7
        assert float(_pc_error(state, sol.sigma, None)) <= 1e-6


@pytest.mark.parametrize("kind", ["qp", "socp", "lp"])
def test_preconditioned_backward_needs_few_vjps_and_matches_references(kind):
    prob, ps, vs, vals = PROBLEMS[kind]()
    grads, vjps, w = {}, {}, None
    for pre in (True, False):
        sol = FoldedSolver(precondition=pre)
        layer = CvxpyLayer(prob, parameters=ps, variables=vs, solver=sol)
        ts = [t.clone().requires_grad_(True) for t in vals]
        x = layer(*ts)[0]
        if w is None:
            w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
        grads[pre] = torch.autograd.grad((x * w).sum(), ts)
        vjps[pre] = sol.last_info.backward_matvecs
        assert bool(sol.last_info.backward_converged.all())
    assert vjps[True] <= 6, vjps
    assert vjps[False] > vjps[True], vjps
    for ref in (cvxpylayers_reference(prob, ps, vs), diffcp_reference(prob, ps, vs)):
        ts = [t.clone().requires_grad_(True) for t in vals]
        g_ref = torch.autograd.grad((ref(*ts)[0] * w).sum(), ts)
        for a, b in zip(grads[True], g_ref):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_auto_preconditions_mostly_polyhedral_programs_and_bad_values_are_named():
    for kind, on in (("qp", True), ("lp", True), ("socp", False)):
        prob, ps, vs, vals = PROBLEMS[kind]()
        counts, grads = {}, {}
        for pre in ("auto", on):
            sol = FoldedSolver(precondition=pre)
            layer = CvxpyLayer(prob, parameters=ps, variables=vs, solver=sol)
            ts = [t.clone().requires_grad_(True) for t in vals]
            grads[pre] = torch.autograd.grad(layer(*ts)[0].sum(), ts)
            counts[pre] = sol.last_info.backward_matvecs
        assert counts["auto"] == counts[on], (kind, counts)
        for a, b in zip(grads["auto"], grads[on]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(Exception, match="precondition must be True, False or 'auto', got 'yes'"):
        FoldedSolver(precondition="yes")


@pytest.mark.parametrize("pairs", [True, False])
def test_weighted_gram_matches_the_dense_product(pairs, monkeypatch):
    from fold_plugins.adapters.cvxpylayers import program as CP

    if not pairs:  # the per-instance sparse product used for dense rows
        monkeypatch.setattr(CP, "MAX_GRAM_PAIRS", 0)
    for kind in ("qp", "socp", "exp"):
        _, state = _solved(kind)
        prog = state.prog
        prog._pairs = None
        Gv = state.data.G
        w = torch.rand(Gv.shape[0], prog.m, generator=torch.Generator().manual_seed(3),
                       dtype=F64)
        Gd = prog.dense_G(Gv)
        torch.testing.assert_close(CP.weighted_gram(prog, Gv, w),
                                   Gd.transpose(1, 2) @ (w.unsqueeze(-1) * Gd),
                                   rtol=1e-13, atol=1e-13)
        assert (prog._pairs is False) is not pairs
