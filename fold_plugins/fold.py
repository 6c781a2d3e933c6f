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
from ._state import (
    State,
    as_parts,
    check_finite,
    check_step_output,
    relative_residual,
    validate_state,
)
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


# ----------------------------------------------------------------------------- state handling
# (Tensor-or-tuple parts, output checks, residual: fold_plugins._state)

class _Spec:
    """Flattens a tuple state into per-instance rows ``(B, n)`` and back."""

    def __init__(self, parts: Sequence[Tensor], batched: bool):
        self.shapes = [p.shape for p in parts]
        self.batched = batched
        if batched:
            self.B = parts[0].shape[0]
            self.sizes = [math.prod(s[1:]) for s in self.shapes]
        else:
            self.B = 1
            self.sizes = [p.numel() for p in parts]
        self.n = sum(self.sizes)

    def flatten(self, parts: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
        rows = []
        for p, ref, size in zip(parts, like, self.sizes):
            if p is None:
                p = torch.zeros_like(ref)
            rows.append(p.reshape(self.B, size))
        return torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]

    def unflatten(self, v: Tensor, lead: tuple[int, ...] = ()) -> list[Tensor]:
        out, start = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(v[..., start:start + size].reshape(*lead, *shape))
            start += size
        return out


# ----------------------------------------------------------------------------- validation

def _validate(x_parts: tuple[Tensor, ...], params: tuple[Any, ...], batched: bool,
              tuple_state: bool) -> torch.dtype:
    validate_state(x_parts, tuple_state, batched, "x_star", same_layout=True, finite=True)
    dtype = x_parts[0].dtype
    for i, p in enumerate(params):
        if isinstance(p, Tensor):
            check_finite(p, f"params[{i}]")
            if p.is_floating_point() and p.dtype != dtype:
                raise FoldError(f"mixed dtypes: x_star is {dtype} but params[{i}] is {p.dtype}; "
                                f"cast params[{i}] (or x_star) so they match.")
    return dtype


# ----------------------------------------------------------------------------- linearization

class Linearization:
    """One differentiable step ``x⁺ = U(x*, θ)`` and the operators built on it.

    Attributes:
        x_parts: detached copies of ``x*`` that require grad (the step's state input).
        out_parts: the step's output, with its graph.
        spec: flattening of the state into ``(B, n)`` rows.
    """

    def __init__(self, step: Callable, x_parts: tuple[Tensor, ...], params: tuple[Any, ...],
                 batched: bool, tuple_state: bool):
        self.spec = _Spec(x_parts, batched)
        self.tuple_state = tuple_state
        self.x_parts = tuple(t.detach().requires_grad_(True) for t in x_parts)
        with torch.enable_grad():
            out = step(tuple(self.x_parts) if tuple_state else self.x_parts[0], *params)
        out_parts = self._check_output(out)
        self.out_parts = out_parts
        self._diff = [i for i, o in enumerate(out_parts) if o.requires_grad]

    def _check_output(self, out: Any) -> tuple[Tensor, ...]:
        return check_step_output(out, self.x_parts, self.tuple_state)

    @property
    def requires_grad(self) -> bool:
        """Whether the step's output depends on any tensor that needs a gradient besides ``x``.

        Walks the one-step graph until it meets a leaf other than the state copies (cheap: it
        stops at the first such leaf). Without one the folded backward would be a pointless
        solve, so :func:`fold` returns the value without a graph.
        """
        if not self._diff:
            return False
        own = {id(x) for x in self.x_parts}
        seen: set[int] = set()
        stack = [self.out_parts[i].grad_fn for i in self._diff]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            var = getattr(node, "variable", None)
            if var is not None:  # an AccumulateGrad node: a leaf that requires grad
                if id(var) not in own:
                    return True
                continue
            stack.extend(nf for nf, _ in node.next_functions)
        return False

    def residual(self) -> Tensor:
        """``(B,)`` relative fixed-point residual ``‖U(x*) − x*‖ / (1 + ‖x*‖)``."""
        with torch.no_grad():
            return relative_residual(self.out_parts, self.x_parts, self.spec.batched)

    def vjp(self, v: Tensor) -> Tensor:
        """``Φᵀ v`` for ``v`` of shape ``(B, n)``."""
        return self._vjp(v, batched=False)

    def vjp_batched(self, V: Tensor) -> Tensor:
        """``Φᵀ V[k]`` for each ``k``, ``V`` of shape ``(k, B, n)`` (vmapped autograd)."""
        try:
            return self._vjp(V, batched=True)
        except RuntimeError:
            # some ops have no batching rule: fall back to one VJP per row
            return torch.stack([self._vjp(V[i], batched=False) for i in range(V.shape[0])])

    def _vjp(self, v: Tensor, batched: bool) -> Tensor:
        lead = (v.shape[0],) if batched else ()
        if not self._diff:
            return torch.zeros_like(v)
        cot = self.spec.unflatten(v, lead)
        outs = [self.out_parts[i] for i in self._diff]
        grads = torch.autograd.grad(outs, self.x_parts, [cot[i] for i in self._diff],
                                    retain_graph=True, allow_unused=True,
                                    is_grads_batched=batched)
        rows = []
        for g, size in zip(grads, self.spec.sizes):
            if g is None:
                rows.append(v.new_zeros(*lead, self.spec.B, size))
            else:
                rows.append(g.reshape(*lead, self.spec.B, size))
        return torch.cat(rows, dim=-1) if len(rows) > 1 else rows[0]


class _IminusPhiT:
    """The operator ``v ↦ v − Φᵀv`` in the solver protocol (with ``matmat`` for ``dense``)."""

    def __init__(self, lin: Linearization):
        self.lin = lin
        self.count = 0

    def __call__(self, v: Tensor) -> Tensor:
        self.count += 1
        return v - self.lin.vjp(v)

    def matmat(self, V: Tensor) -> Tensor:
        self.count += V.shape[0]
        return V - self.lin.vjp_batched(V)


def linearize(step: Callable, x_star: State, *params: Any, batched: bool = True) -> Linearization:
    """Validate inputs and take one differentiable step at ``x_star`` (a :class:`Linearization`)."""
    if not callable(step):
        raise FoldError(f"step must be callable step(x, *params) -> x, got {type(step).__name__}.")
    x_parts, tuple_state = as_parts(x_star, "x_star")
    _validate(x_parts, params, batched, tuple_state)
    return Linearization(step, x_parts, params, batched, tuple_state)


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
        if not bool(torch.isfinite(s.residual[bad]).all()):
            remedy = ("the step's vector-Jacobian product is NaN/Inf at x_star (a point where "
                      "the step is not differentiable, e.g. sqrt or norm at 0): make the step "
                      "differentiable there")
        elif bool(getattr(s, "extra", {}).get("stagnated", torch.zeros(1, dtype=torch.bool))
                  .any()):
            remedy = ("the residual stagnated: the step's VJP is only accurate to about that "
                      "level (round-off inside the step), so loosen tol to it or compute the "
                      "step more accurately (e.g. float64)")
        elif getattr(s, "diverged", None) is not None and bool(s.diverged.any()):
            remedy = ("the fixed-point iteration diverged, so ρ(Φ) ≥ 1 for that step: use "
                      "solver='gmres' (or 'dense' for small states)")
        elif self.solver_name == "fixed_point":
            remedy = ("it converges slowly (ρ(Φ) near 1): use solver='gmres', or raise "
                      "maxiter")
        elif self.solver_name == "dense":
            remedy = "I − Φᵀ is ill-conditioned there: check the step size and the problem"
        else:
            remedy = (f"raise maxiter (now {self.maxiter}), loosen tol if the step is only "
                      "accurate to round-off, use solver='dense' for small states, or "
                      "precondition the step (e.g. a Newton or scaled step)")
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
