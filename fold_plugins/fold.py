"""The folded autograd op: ``fold(step, x_star, *params)``.

Given any fixed point ``x* = U(x*, θ)`` of an update step ``U``, :func:`fold` returns a
tensor equal to ``x*`` whose backward pass solves

    (I − Φ)ᵀ v = g,     Φ = ∂U/∂x (x*, θ)

with a matrix-free solver (VJPs of one step) and then returns ``Ψᵀ v``, ``Ψ = ∂U/∂θ``,
through plain autograd of that one step — so every tensor the step touched (explicit
``params``, ``nn.Module`` parameters, closure tensors) receives its gradient.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._errors import FoldConvergenceWarning, FoldError, instance_list, report_unconverged
from ._linearize import Linearization, _IminusPhiT, linearize
from ._state import State
from ._verdicts import backward_remedy
from .solvers import SolveInfo, get_solver

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
        if self.backward_ran:
            parts.append(f"backward {self.backward_solver}: iters max "
                         f"{int(self.backward_iterations.max())}, residual "
                         f"{fmt(self.backward_residual)}, converged "
                         f"{int(self.backward_converged.sum())}/{self.batch_size}")
        return "; ".join(parts)


def default_fixed_point_tol(dtype: torch.dtype) -> float:
    """Largest ``‖U(x*) − x*‖ / (1 + ‖x*‖)`` accepted silently: 1e-6 (float64), 1e-3 otherwise."""
    return 1e-6 if dtype == torch.float64 else 1e-3


# ----------------------------------------------------------------------------- autograd op

class _Backward:
    """State carried from forward to backward of the folded op."""

    def __init__(self, lin: Linearization, solver: str | Callable, tol: float,
                 maxiter: int | None, strict: bool, info: FoldInfo, solver_options: dict):
        self.lin = lin
        self.solver_name, self.solver = get_solver(solver)
        self.tol = tol
        self.maxiter = maxiter
        self.strict = strict
        self.info = info
        self.solver_options = solver_options

    def solve(self, grads: Sequence[Tensor | None]) -> list[Tensor]:
        lin = self.lin
        g = lin.spec.flatten(list(grads), lin.x_parts).detach()
        finite = torch.isfinite(g).all(dim=1)
        all_finite = bool(finite.all())
        if not all_finite:
            # NaN in, NaN out for those instances, without spending a solve on them
            msg = (f"the incoming gradient of fold's output is NaN/Inf for instance(s) "
                   f"{instance_list(~finite)}: it comes from upstream of fold (the loss or "
                   "later layers); those instances get NaN gradients")
            if self.strict:
                raise FoldError(msg)
            warnings.warn(msg, FoldConvergenceWarning, stacklevel=3)
            g = torch.where(finite[:, None], g, torch.zeros_like(g))
        op = _IminusPhiT(lin)
        t0 = time.perf_counter()
        v, sinfo = self.solver(op, g, x0=None, tol=self.tol, maxiter=self.maxiter,
                               **self.solver_options)
        self.info.backward_time = time.perf_counter() - t0
        self._record(sinfo, op.count)
        self._judge(sinfo)
        if not all_finite:
            v = torch.where(finite[:, None], v, torch.full_like(v, float("nan")))
        return lin.spec.unflatten(v)

    def zero(self) -> list[Tensor]:
        """A zero cotangent: ``v = 0`` exactly, no solve."""
        xs = self.lin.x_parts
        B, dev = self.lin.spec.B, xs[0].device
        self._record(SolveInfo(torch.zeros(B, dtype=torch.int64, device=dev),
                               torch.zeros(B, dtype=xs[0].dtype, device=dev),
                               torch.ones(B, dtype=torch.bool, device=dev), 0,
                               self.solver_name), 0)
        return [torch.zeros_like(x) for x in xs]

    def _record(self, s: SolveInfo, count: int) -> None:
        info = self.info
        # a dispatching solver (``auto``) names what actually ran: "auto (dense)"
        ran = getattr(s, "solver", "")
        info.backward_solver = (self.solver_name if not ran or ran == self.solver_name
                                else f"{self.solver_name} ({ran})")
        info.backward_iterations = s.iterations
        info.backward_residual = s.residual
        info.backward_converged = s.converged
        info.backward_matvecs = count
        if getattr(s, "diverged", None) is not None:
            info.extra["backward_diverged"] = s.diverged

    def _judge(self, s: SolveInfo) -> None:
        bad = ~s.converged
        if not bool(bad.any()):
            return
        remedy = backward_remedy(s, self.solver_name, self.maxiter)
        what = (f"folded backward ({self.solver_name}, tol {self.tol:.1e}, "
                f"{int(s.iterations[bad].max())} iterations; error = relative residual)")
        report_unconverged(bad, s.residual, what, remedy, self.strict, stacklevel=5)


class _FoldFunction(torch.autograd.Function):
    """Forward: ``x*`` (clones). Backward: ``v = (I − Φᵀ)⁻¹ g`` sent into the step's graph."""

    @staticmethod
    def forward(ctx, state: _Backward, x_values: tuple[Tensor, ...], *out_parts: Tensor):
        ctx.state = state
        return tuple(x.clone() for x in x_values)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        state: _Backward = ctx.state
        if all(g is None or not bool(g.any()) for g in grads):
            return (None, None, *state.zero())
        v = state.solve(grads)
        return (None, None, *v)


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
            gradients too. For a tuple state it takes and returns a tuple.
        x_star: the solution (Tensor or tuple of Tensors), from any code; its graph, if any,
            is ignored (detached).
        *params: tensors the step depends on explicitly (any other values pass through).
        solver: backward solver: ``"gmres"`` (default), ``"bicgstab"``, ``"dense"``,
            ``"fixed_point"`` (what unrolling computes), ``"auto"`` (dense for small
            states, else gmres), or a callable with the :mod:`fold_plugins.solvers` protocol.
        tol: relative residual per instance for the backward solve (floored at 50·eps).
        maxiter: backward iteration cap (solver default when ``None``).
        batched: dim 0 of every state tensor is the batch; each instance's system is solved
            and judged on its own. ``False``: the whole state is one problem.
        strict: raise :class:`FoldError` instead of warning on non-convergence.
        return_info: also return a :class:`FoldInfo` (backward fields filled by backward).
        fixed_point_tol: warn when ``‖U(x*) − x*‖ / (1+‖x*‖)`` exceeds it (default
            :func:`default_fixed_point_tol`): the gradient is then biased.
        solver_options: extra keywords for the solver (e.g. ``{"restart": 30}``).
        info: a :class:`FoldInfo` to fill in (adapters pass one with forward fields set).

    Returns:
        A tensor (tuple) equal to ``x_star`` bit for bit; with ``return_info``, ``(x, info)``.
    """
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise FoldError(f"tol must be a finite number ≥ 0, got {tol!r}.")
    if maxiter is not None and (not isinstance(maxiter, int) or maxiter < 1):
        raise FoldError(f"maxiter must be a positive int or None, got {maxiter!r}.")
    get_solver(solver)  # an unknown name fails here, not in backward
    lin = linearize(step, x_star, *params, batched=batched)
    info = info if info is not None else FoldInfo()
    info.batch_size = lin.spec.B
    res = lin.residual()
    info.fixed_point_residual = res
    info.extra.update(_merge_notes(lin.notes))
    fp_tol = default_fixed_point_tol(lin.x_parts[0].dtype) if fixed_point_tol is None \
        else float(fixed_point_tol)
    bad = res > fp_tol
    if bool(bad.any()):
        msg = (f"x_star is not a fixed point of step for instance(s) {instance_list(bad)}: "
               f"‖U(x*) − x*‖/(1+‖x*‖) up to "
               f"{float(res[bad].max()):.2e} > {fp_tol:.1e}. The folded gradient is biased; "
               "solve the forward to a tighter tolerance, or check that step matches the "
               "problem your solver solved.")
        if strict:
            raise FoldError(msg)
        warnings.warn(msg, FoldConvergenceWarning, stacklevel=2)
    x_values = tuple(t.detach() for t in lin.x_parts)
    if not (torch.is_grad_enabled() and lin.requires_grad):
        out = tuple(x.clone() for x in x_values)
    else:
        state = _Backward(lin, solver, tol, maxiter, strict, info, dict(solver_options or {}))
        out_parts = tuple(lin.out_parts[i] for i in range(len(lin.out_parts)))
        out = _FoldFunction.apply(state, x_values, *out_parts)
    result = tuple(out) if lin.tuple_state else out[0]
    return (result, info) if return_info else result
