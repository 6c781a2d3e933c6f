"""Shared helpers for the update steps: shape checks, batched mat-vecs, autograd gradients."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _record
from .._errors import FoldError

__all__ = ["ShapeError", "bmv", "check_vector", "check_matrix", "check_batch_scalar",
           "autograd_grad", "autograd_jacobian", "autograd_hessian", "as_tensor_like",
           "clip_free", "kink_band", "note_weakly_active", "value_of", "ABSENT_BOUND",
           "self_contained"]


def self_contained(step: Callable) -> Callable:
    """Mark a step made of per-instance algebra on its explicit params only (every tensor it
    reads otherwise is detached): :func:`fold_plugins.fold` then skips its batch-independence
    probe (one VJP per backward) and its op recorder (``batch_independent``,
    ``record_captured``)."""
    step.batch_independent = True
    step.record_captured = False
    return step


class ShapeError(FoldError, ValueError):
    """A parameter or state has the wrong shape (the message names the shapes seen/expected)."""


def as_tensor_like(value: Any, ref: Tensor) -> Tensor:
    """``value`` (float or tensor) on ``ref``'s dtype/device (tensors keep their graph)."""
    if isinstance(value, Tensor):
        if value.is_floating_point() and value.dtype == ref.dtype and value.device == ref.device:
            return value
        return value.to(dtype=ref.dtype, device=ref.device)
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


#: A bound whose magnitude reaches this is treated as absent (``INF = 1e20`` in the QP steps).
ABSENT_BOUND = 1e19


def kink_band(v: Tensor, *refs: Tensor | None) -> Tensor:
    """Half-width of the "weakly active" band around a kink, ``√eps · scale`` (no grad).

    ``scale`` is, per row (all leading dims, the set on the last dim), the largest magnitude
    of ``v`` and of the finite reference values ``refs`` (bounds, radius, threshold): the
    problem's own scale, so the band is far above round-off (``√eps ≈ 1.5e-8`` relative in
    float64, ``3.5e-4`` in float32) yet far below any meaningful distance. Shape: ``v``'s
    shape with a trailing 1 (broadcastable against ``v``).
    """
    with torch.no_grad():
        vv = v.detach()
        scale = vv.abs().amax(dim=-1, keepdim=True) if vv.dim() else vv.abs()
        for r in refs:
            if r is None:
                continue
            rr = r.detach().abs()
            rr = torch.where(rr < ABSENT_BOUND, rr, torch.zeros_like(rr))
            rr = torch.broadcast_to(rr, vv.shape) if rr.dim() <= vv.dim() else rr
            rmax = rr.amax(dim=-1, keepdim=True) if rr.dim() else rr
            scale = torch.maximum(scale, rmax)
        tiny = torch.finfo(vv.dtype).tiny
        return math.sqrt(torch.finfo(vv.dtype).eps) * scale.clamp_min(tiny)


def note_weakly_active(weak: Tensor) -> None:
    """Report a ``(B,)`` count of weakly active constraints (``weak``: bool, batch on dim 0)
    to an open :func:`fold_plugins._record.collect` block — only while autograd records (the
    one differentiable step that :func:`fold_plugins.fold` takes), never in forward loops."""
    if weak.dim() == 0 or not _record.active() or not torch.is_grad_enabled():
        return
    _record.note("weakly_active", weak.reshape(weak.shape[0], -1).sum(dim=1))


def value_of(smooth: Tensor, exact: Tensor) -> Tensor:
    """``exact``'s value, bit for bit, with ``smooth``'s derivative:
    ``exact + (smooth − smooth.detach())`` (the bracket is exactly 0 in floating point).

    Used where the "free" convention extends a piece by the weakly active band: the two
    differ by at most the band (``√eps``-relative), and the value must not."""
    return exact.detach() + (smooth - smooth.detach())


def clip_free(v: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """``min(max(v, lo), hi)`` with the "free at the kink" derivative (the weakly-active
    convention of :mod:`fold_plugins.projections`): ``∂/∂v = 1`` on ``lo − δ ≤ v ≤ hi + δ``,
    ``∂/∂lo = 1`` where ``v < lo − δ``, ``∂/∂hi = 1`` where ``v > hi + δ``, with the band
    ``δ = √eps · scale`` (:func:`kink_band`); ``None`` means no bound. The value is the exact
    clip. Entries with ``|v − bound| ≤ δ`` are weakly active and are counted
    (:func:`note_weakly_active`). An equality row (``lo = hi``) is always active (derivative
    to the bound), without a band. The one implementation of this rule (projections.box, the
    ADMM and TV steps use it)."""
    if lo is None and hi is None:
        return v
    if not torch.is_grad_enabled():  # no derivative to choose, nothing to report: plain clip
        out = v if lo is None else torch.where(v < lo, lo, v)
        return out if hi is None else torch.where(v > hi, hi, out)
    delta = kink_band(v, lo, hi)
    with torch.no_grad():
        vd = v.detach()
        # an equality row (lo = hi) is always active: no kink to choose, no band, not counted
        eq = (lo.detach() == hi.detach()) if lo is not None and hi is not None else None
        if eq is not None:
            delta = torch.where(eq, torch.zeros_like(delta), delta)
        lo_act = None if lo is None else vd < lo.detach() - delta
        hi_act = None if hi is None else vd > hi.detach() + delta
        if eq is not None:
            hi_act = hi_act | (eq & (vd >= hi.detach()))
        weak = torch.zeros_like(vd, dtype=torch.bool)
        if lo is not None:
            weak = weak | (((vd - lo.detach()).abs() <= delta) & (lo.detach().abs() < ABSENT_BOUND))
        if hi is not None:
            weak = weak | (((vd - hi.detach()).abs() <= delta) & (hi.detach().abs() < ABSENT_BOUND))
        if eq is not None:
            weak = weak & ~eq
    out = v
    if lo is not None:
        out = torch.where(lo_act, lo, out)
    if hi is not None:
        out = torch.where(hi_act, hi, out)
    if bool(weak.any()):
        exact = vd
        if lo is not None:
            exact = torch.maximum(exact, lo.detach())
        if hi is not None:
            exact = torch.minimum(exact, hi.detach())
        out = value_of(out, exact)
        note_weakly_active(weak)
    elif _record.active() and torch.is_grad_enabled() and weak.dim():
        note_weakly_active(weak)
    return out


def bmv(M: Tensor, x: Tensor) -> Tensor:
    """``M x`` row by row: ``M`` is ``(m, n)`` (shared) or ``(B, m, n)``, ``x`` is ``(B, n)``."""
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def bmtv(M: Tensor, y: Tensor) -> Tensor:
    """``Mᵀ y`` row by row: ``M`` is ``(m, n)`` or ``(B, m, n)``, ``y`` is ``(B, m)``."""
    return (y.unsqueeze(-2) @ M).squeeze(-2)


def _fmt(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def check_vector(t: Tensor, name: str, B: int, n: int, where: str) -> None:
    """Accept ``(n,)`` (shared by the batch) or ``(B, n)``; raise :class:`ShapeError` otherwise."""
    if not isinstance(t, Tensor):
        raise FoldError(f"{where}: {name} must be a Tensor of shape ({n},) or ({B}, {n}), got "
                        f"{type(t).__name__}.")
    if tuple(t.shape) not in ((n,), (B, n)):
        raise ShapeError(f"{where}: {name} has shape {_fmt(t.shape)}, expected ({n},) (shared) "
                         f"or ({B}, {n}) (one per instance) to match the state; reshape it.")


def check_matrix(t: Tensor, name: str, B: int, m: int, n: int, where: str) -> None:
    """Accept ``(m, n)`` (shared by the batch) or ``(B, m, n)``, else raise :class:`ShapeError`."""
    if not isinstance(t, Tensor):
        raise FoldError(f"{where}: {name} must be a Tensor of shape ({m}, {n}) or ({B}, {m}, {n}), "
                        f"got {type(t).__name__}.")
    if tuple(t.shape) not in ((m, n), (B, m, n)):
        raise ShapeError(f"{where}: {name} has shape {_fmt(t.shape)}, expected ({m}, {n}) "
                         f"(shared) or ({B}, {m}, {n}) (one per instance) to match the state; "
                         "reshape it.")


def check_batch_scalar(value: Any, name: str, B: int, ref: Tensor, where: str) -> Tensor:
    """A float, 0-d tensor, ``(B,)`` or ``(B, 1)`` tensor → a ``(B, 1)`` or ``()`` tensor."""
    t = as_tensor_like(value, ref)
    if t.dim() == 0:
        return t
    if tuple(t.shape) in ((B,), (B, 1)):
        return t.reshape(B, 1)
    raise ShapeError(f"{where}: {name} has shape {_fmt(t.shape)}; give a number, a 0-d tensor, or "
                     f"one value per instance of shape ({B},).")


def autograd_grad(f: Callable[..., Tensor], x: Tensor, params: Sequence[Any]) -> Tensor:
    """``∇ₓ Σ_b f(x, *params)_b`` — the per-instance gradient when rows are independent.

    Builds a differentiable graph (``create_graph=True``) only when grad mode is on outside,
    so the result depends on ``x`` and ``params`` like the true gradient; under ``no_grad`` it
    returns a detached tensor (forward iterations).
    """
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x if (outer and x.requires_grad) else x.detach().requires_grad_(True)
        val = f(xg, *params)
        if not isinstance(val, Tensor) or val.dim() > 1 or (val.dim() == 1
                                                             and val.shape[0] != x.shape[0]):
            shape = _fmt(val.shape) if isinstance(val, Tensor) else type(val).__name__
            raise ShapeError(f"objective must return one value per instance, shape "
                             f"({x.shape[0]},), got {shape}.")
        (g,) = torch.autograd.grad(val.sum(), xg, create_graph=outer)
    return g if outer else g.detach()


def autograd_jacobian(F: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """``(B, k, n)`` Jacobian of ``F (B, k)`` w.r.t. ``x (B, n)`` (rows of the batch independent).

    One batched backward pass (``is_grads_batched`` with the ``k`` unit cotangents); where an
    op has no batching rule it falls back to ``k`` backward passes, one per output.
    """
    B, k = F.shape[0], F.shape[1]
    if k == 0:
        return x.new_zeros(B, 0, x.shape[1])
    eye = torch.eye(k, dtype=F.dtype, device=F.device)
    cot = eye.unsqueeze(1).expand(k, B, k)  # cot[i, b] = e_i
    try:
        with warnings.catch_warnings():
            # ops without a batching rule run in a (correct) slow loop and say so
            warnings.filterwarnings("ignore", message=r".*performance drop.*")
            (J,) = torch.autograd.grad(F, x, cot, create_graph=create_graph, retain_graph=True,
                                       allow_unused=True, is_grads_batched=True)
    except RuntimeError:
        rows = []
        for i in range(k):
            (gi,) = torch.autograd.grad(F[:, i].sum(), x, create_graph=create_graph,
                                        retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(x) if gi is None else gi)
        return torch.stack(rows, dim=1)
    if J is None:  # F does not depend on x
        return x.new_zeros(B, k, x.shape[1])
    return J.transpose(0, 1)


def autograd_hessian(f: Callable[..., Tensor], x: Tensor, params: Sequence[Any]) -> Tensor:
    """``(B, n, n)`` Hessian of ``f(x, *params)`` per instance, detached (no graph)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        pd = [p.detach() if isinstance(p, Tensor) else p for p in params]
        val = f(xg, *pd)
        (g,) = torch.autograd.grad(val.sum(), xg, create_graph=True)
        H = autograd_jacobian(g, xg, create_graph=False)
    return 0.5 * (H + H.transpose(-1, -2)).detach()


def check_n_grad_params(n_grad_params: Any, where: str) -> None:
    """``n_grad_params`` of a composite step is ``None`` or an int ≥ 0 (checked at build)."""
    if n_grad_params is not None and (not isinstance(n_grad_params, int) or n_grad_params < 0):
        raise FoldError(f"{where}: n_grad_params must be None or an int ≥ 0, got "
                        f"{n_grad_params!r}.")


def split_params(params: tuple[Any, ...], n_grad_params: int | None, where: str
                 ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(gradient params, the rest)``: the first ``n_grad_params`` go to the gradient, the
    rest to the projection / prox (all to the gradient when ``None``)."""
    if n_grad_params is None:
        return params, ()
    if n_grad_params > len(params):
        raise FoldError(f"{where}: n_grad_params={n_grad_params} but the step got only "
                        f"{len(params)} params.")
    return params[:n_grad_params], params[n_grad_params:]
