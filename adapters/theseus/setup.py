"""Which folded step the Theseus layer takes, and how its backward solve is set up.

Private to :mod:`fold_plugins.adapters.theseus`: :func:`import_theseus`, :func:`step_kind`
(what ``step="auto"`` means for an optimizer), :func:`lm_kwargs` (the LM damping the folded
step uses) and :class:`FlooredSolver` (the backward solver with its tolerance floor, and no
solve at all where ``Φ = 0``). The step itself is :mod:`._theseus_step`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins.internal import exact_solve_info, get_solver

if TYPE_CHECKING:  # pragma: no cover
    from ._theseus_geometry import TangentGeometry
    from ._theseus_step import TangentStep

__all__ = ["NEWTON_MAX_ROWS", "FlooredSolver", "import_theseus", "lm_kwargs", "step_kind"]


def import_theseus() -> Any:
    """``import theseus`` (silencing its scikit-sparse notice), or an ImportError saying how."""
    th = sys.modules.get("theseus")
    if th is not None and hasattr(th, "TheseusLayer"):  # imported: no warnings filter per call
        return th
    try:
        with warnings.catch_warnings():
            # theseus warns at import when scikit-sparse is absent (only CholmodSparseSolver
            # needs it); FoldedTheseusLayer reports that where it matters instead.
            warnings.filterwarnings("ignore", message=".*skparse.cholmod.*")
            import theseus as th
    except ImportError as exc:  # pragma: no cover - exercised only without theseus
        raise ImportError(
            "fold_plugins.adapters.theseus needs theseus-ai (0.2.3): pip install torchlie "
            "torchkin and `pip install --no-deps --no-build-isolation theseus-ai==0.2.3` "
            "(see the README, 'Installing')."
        ) from exc
    return th


#: ``step="auto"`` picks ``newton`` when its compressed Hessian needs at most this many VJP
#: rows (one vmapped backward in the forward; the backward then needs no solve at all)
NEWTON_MAX_ROWS = 32


def step_kind(name: str, optimizer: Any, geo: TangentGeometry) -> str:
    """The step ``name`` stands for: ``"auto"`` is ``newton`` with a dense linear solver when
    the colour-compressed Hessian needs at most :data:`NEWTON_MAX_ROWS` VJP rows, else the
    optimizer's own (Levenberg-Marquardt for ``LevenbergMarquardt``, Gauss-Newton otherwise)."""
    if name != "auto":
        return name
    th = import_theseus()
    if isinstance(optimizer.linear_solver, th.DenseSolver) \
            and geo.hessian_compression()[0].shape[0] <= NEWTON_MAX_ROWS:
        return "newton"
    if isinstance(optimizer, th.LevenbergMarquardt):
        return "levenberg_marquardt"
    return "gauss_newton"  # GaussNewton, Dogleg, other NLLS subclasses


def lm_kwargs(kind: str, optimizer: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """LM keywords of the folded step: the *configured* damping (class docstring)."""
    if kind != "levenberg_marquardt":
        return {}
    damping = kwargs.get("damping", 1e-3)  # LevenbergMarquardt.reset's default
    if isinstance(damping, Tensor):
        damping = damping.detach().clone()
    elif not (isinstance(damping, (int, float)) and damping >= 0):
        raise fp.FoldError(f"optimizer_kwargs['damping'] must be a number ≥ 0 or a "
                           f"tensor, got {damping!r}.")
    out: dict[str, Any] = {"damping": damping}
    if isinstance(optimizer.linear_solver, import_theseus().DenseSolver):
        out["ellipsoidal_damping"] = bool(kwargs.get("ellipsoidal_damping", False))
        eps = kwargs.get("damping_eps")
        out["damping_eps"] = 1e-8 if eps is None else float(eps)
    elif isinstance(damping, Tensor) and damping.numel() > 1:
        raise fp.FoldError(
            f"{type(optimizer.linear_solver).__name__} takes only a scalar LM "
            f"damping, but optimizer_kwargs['damping'] is a tensor of shape "
            f"{tuple(damping.shape)}; pass a number, use a dense linear solver, or "
            "step='gauss_newton'/'newton'.")
    return out


class FlooredSolver:
    """The backward solver with its tolerance floored at ``min(√eps, eps / rcond₁(M))``.

    Below about ``eps · cond(M)`` the residual of ``(I − Φᵀ) v = g`` is round-off: ``v ↦ v − Φᵀv``
    goes through a solve with ``M``, and x* itself carries a relative error of that order. A
    tighter tolerance would only spend ``maxiter`` iterations and warn (measured: a 30-pose SE2
    graph in float32, cond(JᵀJ) ≈ 1.3e4, stalls at residual 1.1e-5 > 50·eps). The floor is
    known once the step has factored ``M`` (the worst instance of the batch sets it), hence
    this wrapper, read at backward time; the cap ``√eps`` keeps at least half the digits.
    """

    def __init__(self, solver: str | Callable, step: TangentStep):
        self.__name__, self.solve = get_solver(solver)
        self.step = step

    def __call__(self, matvec: Callable, b: Tensor, *, x0: Tensor | None = None, tol: float,
                 maxiter: int | None, **options: Any):
        if self.__name__ == "auto" and self.step.phi_zero:
            # (I − Φᵀ) = I exactly: v = b, no operator application (and none to judge)
            not_isolated = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
            return b.clone(), exact_solve_info(b, "none: Φ = 0",
                                               extra={"not_isolated": not_isolated})
        return self.solve(matvec, b, x0=x0, tol=max(tol, self.step.tol_floor),
                          maxiter=maxiter, **options)
