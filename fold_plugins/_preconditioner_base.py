"""What every preconditioner builds on: the type, matrix checks, LU, lazy construction.

Bottom floor of :mod:`fold_plugins.preconditioners` (the public module) and of the ADMM-QP
preconditioner beside the QP step (:mod:`fold_plugins.steps._qp_preconditioner`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._errors import FoldError

__all__ = ["Preconditioner", "batch_matrix", "lazy", "lu_factor"]

Preconditioner = Callable[[Tensor], Tensor]


def batch_matrix(M: Tensor, name: str, where: str) -> Tensor:
    if not isinstance(M, Tensor) or M.dim() not in (2, 3) or M.shape[-1] != M.shape[-2]:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise FoldError(f"{where}: {name} must be a square (n, n) or (B, n, n) tensor, got "
                        f"{shape}.")
    if not M.is_floating_point():
        raise FoldError(f"{where}: {name} must be floating point, got {M.dtype}.")
    return M.detach() if M.dim() == 3 else M.detach().unsqueeze(0)


def lu_factor(M: Tensor, where: str) -> tuple[Tensor, Tensor]:
    LU, piv, status = torch.linalg.lu_factor_ex(M)
    if bool((status != 0).any()):
        bad = torch.nonzero(status.reshape(-1)).flatten().tolist()
        raise FoldError(f"{where}: the matrix is singular for instance(s) {bad[:20]}; a "
                        "preconditioner needs an invertible M (pass preconditioner=None there).")
    return LU, piv


class _Lazy:
    def __init__(self, build: Callable[..., Preconditioner], args: tuple, kwargs: dict):
        self.build = build
        self.args: tuple | None = args
        self.kwargs: dict | None = kwargs
        self.fn: Preconditioner | None = None

    def __call__(self, v: Tensor) -> Tensor:
        if self.fn is None:
            self.fn = self.build(*(self.args or ()), **(self.kwargs or {}))
            self.args = self.kwargs = None  # the factor is all that is kept
        return self.fn(v)


def lazy(build: Callable[..., Preconditioner], *args, **kwargs) -> Preconditioner:
    """``build(*args, **kwargs)``, made on the first application (in backward): a forward that
    is never differentiated pays nothing for the factorisation."""
    return _Lazy(build, args, kwargs)
