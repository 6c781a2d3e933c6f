"""Batched shape conventions shared by the core: argument checks and row-wise mat-vecs.

Every step, projection and prox takes a batch on dim 0 with parameters either shared
(``(m, n)``) or per instance (``(B, m, n)``); these helpers check that convention, name the
argument and the shapes seen, and apply a matrix row by row. Bottom floor: they import only
:mod:`fold_plugins._errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import FoldError

__all__ = ["ShapeError", "as_tensor_like", "bmv", "bmtv", "check_vector", "check_matrix",
           "check_batch_scalar"]


class ShapeError(FoldError, ValueError):
    """A parameter or state has the wrong shape (the message names the shapes seen/expected)."""


def as_tensor_like(value: Any, ref: Tensor) -> Tensor:
    """``value`` (float or tensor) on ``ref``'s dtype/device (tensors keep their graph)."""
    if isinstance(value, Tensor):
        if value.is_floating_point() and value.dtype == ref.dtype and value.device == ref.device:
            return value
        return value.to(dtype=ref.dtype, device=ref.device)
    return torch.as_tensor(value, dtype=ref.dtype, device=ref.device)


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
