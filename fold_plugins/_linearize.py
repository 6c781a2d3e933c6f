"""One differentiable step at the fixed point, and the operators built on it.

:class:`Linearization` evaluates ``x⁺ = U(x*, θ)`` once with a graph; its VJPs give
``v ↦ Φᵀv`` (``Φ = ∂U/∂x``) for the backward solvers, and the same graph carries ``Ψᵀv``
(``Ψ = ∂U/∂θ``) to every tensor the step touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _record
from ._errors import FoldError
from ._state import (
    State,
    as_parts,
    check_finite,
    check_step_output,
    relative_residual,
    validate_state,
)

__all__ = ["Linearization", "linearize"]


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
        with torch.enable_grad(), _record.collect() as notes:
            out = step(tuple(self.x_parts) if tuple_state else self.x_parts[0], *params)
        self.notes = notes  # what the step's building blocks reported (e.g. weakly active)
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
