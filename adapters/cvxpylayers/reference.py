"""The cvxpylayers reference (cross-checks): a cvxpy problem as a differentiable torch function.

    from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference
    ref = cvxpylayers_reference(problem, [q, b], [x])          # tight tolerances by default
    (x_star,) = ref(q_t, b_t)                                   # (B, n) float64, differentiable

Built on ``cvxpylayers.torch.CvxpyLayer`` (cvxpylayers ≥ 1.2): the forward solves the cone
program of ``problem`` for each instance and the backward is diffcp's implicit derivative of
the homogeneous self-dual embedding. cvxpy and cvxpylayers are imported only when a reference
is built (``pip install 'fold-plugins[cvx]'``). :func:`import_cvx`, :func:`_check_problem` and
:func:`batch_size_of` are shared with :mod:`..diffcp`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fold_plugins import FoldError

__all__ = ["cvxpylayers_reference", "CvxpyLayersReference", "TIGHT_SOLVER_ARGS", "import_cvx",
           "batch_size_of"]

#: Default diffcp/solver options per forward solver: converge far past the 1e-5 VJP checks.
#: ``mode="dense"`` solves diffcp's derivative system by dense factorisation (exact for the
#: small problems cross-checks use) instead of LSQR.
TIGHT_SOLVER_ARGS: dict[str, dict[str, Any]] = {
    "SCS": {"eps_abs": 1e-12, "eps_rel": 1e-12, "eps_infeas": 1e-12, "max_iters": 200_000,
            "acceleration_lookback": 0, "mode": "dense"},
    "CLARABEL": {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12,
                 "tol_ktratio": 1e-10, "max_iter": 500, "mode": "dense"},
}
_SOLVE_METHOD = {"SCS": "SCS", "CLARABEL": "Clarabel"}


def import_cvx() -> tuple[Any, Any]:
    """``(cvxpy, diffcp)``, or an ImportError saying how to install them."""
    try:
        import cvxpy
        import diffcp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the cvxpy references need cvxpy, diffcp and cvxpylayers ({e}); install them "
            "with: pip install 'fold-plugins[cvx]'") from e
    return cvxpy, diffcp


def _check_problem(cp: Any, problem: Any, parameters: Sequence[Any],
                   variables: Sequence[Any]) -> None:
    if not isinstance(problem, cp.Problem):
        raise TypeError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}.")
    for name, items, kind in (("parameters", parameters, cp.Parameter),
                              ("variables", variables, cp.Variable)):
        if not isinstance(items, (list, tuple)) or not items:
            raise TypeError(f"{name} must be a non-empty list of cvxpy {kind.__name__}s, got "
                            f"{type(items).__name__}.")
        bad = [type(v).__name__ for v in items if not isinstance(v, kind)]
        if bad:
            raise TypeError(f"{name} must hold cvxpy {kind.__name__}s only, got {bad}.")
    if set(problem.parameters()) != set(parameters):
        have = sorted(p.name() for p in problem.parameters())
        got = sorted(p.name() for p in parameters)
        raise ValueError(f"parameters must list exactly the problem's parameters: problem has "
                         f"{have}, given {got}.")
    missing = [v.name() for v in variables if v not in set(problem.variables())]
    if missing:
        raise ValueError(f"variables {missing} are not variables of the problem "
                         f"(it has {[v.name() for v in problem.variables()]}).")
    if not problem.is_dpp():
        raise ValueError("problem is not DPP (disciplined parametrized programming), so its "
                         "solution map cannot be differentiated w.r.t. the parameters; "
                         "rewrite it so parameters enter affinely (see cvxpy's DPP rules).")


def batch_size_of(params: Sequence[Tensor], parameters: Sequence[Any]) -> int | None:
    """Common batch size of the parameter tensors (``None``: no tensor is batched).

    Each tensor has the cvxpy parameter's shape (shared by the batch) or that shape with a
    leading batch dimension.
    """
    if len(params) != len(parameters):
        raise ValueError(f"expected {len(parameters)} parameter tensor(s) (for "
                         f"{[p.name() for p in parameters]}), got {len(params)}.")
    sizes = []
    for t, p in zip(params, parameters):
        if not isinstance(t, Tensor):
            raise TypeError(f"parameter {p.name()!r} must be a torch.Tensor, got "
                            f"{type(t).__name__}.")
        if not t.is_floating_point():
            raise TypeError(f"parameter {p.name()!r} must be floating point, got {t.dtype}.")
        shape = tuple(p.shape)
        if tuple(t.shape) == shape:
            continue
        if t.dim() == len(shape) + 1 and tuple(t.shape[1:]) == shape:
            sizes.append(t.shape[0])
            continue
        raise ValueError(f"parameter {p.name()!r} has shape {tuple(t.shape)}; expected {shape} "
                         f"or (B, {', '.join(map(str, shape))}) with a leading batch dim.")
    if sizes and any(s != sizes[0] for s in sizes):
        raise ValueError(f"batch sizes differ across parameters: {sizes}; give every batched "
                         "parameter the same leading dimension.")
    return sizes[0] if sizes else None


class CvxpyLayersReference:
    """``ref(*param_tensors) -> tuple of variable tensors`` through a cvxpylayers CvxpyLayer.

    Attributes:
        layer: the underlying ``cvxpylayers.torch.CvxpyLayer``.
        solver_args: the options passed to diffcp/the solver on every call.
    """

    __name__ = "cvxpylayers"

    def __init__(self, problem: Any, parameters: Sequence[Any], variables: Sequence[Any],
                 solver: str | None = None, solver_args: dict[str, Any] | None = None):
        cp, _ = import_cvx()
        try:
            from cvxpylayers.torch import CvxpyLayer
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"cvxpylayers is missing ({e}); install it with: "
                              "pip install 'fold-plugins[cvx]'") from e
        _check_problem(cp, problem, parameters, variables)
        key = "SCS" if solver is None else str(solver).upper()
        self.parameters = list(parameters)
        self.variables = list(variables)
        if key in _SOLVE_METHOD:
            args = dict(TIGHT_SOLVER_ARGS[key])
            args["solve_method"] = _SOLVE_METHOD[key]
            args.update({"n_jobs_forward": 1, "n_jobs_backward": 1})
            layer_solver = None  # cvxpylayers' DIFFCP backend, forward by solve_method
        else:
            args = {}
            layer_solver = solver  # another cvxpylayers backend (MOREAU, MPAX, ...)
        args.update(solver_args or {})
        self.solver_args = args
        self.solver = key
        self.name = f"cvxpylayers ({key})"  # how fp.verify reports name this reference
        self.layer = CvxpyLayer(problem, parameters=self.parameters, variables=self.variables,
                                solver=layer_solver)

    def __call__(self, *params: Tensor) -> tuple[Tensor, ...]:
        batch_size_of(params, self.parameters)
        dtype, device = params[0].dtype, params[0].device
        p64 = [t.to(device="cpu", dtype=torch.float64) for t in params]
        args = dict(self.solver_args)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in p64)):
            # cvxpylayers then calls diffcp.solve_only_batch, which passes every keyword on
            # to the solver: drop the derivative-only ones
            for k in ("mode", "n_jobs_backward"):
                args.pop(k, None)
        try:
            with warnings.catch_warnings():
                # cvxpylayers' diffcp glue calls np.array on torch tensors (numpy 2 notice)
                warnings.filterwarnings("ignore", message=r"__array__ implementation",
                                        category=DeprecationWarning)
                # SCS often cannot certify eps=1e-12 and returns its best iterate as
                # "Solved/Inaccurate" (measured KKT residuals 1e-11..1e-12): not news here
                warnings.filterwarnings("ignore", message=r"Solved/Inaccurate",
                                        category=UserWarning)
                out = self.layer(*p64, solver_args=args)
        except Exception as e:  # diffcp/cvxpy SolverError and friends
            raise FoldError(f"cvxpylayers ({self.solver}) failed to solve the batch: {e}. "
                            "Check that every instance is feasible and bounded.") from e
        return tuple(o.to(device=device, dtype=dtype) for o in out)

    def __repr__(self) -> str:
        return (f"CvxpyLayersReference(solver={self.solver!r}, "
                f"variables={[v.name() for v in self.variables]})")


def cvxpylayers_reference(problem: Any, parameters: Sequence[Any], variables: Sequence[Any],
                          solver: str | None = None,
                          solver_args: dict[str, Any] | None = None) -> CvxpyLayersReference:
    """A torch function mapping parameter tensors to the problem's optimal variables.

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: its ``cvxpy.Parameter``s, in the order the tensors will be passed.
        variables: the ``cvxpy.Variable``s to return, in order.
        solver: forward solver under cvxpylayers' diffcp backend: ``"SCS"`` (default;
            reaches KKT residuals of 1e-11..1e-12 on small problems, VJPs within 1e-11 of
            closed forms) or ``"CLARABEL"`` (measured: stops "AlmostSolved" near 1e-7 on
            diffcp's conic form, and diffcp reports no failure status for it); any other name
            is passed to ``CvxpyLayer`` as its backend (``"MOREAU"``, ``"MPAX"``, ...).
        solver_args: overrides of :data:`TIGHT_SOLVER_ARGS` (diffcp keywords such as
            ``mode``, and the solver's own settings such as ``eps_abs`` or ``max_iters``).

    Returns:
        ``ref(*params) -> tuple[Tensor, ...]``: each tensor shaped like the cvxpy parameter,
        optionally with a leading batch dim (mixed batched/shared is allowed); the outputs have
        the batch dim when any input has it, and the first input's dtype and device (the
        solve itself runs in float64 on the CPU).
    """
    return CvxpyLayersReference(problem, parameters, variables, solver=solver,
                                solver_args=solver_args)
