"""Shared checks and small float64 problems for the step tests: central finite differences
of a full re-solve, leaves, and each step module's test problem with its closed-form truth."""

from __future__ import annotations

import torch

import fold_plugins as fp
from fold_plugins import projections as PR
from fold_plugins import steps as S

DT = torch.float64
TOL = 1e-6


def _bmv(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched ``Mx`` (``M (B, n, n)`` or ``(n, n)``, ``x (B, n)``)."""
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fd_directional(
    loss_of,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    n_dirs: int = 4,
    h: float = 1e-6,
    sym: tuple[int, ...] = (),
) -> float:
    """Relative error of ⟨∇L, δ⟩ against (L(θ+hδ) − L(θ−hδ))/2h over random directions δ.

    ``loss_of(*params)`` re-solves the problem from scratch (no graph). ``sym``: indices of
    matrix params whose perturbation is symmetrised.
    """
    got, ref = [], []
    for _ in range(n_dirs):
        dirs = []
        for i, p in enumerate(params):
            d = torch.randn_like(p)
            if i in sym:
                d = 0.5 * (d + d.transpose(-1, -2))
            dirs.append(d)
        plus = loss_of(*[p + h * d for p, d in zip(params, dirs)])
        minus = loss_of(*[p - h * d for p, d in zip(params, dirs)])
        ref.append((plus - minus) / (2 * h))
        got.append(sum((g * d).sum() for g, d in zip(grads, dirs)))
    return rel(torch.stack(got), torch.stack(ref))


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _box_qp(B=3, n=8):
    M = torch.randn(B, n, n, dtype=DT)
    P = M @ M.transpose(1, 2) / n + 0.1 * torch.eye(n, dtype=DT)
    q = torch.randn(B, n, dtype=DT)
    lo = -0.4 * torch.ones(n, dtype=DT)
    hi = 0.5 * torch.ones(n, dtype=DT)
    return P, q, lo, hi


def _pg_step(P):
    return S.projected_gradient(
        lambda x, P, q: _bmv(P, x) + q, PR.box, S.quadratic_step_size(P), n_grad_params=2
    )


def _box_truth(P, q, lo, hi, xs):
    """Closed-form active-set solution (masks from xs), differentiable in P, q, lo, hi."""
    low, high = xs <= lo + 1e-12, xs >= hi - 1e-12
    F = ~(low | high)
    xA = torch.where(
        low, lo.expand_as(xs), torch.where(high, hi.expand_as(xs), torch.zeros_like(xs))
    )
    rhs = torch.where(F, -(q + _bmv(P, xA)), torch.zeros_like(xs))
    eye = torch.eye(xs.shape[1], dtype=DT).expand_as(P)
    M = torch.where(F.unsqueeze(2) & F.unsqueeze(1), P, eye)
    xF = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
    return torch.where(F, xF, xA)


def _logreg(x, A, lab, mu):
    z = (A @ x.unsqueeze(-1)).squeeze(-1) * lab
    return torch.nn.functional.softplus(-z).sum(1) + 0.5 * mu * (x * x).sum(1)


def _general_qp(B=2, n=8, me=2, mi=6):
    M = torch.randn(n, n, dtype=DT)
    P = M @ M.T / n + 0.1 * torch.eye(n, dtype=DT)  # shared
    q = torch.randn(B, n, dtype=DT)  # batched
    A = torch.randn(me + mi, n, dtype=DT)
    x0 = torch.randn(n, dtype=DT) * 0.3  # a feasible point
    b = A[:me] @ x0
    l = torch.cat([b, torch.full((mi,), -float("inf"), dtype=DT)])
    u = torch.cat([b, A[me:] @ x0 + 0.1 * torch.rand(mi, dtype=DT)])
    l[me + mi - 1] = A[-1] @ x0 - 0.05  # one two-sided row
    return P, q, A, l, u


def _qp_truth(P, q, A, l, u, y):
    """Active-set KKT solve (masks from the multipliers y), differentiable in P, q, A, l, u."""
    B, n = q.shape
    m = A.shape[0]
    up, lo = y > 1e-9, y < -1e-9
    act = (up | lo).to(DT)
    bval = torch.where(
        up, u.expand(B, m), torch.where(lo, l.expand(B, m), torch.zeros(B, m, dtype=DT))
    )
    K = torch.cat(
        [
            torch.cat([P.expand(B, n, n), A.T.expand(B, n, m)], 2),
            torch.cat([act.unsqueeze(2) * A.expand(B, m, n), torch.diag_embed(act - 1)], 2),
        ],
        1,
    )
    s = torch.linalg.solve(K, torch.cat([-q, act * bval], 1).unsqueeze(-1)).squeeze(-1)
    return s[:, :n]


def _dc3(B=2, n=8, me=3, mi=3):
    Q = torch.diag(torch.rand(n, dtype=DT))
    p = torch.rand(n, dtype=DT)
    A = torch.randn(me, n, dtype=DT)
    G = torch.randn(mi, n, dtype=DT)
    b = torch.randn(B, me, dtype=DT)
    h = (G @ torch.linalg.pinv(A) @ b.T).T.abs() + 0.1
    f = lambda x, Q, p, A, b, G, h: 0.5 * ((x @ Q) * x).sum(1) + (p * torch.sin(x)).sum(1)  # noqa
    g = lambda x, Q, p, A, b, G, h: x @ G.T - h  # noqa: E731
    he = lambda x, Q, p, A, b, G, h: x @ A.T - b  # noqa: E731
    return f, g, he, (Q, p, A, b, G, h)


def _one_iteration_gmres(matvec, b, *, x0=None, tol=1e-10, maxiter=None):
    """A backward solver that gives up after one GMRES iteration (forces non-convergence)."""
    return fp.solvers.gmres(matvec, b, x0=x0, tol=tol, maxiter=1)


def _tv_truth(y, lam, D, u):
    """Dual active-set solution (masks and signs from u), x = y − Dᵀu; differentiable."""
    B, m = u.shape
    lm = lam.reshape(B, 1).expand(B, m)
    act = u.abs() >= lm * (1 - 1e-9)
    G = D @ D.T
    M = torch.where(act.unsqueeze(2), torch.eye(m, dtype=DT).expand(B, m, m), G.expand(B, m, m))
    rhs = torch.where(act, torch.sign(u) * lm, y @ D.T)
    uu = torch.linalg.solve(M, rhs.unsqueeze(-1)).squeeze(-1)
    return y - uu @ D
