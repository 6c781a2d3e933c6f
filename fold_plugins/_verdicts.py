"""Verdicts: what a failed backward solve means, and the remedy a user can act on.

One place decides the wording for every solver, so that the same failure (a singular
``I − Φ``, round-off stagnation, a divergent fixed-point iteration) reads the same whichever
solver met it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._solver_base import SolveInfo

__all__ = ["NOT_ISOLATED", "backward_remedy", "not_isolated_mask"]

#: The verdict for a singular ``I − Φ`` (every solver, :func:`fold_plugins.diagnostics` too).
NOT_ISOLATED = ("the fixed point is not isolated (e.g. a gauge or symmetry): I − Φ is singular "
                "there to working precision (Φ has an eigenvalue 1), so dx*/dθ is not defined "
                "and no tolerance or solver fixes it; fix the gauge in the step (e.g. pin one "
                "coordinate or subtract the mean of the free direction after each update) — "
                "or, if the step has no such symmetry, it is too ill-conditioned for this dtype "
                "(in float32, use float64)")


def not_isolated_mask(s: SolveInfo) -> Tensor:
    """``(B,)`` bool: the instances a solver flagged as singular (``extra["not_isolated"]``)."""
    flag = s.extra.get("not_isolated")
    if flag is None:
        return torch.zeros_like(s.converged, dtype=torch.bool)
    return flag.to(torch.bool)


def backward_remedy(s: SolveInfo, solver_name: str, maxiter: int | None) -> str:
    """The remedy for the instances of ``s`` that did not converge (one sentence)."""
    bad = ~s.converged
    if bool((not_isolated_mask(s) & bad).any()):
        remedy = NOT_ISOLATED
    elif not bool(torch.isfinite(s.residual[bad]).all()):
        remedy = ("the step's vector-Jacobian product is NaN/Inf at x_star (a point where "
                  "the step is not differentiable, e.g. sqrt or norm at 0): make the step "
                  "differentiable there")
    elif bool(s.extra.get("stagnated", torch.zeros(1, dtype=torch.bool)).any()):
        remedy = ("the residual stagnated: the step's VJP is only accurate to about that "
                  "level (round-off inside the step), so loosen tol to it or compute the "
                  "step more accurately (e.g. float64)")
    elif s.diverged is not None and bool(s.diverged.any()):
        remedy = ("the fixed-point iteration diverged, so ρ(Φ) ≥ 1 for that step: use "
                  "solver='gmres' (or 'dense' for small states)")
    elif solver_name == "fixed_point":
        remedy = ("it converges slowly (ρ(Φ) near 1): use solver='gmres', or raise "
                  "maxiter")
    elif solver_name == "dense":
        remedy = ("I − Φᵀ is ill-conditioned there (reciprocal condition estimate in "
                  "SolveInfo.extra['rcond_estimate']): check the step size and the problem")
    else:
        remedy = (f"raise maxiter (now {maxiter}), loosen tol if the step is only "
                  "accurate to round-off, use solver='dense' for small states, or "
                  "precondition the step (e.g. a Newton or scaled step)")
    return remedy
