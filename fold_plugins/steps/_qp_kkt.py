"""KKT pieces of the QP layer: solution info, residuals, the active-set guess and OSQP-style
polishing (an active-set KKT solve) used by :func:`fold_plugins.steps.solve_qp_admm`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._batched import ShapeError, bmtv, bmv, check_matrix, check_vector
from .._errors import FoldError

INF = 1e20


def _amax(t: Tensor) -> Tensor:
    """Row-wise ``max |t|`` of a ``(B, k)`` tensor, 0 when ``k = 0``."""
    return t.abs().amax(dim=1) if t.shape[1] else t.new_zeros(t.shape[0])


@dataclass
class QPInfo:
    """Per-instance outcome of :func:`solve_qp_admm`.

    Attributes:
        status: list of ``"solved"``, ``"primal_infeasible"``, ``"dual_infeasible"``,
            ``"max_iter"`` per instance.
        iterations: ``(B,)`` ADMM iterations.
        primal_residual: ``(B,)`` ``‖Ax − z‖∞``; dual_residual: ``(B,)`` ``‖Px + q + Aᵀy‖∞``.
        converged: ``(B,)`` bool (status ``"solved"``).
        polished: ``(B,)`` bool, the returned point came from the active-set KKT solve.
        rho: ``(B, 1)`` final scalar ρ per instance (pass to :func:`admm_qp`).
    """

    status: list[str]
    iterations: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    converged: Tensor
    polished: Tensor
    rho: Tensor
    extra: dict = field(default_factory=dict)


def _expand(t: Tensor, B: int, d: int) -> Tensor:
    return t.expand(B, *t.shape) if t.dim() == d else t


def qp_kkt_residual(P: Tensor, q: Tensor, A: Tensor, l: Tensor, u: Tensor, x: Tensor,
                    y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(B,)`` ∞-norm residuals of ``x, y``: stationarity ``‖Px+q+Aᵀy‖``, feasibility
    ``‖Ax − Π_[l,u](Ax)‖`` and complementarity/sign ``‖y − Π_{N(Ax)}‖``-style violation."""
    Ax = bmv(A, x)
    stat = (bmv(P, x) + q + bmtv(A, y)).abs().amax(dim=1)
    feas = (Ax - torch.minimum(torch.maximum(Ax, l), u)).abs().amax(dim=1) if A.shape[-2] else \
        x.new_zeros(x.shape[0])
    # y_i > 0 needs Ax_i = u_i, y_i < 0 needs Ax_i = l_i
    lo_f = torch.where(l > -INF, l, torch.full_like(l, -INF))
    up_f = torch.where(u < INF, u, torch.full_like(u, INF))
    comp = torch.maximum(y.clamp_min(0) * (up_f - Ax).clamp_min(0).clamp_max(INF),
                         (-y).clamp_min(0) * (Ax - lo_f).clamp_min(0).clamp_max(INF))
    comp = comp.amax(dim=1) if A.shape[-2] else x.new_zeros(x.shape[0])
    return stat, feas, comp


def _active_guess(z: Tensor, y: Tensor, l: Tensor, u: Tensor,
                  R: Tensor) -> tuple[Tensor, Tensor]:
    """OSQP's active-set guess from an ADMM iterate: ``(upper, lower)`` bool ``(B, m)``."""
    upper = (u - z < y / R) & (u < INF)
    lower = (z - l < -y / R) & (l > -INF) & ~upper
    return upper, lower


def _polish(P: Tensor, q: Tensor, A: Tensor, l: Tensor, u: Tensor, upper: Tensor,
            lower: Tensor, delta: float = 1e-10, refine: int = 4
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Active-set KKT solve (OSQP's polishing) for batched ``(B, ·)`` data and guessed active
    sets. Returns ``(x, z, y, ok)``, ``ok`` marking instances whose solution is
    sign-consistent."""
    B, n = q.shape
    act = (upper | lower)
    bval = torch.where(upper, u, torch.where(lower, l, torch.zeros_like(l)))
    Pb, Ab = _expand(P, B, 2), _expand(A, B, 2)
    D = act.to(q.dtype)
    top = torch.cat([Pb, Ab.transpose(1, 2)], dim=2)
    bot = torch.cat([D.unsqueeze(-1) * Ab, torch.diag_embed(-(1 - D))], dim=2)
    M = torch.cat([top, bot], dim=1)
    reg = torch.cat([torch.full((B, n), delta, dtype=q.dtype, device=q.device), -delta * D], 1)
    Mr = M + torch.diag_embed(reg)
    rhs = torch.cat([-_expand(q, B, 1), D * bval], dim=1)
    LU, piv, info = torch.linalg.lu_factor_ex(Mr)
    s = torch.linalg.lu_solve(LU, piv, rhs.unsqueeze(-1)).squeeze(-1)
    for _ in range(refine):
        r = rhs - (M @ s.unsqueeze(-1)).squeeze(-1)
        s = s + torch.linalg.lu_solve(LU, piv, r.unsqueeze(-1)).squeeze(-1)
    xp, yp = s[:, :n], s[:, n:]
    yp = torch.where(act, yp, torch.zeros_like(yp))
    ok = (info == 0) & torch.isfinite(s).all(dim=1)
    tol_sign = 1e-12 * (1 + _amax(yp).unsqueeze(1))
    ok &= ~((upper & (yp < -tol_sign)) | (lower & (yp > tol_sign))).any(dim=1)
    zp = torch.minimum(torch.maximum(bmv(A, xp), l), u)
    return xp, zp, yp, ok


def _check_finite_data(P, q, A, where: str) -> None:
    for name, t in (("P", P), ("q", q), ("A", A)):
        if not bool(torch.isfinite(t).all()):
            raise FoldError(f"{where}: {name} contains NaN/Inf (shape {tuple(t.shape)}).")


def _qp_shapes(P: Tensor, q: Tensor, A: Tensor, l: Tensor, u: Tensor, B: int | None,
               where: str) -> tuple[int, int, int]:
    """Validate shapes; return ``(B, n, m)``. ``B=None``: infer from batched params (else 1)."""
    for name, t in (("P", P), ("q", q), ("A", A), ("l", l), ("u", u)):
        if not isinstance(t, Tensor):
            raise FoldError(f"{where}: {name} must be a Tensor, got {type(t).__name__}.")
    if q.dim() not in (1, 2):
        raise ShapeError(f"{where}: q has shape {tuple(q.shape)}, expected (n,) or (B, n).")
    n = q.shape[-1]
    if A.dim() not in (2, 3):
        raise ShapeError(f"{where}: A has shape {tuple(A.shape)}, expected (m, {n}) or "
                         f"(B, m, {n}).")
    m = A.shape[-2]
    if B is None:
        cands = [t.shape[0] for t, d in ((P, 3), (q, 2), (A, 3), (l, 2), (u, 2)) if t.dim() == d]
        B = cands[0] if cands else 1
    check_matrix(P, "P", B, n, n, where)
    check_vector(q, "q", B, n, where)
    check_matrix(A, "A", B, m, n, where)
    check_vector(l, "l", B, m, where)
    check_vector(u, "u", B, m, where)
    return B, n, m


def _rho_vector(l: Tensor, u: Tensor, rho: Tensor | float, rho_eq_scale: float,
                rho_min: float = 1e-6) -> Tensor:
    """Per-row ρ (detached): ``ρ·rho_eq_scale`` on equalities, ``rho_min`` on free rows."""
    with torch.no_grad():
        r = torch.as_tensor(rho, dtype=l.dtype, device=l.device)
        eq = (u - l).abs() <= 1e-12 * (1 + u.abs())
        free = (l <= -INF) & (u >= INF)
        base = r * torch.ones_like(l)
        low = torch.full_like(base, rho_min)
        return torch.where(eq, base * rho_eq_scale, torch.where(free, low, base))
