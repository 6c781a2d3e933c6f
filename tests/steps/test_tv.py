"""TV denoising by FDPG (fold_plugins/steps/tv.py): learnable D and λ against the closed form,
the λ shape convention."""

from __future__ import annotations

import pytest
import torch
from step_checks import DT, TOL, _tv_truth, fd_directional, leaves, rel

import fold_plugins as fp
from fold_plugins import steps as S


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
    print(
        f"[measured] fdpg_tv: rel err vs KKT {err_kkt:.1e}, vs FD {err_fd:.1e}, ρ(Φ) "
        f"{float(rho.max()):.4f}, forward iters {info.iterations.tolist()}"
    )
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
    per_instance = torch.tensor([[0.3], [0.6], [0.1], [0.9]], dtype=DT)  # (B, 1)
    per_row = torch.tensor([[0.1, 0.5, 0.2, 0.8]], dtype=DT)  # (1, m)
    with pytest.raises(
        S.ShapeError,
        match=r"lam has shape \(4,\) and B = m = 4.*per instance"
        r".*per row of D.*\(4, 1\).*\(1, 4\)",
    ):
        S.solve_tv(y, per_instance.reshape(-1), D)
    with pytest.raises(S.ShapeError, match="B = m = 4"):
        S.fdpg_tv()(torch.zeros(B, 4, dtype=DT), y, per_row.reshape(-1), D)

    def cvx(lam_rows: torch.Tensor) -> torch.Tensor:  # lam_rows (B, m)
        out = []
        for b in range(B):
            x = cp.Variable(n)
            cp.Problem(
                cp.Minimize(
                    0.5 * cp.sum_squares(x - y[b].numpy())
                    + cp.sum(cp.multiply(lam_rows[b].numpy(), cp.abs(D.numpy() @ x)))
                )
            ).solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
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
    print(
        "[measured] TV λ conventions (B = m): value vs cvxpy / λ-grad vs FD: per instance "
        f"{errs[0][0]:.1e} / {errs[0][1]:.1e}, per row {errs[1][0]:.1e} / {errs[1][1]:.1e}; "
        f"the two readings differ by {gap:.2f}"
    )
    assert gap > 1e-2  # two different problems: the shape decides, unambiguously
