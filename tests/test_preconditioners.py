"""Preconditioned backward solves: the same gradient as the unpreconditioned and dense solves,
with fewer VJPs (fp.preconditioners)."""

from __future__ import annotations

import pytest
import torch

import fold_plugins as fp
from fold_plugins import preconditioners as pcs
from fold_plugins.fold import linearize
from fold_plugins.steps import admm_qp, newton, qp, solve_qp_admm

DT = torch.float64


def general_qp(n: int, B: int, seed: int = 0):
    """min ½xᵀPx + qᵀx s.t. Gx ≤ h (m = n/2), Ex = e (p = n/4), as l ≤ Ax ≤ u."""
    g = torch.Generator().manual_seed(seed)
    m, p = n // 2, n // 4
    M = torch.randn(B, n, n, generator=g, dtype=DT)
    P = M @ M.mT / n + 0.1 * torch.eye(n, dtype=DT)
    q = torch.randn(B, n, generator=g, dtype=DT)
    G = torch.randn(B, m, n, generator=g, dtype=DT)
    h = torch.rand(B, m, generator=g, dtype=DT)
    E = torch.randn(B, p, n, generator=g, dtype=DT)
    e = 0.1 * torch.randn(B, p, generator=g, dtype=DT)
    A = torch.cat([G, E], dim=1)
    l = torch.cat([torch.full_like(h, -fp.steps.INF), e], dim=1)
    u = torch.cat([h, e], dim=1)
    return P, q, A, l, u


@pytest.fixture(scope="module")
def solved_qp():
    P, q, A, l, u = general_qp(40, 2)
    (x, z, y), info = solve_qp_admm(P, q, A, l, u, tol=1e-12)
    assert all(s == "solved" for s in info.status)
    return (P, q, A, l, u), (x, z, y), info


def _grad_q(step, state, data, **kw):
    P, q, A, l, u = data
    qq = q.clone().requires_grad_(True)
    xs, info = fp.fold(step, state, P, qq, A, l, u, tol=1e-12, return_info=True, **kw)
    w = torch.linspace(-1, 1, xs[0].shape[1], dtype=DT)
    (g,) = torch.autograd.grad((xs[0] * w).sum(), qq)
    assert bool(info.backward_converged.all())
    return g, info.backward_matvecs


def test_admm_qp_preconditioner_is_the_exact_inverse(solved_qp):
    # (I − Φᵀ) M⁻¹ g = g against Φ materialised by autograd, column by column
    data, state, info = solved_qp
    step = admm_qp(rho=info.rho)
    pc = pcs.admm_qp(state, *data, rho=info.rho)
    lin = linearize(step, state, *data)
    N = lin.spec.n
    eye = torch.eye(N, dtype=DT).expand(2, N, N).permute(1, 0, 2).contiguous()
    PhiT = lin.vjp_batched(eye).permute(1, 2, 0)  # (B, N, N): columns Φᵀe_j
    g = torch.randn(2, N, generator=torch.Generator().manual_seed(1), dtype=DT)
    v = pc(g)
    resid = v - torch.einsum("bij,bj->bi", PhiT, v) - g
    assert float((resid.norm(dim=1) / g.norm(dim=1)).max()) < 1e-9


@pytest.mark.parametrize("solver", ["gmres", "bicgstab"])
def test_admm_qp_preconditioned_gradient_matches_unpreconditioned_and_dense(solved_qp, solver):
    data, state, info = solved_qp
    step = admm_qp(rho=info.rho)
    n_z = state[0].shape[1] + 2 * state[1].shape[1]
    pc = pcs.admm_qp(state, *data, rho=info.rho)
    g_dense, _ = _grad_q(step, state, data, solver="dense")
    g_plain, k_plain = _grad_q(step, state, data, solver=solver)
    g_pc, k_pc = _grad_q(step, state, data, solver=solver,
                         solver_options={"preconditioner": pc})
    scale = g_dense.norm()
    assert float((g_pc - g_dense).norm() / scale) < 1e-10
    assert float((g_plain - g_dense).norm() / scale) < 1e-10
    assert k_pc <= n_z // 4 and k_pc < k_plain, (k_pc, k_plain, n_z)


def test_qp_layer_preconditions_by_default(solved_qp):
    data, _, _ = solved_qp
    P, q, A, l, u = data
    grads, counts = [], []
    for pre in (True, False):
        qq = q.clone().requires_grad_(True)
        x, finfo, _ = qp(P, qq, A, l, u, return_info=True, precondition=pre,
                         admm_options={"tol": 1e-12})
        (g,) = torch.autograd.grad(x.sum(), qq)
        grads.append(g)
        counts.append(finfo.backward_matvecs)
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-10
    assert counts[0] <= 3 < counts[1], counts


def test_newton_preconditioner_damped_regularised_step():
    # f(x) = ½xᵀQx + Σ log cosh(x) − θᵀx: a damped, regularised Newton step has Φ ≠ 0
    g = torch.Generator().manual_seed(3)
    B, n = 2, 25
    M = torch.randn(n, n, generator=g, dtype=DT)
    Q = M @ M.T / n + 0.5 * torch.eye(n, dtype=DT)
    theta = torch.randn(B, n, generator=g, dtype=DT)

    def grad(x, th):
        return x @ Q + torch.tanh(x) - th

    def hess(x, th):
        return Q + torch.diag_embed(1 - torch.tanh(x) ** 2)

    step = newton(grad, hessian=hess, damping=0.5, regularization=2.0)
    x = torch.zeros(B, n, dtype=DT)
    for _ in range(60):  # plain Newton to the stationary point
        x = x - torch.linalg.solve(hess(x, theta), grad(x, theta).unsqueeze(-1)).squeeze(-1)
    pc = pcs.newton(hess(x, theta), damping=0.5, regularization=2.0)
    out = {}
    for name, kw in (("dense", {"solver": "dense"}), ("plain", {"solver": "gmres"}),
                     ("pc", {"solver": "gmres", "solver_options": {"preconditioner": pc}})):
        th = theta.clone().requires_grad_(True)
        xs, info = fp.fold(step, x, th, tol=1e-12, return_info=True, **kw)
        (gr,) = torch.autograd.grad((xs * torch.arange(n, dtype=DT)).sum(), th)
        out[name] = (gr, info.backward_matvecs)
    # closed form: dx*/dθ = H⁻¹, so the VJP is H⁻¹ w
    w = torch.arange(n, dtype=DT).expand(B, n)
    truth = torch.linalg.solve(hess(x, theta), w.unsqueeze(-1)).squeeze(-1)
    for name, (gr, _) in out.items():
        assert float((gr - truth).norm() / truth.norm()) < 1e-10, name
    assert out["pc"][1] <= 3 < out["plain"][1], (out["pc"][1], out["plain"][1])


def test_inverse_of_matches_solve_and_is_checked():
    g = torch.Generator().manual_seed(5)
    M = torch.eye(6, dtype=DT) + 0.1 * torch.randn(3, 6, 6, generator=g, dtype=DT)
    v = torch.randn(3, 6, generator=g, dtype=DT)
    assert torch.allclose(pcs.inverse_of(M)(v), torch.linalg.solve(M, v), atol=1e-13)
    with pytest.raises(fp.FoldError, match="square"):
        pcs.inverse_of(torch.ones(3, 4, dtype=DT))
    with pytest.raises(fp.FoldError, match="singular"):
        pcs.inverse_of(torch.zeros(4, 4, dtype=DT))
    x, z = torch.zeros(1, 4, dtype=DT), torch.zeros(1, 2, dtype=DT)
    with pytest.raises(fp.FoldError, match="alpha"):
        pcs.admm_qp((x, z, z), *general_qp(4, 1), alpha=2.5)
    with pytest.raises(fp.FoldError, match="P has shape"):
        pcs.admm_qp((v, z, z), *general_qp(4, 1))
