"""The Theseus layer's configuration: importing Theseus, the step names, what they resolve to.

Private to :mod:`fold_plugins.adapters.theseus`: :func:`import_theseus`, :data:`STEPS` and
:func:`resolve_step_name` (``step=...``), :func:`step_kind` (what ``step="auto"`` means for an
optimizer), :func:`lm_kwargs` (the LM damping the folded step uses) and :data:`FOLD_KWARGS`
(the per-call overrides). The step itself is :mod:`.step`, the variables' layout
:mod:`.geometry`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

import fold_plugins as fp

from .geometry import TangentGeometry

__all__ = ["NEWTON_MAX_ROWS", "STEPS", "FOLD_KWARGS", "UNCONVERGED_POLICIES", "Call",
           "check_policy", "import_theseus", "lm_kwargs", "parse_call", "resolve_step_name",
           "step_kind"]

#: step names accepted by ``FoldedTheseusLayer(step=...)`` (plus the aliases "gn", "lm").
STEPS = ("auto", "gauss_newton", "levenberg_marquardt", "newton")
_ALIASES = {"gn": "gauss_newton", "lm": "levenberg_marquardt", "gauss-newton": "gauss_newton",
            "levenberg-marquardt": "levenberg_marquardt"}
#: per-call overrides read from ``optimizer_kwargs`` and removed before Theseus sees them.
FOLD_KWARGS = ("fold_step", "fold_backward", "fold_tol", "fold_maxiter", "fold_unconverged")


#: accepted values of ``FoldedTheseusLayer(unconverged=...)``.
UNCONVERGED_POLICIES = ("unroll", "fold", "raise")


def check_policy(policy: Any) -> str:
    """``policy`` if it is one of :data:`UNCONVERGED_POLICIES`, else a :class:`fp.FoldError`."""
    if not isinstance(policy, str) or policy not in UNCONVERGED_POLICIES:
        raise fp.FoldError(f"unconverged must be one of {UNCONVERGED_POLICIES}, got "
                           f"{policy!r}. 'unroll' (default) differentiates what a truncated "
                           "forward computed, 'fold' folds it anyway, 'raise' refuses it.")
    return policy


@dataclass
class Call:
    """One call of the layer, parsed and validated before Theseus runs (:func:`parse_call`)."""

    input_tensors: dict[str, Tensor]
    #: ``optimizer_kwargs`` without the fold overrides (what Theseus sees)
    kwargs: dict[str, Any]
    #: Theseus's ``BackwardMode`` and whether the caller named one
    mode: Any
    explicit_mode: bool
    #: the fold settings of this call (the layer's, or the ``fold_*`` overrides)
    step: str
    backward: str | Callable
    tol: float
    maxiter: int | None
    policy: str
    #: the optimisation variables' values before the solve (to re-run it with autograd)
    init: dict[str, Tensor]


def parse_call(input_tensors: Any, optimizer_kwargs: Any, defaults: dict[str, Any],
               geo: TangentGeometry | None) -> Call:
    """Validate a layer call as ``th.TheseusLayer`` does (a ValueError for a bad
    ``backward_mode`` or ``dlm_epsilon``) and read the per-call :data:`FOLD_KWARGS` over
    ``defaults`` (``step``, ``backward``, ``tol``, ``maxiter``, ``unconverged``)."""
    th = import_theseus()
    if input_tensors is not None and not isinstance(input_tensors, dict):
        raise fp.FoldError(f"input_tensors must be a dict name -> Tensor (or None), got "
                           f"{type(input_tensors).__name__}.")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise fp.FoldError(f"optimizer_kwargs must be a dict (or None), got "
                           f"{type(optimizer_kwargs).__name__}.")
    kwargs = dict(optimizer_kwargs or {})
    over = {k[len("fold_"):]: kwargs.pop(k) for k in FOLD_KWARGS if k in kwargs}
    mode = th.BackwardMode.resolve(kwargs.get("backward_mode", "unroll"))
    eps_dlm = kwargs.get("dlm_epsilon", 1e-2)
    if mode == th.BackwardMode.DLM and not isinstance(eps_dlm, float):
        raise ValueError(f"dlm_epsilon must be a float but {type(eps_dlm)} was given.")
    opt = {**defaults, **over}
    init = {} if geo is None else {v.name: v.tensor for v in geo.ordering}
    return Call(input_tensors=dict(input_tensors or {}), kwargs=kwargs, mode=mode,
                explicit_mode="backward_mode" in kwargs, step=resolve_step_name(opt["step"]),
                backward=opt["backward"], tol=float(opt["tol"]), maxiter=opt["maxiter"],
                policy=check_policy(opt["unconverged"]), init=init)


def resolve_step_name(step: Any) -> str:
    """The canonical name of ``step`` (one of :data:`STEPS`, aliases resolved), else a
    :class:`fp.FoldError`."""
    if not isinstance(step, str):
        raise fp.FoldError(f"step must be one of {STEPS} (or 'gn'/'lm'), got "
                           f"{type(step).__name__} {step!r}.")
    name = _ALIASES.get(step.lower(), step.lower())
    if name not in STEPS:
        raise fp.FoldError(f"step must be one of {STEPS} (or 'gn'/'lm'), got {step!r}.")
    return name


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
