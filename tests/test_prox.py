"""Prox operators (fold_plugins.prox) and the proximal-gradient step.

Truths: the prox values against cvxpy's argmin; their Jacobians against central finite
differences; folded LASSO / elastic-net / group-lasso / non-negative-LASSO gradients against
cvxpylayers (SCS at 1e-12, dense derivative) with a cvxpy (Clarabel) forward, against the
LASSO's closed form on the support, and against finite differences of the whole solve.
Measured worst relative VJP errors vs cvxpylayers: 2.8e-13 (LASSO) .. 7.5e-12 (elastic net),
asserted ≤ 1e-7; vs central differences 1.6e-9.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fold_plugins as fp
from fold_plugins import FoldConvergenceWarning, FoldError
from fold_plugins.prox import elastic_net, group_lasso, nonnegative_l1, soft_threshold
from fold_plugins.verify import assert_gradients_close

F64 = torch.float64
GROUPS = [3, 2, 4]  # n = 9


def _prox_cases():
    """name -> (torch prox(x, lam) at scaling s, cvxpy regulariser g(z, lam) ⋅ s)."""
    s = 0.7
    return {
        "soft_threshold": (lambda x, lam: soft_threshold(x, lam, scaling=s),
                           lambda cp, z, lam: s * lam * cp.norm1(z)),
        "nonnegative_l1": (lambda x, lam: nonnegative_l1(x, lam, scaling=s),
                           lambda cp, z, lam: s * lam * cp.norm1(z), "nonneg"),
        "elastic_net": (lambda x, lam: elastic_net(x, lam, 2 * lam, scaling=s),
                        lambda cp, z, lam: s * (lam * cp.norm1(z) + lam * cp.sum_squares(z))),
        "group_lasso": (lambda x, lam: group_lasso(x, lam, GROUPS, scaling=s),
                        lambda cp, z, lam: s * lam * sum(cp.norm(z[a:b], 2) for a, b in
                                                         ((0, 3), (3, 5), (5, 9)))),
    }


@pytest.mark.parametrize("name", list(_prox_cases()))
def test_prox_is_the_argmin_and_its_jacobian_matches_finite_differences(name):
    cp = pytest.importorskip("cvxpy")
    case = _prox_cases()[name]
    op, reg = case[0], case[1]
    x = 1.5 * torch.randn(4, 9, dtype=F64)
    x[3, :3] *= 0.05  # a small first group: zeroed by every operator
    lam = torch.tensor([0.3, 0.8, 1.2, 0.5], dtype=F64).unsqueeze(-1)
    out = op(x, lam)
    for i in range(4):
        z = cp.Variable(9, nonneg=len(case) > 2)
        cp.Problem(cp.Minimize(reg(cp, z, float(lam[i])) + 0.5 * cp.sum_squares(z - x[i].numpy()))
                   ).solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12,
                           tol_feas=1e-12)
        assert torch.allclose(out[i], torch.from_numpy(z.value), atol=1e-7), (i, out[i], z.value)
    # sparsity is exact, not approximate (the zero piece), and nothing sits on a kink here
    assert bool((out == 0).any())
    assert_gradients_close(op, "finite_differences", (x, lam), rtol=1e-7, n_directions=2)


def test_kink_convention_and_closed_forms():
    lam = torch.tensor(1.0, dtype=F64, requires_grad=True)
    x = torch.tensor([[-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]], dtype=F64, requires_grad=True)
    y = soft_threshold(x, lam)
    assert y.tolist() == [[-1.0, 0.0, 0.0, 0.0, 0.0, 2.0]]
    gx, gl = torch.autograd.grad(y.sum(), (x, lam))
    assert gx.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]]  # zero piece at |x| = λ
    assert float(gl) == 0.0  # −(+1) − (−1): the two active coordinates cancel
    e = elastic_net(x, 1.0, 3.0)
    assert torch.allclose(e, y / 4)
    g = group_lasso(torch.tensor([[3.0, 4.0, 0.0, 0.0]], dtype=F64), 2.5,
                    torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(g, torch.tensor([[1.5, 2.0, 0.0, 0.0]], dtype=F64))  # (1 − 2.5/5)·x
    # one weight per group (G,), groups given as non-contiguous ids
    xg = torch.tensor([[3.0, 1.0, 4.0, 2.0]], dtype=F64, requires_grad=True)
    wg = torch.tensor([2.5, 1.0], dtype=F64, requires_grad=True)
    out = group_lasso(xg, wg, torch.tensor([0, 1, 0, 1]))
    n0, n1 = 5.0, 5.0 ** 0.5  # ‖(3, 4)‖, ‖(1, 2)‖
    want = torch.tensor([[3 * (1 - 2.5 / n0), 1 * (1 - 1 / n1), 4 * (1 - 2.5 / n0),
                          2 * (1 - 1 / n1)]], dtype=F64)
    assert torch.allclose(out, want)
    (gw,) = torch.autograd.grad(out.sum(), wg)
    assert torch.allclose(gw, torch.tensor([-(3 + 4) / n0, -(1 + 2) / n1], dtype=F64))
    # group of zeros: no NaN in value or gradient
    z = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    (gz,) = torch.autograd.grad(group_lasso(z, 0.1, [2, 2]).sum(), z)
    assert torch.isfinite(gz).all() and float(gz.abs().max()) == 0.0


def test_dtype_device_and_errors():
    x32 = torch.randn(2, 5)
    for out in (soft_threshold(x32, 0.1), nonnegative_l1(x32, 0.1), elastic_net(x32, 0.1, 0.2),
                group_lasso(x32, 0.1, [2, 3])):
        assert out.dtype == torch.float32 and out.device == x32.device
    with pytest.raises(FoldError, match="lam must be ≥ 0"):
        soft_threshold(x32, -0.1)
    with pytest.raises(FoldError, match=r"sum to the vector length 5 \(they sum to 4\)"):
        group_lasso(x32, 0.1, [2, 2])
    with pytest.raises(FoldError, match="every id used"):
        group_lasso(x32, 0.1, torch.tensor([0, 0, 2, 2, 2]))
    with pytest.raises(FoldError, match="not broadcastable"):
        soft_threshold(x32, torch.ones(3))
    with pytest.raises(FoldError, match="must accept the keyword scaling"):
        fp.steps.proximal_gradient(lambda x: x, lambda y, lam: y, 0.1)
    with pytest.raises(FoldError, match="prox must be callable"):
        fp.steps.proximal_gradient(lambda x: x, None, 0.1)


# ----------------------------------------------------------------------------- folded problems

M_ROWS, N, B = 15, 9, 3


def _data(rows: int = M_ROWS):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(rows, N, generator=g, dtype=F64) / rows ** 0.5
    b = torch.randn(B, rows, generator=g, dtype=F64)
    return A, b


def _problems(cp):
    """name -> (cvxpy regulariser(z, lam), torch prox(y, lam, scaling), λ per instance)."""
    return {
        "lasso": (lambda z, lam: lam * cp.norm1(z),
                  lambda y, lam, scaling: soft_threshold(y, lam, scaling=scaling),
                  (0.1, 0.3, 0.05)),
        "elastic_net": (lambda z, lam: lam * cp.norm1(z) + 0.5 * lam * cp.sum_squares(z),
                        lambda y, lam, scaling: elastic_net(y, lam, lam, scaling=scaling),
                        (0.1, 0.3, 0.2)),
        "group_lasso": (lambda z, lam: lam * sum(cp.norm(z[a:b], 2) for a, b in
                                                 ((0, 3), (3, 5), (5, 9))),
                        lambda y, lam, scaling: group_lasso(y, lam, GROUPS, scaling=scaling),
                        (0.2, 0.6, 0.3)),
        "nonnegative_lasso": (lambda z, lam: lam * cp.norm1(z),
                              lambda y, lam, scaling: nonnegative_l1(y, lam, scaling=scaling),
                              (0.05, 0.1, 0.02)),
    }


@pytest.mark.parametrize("name", ["lasso", "elastic_net", "group_lasso", "nonnegative_lasso"])
def test_folded_proximal_gradient_matches_cvxpylayers(name):
    cp = pytest.importorskip("cvxpy")
    pytest.importorskip("cvxpylayers")
    from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference

    reg, prox, lams = _problems(cp)[name]
    A0, b0 = _data()
    lam0 = torch.tensor(lams, dtype=F64)
    z = cp.Variable(N, nonneg=name == "nonnegative_lasso")
    Ap, bp, lp = cp.Parameter((M_ROWS, N)), cp.Parameter(M_ROWS), cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Ap @ z - bp) + reg(z, lp)))
    reference = cvxpylayers_reference(problem, [Ap, bp, lp], [z])
    alpha = 1.0 / float(torch.linalg.matrix_norm(A0, 2) ** 2)
    step = fp.steps.proximal_gradient(lambda x, A, b: (x @ A.T - b) @ A, prox, alpha,
                                      n_grad_params=2)

    def folded(A, b, lam):
        xs = []
        for i in range(b.shape[0]):  # the forward: cvxpy with Clarabel, one instance at a time
            Ap.value, bp.value = A.detach().numpy(), b[i].detach().numpy()
            lp.value = float(lam[i].detach())
            with warnings.catch_warnings():  # Clarabel on the group lasso: "may be inaccurate"
                warnings.simplefilter("ignore", UserWarning)
                problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12,
                              tol_feas=1e-12)
            xs.append(torch.from_numpy(z.value))
        # Clarabel stops near 1e-9 (1e-7 on the group lasso's cones): polish with the step
        params = (A.detach(), b.detach(), lam.detach().unsqueeze(-1))
        x, _ = fp.steps.iterate(step, torch.stack(xs), *params, tol=1e-15, maxiter=20_000)
        return fp.fold(step, x, A, b, lam.unsqueeze(-1), tol=1e-12)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FoldConvergenceWarning)
        report = assert_gradients_close(folded, lambda A, b, lam: reference(A, b, lam)[0],
                                        (A0, b0, lam0), rtol=1e-7, value_rtol=1e-8,
                                        n_directions=2, names=("A", "b", "lam"),
                                        name="cvxpylayers (SCS)")
    assert report.reference == "cvxpylayers (SCS)"
    assert "vs cvxpylayers (SCS)" in str(report)
    x = folded(A0, b0, lam0).detach()
    active = step(x, A0, b0, lam0.unsqueeze(-1)) == 0  # the step zeroes these exactly
    assert bool(active.any()) and bool((~active).any())  # sparse, not trivially zero


def test_folded_lasso_matches_closed_form_and_finite_differences():
    A, b0 = _data(40)  # well conditioned (κ(AᵀA) ≈ 8): ISTA reaches 1e-14 in ~200 steps
    lam = 0.1
    alpha = 1.0 / float(torch.linalg.matrix_norm(A, 2) ** 2)
    step = fp.steps.proximal_gradient(lambda x, b: (x @ A.T - b) @ A,
                                      lambda y, scaling: soft_threshold(y, lam, scaling=scaling),
                                      alpha)

    base = {}

    def folded(b):  # the library's own forward: ISTA to 1e-14 (warm-started), then fold
        x0 = base.get("x", b.new_zeros(b.shape[0], N))
        x, info = fp.steps.iterate(step, x0, b.detach(), tol=1e-14, maxiter=100_000)
        base.setdefault("x", x)
        assert bool(info.converged.all())
        return fp.fold(step, x, b, tol=1e-13)

    b = b0.clone().requires_grad_(True)
    w = torch.randn(B, N, dtype=F64)
    x = folded(b)
    (g,) = torch.autograd.grad((w * x).sum(), b)
    for i in range(B):  # on the support S: x_S = (A_Sᵀ A_S)⁻¹ (A_Sᵀ b − λ sign(x_S))
        S = x[i].detach() != 0
        AS = A[:, S]
        expected = AS @ torch.linalg.solve(AS.T @ AS, w[i, S])
        assert torch.allclose(g[i], expected, rtol=1e-9, atol=1e-11), i
    # x*(b) is piecewise linear: central differences with a step far below the smallest
    # margin of the active set are exact up to the forward's own error
    base.clear()
    assert_gradients_close(folded, "finite_differences", (b0[:1],), rtol=1e-7, eps=1e-4,
                           n_directions=1)
