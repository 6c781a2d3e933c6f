"""The pieces every backward solver shares: :class:`SolveInfo`, input checks, the true
residual, and the final verdict (tol, round-off floor, singular ``I − Φ``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._conditioning import krylov_rcond, noise_and_gain, not_isolated_threshold, roundoff_floor
from ._errors import FoldError

MatVec = Callable[[Tensor], Tensor]


@dataclass
class SolveInfo:
    """Per-instance outcome of a batched linear solve.

    Attributes:
        iterations: ``(B,)`` int64, iterations each instance needed (``maxiter`` if it never
            converged). For :func:`dense` it is the number of operator applications (``n``).
        residual: ``(B,)`` relative residual ``‖b − A x‖ / ‖b‖`` of the returned ``x``
            (absolute where ``b = 0``).
        converged: ``(B,)`` bool, ``residual ≤ tol``.
        n_matvec: operator applications of ``A`` in total (one batched call counts once).
        diverged: ``(B,)`` bool, the iteration blew up (only :func:`fixed_point` sets it).
        solver: the solver's name.
        extra: solver-specific ``(B,)`` flags. Every built-in solver sets
            ``"not_isolated"`` (bool): ``I − Φ`` is singular to working precision there (the
            fixed point is not isolated), never counted as converged; and
            ``"roundoff_floor"``: the relative residual a backward-stable solve can reach in
            this dtype (an instance whose residual is below it counts as converged even when
            ``tol`` is smaller). :func:`gmres` adds ``"stagnated"``.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    n_matvec: int
    solver: str = ""
    diverged: Tensor | None = None
    extra: dict = field(default_factory=dict)


def exact_solve_info(like: Tensor, solver: str, extra: dict | None = None) -> SolveInfo:
    """The outcome of a solve that needed no operator application (``like``: ``(B, n)``, for
    batch, dtype and device): 0 iterations, residual 0, converged, 0 matvecs."""
    B, dev = like.shape[0], like.device
    return SolveInfo(torch.zeros(B, dtype=torch.int64, device=dev),
                     torch.zeros(B, dtype=like.dtype, device=dev),
                     torch.ones(B, dtype=torch.bool, device=dev), 0, solver, extra=extra or {})


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=-1)


def _check_b(b: Tensor, name: str) -> None:
    if not isinstance(b, Tensor) or b.dim() != 2:
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise FoldError(f"{name}: b must be a (B, n) tensor, got {shape}; flatten each "
                        "instance's right-hand side into one row.")
    if not b.is_floating_point():
        raise FoldError(f"{name}: b must be floating point, got {b.dtype}.")


def _effective_tol(tol: float, dtype: torch.dtype) -> float:
    """Relative tolerance floored at 50·eps of ``dtype`` (1e-10 is unreachable in float32)."""
    if tol < 0 or not math.isfinite(tol):
        raise FoldError(f"tol must be a finite number ≥ 0, got {tol!r}.")
    return max(float(tol), 50.0 * torch.finfo(dtype).eps)


def _residual(matvec: MatVec, b: Tensor, x: Tensor, bnorm: Tensor) -> Tensor:
    r = b - matvec(x)
    return r.norm(dim=1) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _verdict(matvec: MatVec, b: Tensor, x: Tensor, res: Tensor, tol: float, anorm: Tensor,
             extra: dict) -> tuple[Tensor, int]:
    """Final judgement shared by the iterative solvers: ``(converged, extra matvecs)``.

    Where some instance missed ``tol``, a short Arnoldi process
    (:func:`fold_plugins._conditioning.krylov_rcond`) first tells a singular ``I − Φ`` (the
    fixed point is not isolated: a gauge) from the rest; those are never converged. An
    instance that is not singular and whose residual is at the dtype's round-off floor
    (:func:`fold_plugins._conditioning.roundoff_floor`, capped at ``√eps``) counts as
    converged: asking for less is asking the impossible, and a warning would be a false alarm.
    """
    B, n = b.shape
    floor = roundoff_floor(anorm, x.norm(dim=1), b.norm(dim=1), n)
    floor = torch.minimum(floor, torch.full_like(floor, math.sqrt(torch.finfo(b.dtype).eps)))
    extra["roundoff_floor"] = floor
    extra["not_isolated"] = torch.zeros(B, dtype=torch.bool, device=b.device)
    converged = res <= tol
    missed = ~converged & torch.isfinite(res)
    if not bool(missed.any()):
        return converged, 0
    k = min(n, 40)
    rc = krylov_rcond(matvec, b, k=k)
    extra["rcond_estimate"] = rc
    singular = missed & (rc <= not_isolated_threshold(b.dtype, n))
    extra["not_isolated"] = singular
    # round-off inside the step (e.g. a Cholesky solve of an ill-conditioned matrix) makes the
    # operator itself inexact: measure it by its defect of linearity at x's scale
    noise, gain = noise_and_gain(matvec, x)
    den = b.norm(dim=1)
    floor = torch.maximum(floor, roundoff_floor(torch.maximum(anorm, gain), x.norm(dim=1), den, n))
    floor = torch.maximum(floor, 10 * noise / torch.where(den > 0, den, torch.ones_like(den)))
    floor = torch.minimum(floor, torch.full_like(floor, math.sqrt(torch.finfo(b.dtype).eps)))
    extra["roundoff_floor"] = floor
    converged = converged | (missed & ~singular & (res <= floor))
    return converged, k + 3




class _Preconditioner:
    """A user's ``M⁻¹`` with its first output checked (shape, dtype, device, finiteness)."""

    def __init__(self, fn: MatVec, like: Tensor, where: str):
        self.fn, self.like, self.where, self.checked = fn, like, where, False

    def __call__(self, v: Tensor) -> Tensor:
        out = self.fn(v)
        if not self.checked:
            ok = (isinstance(out, Tensor) and out.shape == v.shape and out.dtype == v.dtype
                  and out.device == v.device)
            if not ok:
                seen = (f"{tuple(out.shape)} {out.dtype} on {out.device}"
                        if isinstance(out, Tensor) else type(out).__name__)
                raise FoldError(
                    f"{self.where}: preconditioner must map a (B, n) tensor to one of the same "
                    f"shape, dtype and device ({tuple(v.shape)} {v.dtype} on {v.device}); it "
                    f"returned {seen}. Return M⁻¹v row by row, keeping v's dtype and device.")
            if not bool(torch.isfinite(out).all()):
                raise FoldError(
                    f"{self.where}: preconditioner returned NaN/Inf for a finite input: its "
                    "M is singular or badly built; fix it or pass preconditioner=None.")
            self.checked = True
        return out


def _check_preconditioner(pc: MatVec | None, b: Tensor, where: str) -> _Preconditioner | None:
    """``None`` or the preconditioner wrapped for a first-call check; a non-callable raises."""
    if pc is None:
        return None
    if not callable(pc):
        raise FoldError(f"{where}: preconditioner must be a callable (B, n) -> (B, n) applying "
                        f"M⁻¹ ≈ A⁻¹ (or None), got {type(pc).__name__}.")
    return _Preconditioner(pc, b, where)
