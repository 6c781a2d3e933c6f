"""The plugin points of the folded backward, declared: what a step, an operator and a backward
solver must (and may) provide. See ``docs/design.md`` ("Plugin points").

Three roles meet in the backward (eq. (1), ``(I − Φ)ᵀ v = g``):

* a **step** ``U(x, *params) -> x`` (:class:`Step`), the user's (or a library) update whose
  Jacobian at the solution is ``Φ``. It may carry two optional traits, read once per call by
  :func:`step_traits`: ``batch_independent = True`` (it vouches that ``∂U[i]/∂x[j] = 0`` for
  ``i ≠ j``: the one-VJP probe is skipped) and ``record_captured = False`` (its captured
  tensors are found by the graph walk instead of the recorder, see ``_capture``).
* a **batched operator** ``A: (B, n) -> (B, n)`` (:class:`BatchedOperator`), e.g. ``v ↦ v −
  Φᵀv``. It may add ``matmat`` (:class:`SupportsMatmat`: ``(k, B, n) -> (k, B, n)``, many
  right-hand sides in one call, used by ``dense`` and ``auto``), ``count`` (applications so
  far, :class:`CountsApplications`) and ``cost_key`` (:class:`HasCostKey`: an identity under
  which ``auto`` caches its cost measurements).
* a **backward solver** (:class:`BackwardSolver`): ``solve(A, b, *, x0, tol, maxiter, **opts)
  -> (x, info)`` with ``info`` a :class:`~fold_plugins.solvers.SolveInfo` or any object with
  its three required fields (``iterations``, ``residual``, ``converged``);
  :func:`normalize_solve_info` turns the latter into a ``SolveInfo`` once, where the solver
  returns, so nothing downstream probes for optional fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._errors import FoldError
from ._solver_base import SolveInfo

__all__ = ["BackwardSolver", "BatchedOperator", "CountsApplications", "HasCostKey", "Step",
           "StepTraits", "SupportsMatmat", "cost_key", "normalize_solve_info", "step_traits"]


class Step(Protocol):
    """``U(x, *params) -> x``: one update of the forward solver (``x`` a tensor or a tuple of
    tensors, the output of the same structure). Optional traits: see :func:`step_traits`."""

    def __call__(self, x: Any, *params: Any) -> Any: ...


@dataclass(frozen=True)
class StepTraits:
    """What a step declares about itself (absent attributes take the safe default).

    Attributes:
        batch_independent: the step vouches ``∂U[i]/∂x[j] = 0`` for ``i ≠ j`` (only the
            literal ``True`` counts); the backward then skips its batch-mixing probe.
        record_captured: ``False`` opts out of the captured-tensor recorder (the graph walk
            finds the step's leaves instead); anything else keeps it on.
    """

    batch_independent: bool = False
    record_captured: bool = True


def step_traits(step: Callable) -> StepTraits:
    """The :class:`StepTraits` ``step`` declares, read once (a step may set
    ``batch_independent`` while it runs: read it after the step's one call)."""
    return StepTraits(batch_independent=getattr(step, "batch_independent", False) is True,
                      record_captured=getattr(step, "record_captured", True) is not False)


class BatchedOperator(Protocol):
    """A linear operator applied row by row: ``(B, n) -> (B, n)``, one instance per row."""

    def __call__(self, v: Tensor) -> Tensor: ...


@runtime_checkable
class SupportsMatmat(Protocol):
    """An operator that also applies to ``k`` stacked right-hand sides ``(k, B, n)`` at once."""

    def matmat(self, V: Tensor) -> Tensor: ...


@runtime_checkable
class CountsApplications(Protocol):
    """An operator that counts its applications (a ``matmat`` of ``k`` columns counts ``k``)."""

    count: int


@runtime_checkable
class HasCostKey(Protocol):
    """An operator with an identity for ``solver="auto"``'s cost cache (the step's code)."""

    cost_key: Any


def cost_key(op: Callable[..., Any]) -> Any:
    """``op.cost_key`` where the operator declares one, else ``None`` (costs not cached)."""
    return op.cost_key if isinstance(op, HasCostKey) else None


class BackwardSolver(Protocol):
    """``solve(A, b, *, x0, tol, maxiter, **options) -> (x, info)``: ``A x = b`` for a batched
    operator ``A`` and ``b (B, n)``; ``info`` a ``SolveInfo`` (or its three required fields)."""

    def __call__(self, matvec: BatchedOperator, b: Tensor, *, x0: Tensor | None = None,
                 tol: float = ..., maxiter: int | None = None, **options: Any
                 ) -> tuple[Tensor, Any]: ...


def normalize_solve_info(info: Any, b: Tensor, solver: str) -> SolveInfo:
    """A backward solver's ``info`` as a :class:`SolveInfo`: a ``SolveInfo`` passes through;
    any other object must have ``iterations``, ``residual`` and ``converged`` (each ``(B,)``,
    on ``b``'s device), and its ``n_matvec``, ``diverged``, ``extra`` and ``solver`` are taken
    when present. A result missing a required field raises, naming the solver."""
    if isinstance(info, SolveInfo):
        if not info.solver:
            info.solver = solver
        return info
    missing = [k for k in ("iterations", "residual", "converged") if not hasattr(info, k)]
    if missing:
        raise FoldError(
            f"backward solver {solver!r} returned info of type {type(info).__name__} without "
            f"{', '.join(missing)}: a solver must return (x, info) with info.iterations, "
            "info.residual and info.converged, each (B,) — or a fold_plugins.internal.SolveInfo.")
    B, dev = b.shape[0], b.device

    def field(name: str, dtype: torch.dtype) -> Tensor:
        t = torch.as_tensor(getattr(info, name), device=dev).to(dtype)
        if t.shape != (B,):
            raise FoldError(f"backward solver {solver!r}: info.{name} must have shape ({B},), "
                            f"one entry per instance; got {tuple(t.shape)}.")
        return t

    diverged = getattr(info, "diverged", None)
    return SolveInfo(
        iterations=field("iterations", torch.int64),
        residual=field("residual", b.dtype),
        converged=field("converged", torch.bool),
        n_matvec=int(getattr(info, "n_matvec", 0) or 0),
        solver=str(getattr(info, "solver", "") or solver),
        diverged=None if diverged is None else field("diverged", torch.bool),
        extra=dict(getattr(info, "extra", None) or {}),
    )
