"""State handling shared by :func:`fold_plugins.fold`, the forward drivers in
:mod:`fold_plugins.steps` and the adapters: Tensor-or-tuple states, checks of a step's output,
the relative fixed-point residual ``‖U(x) − x‖ / (1 + ‖x‖)`` and the one forward fixed-point
iteration ``x ← U(x)`` (per-instance freezing, NaN guard, batched or not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._errors import FoldError

__all__ = ["State", "FixedPointResult", "as_parts", "pack", "check_step_output",
           "validate_state", "check_finite", "instance_norm", "relative_residual",
           "fixed_point_iteration"]

State = Tensor | tuple[Tensor, ...]


def as_parts(x: Any, name: str) -> tuple[tuple[Tensor, ...], bool]:
    """``(parts, is_tuple)`` of a Tensor or a non-empty tuple/list of Tensors.

    Raises:
        FoldError: naming ``name`` and what was seen, for anything else.
    """
    if isinstance(x, Tensor):
        return (x,), False
    if isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x):
        return tuple(x), True
    seen = type(x).__name__
    if isinstance(x, (tuple, list)):
        seen += f" of {[type(t).__name__ for t in x]}"
    raise FoldError(f"{name} must be a Tensor or a non-empty tuple of Tensors, got {seen}.")


def pack(parts: tuple[Tensor, ...], is_tuple: bool) -> State:
    """Inverse of :func:`as_parts`: a tuple for a tuple state, else the one Tensor."""
    return tuple(parts) if is_tuple else parts[0]


def check_step_output(out: Any, like: tuple[Tensor, ...], is_tuple: bool,
                      where: str | None = None) -> tuple[Tensor, ...]:
    """Parts of ``step``'s output; raises :class:`FoldError` unless it matches the state
    ``like`` in structure, shape and dtype. ``where`` (e.g. ``"unroll, step 3"``) prefixes
    the message."""
    pre = f"{where}: " if where else ""
    if is_tuple:
        if not isinstance(out, (tuple, list)) or len(out) != len(like):
            got = (f"a {type(out).__name__} of length {len(out)}"
                   if isinstance(out, (tuple, list)) else f"a {type(out).__name__}")
            raise FoldError(f"{pre}step must return a tuple of {len(like)} tensors like the "
                            f"state, got {got}.")
        parts = tuple(out)
    else:
        if not isinstance(out, Tensor):
            raise FoldError(f"{pre}step must return a Tensor like the state, got "
                            f"{type(out).__name__}; for a tuple state pass the state as a tuple.")
        parts = (out,)
    for i, (o, x) in enumerate(zip(parts, like)):
        name = f"step output[{i}]" if is_tuple else "step output"
        if not isinstance(o, Tensor):
            raise FoldError(f"{pre}{name} is a {type(o).__name__}, expected a Tensor.")
        if o.shape != x.shape:
            raise FoldError(f"{pre}{name} has shape {tuple(o.shape)} but the state has shape "
                            f"{tuple(x.shape)}; step(x, *params) must return a state of the "
                            "same shape as x.")
        if o.dtype != x.dtype:
            raise FoldError(f"{pre}{name} has dtype {o.dtype} but the state is {x.dtype}; the "
                            "step must keep the dtype (mixed dtypes).")
    return parts


def check_finite(t: Tensor, name: str) -> None:
    """Raise :class:`FoldError` counting the NaN/Inf entries of a floating tensor."""
    if t.is_floating_point() or t.is_complex():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_bad = int((~finite).sum())
            raise FoldError(f"{name} contains {n_bad} NaN/Inf value(s) (shape {tuple(t.shape)}); "
                            "the forward solve likely failed — check it before folding.")


def validate_state(parts: tuple[Tensor, ...], is_tuple: bool, batched: bool, name: str, *,
                   same_layout: bool = False, finite: bool = False) -> None:
    """Check a state: floating point; with ``batched``, ndim ≥ 2 and one batch size.

    Args:
        same_layout: also require one dtype and one device across the parts.
        finite: also reject NaN/Inf entries.
    """
    dtype, device = parts[0].dtype, parts[0].device
    for i, t in enumerate(parts):
        nm = f"{name}[{i}]" if is_tuple else name
        if not t.is_floating_point():
            raise FoldError(f"{nm} must be floating point, got {t.dtype}; cast it to the dtype "
                            "of your parameters.")
        if same_layout:
            if t.dtype != dtype:
                raise FoldError(f"mixed dtypes in the state: {name}[0] is {dtype}, {nm} is "
                                f"{t.dtype}; give every state tensor the same dtype.")
            if t.device != device:
                raise FoldError(f"mixed devices in the state: {name}[0] on {device}, {nm} on "
                                f"{t.device}; move them to one device.")
        if finite:
            check_finite(t, nm)
        if batched:
            if t.dim() < 2:
                raise FoldError(
                    f"{nm} has shape {tuple(t.shape)}; with batched=True (the default) dim 0 is "
                    "the batch and each instance needs at least one more dim. Pass "
                    "batched=False for one unbatched problem, or shape (B, 1) for a batch of "
                    "scalar problems.")
            if t.shape[0] != parts[0].shape[0]:
                raise FoldError(f"batch sizes differ across the state: {name}[0] has "
                                f"{parts[0].shape[0]}, {nm} has {t.shape[0]} (shape "
                                f"{tuple(t.shape)}); with batched=True dim 0 is the batch.")


def instance_norm(parts: tuple[Tensor, ...], batched: bool) -> Tensor:
    """``(B,)`` Euclidean norm of each instance over all parts (``(1,)`` when unbatched)."""
    B = parts[0].shape[0] if batched else 1
    flat = [p.reshape(B, -1) for p in parts]
    return (torch.cat(flat, dim=1) if len(flat) > 1 else flat[0]).norm(dim=1)


def relative_residual(out_parts: tuple[Tensor, ...], x_parts: tuple[Tensor, ...],
                      batched: bool = True) -> Tensor:
    """``(B,)`` relative fixed-point residual ``‖U(x) − x‖ / (1 + ‖x‖)`` per instance, norms over
    every part of the state (``(1,)`` when unbatched)."""
    d = tuple(o - x for o, x in zip(out_parts, x_parts))
    return instance_norm(d, batched) / (1 + instance_norm(x_parts, batched))


@dataclass
class FixedPointResult:
    """Outcome of :func:`fixed_point_iteration`, per instance.

    Attributes:
        parts: the final iterate (state parts).
        iterations: ``(B,)`` int64 steps taken until the instance stopped.
        residual: ``(B,)`` last ``‖U(x) − x‖ / (1 + ‖x‖)`` (NaN/Inf where the step produced it).
        converged: ``(B,)`` bool, residual ≤ tol.
        diverged: ``(B,)`` bool, the step produced NaN/Inf (the instance keeps its last finite
            iterate and stops).
    """

    parts: tuple[Tensor, ...]
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor


def _bcast(mask: Tensor, t: Tensor, batched: bool) -> Tensor:
    return mask.view(-1, *([1] * (t.dim() - 1))) if batched else mask.reshape(())


def fixed_point_iteration(step: Callable, parts: tuple[Tensor, ...], is_tuple: bool,
                          params: tuple[Any, ...], *, tol: float, maxiter: int,
                          batched: bool = True, where: str = "iterate") -> FixedPointResult:
    """Iterate ``x ← step(x, *params)`` under ``no_grad`` until ``‖U(x) − x‖ ≤ tol·(1 + ‖x‖)``
    for each instance on its own, at most ``maxiter`` steps.

    An instance that converged stops changing (its rows are frozen); one whose step returns
    NaN/Inf keeps its last finite iterate and is flagged ``diverged``. The step's output is
    checked against the state (structure, shape, dtype) at every step.

    Args:
        parts, is_tuple: the initial state (see :func:`as_parts`).
        tol: stopping tolerance (used as given; callers floor it if they want).
        batched: dim 0 of every part is the batch; ``False``: the state is one problem.
        where: names the caller in error messages.
    """
    ref = parts[0]
    B = ref.shape[0] if batched else 1
    dev = ref.device
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    res = torch.full((B,), torch.inf, dtype=ref.dtype, device=dev)
    conv = torch.zeros(B, dtype=torch.bool, device=dev)
    diverged = torch.zeros(B, dtype=torch.bool, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    x = parts
    with torch.no_grad():
        for k in range(maxiter):
            out = check_step_output(step(pack(x, is_tuple), *params), x, is_tuple,
                                    f"{where}, step {k}")
            r = relative_residual(out, x, batched)
            finite = torch.isfinite(r)
            take = active & finite
            x = tuple(torch.where(_bcast(take, xi, batched), o, xi) for o, xi in zip(out, x))
            res = torch.where(active, r, res)
            iters = torch.where(active, torch.full_like(iters, k + 1), iters)
            diverged = diverged | (active & ~finite)
            conv = conv | (take & (r <= tol))
            active = take & (r > tol)
            if not bool(active.any()):
                break
    return FixedPointResult(x, iters, res, conv, diverged)
