"""Differentiable proximal operators ``prox_{s·g}(x) = argmin_z g(z)·s + ½‖z − x‖²``.

Used with :func:`fold_plugins.steps.proximal_gradient` (the step calls ``prox(y, ...,
scaling=α)`` with its step size ``α``), and re-exported by :mod:`fold_plugins.projections`.
Every operator is batched over the leading dims of ``x`` (the vector lives on the last dim)
and keeps ``x``'s dtype and device; the regularisation weights are differentiable.

=================== =========================================== ===============================
operator            ``g(z)``                                    ``prox_{s·g}(x)``
=================== =========================================== ===============================
soft_threshold      ``λ‖z‖₁``                                   ``sign(x)·max(|x| − sλ, 0)``
nonnegative_l1      ``λ‖z‖₁ + ι(z ≥ 0)``                        ``max(x − sλ, 0)``
elastic_net         ``λ₁‖z‖₁ + ½λ₂‖z‖²``                        ``soft_threshold(x, sλ₁)/(1+sλ₂)``
group_lasso         ``λ Σ_g ‖z_g‖₂`` (ℓ2,1)                     ``max(0, 1 − sλ/‖x_g‖)·x_g``
=================== =========================================== ===============================

Kink convention (as for the projections): where a coordinate (or group) sits exactly on the
threshold, the derivative of the piece that sets it to zero is used (``∂/∂x = 0`` there). It
is a one-sided derivative, finite, and the same as ``x − box(x, −λ, λ)`` under the
projections' "free at the bound" rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._batched import ShapeError, as_tensor_like
from ._errors import FoldError
from ._kinks import clip_free

__all__ = ["soft_threshold", "nonnegative_l1", "elastic_net", "group_lasso", "group_index"]


def _check_x(x: Any, where: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        desc = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor)
                else type(x).__name__)
        raise FoldError(f"{where}: x must be a floating-point tensor with at least 1 dim (the "
                        f"vector on the last dim), got {desc}.")


def _weight(value: Any, x: Tensor, shape: tuple[int, ...], name: str, where: str) -> Tensor:
    """A non-negative weight (number or tensor broadcastable to ``shape``) on ``x``'s
    dtype/device; tensors keep their graph."""
    t = as_tensor_like(value, x)
    try:
        torch.broadcast_shapes(t.shape, shape)
    except RuntimeError:
        raise ShapeError(f"{where}: {name} has shape {tuple(t.shape)}, not broadcastable to "
                         f"{shape}; give a number, one value per row, or one per entry.") from None
    if bool(torch.isnan(t.detach()).any()) or bool((t.detach() < 0).any()):
        raise FoldError(f"{where}: {name} must be ≥ 0 (a regularisation weight), got minimum "
                        f"{float(t.detach().min()):.3g}; pass its absolute value or clamp it.")
    return t


def _scaled(lam: Any, scaling: Any, x: Tensor, shape: tuple[int, ...], name: str,
            where: str) -> Tensor:
    return _weight(scaling, x, shape, "scaling", where) * _weight(lam, x, shape, name, where)


def soft_threshold(x: Tensor, lam: float | Tensor = 1.0, *,
                   scaling: float | Tensor = 1.0) -> Tensor:
    """Prox of ``s·λ‖z‖₁``: ``sign(x)·max(|x| − sλ, 0)`` (``s`` = ``scaling``).

    Args:
        x: ``(..., n)``.
        lam: ``λ ≥ 0``: a number or a tensor broadcastable to ``x`` (per row ``(..., 1)`` or
            per coordinate: a weighted ℓ1 norm).
        scaling: ``s ≥ 0``, the step size of a proximal-gradient step (broadcastable too).

    Returns:
        Like ``x``. ``∂/∂x = 1`` where ``|x| > sλ``, else 0; ``∂/∂λ = −s·sign(x)`` there.
    """
    _check_x(x, "soft_threshold")
    t = _scaled(lam, scaling, x, tuple(x.shape), "lam", "soft_threshold")
    return x - clip_free(x, -t, t)


def nonnegative_l1(x: Tensor, lam: float | Tensor = 1.0, *,
                   scaling: float | Tensor = 1.0) -> Tensor:
    """Prox of ``s·λ‖z‖₁ + ι(z ≥ 0)`` (the non-negative LASSO): ``max(x − sλ, 0)``.

    Args and Returns as in :func:`soft_threshold`; with ``λ = 0`` this is
    :func:`fold_plugins.projections.nonnegative` except at ``x = 0`` (here the zero piece).
    """
    _check_x(x, "nonnegative_l1")
    y = x - _scaled(lam, scaling, x, tuple(x.shape), "lam", "nonnegative_l1")
    with torch.no_grad():
        keep = y > 0
    return torch.where(keep, y, torch.zeros_like(y))


def elastic_net(x: Tensor, l1: float | Tensor = 1.0, l2: float | Tensor = 1.0, *,
                scaling: float | Tensor = 1.0) -> Tensor:
    """Prox of ``s·(λ₁‖z‖₁ + ½λ₂‖z‖²)``: ``soft_threshold(x, sλ₁) / (1 + sλ₂)``.

    Args:
        x: ``(..., n)``.
        l1, l2: ``λ₁, λ₂ ≥ 0``, numbers or tensors broadcastable to ``x``.
        scaling: ``s ≥ 0``.
    """
    _check_x(x, "elastic_net")
    shape = tuple(x.shape)
    t2 = _scaled(l2, scaling, x, shape, "l2", "elastic_net")
    return soft_threshold(x, _scaled(l1, scaling, x, shape, "l1", "elastic_net")) / (1 + t2)


def group_index(groups: Sequence[int] | Tensor, n: int, device: torch.device | None = None,
                where: str = "group_lasso") -> tuple[Tensor, int]:
    """``(ids (n,) int64, G)``: the group of each coordinate, from group sizes or ids.

    Args:
        groups: a sequence of positive sizes of consecutive groups summing to ``n`` (e.g.
            ``[3, 3, 4]``), or an int tensor ``(n,)`` with the group id ``0..G−1`` of each
            coordinate (groups need not be contiguous; every id in ``0..G−1`` must occur).
        n: the vector length.
    """
    if isinstance(groups, Tensor):
        if groups.is_floating_point() or groups.dtype == torch.bool or tuple(groups.shape) != (n,):
            raise ShapeError(f"{where}: groups as a tensor must be integer group ids of shape "
                             f"({n},), got {groups.dtype} of shape {tuple(groups.shape)}.")
        ids = groups.to(device=device, dtype=torch.int64)
        if n == 0:
            return ids, 0
        G = int(ids.max()) + 1
        if int(ids.min()) < 0 or torch.bincount(ids.cpu(), minlength=G).eq(0).any():
            raise FoldError(f"{where}: group ids must be 0..G−1 with every id used, got ids "
                            f"{sorted(set(ids.tolist()))[:20]}; renumber them consecutively.")
        return ids, G
    try:
        sizes = [int(s) for s in groups]
    except TypeError:
        raise FoldError(f"{where}: groups must be a sequence of group sizes or a ({n},) tensor "
                        f"of group ids, got {type(groups).__name__}.") from None
    if any(s <= 0 for s in sizes) or sum(sizes) != n:
        raise FoldError(f"{where}: group sizes {sizes} must be positive and sum to the vector "
                        f"length {n} (they sum to {sum(sizes)}).")
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                  torch.tensor(sizes, device=device))
    return ids, len(sizes)


def group_lasso(x: Tensor, lam: float | Tensor, groups: Sequence[int] | Tensor, *,
                scaling: float | Tensor = 1.0) -> Tensor:
    """Prox of ``s·λ Σ_g ‖z_g‖₂`` (ℓ2,1, block soft-thresholding): ``max(0, 1 − sλ_g/‖x_g‖)·x_g``.

    Args:
        x: ``(..., n)``.
        lam: ``λ ≥ 0``: a number, or a tensor broadcastable to ``(..., G)`` (one weight per
            group, e.g. ``λ·√|g|``; per row ``(..., 1)``).
        groups: sizes of consecutive groups (``[2, 3, 3]``) or ``(n,)`` integer group ids
            (see :func:`group_index`).
        scaling: ``s ≥ 0``, broadcastable to ``(..., G)``.

    Returns:
        Like ``x``. A group with ``‖x_g‖ ≤ sλ_g`` is set to zero (derivative 0, also exactly
        at the threshold), so no NaN arises from ``‖0‖``.
    """
    _check_x(x, "group_lasso")
    ids, G = group_index(groups, x.shape[-1], x.device)
    gshape = tuple(x.shape[:-1]) + (G,)
    t = _scaled(lam, scaling, x, gshape, "lam", "group_lasso").expand(gshape)
    sq = x.new_zeros(gshape).index_add(-1, ids, x * x)  # ‖x_g‖² per group
    with torch.no_grad():
        keep = sq > t * t
    norm = torch.sqrt(torch.where(keep, sq, torch.ones_like(sq)))
    factor = torch.where(keep, 1 - t / norm, torch.zeros_like(sq))
    return factor.index_select(-1, ids) * x
