"""The exact ``(I − Φ)⁻ᵀ`` of the ADMM-QP step at its fixed point (eq. (P1)).

Public as :func:`fold_plugins.preconditioners.admm_qp`; it lives beside the step's KKT code
(:mod:`._qp_kkt`), whose shape checks and penalty vector it shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import FoldError
from .._kinks import clip_free
from .._preconditioner_base import Preconditioner
from ._qp_kkt import _qp_shapes, _rho_vector

__all__ = ["admm_qp"]


def admm_qp(state: tuple[Tensor, Tensor, Tensor], P: Tensor, q: Tensor, A: Tensor, l: Tensor,
            u: Tensor, *, rho: float | Tensor = 0.1, sigma: float = 1e-6, alpha: float = 1.6,
            rho_eq_scale: float = 1e3) -> Preconditioner:
    """The exact ``(I − Φ)⁻ᵀ`` of :func:`fold_plugins.steps.admm_qp` at its fixed point.

    Pass the step's own settings (``rho`` as given to the step, e.g. ``QPInfo.rho``). With
    ``R = diag(ρ)``, ``D`` the projection's derivative at ``z + R⁻¹y`` (1 on free rows, 0 on
    active ones, the step's own kink convention) and ``a = 1 − D``, solving
    ``(I − Φ)(dx, dz, dy) = (r_x, r_z, r_y)`` reduces to the KKT system of the active set::

        c = (r_z + r_y/ρ)/α,   h = −(r_y/ρ + (1−α) r_z)/α
        [ P    Aᵀa ] [ x̃ ]   [ σ r_x/α + Aᵀ(D(ρc − r_y) + aρ(r_z − h)) ]
        [ aA  I − a] [ μ  ] = [ a h                                       ]        (P1)
        dx = x̃ + r_x/α,   dz = D(Ax̃ + c) + a r_z,   dy = D r_y + a μ

    (the rows of an inactive constraint are identity rows, so every instance has the same
    size ``n + m``). The preconditioner applies the transpose of this map, with one LU of the
    symmetric KKT matrix per instance made here. Where the KKT matrix is singular (``P`` not
    positive definite on the active rows' null space: the solution is not unique) that
    instance gets the identity, and the solver's own verdict speaks.

    Args:
        state: the fixed point ``(x (B, n), z (B, m), y (B, m))``.
        P, q, A, l, u: the QP data as given to the step (shared or batched).

    Returns:
        ``(B, n + 2m) -> (B, n + 2m)``.
    """
    x, z, y = (t.detach() for t in state)
    B, n, m = x.shape[0], x.shape[-1], z.shape[-1]
    _qp_shapes(P, q, A, l, u, B, "preconditioners.admm_qp")
    if not (0 < alpha < 2):
        raise FoldError(f"preconditioners.admm_qp: alpha must lie in (0, 2), got {alpha!r}.")
    dt, dev = x.dtype, x.device
    P, A, l, u = (t.detach().to(dt) for t in (P, A, l, u))
    Ps = 0.5 * (P + P.transpose(-1, -2)).expand(B, n, n)
    Ab = A.expand(B, m, n)
    lb, ub = l.expand(B, m), u.expand(B, m)
    R = _rho_vector(lb, ub, torch.as_tensor(rho, dtype=dt, device=dev).detach(),
                    rho_eq_scale).expand(B, m)
    with torch.enable_grad():  # the step's projection derivative, by its own rule
        v = (z + y / R).requires_grad_(True)
        (D,) = torch.autograd.grad(clip_free(v, lb, ub).sum(), v)
    a = 1 - D
    K = torch.zeros(B, n + m, n + m, dtype=dt, device=dev)
    K[:, :n, :n] = Ps
    K[:, :n, n:] = Ab.transpose(1, 2) * a.unsqueeze(1)
    K[:, n:, :n] = Ab * a.unsqueeze(2)
    K[:, n:, n:] = torch.diag_embed(D)
    LU, piv, status = torch.linalg.lu_factor_ex(K)
    ok = status == 0
    all_ok = bool(ok.all())
    if not all_ok:
        eye = torch.eye(n + m, dtype=dt, device=dev).expand(B, -1, -1)
        LU, piv, _ = torch.linalg.lu_factor_ex(torch.where(ok[:, None, None], K, eye))

    def apply(g: Tensor) -> Tensor:
        """Transpose of (P1): cotangents of ``(r_x, r_z, r_y)`` from those of
        ``(dx, dz, dy)``."""
        gx, gz, gy = g[:, :n], g[:, n:n + m], g[:, n + m:]
        # dx = x̃ + r_x/α, dz = D(Ax̃ + c) + a r_z, dy = D r_y + a μ
        bx = gx + (Ab.transpose(1, 2) @ (D * gz).unsqueeze(2)).squeeze(2)
        bc = D * gz
        rx, rz, ry = gx / alpha, a * gz, D * gy
        sol = torch.linalg.lu_solve(LU, piv, torch.cat([bx, a * gy], dim=1).unsqueeze(2),
                                    adjoint=True).squeeze(2)
        bs, bt = sol[:, :n], sol[:, n:]
        # s = σ r_x/α + Aᵀ(D(ρc − r_y) + aρ(r_z − h)),  t = a h
        rx = rx + sigma * bs / alpha
        e = (Ab @ bs.unsqueeze(2)).squeeze(2)
        bc = bc + D * R * e
        ry = ry - D * e
        rz = rz + a * R * e
        bh = a * (bt - R * e)
        # c = (r_z + r_y/ρ)/α,  h = −(r_y/ρ + (1−α) r_z)/α
        rz = rz + (bc - (1 - alpha) * bh) / alpha
        ry = ry + (bc - bh) / (R * alpha)
        out = torch.cat([rx, rz, ry], dim=1)
        return out if all_ok else torch.where(ok[:, None], out, g)
    return apply
