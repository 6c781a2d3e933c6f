"""Backward linear solvers sharing one batched, matrix-free protocol.

Every solver has the signature::

    solve(matvec, b, *, x0=None, tol=1e-10, maxiter=None, **options) -> (x, SolveInfo)

``b`` has shape ``(B, n)``: ``B`` independent systems of size ``n``. ``matvec`` maps a
``(B, n)`` tensor to ``(B, n)`` (``A`` applied to each instance) and may expose
``matvec.matmat(V)`` mapping ``(k, B, n) -> (k, B, n)`` for batched application (used by
:func:`dense`). Inner products, step sizes and stopping decisions are per instance: each
system stops when ``‖b − A x‖ ≤ tol · ‖b‖`` on its own. Results keep ``b``'s dtype and
device; nothing is allocated elsewhere.

In :func:`fold_plugins.fold` the operator is ``A = I − Φᵀ`` with ``Φ = ∂U/∂x`` at the
fixed point, applied through vector-Jacobian products of one update step.

Every built-in solver ends with the same verdict (``fold_plugins._solver_base``): tol met,
or a residual at the round-off floor (converged, no warning), or a singular ``I − Φ``
(``info.extra["not_isolated"]``: the fixed point is not isolated). :func:`gmres` and
:func:`bicgstab` live in ``fold_plugins._krylov`` and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._conditioning import not_isolated_threshold, rcond_from_factor, roundoff_floor
from ._errors import FoldError
from ._krylov import bicgstab, gmres
from ._solver_base import MatVec, SolveInfo, _check_b, _effective_tol, _verdict

__all__ = ["SOLVERS", "SolveInfo", "auto", "bicgstab", "dense", "fixed_point", "get_solver",
           "gmres"]


def fixed_point(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
                maxiter: int | None = None, divergence_factor: float = 1e8
                ) -> tuple[Tensor, SolveInfo]:
    """Linear fixed-point iteration ``x ← x + (b − A x)``, i.e. ``v ← Φᵀv + g`` for ``A = I − Φᵀ``.

    Started from ``x0 = 0`` its k-th iterate is ``Σ_{i<k} (Φᵀ)^i g``: exactly the gradient
    that unrolling k solver steps from the fixed point computes. Converges iff ``ρ(Φ) < 1``,
    at rate ``ρ(Φ)`` per iteration. One operator application per iteration.

    Args:
        divergence_factor: an instance whose residual grows past this multiple of ‖b‖ (or
            becomes non-finite) is stopped and flagged ``diverged``.
    """
    _check_b(b, "fixed_point")
    B, n = b.shape
    tol = _effective_tol(tol, b.dtype)
    maxiter = int(maxiter) if maxiter is not None else min(max(1000, 20 * n), 10_000)
    bnorm = b.norm(dim=1)
    denom = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    n_mv = 1 if x0 is not None else 0
    res = r.norm(dim=1) / denom
    active = res > tol
    diverged = torch.zeros(B, dtype=torch.bool, device=b.device)
    iters = torch.zeros(B, dtype=torch.int64, device=b.device)
    anorm = torch.zeros_like(res)  # ‖A‖ ≥ ‖A r‖/‖r‖ = ‖r − r_new‖/‖r‖ for each update r
    k = 0
    while k < maxiter and bool(active.any()):
        k += 1
        x = torch.where(active[:, None], x + r, x)
        r_new = b - matvec(x)
        n_mv += 1
        rn = r.norm(dim=1)
        anorm = torch.maximum(anorm, torch.where(rn > 0, (r - r_new).norm(dim=1) / rn.clamp_min(
            torch.finfo(rn.dtype).tiny), anorm))
        r = torch.where(active[:, None], r_new, r)
        res = r.norm(dim=1) / denom
        iters = torch.where(active, torch.full_like(iters, k), iters)
        blown = active & (~torch.isfinite(res) | (res > divergence_factor))
        diverged |= blown
        active = active & (res > tol) & ~blown
    extra: dict = {}
    conv, extra_mv = _verdict(matvec, b, x, res, tol, anorm, extra)
    converged = conv & ~diverged
    return x, SolveInfo(iters, res, converged, n_mv + extra_mv, "fixed_point", diverged, extra)


def dense(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
          maxiter: int | None = None, chunk_elements: int = 1 << 24) -> tuple[Tensor, SolveInfo]:
    """Materialise ``A`` column by column (``n`` applications, batched when the operator allows)
    and solve each instance with LU. Exact up to rounding; best for small ``n``.

    Uses ``matvec.matmat`` (``(k, B, n) -> (k, B, n)``) when present, in chunks of at most
    ``chunk_elements`` elements; otherwise ``n`` single applications. ``x0`` and ``maxiter``
    are accepted for the protocol and ignored.

    The LU factor also gives each instance's reciprocal condition estimate
    (:func:`fold_plugins._conditioning.rcond_from_factor`, in ``info.extra["rcond_estimate"]``).
    Where it is at round-off level (:func:`fold_plugins._conditioning.not_isolated_threshold`)
    ``I − Φ`` is singular: the instance is flagged in ``info.extra["not_isolated"]`` and
    never counted as converged (its ``x`` is one of infinitely many solutions, NaN where the
    factorisation broke down).
    """
    _check_b(b, "dense")
    B, n = b.shape
    tol = _effective_tol(tol, b.dtype)
    dev, dt = b.device, b.dtype
    cols = []
    matmat = getattr(matvec, "matmat", None)
    n_mv = 0
    if matmat is not None:
        k = max(1, min(n, chunk_elements // max(1, B * n)))
        for start in range(0, n, k):
            stop = min(n, start + k)
            E = torch.zeros(stop - start, B, n, dtype=dt, device=dev)
            idx = torch.arange(start, stop, device=dev)
            E[torch.arange(stop - start, device=dev), :, idx] = 1
            cols.append(matmat(E))
            n_mv += 1
        AT = torch.cat(cols, dim=0)  # (n, B, n): AT[j, b] = A_b e_j
    else:
        for j in range(n):
            e = torch.zeros(B, n, dtype=dt, device=dev)
            e[:, j] = 1
            cols.append(matvec(e))
            n_mv += 1
        AT = torch.stack(cols, dim=0)
    A = AT.permute(1, 2, 0)  # (B, n, n)
    LU, piv, status = torch.linalg.lu_factor_ex(A)
    usable = status == 0
    if bool(usable.all()):
        rcond = rcond_from_factor(A, "lu", LU, piv)
    else:  # an exactly singular factor: estimate on the others, solve those with I
        eye = torch.eye(n, dtype=dt, device=dev).expand(B, n, n)
        LU, piv, _ = torch.linalg.lu_factor_ex(torch.where(usable[:, None, None], A, eye))
        rcond = torch.where(usable, rcond_from_factor(A, "lu", LU, piv),
                            torch.zeros(B, dtype=dt, device=dev))
    x = torch.linalg.lu_solve(LU, piv, b.unsqueeze(2)).squeeze(2)
    # the fixed point is not isolated where I − Φᵀ is singular to working precision: LU then
    # returns one of infinitely many solutions (its component along the null space is
    # round-off amplified), so the instance is never reported converged
    finite_a = torch.isfinite(A).all(dim=2).all(dim=1)  # a NaN VJP is another verdict
    not_isolated = finite_a & (~usable | ~torch.isfinite(rcond)
                               | (rcond <= not_isolated_threshold(dt, n)))
    x = torch.where(usable[:, None], x, torch.full_like(x, math.nan))
    bnorm = b.norm(dim=1)
    res = (b - torch.einsum("bij,bj->bi", A, x)).norm(dim=1)
    res = res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    res = torch.where(torch.isfinite(res), res, torch.full_like(res, math.inf))
    anorm = A.abs().sum(dim=-2).amax(dim=-1)  # ‖A‖₁ ≥ ‖A‖₂/√n: a floor on the safe side
    floor = roundoff_floor(anorm, x.norm(dim=1), bnorm, n)
    converged = ((res <= tol) | (res <= floor)) & ~not_isolated
    iters = torch.full((B,), n, dtype=torch.int64, device=dev)
    return x, SolveInfo(iters, res, converged, n_mv, "dense",
                        extra={"not_isolated": not_isolated, "rcond_estimate": rcond,
                               "roundoff_floor": floor})


#: ``auto`` uses :func:`dense` up to this many state entries per instance (measured in
#: ``comparisons`` scaling: dense's one batched VJP + LU beat GMRES's n sequential autograd
#: calls up to n ≈ 200, and lost 2.3× at n = 400) ...
AUTO_DENSE_MAX_N = 128
#: ... and while the materialised (B, n, n) system stays below this many elements.
AUTO_DENSE_MAX_ELEMENTS = 1 << 22


def auto(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
         maxiter: int | None = None, **options) -> tuple[Tensor, SolveInfo]:
    """:func:`dense` for small systems (``n ≤ AUTO_DENSE_MAX_N`` and ``B·n² ≤
    AUTO_DENSE_MAX_ELEMENTS``), :func:`gmres` otherwise; ``info.solver`` says which ran.

    At small sizes the cost of a Krylov method is its sequential operator applications (one
    autograd call each), which dense replaces with one batched application and an LU.
    """
    _check_b(b, "auto")
    B, n = b.shape
    if n <= AUTO_DENSE_MAX_N and B * n * n <= AUTO_DENSE_MAX_ELEMENTS:
        return dense(matvec, b, x0=x0, tol=tol, maxiter=maxiter)
    return gmres(matvec, b, x0=x0, tol=tol, maxiter=maxiter, **options)


SOLVERS: dict[str, Callable] = {
    "fixed_point": fixed_point,
    "gmres": gmres,
    "bicgstab": bicgstab,
    "dense": dense,
    "auto": auto,
}


def get_solver(solver: str | Callable) -> tuple[str, Callable]:
    """Resolve a solver name or callable to ``(name, callable)``."""
    if callable(solver):
        return getattr(solver, "__name__", "custom"), solver
    if isinstance(solver, str) and solver in SOLVERS:
        return solver, SOLVERS[solver]
    raise FoldError(f"solver must be one of {sorted(SOLVERS)} or a callable "
                    f"solve(matvec, b, *, x0, tol, maxiter) -> (x, info); got {solver!r}.")
