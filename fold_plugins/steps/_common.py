"""Shared helpers for the update steps: shape checks, batched mat-vecs, autograd gradients."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._errors import FoldError

__all__ = ["ShapeError", "bmv", "check_vector", "check_matrix", "check_batch_scalar",
           "autograd_grad", "autograd_jacobian", "autograd_hessian", "as_tensor_like",
           "clip_free"]


class ShapeError(FoldError, ValueError):
    """A parameter or state has the wrong shape (the message names the shapes seen/expected)."""


def as_tensor_like(value: Any, ref: Tensor) -> Tensor:
    """``value`` (float or tensor) on ``ref``'s dtype/device (tensors keep their graph)."""
    if isinstance(value, Tensor):
        if value.is_floating_point() and value.dtype == ref.dtype and value.device == ref.device:
            return value
        return value.to(dtype=ref.dtype, device=ref.device)
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


def clip_free(v: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """``min(max(v, lo), hi)`` with the "free at the kink" derivative: ``∂/∂v = 1`` on
    ``lo ≤ v ≤ hi`` (bounds included), ``∂/∂lo = 1`` where ``v < lo``, ``∂/∂hi = 1`` where
    ``v > hi``; ``None`` means no bound. The one implementation of this rule (projections.box,
    the ADMM and TV steps use it)."""
    out = v
    if lo is not None:
        out = torch.where(v < lo, lo, out)
    if hi is not None:
        out = torch.where(v > hi, hi, out)
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
