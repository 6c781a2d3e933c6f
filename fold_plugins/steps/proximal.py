"""Proximal-gradient update step for ``min_x f(x, θ) + g(x, η)`` (LASSO, elastic net, group
lasso, non-negative LASSO, or any regulariser with a differentiable prox).

The prox operators in :mod:`fold_plugins.prox` (re-exported by :mod:`fold_plugins.projections`)
plug in directly; a prox of your own is any ``prox(y, *prox_params, scaling=α)`` returning
``prox_{α·g}(y)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from .._batched import check_batch_scalar
from .._errors import FoldError
from ._common import check_n_grad_params, split_params
from .gradient import GradFn, _check_state, _grad_fn

__all__ = ["proximal_gradient"]


def _accepts_scaling(prox: Callable[..., Tensor]) -> bool | None:
    """Whether ``prox`` takes a ``scaling`` keyword (``None``: its signature is unknown)."""
    try:
        params = inspect.signature(prox).parameters.values()
    except (TypeError, ValueError):
        return None
    return any(p.name == "scaling" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def proximal_gradient(grad: GradFn | None = None, prox: Callable[..., Tensor] | None = None,
                      step_size: float | Tensor = 1.0, *,
                      objective: Callable[..., Tensor] | None = None,
                      n_grad_params: int | None = None) -> Callable[..., Tensor]:
    """``U(x) = prox_{α·g}(x − α ∇f(x, θ))``; fixed points are exactly the points with
    ``0 ∈ ∇f(x) + ∂g(x)`` (the optimality condition of ``min f + g``).

    Args:
        grad: ``grad(x, *grad_params) -> (B, n)``, the smooth part's gradient; or pass
            ``objective=f``, ``f(x, *grad_params) -> (B,)`` (autograd supplies ``∇f``).
        prox: ``prox(y, *prox_params, scaling=α) -> (B, n)``, the proximal operator of ``α·g``:
            ``fp.projections.soft_threshold`` (ℓ1), ``elastic_net``, ``group_lasso``,
            ``nonnegative_l1``, or a closure such as
            ``lambda y, scaling: fp.projections.soft_threshold(y, lam, scaling=scaling)``.
        step_size: ``α > 0``: number, 0-d or ``(B,)`` tensor (detached). Every ``α > 0`` has
            the same fixed points; the iteration converges for ``0 < α < 2/L``
            (``L = λ_max(∇²f)``), and ``Φ = J_prox (I − αH)`` with ``‖J_prox‖ ≤ 1`` (a prox is
            firmly non-expansive), so ``ρ(Φ) ≤ max(|1 − αμ|, |1 − αL|)``.
        n_grad_params: how the step's params are split, as in
            :func:`~fold_plugins.steps.projected_gradient`: ``None`` gives every param to
            ``grad`` and calls ``prox(y, scaling=α)`` (its weights are closure tensors, which
            still receive gradients through ``fold``); an int ``k`` gives the first ``k`` to
            ``grad`` and the rest to ``prox``: ``step(x, *grad_params, *prox_params)``, e.g.
            LASSO ``proximal_gradient(lambda x, A, b: (x @ A.T - b) @ A,
            fp.projections.soft_threshold, α, n_grad_params=2)`` called as ``step(x, A, b, lam)``.

    Returns:
        ``step(x, *params)`` for :func:`fold_plugins.fold`; state ``x`` is ``(B, n)``. At a
        coordinate exactly on the prox's threshold its documented kink convention applies.
    """
    if prox is None or not callable(prox):
        raise FoldError("proximal_gradient: prox must be callable prox(y, ..., scaling=α) -> y "
                        f"(e.g. fp.projections.soft_threshold), got {type(prox).__name__}.")
    if _accepts_scaling(prox) is False:
        raise FoldError("proximal_gradient: prox must accept the keyword scaling=α (the step "
                        "size; it returns prox_{α·g}(y)); wrap yours, e.g. "
                        "lambda y, scaling: my_prox(y, scaling * lam).")
    check_n_grad_params(n_grad_params, "proximal_gradient")
    g = _grad_fn(grad, objective, "proximal_gradient")

    def step(x: Tensor, *params: Any) -> Tensor:
        _check_state(x, "proximal_gradient")
        gp, pp = split_params(params, n_grad_params, "proximal_gradient")
        a = check_batch_scalar(step_size, "step_size", x.shape[0], x, "proximal_gradient")
        a = a.detach()
        return prox(x - a * g(x, gp), *pp, scaling=a)
    return step
