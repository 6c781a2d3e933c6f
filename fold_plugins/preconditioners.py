"""Ready preconditioners for the folded backward ``(I − Φ)ᵀ v = g`` (``Φ = ∂U/∂x`` at ``x*``).

A preconditioner is a callable ``(B, n) -> (B, n)`` applying ``M⁻¹ ≈ (I − Φᵀ)⁻¹`` row by row;
:func:`fold_plugins.solvers.gmres` and :func:`fold_plugins.solvers.bicgstab` take it as
``preconditioner=`` (right preconditioning: the residual they judge stays the true one), and
:func:`fold_plugins.fold` passes it through ``solver_options={"preconditioner": pc}``. ``n``
is the flattened state (a tuple state ``(x, z, y)`` is ``[x | z | y]`` per row).

* :func:`admm_qp` — for :func:`fold_plugins.steps.admm_qp`: the exact ``(I − Φ)⁻ᵀ`` from the
  step's own matrices, through one symmetric KKT system of the active set (eq. (P1)); GMRES
  then needs one or two iterations instead of ``0.5–1 × (n + 2m)``.
* :func:`newton` — for Newton-type steps ``U(x) = x − t S⁻¹∇f``: ``I − Φ = t S⁻¹H`` at a
  stationary point, so ``(I − Φ)⁻ᵀ = S H⁻¹ / t`` with a factor of ``H``.
* :func:`inverse_of` — any ``(B, n, n)`` matrix ``M ≈ I − Φᵀ``, LU-factored once.

Each factors its matrices once, when built; applying it is a pair of triangular solves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._errors import FoldError

__all__ = ["admm_qp", "inverse_of", "lazy", "newton"]

Preconditioner = Callable[[Tensor], Tensor]


def _batch_matrix(M: Tensor, name: str, where: str) -> Tensor:
    if not isinstance(M, Tensor) or M.dim() not in (2, 3) or M.shape[-1] != M.shape[-2]:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise FoldError(f"{where}: {name} must be a square (n, n) or (B, n, n) tensor, got "
                        f"{shape}.")
    if not M.is_floating_point():
        raise FoldError(f"{where}: {name} must be floating point, got {M.dtype}.")
    return M.detach() if M.dim() == 3 else M.detach().unsqueeze(0)


def _lu(M: Tensor, where: str) -> tuple[Tensor, Tensor]:
    LU, piv, status = torch.linalg.lu_factor_ex(M)
    if bool((status != 0).any()):
        bad = torch.nonzero(status.reshape(-1)).flatten().tolist()
        raise FoldError(f"{where}: the matrix is singular for instance(s) {bad[:20]}; a "
                        "preconditioner needs an invertible M (pass preconditioner=None there).")
    return LU, piv


class _Lazy:
    def __init__(self, build: Callable[..., Preconditioner], args: tuple, kwargs: dict):
        self.build, self.args, self.kwargs, self.fn = build, args, kwargs, None

    def __call__(self, v: Tensor) -> Tensor:
        if self.fn is None:
            self.fn = self.build(*self.args, **self.kwargs)
            self.args = self.kwargs = None  # the factor is all that is kept
        return self.fn(v)


def lazy(build: Callable[..., Preconditioner], *args, **kwargs) -> Preconditioner:
    """``build(*args, **kwargs)``, made on the first application (in backward): a forward that
    is never differentiated pays nothing for the factorisation."""
    return _Lazy(build, args, kwargs)


def inverse_of(M: Tensor) -> Preconditioner:
    """``v ↦ M⁻¹ v`` for a ``(n, n)`` or ``(B, n, n)`` matrix ``M ≈ I − Φᵀ`` (LU once)."""
    Mb = _batch_matrix(M, "M", "inverse_of")
    LU, piv = _lu(Mb, "inverse_of")

    def apply(v: Tensor) -> Tensor:
        F, p = (LU, piv) if LU.shape[0] == v.shape[0] else (LU.expand(v.shape[0], -1, -1),
                                                            piv.expand(v.shape[0], -1))
        return torch.linalg.lu_solve(F, p, v.unsqueeze(-1)).squeeze(-1)
    return apply


def newton(H: Tensor, damping: float | Tensor = 1.0, step_matrix: Tensor | None = None,
           regularization: float = 0.0) -> Preconditioner:
    """``(I − Φ)⁻ᵀ`` of a Newton-type step ``U(x) = x − t S⁻¹∇f(x)`` at a stationary point.

    There ``Φ = I − t S⁻¹H`` (``H`` the Hessian of ``f``, ``S`` the step's matrix, held
    constant), so ``(I − Φ)ᵀ = t H S⁻¹`` (both symmetric) and ``(I − Φ)⁻ᵀ v = S H⁻¹ v / t``:
    exact with the true ``H``, a preconditioner with an approximation of it (e.g. the
    Gauss–Newton matrix of a least-squares step whose ``S`` is damped).

    Args:
        H: ``(n, n)`` or ``(B, n, n)`` Hessian (or approximation), factored once (Cholesky,
            LU where it is not positive definite).
        damping: ``t`` (number or ``(B,)`` tensor), as in :func:`fold_plugins.steps.newton`.
        step_matrix: ``S``; default ``H + regularization·I`` (the library's ``newton`` step).
    """
    Hb = _batch_matrix(H, "H", "newton")
    n = Hb.shape[-1]
    S = (Hb + regularization * torch.eye(n, dtype=Hb.dtype, device=Hb.device)
         if step_matrix is None else _batch_matrix(step_matrix, "step_matrix", "newton"))
    L, info = torch.linalg.cholesky_ex(Hb)
    chol = not bool((info != 0).any())
    LU, piv = (None, None) if chol else _lu(Hb, "newton")
    t = torch.as_tensor(damping, dtype=Hb.dtype, device=Hb.device).detach().reshape(-1, 1)
    if not bool((t != 0).all()):
        raise FoldError(f"newton: damping must be non-zero, got {damping!r}.")

    def apply(v: Tensor) -> Tensor:
        B = v.shape[0]
        rhs = v.unsqueeze(-1)
        if chol:
            w = torch.cholesky_solve(rhs, L.expand(B, -1, -1))
        else:
            w = torch.linalg.lu_solve(LU.expand(B, -1, -1), piv.expand(B, -1), rhs)
        return (S.expand(B, -1, -1) @ w).squeeze(-1) / t
    return apply


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
    from .steps._common import clip_free
    from .steps.quadprog import _qp_shapes, _rho_vector

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
