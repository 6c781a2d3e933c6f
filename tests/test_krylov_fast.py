"""The lean GMRES inner loop and the captured operator against independent truths: Krylov
least-squares minimisers, dense solves, autograd Jacobians; and its operation budget."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fold_plugins as fp
from fold_plugins._krylov import _Arnoldi
from fold_plugins.internal import AdjointOperator, linearize

DT = torch.float64


def _system(B: int = 3, n: int = 12, scale: float = 0.6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=DT) - scale * torch.randn(B, n, n, generator=g, dtype=DT) / n ** 0.5
    b = torch.randn(B, n, generator=g, dtype=DT)
    return A, b


def _matvec(A):
    return lambda v: torch.einsum("bij,bj->bi", A, v)


def _krylov_minimiser(A, b, k):
    """``argmin ‖b − A x‖`` over ``span{b, Ab, …, A^{k−1}b}`` per instance, by an orthonormal
    basis of the Krylov matrix and a dense least-squares solve (float64)."""
    cols = [b]
    for _ in range(k - 1):
        cols.append(torch.einsum("bij,bj->bi", A, cols[-1]))
    K, _ = torch.linalg.qr(torch.stack(cols, dim=2))  # (B, n, k)
    AK = A @ K
    c = torch.linalg.lstsq(AK, b.unsqueeze(2)).solution
    return (K @ c).squeeze(2)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_gmres_iterate_is_the_krylov_least_squares_minimiser(k):
    A, b = _system()
    x, info = fp.solvers.gmres(_matvec(A), b, tol=0.0, maxiter=k, restart=12)
    truth = _krylov_minimiser(A, b, k)
    assert ((x - truth).norm(dim=1) / truth.norm(dim=1)).max() < 1e-10
    # the reported residual is the true one of the returned iterate
    true_res = (b - torch.einsum("bij,bj->bi", A, x)).norm(dim=1) / b.norm(dim=1)
    assert torch.allclose(info.residual, true_res, rtol=1e-10, atol=0)


def test_last_row_givens_estimates_equal_the_least_squares_residuals():
    # the residual estimate after each iteration (est₀ · ∏ s) is the minimal residual over
    # the Krylov space of that dimension
    A, b = _system(B=2, n=10, seed=1)
    arn = _Arnoldi(b, 8, None)
    beta = b.norm(dim=1)
    k = arn.cycle(_matvec(A), b, beta, torch.ones_like(beta), 0.0, 8)
    assert k == 8
    est = arn.estimates(k)
    for j in range(1, k + 1):
        xj = _krylov_minimiser(A, b, j)
        rj = (b - torch.einsum("bij,bj->bi", A, xj)).norm(dim=1) / beta
        assert torch.allclose(est[:, j - 1], rj, rtol=1e-9, atol=1e-14), j


def test_per_instance_breakdown_at_different_steps():
    # A = I − low-rank: instance i's Krylov space is invariant after rank_i + 1 vectors, so
    # its columns after that are exactly zero; the others must be unaffected
    g = torch.Generator().manual_seed(2)
    n, ranks = 16, (1, 3, 6)
    A = torch.stack([torch.eye(n, dtype=DT) - 0.4 * torch.randn(n, r, generator=g, dtype=DT)
                     @ torch.randn(r, n, generator=g, dtype=DT) / n for r in ranks])
    b = torch.randn(len(ranks), n, generator=g, dtype=DT)
    x, info = fp.solvers.gmres(_matvec(A), b, tol=1e-13)
    truth = torch.linalg.solve(A, b)
    assert torch.isfinite(x).all()
    assert ((x - truth).norm(dim=1) / truth.norm(dim=1)).max() < 1e-12
    assert bool(info.converged.all())
    assert all(int(i) <= r + 1 for i, r in zip(info.iterations, ranks)), info.iterations


def test_captured_operator_matches_autograd_jacobian():
    g = torch.Generator().manual_seed(3)
    B, n = 4, 7
    W = torch.randn(n, n, generator=g, dtype=DT) / n
    theta = torch.randn(B, n, generator=g, dtype=DT, requires_grad=True)
    x = torch.rand(B, n, generator=g, dtype=DT)

    def step(x, th):
        return torch.tanh(x @ W + th)

    lin = linearize(step, x, theta)
    op = AdjointOperator(lin)
    v = torch.randn(B, n, generator=g, dtype=DT)
    J = torch.autograd.functional.jacobian(lambda z: step(z, theta.detach()), x)  # (B,n,B,n)
    Jd = torch.stack([J[i, :, i, :] for i in range(B)])  # per-instance ∂U/∂x
    truth = v - torch.einsum("bij,bi->bj", Jd, v)
    out = op(v)
    assert torch.allclose(out, truth, rtol=1e-12, atol=1e-14)
    assert torch.equal(out, v - lin.vjp(v))  # the captured path is the general one, bit for bit
    assert op.count == 1


def test_captured_operator_with_phi_zero_and_with_a_tuple_state():
    theta = torch.randn(3, 5, dtype=DT, requires_grad=True)
    x = torch.rand(3, 5, dtype=DT)
    op = AdjointOperator(linearize(lambda x, th: 2.0 * th, x, theta))  # U ignores x: Φ = 0
    v = torch.randn(3, 5, dtype=DT)
    assert torch.equal(op(v), v)
    # a two-part state: Φᵀ of (a, b) ↦ (a·b + θ, a − b) from the closed form
    a0, b0 = torch.rand(3, 2, dtype=DT), torch.rand(3, 2, dtype=DT)
    lin = linearize(lambda s, th: (s[0] * s[1] + th[:, :2], s[0] - s[1]), (a0, b0), theta)
    v = torch.randn(3, 4, dtype=DT)
    va, vb = v[:, :2], v[:, 2:]
    truth = torch.cat([va * b0 + vb, va * a0 - vb], dim=1)
    assert torch.allclose(AdjointOperator(lin)(v), v - truth, rtol=1e-14, atol=1e-15)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not self.paused
        return func(*args, **(kwargs or {}))


def test_gmres_inner_loop_operation_budget():
    # dispatch, not arithmetic, is what a small Krylov iteration costs: count the aten
    # operations (views included) per iteration outside the operator; was 66 before the
    # last-row Givens loop, is 30
    A, b = _system(B=2, n=24)
    counts = {}
    for iters in (6, 16):
        mode = _CountOps()

        def mv(v, mode=mode):
            mode.paused = True
            out = torch.einsum("bij,bj->bi", A, v)
            mode.paused = False
            return out
        with mode:
            fp.solvers.gmres(mv, b, tol=0.0, maxiter=iters, restart=24)
        counts[iters] = mode.n
    per_iteration = (counts[16] - counts[6]) / 10
    assert per_iteration <= 34, per_iteration


def test_preconditioned_breakdown_keeps_the_round_off_floor_finite():
    # instance 0 (A = I − rank 1) breaks down after two iterations while instance 1 goes on:
    # its later basis vectors, preconditioned, are exactly zero; the ‖A‖ bound behind the
    # round-off floor must not become 0/0 there
    g = torch.Generator().manual_seed(4)
    n = 12
    A0 = torch.eye(n, dtype=DT) - 0.5 * torch.outer(torch.randn(n, generator=g, dtype=DT),
                                                    torch.randn(n, generator=g, dtype=DT)) / n
    A1 = torch.eye(n, dtype=DT) - 0.6 * torch.randn(n, n, generator=g, dtype=DT) / n ** 0.5
    A = torch.stack([A0, A1])
    b = torch.randn(2, n, generator=g, dtype=DT)
    # M⁻¹ = 2I keeps A M⁻¹ a rank-one change of a multiple of I
    x, info = fp.solvers.gmres(_matvec(A), b, tol=1e-12, preconditioner=lambda v: 2.0 * v)
    assert torch.isfinite(info.extra["roundoff_floor"]).all(), info.extra["roundoff_floor"]
    assert int(info.iterations[0]) <= 2 < int(info.iterations[1])
    truth = torch.linalg.solve(A, b)
    assert ((x - truth).norm(dim=1) / truth.norm(dim=1)).max() < 1e-10
