"""The folded autograd op: ``fold(step, x_star, *params)``.

Given any fixed point ``x* = U(x*, θ)`` of an update step ``U``, :func:`fold` returns a
tensor equal to ``x*`` whose backward pass solves

    (I − Φ)ᵀ v = g,     Φ = ∂U/∂x (x*, θ)

with a matrix-free solver (VJPs of one step) and then returns ``Ψᵀ v``, ``Ψ = ∂U/∂θ``,
through plain autograd of that one step — so every tensor the step touched (explicit
``params``, ``nn.Module`` parameters, closure tensors) receives its gradient.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import _record
from ._adjoint import Adjoint, FoldVJP
from ._errors import FoldConvergenceWarning, FoldError, instance_list
from ._linearize import Linearization, linearize
from ._state import State
from .solvers import get_solver

__all__ = ["FoldInfo", "Linearization", "default_fixed_point_tol", "fold", "linearize"]


@dataclass
class FoldInfo:
    """What the forward and the folded backward did, per instance.

    ``fold(..., return_info=True)`` returns ``(x, info)``; the backward fields are filled in
    when backward runs (``info.backward_ran`` tells). Adapters fill the forward fields.

    Attributes:
        batch_size: number of instances ``B`` (1 when ``batched=False``).
        fixed_point_residual: ``(B,)`` ``‖U(x*) − x*‖ / (1 + ‖x*‖)`` measured by ``fold``.
        forward_iterations, forward_residual, forward_converged: ``(B,)`` tensors from the
            forward solver when an adapter ran it (``None`` otherwise).
        backward_solver: name of the backward solver.
        backward_iterations: ``(B,)`` iterations each instance's solve took.
        backward_residual: ``(B,)`` relative residual ``‖g − (I−Φᵀ)v‖ / ‖g‖``.
        backward_converged: ``(B,)`` bool.
        backward_matvecs: total VJP applications of the step.
        backward_time: seconds spent in the backward linear solve.
    """

    batch_size: int = 1
    fixed_point_residual: Tensor | None = None
    forward_iterations: Tensor | None = None
    forward_residual: Tensor | None = None
    forward_converged: Tensor | None = None
    backward_solver: str = ""
    backward_iterations: Tensor | None = None
    backward_residual: Tensor | None = None
    backward_converged: Tensor | None = None
    backward_matvecs: int = 0
    backward_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def backward_ran(self) -> bool:
        return self.backward_converged is not None

    @property
    def converged(self) -> Tensor | None:
        """``(B,)`` bool: forward (when known) and backward converged; ``None`` before backward."""
        if self.backward_converged is None:
            return None
        ok = self.backward_converged
        if self.forward_converged is not None:
            ok = ok & self.forward_converged.to(ok.device)
        return ok

    def summary(self) -> str:
        """One line per quantity, for logs."""
        def fmt(t: Tensor | None) -> str:
            if t is None:
                return "—"
            t = t.detach().float().cpu()
            return f"max {t.max().item():.2e}" if t.numel() else "—"
        parts = [f"B={self.batch_size}", f"fixed-point residual {fmt(self.fixed_point_residual)}"]
        if self.forward_iterations is not None:
            parts.append(f"forward iters max {int(self.forward_iterations.max())}")
        its, conv = self.backward_iterations, self.backward_converged
        if its is not None and conv is not None:
            parts.append(f"backward {self.backward_solver}: iters max {int(its.max())}, "
                         f"residual {fmt(self.backward_residual)}, converged "
                         f"{int(conv.sum())}/{self.batch_size}")
        return "; ".join(parts)


def default_fixed_point_tol(dtype: torch.dtype) -> float:
    """Largest ``‖U(x*) − x*‖ / (1 + ‖x*‖)`` accepted silently: 1e-6 (float64), 1e-3 otherwise."""
    return 1e-6 if dtype == torch.float64 else 1e-3


# ----------------------------------------------------------------------------- autograd op

class _FoldFunction(torch.autograd.Function):
    """Forward: ``x*`` (clones). Backward: eq. (1) of :mod:`fold_plugins._adjoint`.

    Inputs: ``(adj, x_values, n_out, *out_parts, *inputs)`` — ``out_parts`` is the step's
    output ``U(x*, θ)`` with its graph, ``inputs`` every tensor that graph depends on (see
    :class:`fold_plugins._linearize.Linearization`).

    * first order: ``v = (I − Φᵀ)⁻¹ g`` is sent into the step's graph through ``out_parts``,
      so autograd delivers ``Ψᵀ v`` to everything the step touched;
    * recorded backward (``create_graph=True``): the gradients of ``inputs`` come from
      :class:`fold_plugins._adjoint.FoldVJP`, whose own backward is exact;
    * forward mode: the tangent of ``out_parts`` is ``Ψ t``; ``u = (I − Φ)⁻¹ Ψ t`` (eq. 2).
    """

    @staticmethod
    def forward(ctx, adj: Adjoint, x_values: tuple[Tensor, ...], n_out: int, *tensors: Tensor):
        # (old-style forward: setup_context costs an inspect.signature per call, and torch.func
        # transforms are refused before this point anyway)
        out = tuple(x.clone() for x in x_values)
        ctx.adj, ctx.n_out, ctx.n_inputs = adj, n_out, len(tensors) - n_out
        ctx.save_for_backward(*out, *tensors[n_out:])
        return out

    @staticmethod
    def backward(ctx, *grads: Tensor):
        adj: Adjoint = ctx.adj
        n_out, n_in = ctx.n_out, ctx.n_inputs
        if not torch.is_grad_enabled():  # plain backward
            v = adj.solve_adjoint(grads)
            return (None, None, None, *adj.lin.spec.unflatten(v), *([None] * n_in))
        # create_graph=True: the gradient must itself be differentiable
        lin = adj.lin
        if not lin.complete:
            raise FoldError(
                "double backward through fp.fold needs every tensor the step depends on, and "
                "the step's graph reaches a tensor fold did not see being read (e.g. through a "
                "custom C++ op or autograd.Function): pass that tensor explicitly as a param "
                "of fold, or differentiate only once (without create_graph=True).")
        saved = ctx.saved_tensors
        x_s, inputs = saved[:n_out], saved[n_out:]
        g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(grads, x_s)]
        if not inputs:
            return (None, None, None, *([None] * (n_out + n_in)))
        grads_in = FoldVJP.apply(adj, n_out, *g, *x_s, *inputs)
        return (None, None, None, *([None] * n_out), *grads_in)

    @staticmethod
    def jvp(ctx, adj_t, x_values_t, n_out_t, *tangents: Tensor | None):
        adj: Adjoint = ctx.adj
        lin = adj.lin
        t_out = tangents[:ctx.n_out]
        rhs = lin.spec.flatten([None if t is None else t.detach() for t in t_out], lin.x_parts)
        u = adj.solve_tangent(rhs)
        return tuple(lin.spec.unflatten(u))


def _merge_notes(notes: dict[str, list[Any]]) -> dict[str, Any]:
    """Per-key merge of what the step's building blocks noted (:mod:`fold_plugins._record`):
    same-shaped tensors (e.g. ``(B,)`` counts from several projections) are summed."""
    out: dict[str, Any] = {}
    for key, values in notes.items():
        if all(isinstance(v, Tensor) for v in values) and len({v.shape for v in values}) == 1:
            total = values[0].detach()
            for v in values[1:]:
                total = total + v.detach()
            out[key] = total
        else:
            out[key] = values if len(values) > 1 else values[0]
    return out


def fold(step: Callable, x_star: State, *params: Any, solver: str | Callable = "gmres",
         tol: float = 1e-10, maxiter: int | None = None, batched: bool = True,
         strict: bool = False, return_info: bool = False, fixed_point_tol: float | None = None,
         solver_options: dict | None = None, info: FoldInfo | None = None):
    """Attach the folded implicit gradient to a fixed point found by any solver.

    Args:
        step: one update of an iterative method, ``step(x, *params) -> x``; ``x*`` must be
            its fixed point. May capture tensors and ``nn.Module`` parameters: they get
            gradients too. For a tuple state it takes and returns a tuple. With
            ``batched=True`` the backward checks once (one VJP) that the step does not mix
            instances; a step object whose attribute ``batch_independent`` is ``True`` after
            it ran vouches for that itself (e.g. it verified it while building its own
            matrices) and the check is skipped. One whose ``record_captured`` is ``False`` runs
            without fold's op recorder (a Python call per torch op): captured leaves (module
            parameters) are still found by walking its graph, but a captured *non-leaf* tensor
            is then unnamed — first-order gradients and forward mode stay exact, double
            backward refuses — so such a step passes its non-leaf inputs as ``params``.
        x_star: the solution (Tensor or tuple of Tensors), from any code; its graph, if any,
            is ignored (detached).
        *params: tensors the step depends on explicitly (any other values pass through).
        solver: backward solver: ``"gmres"`` (default), ``"bicgstab"``, ``"dense"``,
            ``"fixed_point"`` (what unrolling computes), ``"auto"`` (dense or GMRES from a
            cost model measured per step), or a callable with the :mod:`fold_plugins.solvers`
            protocol. Every derivative mode uses it: backward, double backward (one more
            solve with ``I − Φ``) and forward mode.
        tol: relative residual per instance for the backward solve (floored at 50·eps).
        maxiter: backward iteration cap (solver default when ``None``).
        batched: dim 0 of every state tensor is the batch; each instance's system is solved
            and judged on its own. ``False``: the whole state is one problem.
        strict: raise :class:`FoldError` instead of warning on non-convergence.
        return_info: also return a :class:`FoldInfo` (backward fields filled by backward).
        fixed_point_tol: warn when ``‖U(x*) − x*‖ / (1+‖x*‖)`` exceeds it (default
            :func:`default_fixed_point_tol`): the gradient is then biased.
        solver_options: extra keywords for the solver (e.g. ``{"restart": 30}``, or
            ``{"preconditioner": pc}`` for gmres/bicgstab/auto, see
            :mod:`fold_plugins.preconditioners`); checked against the solver at the call.
        info: a :class:`FoldInfo` to fill in (adapters pass one with forward fields set).

    Returns:
        A tensor (tuple) equal to ``x_star`` bit for bit; with ``return_info``, ``(x, info)``.
    """
    _check_options(tol, maxiter, fixed_point_tol, batched, solver, solver_options)
    graph = torch.is_grad_enabled() or forward_ad._current_level >= 0
    lin = linearize(step, x_star, *params, batched=batched, graph=graph)
    info = info if info is not None else FoldInfo()
    info.batch_size = lin.spec.B
    if lin.spec.B == 0 or lin.spec.n == 0:  # nothing to solve: an empty result, whose path
        # to the step's inputs (0·U(x*), empty) gives them exact zero gradients in every mode
        info.fixed_point_residual = lin.x_parts[0].new_zeros(lin.spec.B)
        out = tuple(x.detach() + 0 * u if u.requires_grad else x.detach().clone()
                    for x, u in zip(lin.x_parts, lin.out_parts))
        result = tuple(out) if lin.tuple_state else out[0]
        return (result, info) if return_info else result
    res = lin.residual()
    info.fixed_point_residual = res
    notes = _merge_notes(lin.notes)
    info.extra.update(notes)
    if _record.active():  # an enclosing collector (e.g. fp.verify) hears what the step noted
        for key, value in notes.items():
            _record.note(key, value)
    excluded = _check_fixed_point(lin, res, fixed_point_tol, strict)
    if excluded is not None:
        info.extra["nonfinite_step"] = excluded
    x_values = tuple(t.detach() for t in lin.x_parts)
    tangents = _forward_ad_active(params, lin)
    if torch.is_grad_enabled() or tangents:
        lin.warn_unreached()
    if not (torch.is_grad_enabled() and lin.requires_grad) and not tangents:
        out = tuple(x.clone() for x in x_values)
    else:
        adj = Adjoint(lin, solver, tol, maxiter, strict, info, dict(solver_options or {}))
        adj.excluded = excluded
        out = _FoldFunction.apply(adj, x_values, len(lin.out_parts), *lin.out_parts,
                                  *lin.inputs)
    result = tuple(out) if lin.tuple_state else out[0]
    return (result, info) if return_info else result


def _forward_ad_active(params: tuple[Any, ...], lin: Linearization) -> bool:
    """Whether some input carries a forward-mode tangent (``torch.autograd.forward_ad``)."""
    if forward_ad._current_level < 0:
        return False
    # the step's output carries a tangent whenever anything it read did (also a captured
    # tensor that a step without the recorder does not name)
    return any(forward_ad.unpack_dual(t).tangent is not None
               for t in [*lin.out_parts, *lin.inputs, *(p for p in params
                                                       if isinstance(p, Tensor))])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_options(tol: Any, maxiter: Any, fixed_point_tol: Any, batched: Any, solver: Any,
                   solver_options: Any) -> None:
    """Every keyword of :func:`fold` checked at the call (not later in backward)."""
    if not _is_number(tol) or not math.isfinite(tol) or tol < 0:
        raise FoldError(f"tol must be a finite number ≥ 0, got {tol!r}.")
    if maxiter is not None and (not isinstance(maxiter, int) or isinstance(maxiter, bool)
                                or maxiter < 1):
        raise FoldError(f"maxiter must be a positive int or None, got {maxiter!r}.")
    if fixed_point_tol is not None and (not _is_number(fixed_point_tol)
                                        or not fixed_point_tol >= 0):
        raise FoldError(f"fixed_point_tol must be a number ≥ 0 (inf: no check) or None (the "
                        f"dtype's default), got {fixed_point_tol!r}.")
    if not isinstance(batched, bool):
        raise FoldError(f"batched must be True or False, got {batched!r}.")
    name, fn = get_solver(solver)  # an unknown name fails here, not in backward
    if solver_options is None or (isinstance(solver_options, dict) and not solver_options):
        return
    if not isinstance(solver_options, dict):
        raise FoldError(f"solver_options must be a dict of keywords for the solver, got "
                        f"{type(solver_options).__name__}.")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check against
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    known = [k for k, p in sig.parameters.items()
             if p.kind is p.KEYWORD_ONLY and k not in ("x0", "tol", "maxiter")]
    unknown = [k for k in solver_options if k not in known]
    if unknown:
        raise FoldError(f"solver_options has {unknown} which solver {name!r} does not take; "
                        f"it accepts {known or 'no extra options'}.")


def _check_fixed_point(lin: Linearization, res: Tensor, fixed_point_tol: float | None,
                       strict: bool) -> Tensor | None:
    """Report a step that is NaN/Inf at ``x*`` (returns those instances: they get NaN
    gradients) and warn (or raise) where ``x*`` is not a fixed point (biased gradient)."""
    finite = torch.isfinite(res)
    excluded = None
    culprits = [] if bool(finite.all()) else lin.nonfinite_constants()
    lin.constants = []  # kept only for this diagnosis
    if culprits:
        raise FoldError(
            f"step(x_star) is NaN/Inf for instance(s) {instance_list(~finite)}, and the step "
            f"reads tensor(s) it captures that hold NaN/Inf: captured constant(s) "
            f"{', '.join(culprits)}, in the order the step first reads them (they need no "
            "grad, so they are not params). Fix or replace those tensors; no gradient through "
            "this step is meaningful while they are non-finite.")
    if not bool(finite.all()):
        excluded = ~finite
        msg = (f"step(x_star) is NaN/Inf for instance(s) {instance_list(excluded)}: the step "
               "is not defined at the solution there (e.g. log or division at 0, an "
               "infeasible instance), so neither is the folded gradient; those instances get "
               "NaN gradients, the others stay exact. Check those instances' forward solve "
               "and the step's domain")
        if strict:
            raise FoldError(msg + ".")
        warnings.warn(msg + ".", FoldConvergenceWarning, stacklevel=3)
        res = torch.where(finite, res, torch.zeros_like(res))
    fp_tol = default_fixed_point_tol(lin.x_parts[0].dtype) if fixed_point_tol is None \
        else float(fixed_point_tol)
    bad = ~(res <= fp_tol)
    if bool(bad.any()):
        msg = (f"x_star is not a fixed point of step for instance(s) {instance_list(bad)}: "
               f"‖U(x*) − x*‖/(1+‖x*‖) up to "
               f"{float(res[bad].max()):.2e} > {fp_tol:.1e}. The folded gradient is biased; "
               "solve the forward to a tighter tolerance, or check that step matches the "
               "problem your solver solved.")
        if strict:
            raise FoldError(msg)
        warnings.warn(msg, FoldConvergenceWarning, stacklevel=3)
    return excluded
