"""The common base of every adapter module: same keywords, same ``last_info``.

Every adapter (``FoldedLoop``, ``FoldedTheseusLayer``, …) is an ``nn.Module`` derived from
:class:`FoldedModule`. It takes ``backward`` (a solver name or callable), ``tol``,
``maxiter`` and ``strict``, calls :func:`fold_plugins.fold` as its one primitive, and after
a forward (and its backward) exposes ``last_info`` as a :class:`fold_plugins.FoldInfo`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import fold_plugins as fp
from fold_plugins.internal import get_solver, report_unconverged

__all__ = ["FoldedModule"]


class FoldedModule(nn.Module):
    """Base for adapters: holds the backward settings and the last :class:`fp.FoldInfo`.

    Args:
        backward: backward solver, ``"gmres"``, ``"bicgstab"``, ``"dense"``,
            ``"fixed_point"`` or a callable with the :mod:`fold_plugins.solvers` protocol.
        tol: relative residual tolerance of the backward solve, per instance.
        maxiter: backward iteration cap (``None``: the solver's default).
        strict: raise :class:`fp.FoldError` on forward or backward non-convergence
            instead of warning.
        solver_options: extra keywords for the backward solver (e.g. ``{"restart": 30}``).
    """

    def __init__(self, backward: str | Callable = "gmres", tol: float = 1e-10,
                 maxiter: int | None = None, strict: bool = False,
                 solver_options: dict | None = None):
        super().__init__()
        get_solver(backward)  # validates the name now rather than at backward time
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise fp.FoldError(f"tol must be a number ≥ 0, got {tol!r}.")
        if maxiter is not None and (not isinstance(maxiter, int) or maxiter < 1):
            raise fp.FoldError(f"maxiter must be a positive int or None, got {maxiter!r}.")
        self.backward = backward
        self.tol = float(tol)
        self.maxiter = maxiter
        self.strict = bool(strict)
        self.solver_options = dict(solver_options or {})
        self._calls = threading.local()

    @property
    def last_info(self) -> Any:
        """The :class:`fp.FoldInfo` of this thread's latest call (``None`` before one): each
        thread reads what its own call did, also while other threads call the same module."""
        return getattr(self._calls, "info", None)

    @last_info.setter
    def last_info(self, info: Any) -> None:
        self._calls.info = info

    def __getstate__(self) -> dict[str, Any]:
        # pickling and deepcopy: a thread-local cannot travel; the calling thread's info does
        state = dict(self.__dict__)
        state["_calls"] = self.last_info
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        info = state.pop("_calls", None)
        super().__setstate__(state)
        self._calls = threading.local()
        self.last_info = info

    def _fold(self, step: Callable, x_star: Any, *params: Any, batched: bool = True,
              info: fp.FoldInfo | None = None, **kwargs: Any) -> Any:
        """Call :func:`fp.fold` with this module's settings and keep its info as ``last_info``."""
        x, info = fp.fold(step, x_star, *params, solver=self.backward, tol=self.tol,
                          maxiter=self.maxiter, batched=batched, strict=self.strict,
                          return_info=True, info=info, solver_options=self.solver_options,
                          **kwargs)
        self.last_info = info
        return x

    def _report_forward(self, converged: Tensor, residual: Tensor, what: str,
                        remedy: str) -> None:
        """Warn (or raise when ``strict``) naming the instances whose forward did not converge."""
        bad = ~converged.detach().to(torch.bool).reshape(-1)
        report_unconverged(bad, residual, f"{what}: forward (gradients of these instances are "
                           "biased)", remedy, self.strict, stacklevel=4,
                           category=fp.ForwardConvergenceWarning)

    def extra_repr(self) -> str:
        name = self.backward if isinstance(self.backward, str) else getattr(
            self.backward, "__name__", "custom")
        return f"backward={name!r}, tol={self.tol:g}, maxiter={self.maxiter}, strict={self.strict}"
