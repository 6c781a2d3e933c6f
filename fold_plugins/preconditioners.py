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

import torch
from torch import Tensor

from ._errors import FoldError
from ._preconditioner_base import Preconditioner, lazy
from ._preconditioner_base import batch_matrix as _batch_matrix
from ._preconditioner_base import lu_factor as _lu
from .steps._qp_preconditioner import admm_qp

__all__ = ["Preconditioner", "admm_qp", "inverse_of", "lazy", "newton"]

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
    LU, piv = (None, None) if not bool((info != 0).any()) else _lu(Hb, "newton")
    t = torch.as_tensor(damping, dtype=Hb.dtype, device=Hb.device).detach().reshape(-1, 1)
    if not bool((t != 0).all()):
        raise FoldError(f"newton: damping must be non-zero, got {damping!r}.")

    def apply(v: Tensor) -> Tensor:
        B = v.shape[0]
        rhs = v.unsqueeze(-1)
        if LU is None or piv is None:  # factored by Cholesky
            w = torch.cholesky_solve(rhs, L.expand(B, -1, -1))
        else:
            w = torch.linalg.lu_solve(LU.expand(B, -1, -1), piv.expand(B, -1), rhs)
        return (S.expand(B, -1, -1) @ w).squeeze(-1) / t
    return apply
