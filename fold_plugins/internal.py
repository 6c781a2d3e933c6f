"""What the adapters (``fold_plugins.adapters``) and other extensions build on.

A public, stable namespace for the core's building blocks that are not part of the user-facing
API: the state-packing helpers, the one-step linearisation, solver selection, the convergence
reporter, and the small numerical helpers an adapter's step needs. Import from here, never
from the core's private modules (``fold_plugins._*``), which may move.

    from fold_plugins.internal import linearize, get_solver, report_unconverged
"""

from __future__ import annotations

from ._conditioning import rcond_from_factor
from ._errors import instance_list, report_unconverged
from ._linearize import AdjointOperator
from ._solver_base import SolveInfo, exact_solve_info
from ._state import (
    State,
    as_parts,
    check_step_output,
    fixed_point_iteration,
    pack,
    validate_state,
)
from .fold import default_fixed_point_tol, linearize
from .protocols import (
    BackwardSolver,
    BatchedOperator,
    CountsApplications,
    HasCostKey,
    Step,
    StepTraits,
    SupportsMatmat,
    normalize_solve_info,
    step_traits,
)
from .solvers import get_solver
from .steps._common import self_contained

__all__ = [
    "AdjointOperator",
    "BackwardSolver",
    "BatchedOperator",
    "CountsApplications",
    "HasCostKey",
    "Step",
    "StepTraits",
    "SupportsMatmat",
    "normalize_solve_info",
    "step_traits",
    "SolveInfo",
    "State",
    "as_parts",
    "check_step_output",
    "default_fixed_point_tol",
    "exact_solve_info",
    "fixed_point_iteration",
    "get_solver",
    "instance_list",
    "linearize",
    "pack",
    "rcond_from_factor",
    "report_unconverged",
    "self_contained",
    "validate_state",
]
