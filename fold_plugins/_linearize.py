"""One differentiable step at the fixed point, and the operators built on it.

:class:`Linearization` evaluates ``x⁺ = U(x*, θ)`` once with a graph; its VJPs give
``v ↦ Φᵀv`` (``Φ = ∂U/∂x``) for the backward solvers, and the same graph carries ``Ψᵀv``
(``Ψ = ∂U/∂θ``) to every tensor the step touched.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _record
from ._capture import (
    StepRecorder,
    functorch_active,
    is_functorch_tensor,
    reach,
    sequence_mark,
)
from ._errors import FoldConvergenceWarning, FoldError
from ._state import (
    State,
    as_parts,
    check_finite,
    check_step_output,
    relative_residual,
    validate_state,
)
from .protocols import step_traits

__all__ = ["Linearization", "linearize"]

_FUNCTORCH_MESSAGE = (
    "fp.fold does not support torch.func transforms (torch.func.grad, jacrev, jacfwd, jvp, "
    "vjp, vmap, functional_call under them): it runs a forward solve outside autograd and "
    "differentiates one step with torch.autograd inside. Use torch.autograd.grad / .backward "
    "(also double backward), torch.autograd.functional.{jacobian, hessian, hvp, vhp, jvp}, or "
    "torch.autograd.forward_ad for forward mode — all exact through fold — and the batch "
    "dimension (batched=True) instead of vmap.")


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
    named = [(f"x_star[{i}]" if tuple_state else "x_star", t) for i, t in enumerate(x_parts)]
    named += [(f"params[{i}]", p) for i, p in enumerate(params) if isinstance(p, Tensor)]
    if functorch_active() or any(is_functorch_tensor(t) for _, t in named):
        raise FoldError(_FUNCTORCH_MESSAGE)
    for name, t in named:
        if t.device.type == "meta":
            raise FoldError(f"{name} is a meta tensor (no values): fold needs the actual "
                            "solution to take a step at it; materialise it (e.g. .to('cpu')) "
                            "first.")
    dtype = x_parts[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        raise FoldError(
            f"x_star is {dtype}: the folded backward solves a linear system whose round-off "
            f"in {dtype} (eps {torch.finfo(dtype).eps:.0e}) exceeds any useful tolerance, and "
            "several torch linear-algebra kernels do not exist for it. Cast x_star and params "
            "to float32 (or float64) for fold, and cast the result back if you need to.")
    validate_state(x_parts, tuple_state, batched, "x_star", same_layout=True, finite=True)
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
                 batched: bool, tuple_state: bool, graph: bool = True):
        self.spec = _Spec(x_parts, batched)
        self.tuple_state = tuple_state
        #: identifies the step's code across calls (``solver="auto"`` caches its costs by it)
        self.step_key = _step_key(step)
        self._jt: tuple[Tensor, Tensor] | None = None
        if not graph:  # value and residual only (fold under no_grad): no graph, no recording
            self.x_parts = tuple(t.detach() for t in x_parts)
            with torch.no_grad(), _record.collect() as notes:
                out = step(tuple(self.x_parts) if tuple_state else self.x_parts[0], *params)
            self.notes = notes
            self.constants: list[Tensor] = []
            self.batch_independent = step_traits(step).batch_independent
            self.out_parts = self._check_output(out)
            self._diff, self.inputs = [], []
            self.complete = True
            self._unreached: tuple[list[int], list[Tensor]] = ([], [])
            return
        self.x_parts = tuple(t.detach().requires_grad_(True) for t in x_parts)
        # a step may opt out of the recorder (module _capture): the graph walk finds its leaves
        recorder = StepRecorder(self.x_parts, params) \
            if step_traits(step).record_captured else None
        since = sequence_mark(self.x_parts[0]) if recorder is None else None
        try:
            with torch.enable_grad(), _record.collect() as notes, \
                    recorder if recorder is not None else contextlib.nullcontext():
                out = step(tuple(self.x_parts) if tuple_state else self.x_parts[0], *params)
        except RuntimeError as exc:
            if "in-place" in str(exc) or "inplace" in str(exc):
                raise FoldError(
                    f"step modified a tensor in place ({exc}); the folded backward needs the "
                    "step's inputs unchanged: write the step out of place, or clone first."
                ) from exc
            raise
        self.notes = notes  # what the step's building blocks reported (e.g. weakly active)
        #: the no-grad tensors the step read (closure constants): named by
        #: :meth:`nonfinite_constants` when the output is NaN/Inf; released by fold after it
        self.constants = list(recorder.constants.values()) if recorder is not None else []
        #: the step vouches that ∂U[i]/∂x[j] = 0 for i ≠ j (read after it ran: a step may
        #: verify it while it runs); the backward then skips its one-VJP probe
        self.batch_independent = step_traits(step).batch_independent
        out_parts = self._check_output(out)
        self.out_parts = out_parts
        self._diff = [i for i, o in enumerate(out_parts) if o.requires_grad]
        # every tensor the step reads that requires grad: explicit params first, then captured
        explicit = [p for p in params if isinstance(p, Tensor) and p.requires_grad]
        seen = {id(p) for p in explicit}
        captured = [t for k, t in recorder.captured.items() if k not in seen] \
            if recorder is not None else []
        walk = reach([out_parts[i] for i in self._diff], self.x_parts, explicit + captured,
                     since)
        captured += [t for t in walk.leaves if id(t) not in seen]
        #: tensors the output depends on: the inputs of the folded op (double backward, JVPs)
        self.inputs = [t for t in explicit + captured if id(t) in walk.reached]
        for j, t in enumerate(t for t in self.inputs if id(t) not in seen):
            check_finite(t, f"a tensor captured by step (#{j}, shape {tuple(t.shape)}, "
                            f"{t.dtype})")
        #: a dependency the recorder missed: first order still exact, higher order refused
        self.complete = not walk.unknown
        self._unreached = ([i for i, p in enumerate(params) if isinstance(p, Tensor)
                            and p.requires_grad and id(p) not in walk.reached],
                           [t for t in captured if id(t) not in walk.reached])

    def nonfinite_constants(self) -> list[str]:
        """The captured constants (tensors the step read that need no grad and that it did not
        make) holding NaN/Inf, described by position, shape, dtype and count."""
        found = []
        for j, t in enumerate(self.constants):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                found.append(f"#{j} (shape {tuple(t.shape)}, {t.dtype}, {int(bad.sum())} "
                             "NaN/Inf)")
        return found

    def _check_output(self, out: Any) -> tuple[Tensor, ...]:
        return check_step_output(out, self.x_parts, self.tuple_state)

    @property
    def requires_grad(self) -> bool:
        """Whether the step's output depends on any tensor that needs a gradient besides ``x``.

        Without one the folded backward would be a pointless solve, so :func:`fold` returns the
        value without a graph.
        """
        return bool(self.inputs) or not self.complete

    def warn_unreached(self) -> None:
        """One warning naming params / captured tensors that require grad but that the step's
        output does not depend on differentiably (they would silently get no gradient)."""
        params, captured = self._unreached
        if not params and not captured:
            return
        names = [f"params[{i}]" for i in params]
        names += [f"a captured tensor of shape {tuple(t.shape)}" for t in captured]
        warnings.warn(
            f"{', '.join(names)} require(s) grad but the step's output does not depend on "
            "it differentiably (detached, or computed outside torch, e.g. in numpy?): it gets "
            "no gradient from fold. Compute the step with torch operations on the tensor "
            "itself, or pass it with requires_grad=False if that is intended.",
            FoldConvergenceWarning, stacklevel=4)

    def residual(self) -> Tensor:
        """``(B,)`` relative fixed-point residual ``‖U(x*) − x*‖ / (1 + ‖x*‖)``."""
        with torch.no_grad():
            return relative_residual(self.out_parts, self.x_parts, self.spec.batched)

    def vjp(self, v: Tensor) -> Tensor:
        """``Φᵀ v`` for ``v`` of shape ``(B, n)``."""
        return self._vjp(v, batched=False)

    def jvp(self, u: Tensor) -> Tensor:
        """``Φ u`` for ``u`` of shape ``(B, n)``, by the double-VJP identity
        ``Φu = ∂/∂y ⟨Φᵀy, u⟩`` on a graph of ``y ↦ Φᵀy`` built once per linearization."""
        if not self._diff:
            return torch.zeros_like(u)
        if self._jt is None:
            with torch.enable_grad():
                y = torch.zeros_like(u).requires_grad_(True)
                self._jt = (y, self._vjp(y, batched=False, create_graph=True))
        y, jt = self._jt
        if not jt.requires_grad:  # Φᵀy does not depend on y: Φ = 0
            return torch.zeros_like(u)
        (out,) = torch.autograd.grad(jt, y, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if out is None else out

    def input_vjp(self, v: Tensor, create_graph: bool = False) -> list[Tensor]:
        """``Ψᵀ v`` for every tensor in :attr:`inputs` (zeros where it is unused)."""
        outs = [self.out_parts[i] for i in self._diff]
        cot = self.spec.unflatten(v)
        grads = torch.autograd.grad(outs, self.inputs, [cot[i] for i in self._diff],
                                    retain_graph=True, allow_unused=True,
                                    create_graph=create_graph)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.inputs)]

    def vjp_batched(self, V: Tensor) -> Tensor:
        """``Φᵀ V[k]`` for each ``k``, ``V`` of shape ``(k, B, n)`` (vmapped autograd)."""
        try:
            return self._vjp(V, batched=True)
        except RuntimeError:
            # some ops have no batching rule: fall back to one VJP per row
            return torch.stack([self._vjp(V[i], batched=False) for i in range(V.shape[0])])

    def _vjp(self, v: Tensor, batched: bool, create_graph: bool = False) -> Tensor:
        lead = (v.shape[0],) if batched else ()
        if not self._diff:
            return torch.zeros_like(v)
        cot = self.spec.unflatten(v, lead)
        outs = [self.out_parts[i] for i in self._diff]
        cots = [cot[i] for i in self._diff]
        grads = None
        if not batched and not create_graph and _FAST_ENGINE[0]:
            grads = _engine_grad(outs, self.x_parts, cots)
        if grads is None:
            grads = torch.autograd.grad(outs, self.x_parts, cots, retain_graph=True,
                                        allow_unused=True, is_grads_batched=batched,
                                        create_graph=create_graph)
        rows = []
        for g, size in zip(grads, self.spec.sizes):
            if g is None:
                rows.append(v.new_zeros(*lead, self.spec.B, size))
            else:
                rows.append(g.reshape(*lead, self.spec.B, size))
        return torch.cat(rows, dim=-1) if len(rows) > 1 else rows[0]

    def vjp_fn(self) -> Callable[[Tensor], Tensor]:
        """``v ↦ Φᵀv`` as a callable for repeated use (one per backward solve): the same result
        as :meth:`vjp`, bit for bit. For a one-tensor state whose output has a graph it is a
        single engine call on prebuilt argument tuples (no unflatten, no lists, no cat);
        otherwise :meth:`vjp` itself."""
        if len(self.x_parts) != 1 or self._diff != [0] or not _FAST_ENGINE[0]:
            return self.vjp
        outs, inputs = (self.out_parts[0],), self.x_parts
        shape, rows = outs[0].shape, (self.spec.B, self.spec.n)

        def vjp(v: Tensor) -> Tensor:
            grads = _engine_grad(outs, inputs, (v.reshape(shape),))
            if grads is None:  # this torch's engine entry point differs: the general path
                return self.vjp(v)
            g = grads[0]
            return v.new_zeros(rows) if g is None else g.reshape(rows)
        return vjp


#: whether the direct engine call of :func:`_engine_grad` works in this torch (checked once)
_FAST_ENGINE = [True]
_engine_run_backward: Callable[..., tuple[Tensor | None, ...]] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None)
if _engine_run_backward is None:  # pragma: no cover - a torch without it: autograd.grad
    _FAST_ENGINE[0] = False


def _engine_grad(outs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor]
                 ) -> tuple[Tensor | None, ...] | None:
    """``torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True)``
    through the engine entry point that ``autograd.grad`` itself calls, without its per-call
    argument normalisation (≈ 40 µs, as much as a small step's whole VJP; one per Krylov
    iteration). Same engine, same graph, same result bit for bit. ``None`` (and the fast path
    switched off for the process) when this torch's private entry point differs: callers then
    use ``torch.autograd.grad``."""
    if _engine_run_backward is None:
        return None
    try:
        return _engine_run_backward(tuple(outs), tuple(cots), True, False, tuple(inputs),
                                    True, False)
    except (TypeError, AttributeError):
        _FAST_ENGINE[0] = False
        return None


def _step_key(step: Callable) -> Any:
    """The code object behind ``step`` (a function, bound method, closure or module's
    ``forward``): the same for every call of one step, whatever its parameters."""
    fn = getattr(step, "__func__", step)
    code = getattr(fn, "__code__", None)
    if code is None:
        fwd = getattr(type(step), "forward", None) or type(step).__dict__.get("__call__")
        code = getattr(fwd, "__code__", None)
    return code if code is not None else type(step)


class AdjointOperator:
    """The operator ``v ↦ v − Φᵀv`` of (I − Φ)ᵀv = g, in the solver protocol (with ``matmat``
    for ``dense``).

    The VJP is captured once (:meth:`Linearization.vjp_fn`): each application is one engine
    call and one subtraction, the least a Krylov iteration can spend on the operator."""

    def __init__(self, lin: Linearization):
        self.lin = lin
        self.count = 0
        self.cost_key = lin.step_key
        self._vjp = lin.vjp_fn()

    def __call__(self, v: Tensor) -> Tensor:
        self.count += 1
        return v - self._vjp(v)

    def matmat(self, V: Tensor) -> Tensor:
        self.count += V.shape[0]
        return V - self.lin.vjp_batched(V)


def linearize(step: Callable, x_star: State, *params: Any, batched: bool = True,
              graph: bool = True) -> Linearization:
    """Validate inputs and take one differentiable step at ``x_star`` (a :class:`Linearization`;
    ``graph=False``: the step's value only, for a fold that will not be differentiated)."""
    if not callable(step):
        raise FoldError(f"step must be callable step(x, *params) -> x, got {type(step).__name__}.")
    x_parts, tuple_state = as_parts(x_star, "x_star")
    _validate(x_parts, params, batched, tuple_state)
    return Linearization(step, x_parts, params, batched, tuple_state, graph)
