"""fp.diagnostics against closed forms: linear steps U(x) = A x + b, whose Φ = A is known."""

from __future__ import annotations

import math

import pytest
import torch

import fold_plugins as fp
from fold_plugins.diagnostics import (
    fixed_point_residual,
    predicted_unroll_error,
    spectral_radius,
    unroll_iterations_needed,
    unrolling_report,
)

DT = torch.float64


def linear_step(A):
    """Batched U(x, b) = A_b x + b, so Φ = A_b for each instance."""
    def step(x, b):
        return torch.einsum("bij,bj->bi", A, x) + b
    return step


def test_matrices(n=8, seed=0):
    """Three Φ: symmetric real (ρ = 0.8), dominant complex pair 0.9·e^{±0.7i} (non-normal),
    dominant ± pair (0.9, −0.9)."""
    g = torch.Generator().manual_seed(seed)
    A1 = torch.randn(n, n, generator=g, dtype=DT)
    A1 = A1 + A1.T
    A1 = 0.8 * A1 / torch.linalg.eigvalsh(A1).abs().max()
    blk = torch.zeros(n, n, dtype=DT)
    r, t = 0.9, 0.7
    blk[:2, :2] = r * torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]],
                                   dtype=DT)
    blk[2:, 2:] = torch.diag(torch.tensor([0.5, -0.4, 0.3, 0.2, -0.1, 0.05], dtype=DT))
    Q = torch.randn(n, n, generator=g, dtype=DT)
    A2 = Q @ blk @ torch.linalg.inv(Q)
    D = torch.diag(torch.tensor([0.9, -0.9, 0.5, 0.3, -0.2, 0.1, 0.05, 0.01], dtype=DT))
    Q = torch.randn(n, n, generator=g, dtype=DT)
    A3 = Q @ D @ torch.linalg.inv(Q)
    return torch.stack([A1, A2, A3])


test_matrices.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("method,tol", [("arnoldi", 1e-10), ("power", 1e-6)])
def test_spectral_radius_matches_eigvals(method, tol):
    A = test_matrices()
    truth = torch.linalg.eigvals(A).abs().max(dim=1).values
    assert torch.allclose(truth, torch.tensor([0.8, 0.9, 0.9], dtype=DT), atol=1e-12)
    b = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=DT)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), dtype=DT)
    rho = spectral_radius(linear_step(A), x, b, method=method)
    assert rho.dtype == DT and rho.shape == (3,)
    assert float((rho - truth).abs().max()) < tol


@pytest.mark.parametrize("method,tol", [("arnoldi", 1e-10), ("power", 1e-6)])
def test_spectral_radius_low_rank_phi(method, tol):
    """Φ of rank 3 in n = 20 (like a projection step with many active bounds): the Krylov
    space is invariant after 4 vectors and Arnoldi must stop there, not normalise round-off."""
    g = torch.Generator().manual_seed(4)
    U_, V_ = torch.randn(2, 2, 20, 3, generator=g, dtype=DT)  # two instances
    A = U_ @ V_.transpose(1, 2)
    A = 0.7 * A / torch.linalg.eigvals(A).abs().max(dim=1).values[:, None, None]
    truth = torch.linalg.eigvals(A).abs().max(dim=1).values
    assert int(torch.linalg.matrix_rank(A[0])) == 3
    x = torch.zeros(2, 20, dtype=DT)
    rho = spectral_radius(linear_step(A), x, torch.zeros_like(x), method=method)
    assert float((rho - truth).abs().max()) < tol


def test_spectral_radius_unbatched_and_zero():
    A = test_matrices()[1]
    rho = spectral_radius(lambda x: A @ x, torch.zeros(8, dtype=DT), batched=False)
    assert rho.shape == (1,) and abs(float(rho) - 0.9) < 1e-10
    z = spectral_radius(lambda x: 0 * x, torch.zeros(1, 5, dtype=DT))
    assert float(z) == 0.0
    with pytest.raises(fp.FoldError, match="method"):
        spectral_radius(lambda x: x, torch.zeros(1, 5, dtype=DT), method="qr")


def test_unroll_iterations_needed_closed_form():
    assert unroll_iterations_needed(0.5, 1e-3) == 10  # 0.5^10 = 9.8e-4 ≤ 1e-3 < 0.5^9
    assert unroll_iterations_needed(0.9, 1e-6) == 132  # ⌈ln 1e-6 / ln 0.9⌉ = ⌈131.1⌉
    assert math.isinf(unroll_iterations_needed(1.0, 1e-3))
    assert unroll_iterations_needed(0.0, 1e-3) == 0
    rhos = torch.tensor([0.1, 0.5, 0.9, 0.99, 0.999, 1.2, 0.0], dtype=DT)
    for acc in (1e-2, 1e-6, 1e-10):
        K = unroll_iterations_needed(rhos, acc)
        for r, k in zip(rhos.tolist(), K.tolist()):
            if r >= 1:
                assert math.isinf(k)
            elif r == 0:
                assert k == 0
            else:  # the smallest K with ρ^K ≤ acc (up to one ulp of the logs)
                assert k == unroll_iterations_needed(r, acc)
                assert r ** k <= acc * (1 + 1e-12) and r ** (k - 1) > acc * (1 - 1e-12)
    with pytest.raises(fp.FoldError, match="accuracy"):
        unroll_iterations_needed(0.5, 1.5)


def test_predicted_unroll_error_is_measured_error_of_unrolling():
    """Unrolling K steps of U(x) = Ax + b from x* gives v_K = Σ_{i<K}(Aᵀ)^i g, with error
    (Aᵀ)^K v*. For symmetric A and v* the top eigenvector it is exactly ρ^K·‖v*‖."""
    A = test_matrices()[:1]
    evals, evecs = torch.linalg.eigh(A[0])
    top = evecs[:, evals.abs().argmax()]
    g = (1 - evals[evals.abs().argmax()]) * top  # then v* = (I − Aᵀ)⁻¹ g = top
    b = torch.randn(1, 8, generator=torch.Generator().manual_seed(3), dtype=DT,
                    requires_grad=True)
    x_star = torch.linalg.solve(torch.eye(8, dtype=DT) - A[0], b[0].detach())[None]
    rho = float(spectral_radius(linear_step(A), x_star, b))
    for K in (1, 5, 20):
        x = x_star
        for _ in range(K):
            x = linear_step(A)(x, b)
        (gb,) = torch.autograd.grad((x * g).sum(), b)  # = Ψᵀ v_K with Ψ = I
        err = float((gb[0] - top).norm() / top.norm())
        assert abs(err - predicted_unroll_error(rho, K)) < 1e-12
        assert abs(err - 0.8 ** K) < 1e-12
    t = predicted_unroll_error(torch.tensor([0.5, 0.9], dtype=DT), 3)
    assert torch.allclose(t, torch.tensor([0.125, 0.729], dtype=DT), atol=0, rtol=1e-15)


def test_fixed_point_residual_value():
    A = test_matrices()
    b = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=DT)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(6), dtype=DT)
    d = torch.einsum("bij,bj->bi", A, x) + b - x
    res = fixed_point_residual(linear_step(A), x, b)
    assert torch.allclose(res, d.norm(dim=1) / (1 + x.norm(dim=1)), atol=0, rtol=1e-14)
    res_abs = fixed_point_residual(linear_step(A), x, b, relative=False)
    assert torch.allclose(res_abs, d.norm(dim=1), atol=0, rtol=1e-14)
    # at the exact fixed point x* = (I − A)⁻¹ b it vanishes to round-off
    xs = torch.linalg.solve(torch.eye(8, dtype=DT) - A, b)
    assert float(fixed_point_residual(linear_step(A), xs, b).max()) < 1e-14
    # a tuple state is one vector per instance: (x, y) ↦ (Ax + b, y/2), y* = 0
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(7), dtype=DT)

    def tstep(s, b):
        return linear_step(A)(s[0], b), s[1] / 2

    full = torch.cat([d, -y / 2], dim=1)
    res_t = fixed_point_residual(tstep, (x, y), b)
    expected = full.norm(dim=1) / (1 + torch.cat([x, y], dim=1).norm(dim=1))
    assert torch.allclose(res_t, expected, atol=0, rtol=1e-14)


def test_unrolling_report_numbers():
    A = test_matrices()[:2]
    b = torch.zeros(2, 8, dtype=DT)
    text = unrolling_report(linear_step(A), torch.zeros(2, 8, dtype=DT), b,
                            accuracies=(1e-4,))
    assert "max 0.9000" in text and "min 0.8000" in text
    # the worst instance (ρ = 0.9) sets K: ⌈ln 1e-4 / ln 0.9⌉ = 88
    assert "gradient error 1e-04: 88" in text


def test_unit_eigenvalue_is_a_gauge_and_1_minus_1e7_is_not():
    """Issue 9 item 6: Φ with eigenvalues {1, 1 − 1e-7, …} known by construction."""
    g = torch.Generator().manual_seed(4)
    B, n = 3, 10
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64))
    lam = torch.rand(B, n, generator=g, dtype=torch.float64) * 1.2 - 0.6
    lam[0, 0] = 1.0  # a gauge: Φ e = e
    lam[1, 0] = 1 - 1e-7  # slow but isolated
    lam[2, :2] = torch.tensor([1.0, 1.0], dtype=torch.float64)  # two gauge directions
    Phi = (Q * lam[:, None, :]) @ Q.mT

    def step(x, t):
        return (Phi @ x.unsqueeze(-1)).squeeze(-1) + t

    xs = torch.zeros(B, n, dtype=torch.float64)
    count, rest = fp.diagnostics.unit_eigenvalues(step, xs, torch.zeros(B, n, dtype=torch.float64))
    # a repeated eigenvalue shows once in a Krylov space: the count is ≥ 1, not its multiplicity
    assert count[0] == 1 and count[1] == 0 and count[2] >= 1
    lam_abs = lam.abs()
    expected = torch.stack([lam_abs[0, 1:].max(), lam_abs[1].max(), lam_abs[2, 2:].max()])
    assert torch.allclose(rest, expected, atol=1e-12)
    text = unrolling_report(step, xs, torch.zeros(B, n, dtype=torch.float64))
    assert "not isolated" in text and "[0, 2] of 3" in text
