"""Shared helpers for the update steps: autograd gradients, Jacobians and Hessians, and the
parameter split of composite steps (shape checks and batched mat-vecs: :mod:`fold_plugins._batched`;
the kink convention: :mod:`fold_plugins._kinks`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._batched import ShapeError, _fmt
from .._errors import FoldError

__all__ = ["autograd_grad", "autograd_jacobian", "autograd_hessian", "check_n_grad_params",
           "split_params", "self_contained"]


def self_contained(step: Callable) -> Callable:
    """Mark a step made of per-instance algebra on its explicit params only (every tensor it
    reads otherwise is detached): :func:`fold_plugins.fold` then skips its batch-independence
    probe (one VJP per backward) and its op recorder (``batch_independent``,
    ``record_captured``)."""
    vars(step).update(batch_independent=True, record_captured=False)  # the StepTraits
    return step


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
