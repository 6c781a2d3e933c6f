"""Gradient-type update steps: gradient descent, projected gradient, entropic mirror descent,
damped Newton — and a generic no-grad forward driver :func:`iterate`.

Every factory returns ``step(x, *params) -> x`` for :func:`fold_plugins.fold`. State ``x`` is
``(B, n)`` (dim 0 the batch). The objective's gradient comes either from ``grad(x, *params)``
(returns ``(B, n)``) or from ``objective=f`` with ``f(x, *params) -> (B,)`` differentiated by
autograd (``create_graph=True`` when grad mode is on, so Φ and Ψ are exact). Instances must
not interact (row ``b`` of the output depends only on row ``b`` of the inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._batched import ShapeError, check_batch_scalar
from .._errors import FoldError, instance_list, report_unconverged
from .._state import as_parts, fixed_point_iteration, pack
from ._common import (
    autograd_grad,
    autograd_hessian,
    autograd_jacobian,
    check_n_grad_params,
    split_params,
)

__all__ = ["gradient_descent", "projected_gradient", "mirror_descent", "newton", "iterate",
           "IterateInfo", "minimize_newton", "quadratic_step_size"]

GradFn = Callable[..., Tensor]


def _grad_fn(grad: GradFn | None, objective: Callable[..., Tensor] | None,
             where: str) -> Callable[[Tensor, tuple], Tensor]:
    if (grad is None) == (objective is None):
        raise FoldError(f"{where}: give exactly one of grad=(x, *params) -> (B, n) or "
                        "objective=(x, *params) -> (B,), got "
                        f"{'both' if grad is not None else 'neither'}.")
    if grad is not None:
        if not callable(grad):
            raise FoldError(f"{where}: grad must be callable grad(x, *params) -> (B, n), got "
                            f"{type(grad).__name__}.")

        def g(x: Tensor, params: tuple) -> Tensor:
            out = grad(x, *params)
            if not isinstance(out, Tensor) or out.shape != x.shape:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                hint = ""
                per_instance = isinstance(out, Tensor) and tuple(out.shape) in ((), (x.shape[0],))
                if per_instance:
                    hint = (f" It returned one value per instance, like an objective f(x) -> "
                            f"({x.shape[0]},): pass such a function as objective=f (keyword), "
                            f"e.g. {where}(objective=f, ...), and autograd supplies ∇f.")
                raise ShapeError(f"{where}: grad (the first argument) must return the gradient "
                                 f"∇f(x), shaped like the state {tuple(x.shape)}; it returned "
                                 f"{shape}.{hint}")
            return out
        return g
    if not callable(objective):
        raise FoldError(f"{where}: objective must be callable f(x, *params) -> (B,), got "
                        f"{type(objective).__name__}.")
    return lambda x, params: autograd_grad(objective, x, params)


def _check_state(x: Any, where: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{where}: the state must be a (B, n) tensor, got {shape}; use shape "
                         "(1, n) for a single problem.")


def quadratic_step_size(H: Tensor, rule: str = "optimal") -> Tensor:
    """Step sizes for gradient steps on a quadratic with Hessian ``H`` (``(n, n)``/``(B, n, n)``).

    ``rule="optimal"``: ``2 / (L + μ)`` (minimises ``ρ(I − αH) = (L − μ)/(L + μ)``);
    ``rule="1/L"``: ``1 / L``. ``L``, ``μ`` are the extreme eigenvalues (detached). Returns a
    0-d tensor for a shared ``H`` and ``(B,)`` for a batched one.
    """
    ev = torch.linalg.eigvalsh(0.5 * (H + H.transpose(-1, -2)).detach())
    L, mu = ev[..., -1], ev[..., 0].clamp_min(0)
    if rule == "optimal":
        return 2.0 / (L + mu)
    if rule == "1/L":
        return 1.0 / L
    raise FoldError(f"quadratic_step_size: rule must be 'optimal' or '1/L', got {rule!r}.")


# ----------------------------------------------------------------------------- steps

def gradient_descent(grad: GradFn | None = None, step_size: float | Tensor = 1.0, *,
                     objective: Callable[..., Tensor] | None = None) -> Callable[..., Tensor]:
    """``U(x) = x − α ∇f(x, θ)``; fixed points are the stationary points ``∇f = 0``.

    Args:
        grad: ``grad(x, *params) -> (B, n)``; or pass ``objective=f`` with ``f -> (B,)``.
        step_size: ``α``: a number, 0-d tensor or ``(B,)`` tensor (one per instance). Any
            ``α > 0`` has the same fixed point; ``ρ(Φ) = ρ(I − αH) < 1`` iff ``0 < α < 2/L`` for
            ``H ≻ 0`` (``L = λ_max(H)``); ``α = 2/(L+μ)`` is optimal (:func:`quadratic_step_size`).
            A tensor step size is treated as a constant (detached).

    Returns:
        ``step(x, *params)``: every param (and anything ``grad``/``objective`` captures) is
        differentiable through :func:`fold_plugins.fold`.
    """
    g = _grad_fn(grad, objective, "gradient_descent")

    def step(x: Tensor, *params: Any) -> Tensor:
        _check_state(x, "gradient_descent")
        a = check_batch_scalar(step_size, "step_size", x.shape[0], x, "gradient_descent")
        return x - a.detach() * g(x, params)
    return step


def projected_gradient(grad: GradFn | None = None, projection: Callable[..., Tensor] | None = None,
                       step_size: float | Tensor = 1.0, *,
                       objective: Callable[..., Tensor] | None = None,
                       n_grad_params: int | None = None) -> Callable[..., Tensor]:
    """``U(x) = Π_C(x − α ∇f(x, θ))``; fixed points are exactly the KKT points of ``min_{x∈C} f``.

    Args:
        grad: ``grad(x, *grad_params) -> (B, n)``; or pass ``objective=f``,
            ``f(x, *grad_params) -> (B,)`` (differentiated by autograd with ``create_graph``).
        projection: ``projection(y, *set_params) -> (B, n)``, the Euclidean projection onto
            ``C`` — e.g. ``fp.projections.box`` or a closure ``lambda y: simplex(y, 2.0)``.
        step_size: ``α > 0``: number, 0-d or ``(B,)`` tensor (detached). Every ``α > 0`` gives
            the same fixed point. ``Φ = J_Π (I − αH)`` with ``‖J_Π‖ ≤ 1``, so
            ``ρ(Φ) ≤ max(|1 − αμ|, |1 − αL|) < 1`` for ``0 < α < 2/L`` when ``H ≻ 0``.
        n_grad_params: how the step's params are split. ``None`` (default): all params go to
            ``grad`` and the projection is called as ``projection(y)`` (its set parameters are
            closure tensors, which still get gradients through ``fold``). An int ``k``: the
            first ``k`` params go to ``grad`` and the rest to the projection,
            ``step(x, *grad_params, *set_params)``; e.g. box QP:
            ``projected_gradient(lambda x, P, q: x @ P + q, fp.projections.box, a,
            n_grad_params=2)`` (symmetric shared ``P``) called as
            ``step(x, P, q, lower, upper)``.

    Returns:
        ``step(x, *params)``; every param is differentiable through ``fold``. At a weakly
        active constraint the projection's documented kink convention applies (see
        :mod:`fold_plugins.projections`): the gradient is finite and one-sided.
    """
    if projection is None or not callable(projection):
        raise FoldError("projected_gradient: projection must be callable projection(y, ...) -> y, "
                        f"got {type(projection).__name__}.")
    check_n_grad_params(n_grad_params, "projected_gradient")
    g = _grad_fn(grad, objective, "projected_gradient")

    def step(x: Tensor, *params: Any) -> Tensor:
        _check_state(x, "projected_gradient")
        gp, sp = split_params(params, n_grad_params, "projected_gradient")
        a = check_batch_scalar(step_size, "step_size", x.shape[0], x, "projected_gradient")
        return projection(x - a.detach() * g(x, gp), *sp)
    return step


def mirror_descent(grad: GradFn | None = None, step_size: float | Tensor = 1.0, *,
                   objective: Callable[..., Tensor] | None = None,
                   radius: float | Tensor = 1.0) -> Callable[..., Tensor]:
    """Entropic mirror descent on the simplex ``{x ≥ 0, 1ᵀx = r}``:
    ``U(x)_i = r · x_i e^{−η ∇f_i} / Σ_j x_j e^{−η ∇f_j}``.

    Fixed points with ``x > 0`` are exactly the KKT points (``∇f_i`` equal on the support),
    so start the forward strictly inside (e.g. ``x0 = r/n``): a coordinate at 0 stays 0. For
    the entropy-regularised LP ``f = cᵀx + ε Σ x log x`` (solution ``r·softmax(−c/ε)``),
    ``Φ = (1 − ηε)(I − x 1ᵀ/r)``, so ``ρ(Φ) = |1 − ηε| < 1`` for ``0 < η < 2/ε`` and ``η = 1/ε``
    gives ``Φ = 0``. In general ``ρ(Φ) < 1`` for ``η`` below ``2/L`` in the local norm.

    Args:
        grad / objective: as in :func:`gradient_descent`.
        step_size: ``η``: number, 0-d or ``(B,)`` tensor (detached).
        radius: ``r``: number, 0-d or ``(B,)`` tensor; differentiable when it is a tensor.

    Returns:
        ``step(x, *params)``; ``x`` is ``(B, n)``; the update is computed as
        ``x ⊙ exp(s − m) / Σ`` with ``m`` a detached shift, so ``x_i = 0`` gives no NaN.
    """
    g = _grad_fn(grad, objective, "mirror_descent")

    def step(x: Tensor, *params: Any) -> Tensor:
        _check_state(x, "mirror_descent")
        B = x.shape[0]
        eta = check_batch_scalar(step_size, "step_size", B, x, "mirror_descent").detach()
        r = check_batch_scalar(radius, "radius", B, x, "mirror_descent")
        s = -eta * g(x, params)
        with torch.no_grad():
            pos = x > 0
            logx = torch.where(pos, x, torch.ones_like(x)).log()
            m = torch.where(pos, s + logx, torch.full_like(x, -torch.inf)).amax(dim=1,
                                                                                 keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = x * torch.exp((s - m).clamp(max=700.0))
        return r * w / w.sum(dim=1, keepdim=True)
    return step


def newton(grad: GradFn | None = None, *, objective: Callable[..., Tensor] | None = None,
           hessian: Callable[..., Tensor] | None = None, damping: float | Tensor = 1.0,
           regularization: float = 0.0) -> Callable[..., Tensor]:
    """Damped Newton step ``U(x) = x − t (H + δI)⁻¹ ∇f(x, θ)`` for smooth unconstrained problems.

    ``H`` is the Hessian at the current ``x`` (from ``hessian(x, *params) -> (B, n, n)``, or
    by autograd from ``objective``, or as the Jacobian of ``grad``), used as a constant
    (detached): at a stationary point ``∇f = 0`` this is exact, because
    ``(I − Φ)⁻¹ Ψ = (t H̃⁻¹ H)⁻¹ (−t H̃⁻¹ ∂_θ∇f) = −H⁻¹ ∂_θ∇f`` for any fixed ``H̃ = H + δI``.
    With ``δ = 0``, ``Φ = (1 − t) I``: ``t = 1`` (default) gives ``Φ = 0`` (one backward
    iteration) and ``ρ(Φ) < 1`` for ``0 < t < 2``.

    Args:
        grad / objective: as in :func:`gradient_descent` (one of them).
        hessian: optional ``(x, *params) -> (B, n, n)``.
        damping: ``t`` (number, 0-d or ``(B,)`` tensor, detached).
        regularization: ``δ ≥ 0`` added to the Hessian's diagonal.

    Returns:
        ``step(x, *params)``. Use :func:`minimize_newton` (line search) as a forward.
    """
    g = _grad_fn(grad, objective, "newton")

    def hess(x: Tensor, params: tuple) -> Tensor:
        if hessian is not None:
            H = hessian(x.detach(), *params)
            n = x.shape[1]
            if not isinstance(H, Tensor) or tuple(H.shape[-2:]) != (n, n):
                shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
                raise ShapeError(f"newton: hessian returned {shape}, expected ({x.shape[0]}, {n}, "
                                 f"{n}) or ({n}, {n}).")
            return H.detach()
        if objective is not None:
            return autograd_hessian(objective, x, params)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            gx = g(xg, tuple(p.detach() if isinstance(p, Tensor) else p for p in params))
            H = autograd_jacobian(gx, xg, create_graph=False)
        return H.detach()

    def step(x: Tensor, *params: Any) -> Tensor:
        _check_state(x, "newton")
        t = check_batch_scalar(damping, "damping", x.shape[0], x, "newton").detach()
        H = hess(x, params)
        if regularization:
            H = H + regularization * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        H = H.expand(x.shape[0], -1, -1)
        d, info = torch.linalg.solve_ex(H, g(x, params).unsqueeze(-1))
        if bool((info != 0).any()):
            bad = torch.nonzero(info).flatten().tolist()
            raise FoldError(f"newton: the Hessian is singular for instance(s) {bad[:20]}; pass "
                            "regularization=δ > 0 or use gradient_descent.")
        return x - t * d.squeeze(-1)
    return step


# ----------------------------------------------------------------------------- forward drivers

@dataclass
class IterateInfo:
    """Per-instance outcome of a forward fixed-point iteration.

    Attributes:
        iterations: ``(B,)`` int64 iterations until the residual fell below ``tol``.
        residual: ``(B,)`` final ``‖U(x) − x‖ / (1 + ‖x‖)`` (flattened over a tuple state).
        converged: ``(B,)`` bool.
        diverged: ``(B,)`` bool, the step returned NaN/Inf (the instance kept its last finite
            iterate); ``None`` from drivers that do not track it.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor | None = None


def iterate(step: Callable, x0: Tensor | tuple[Tensor, ...], *params: Any, tol: float = 1e-12,
            maxiter: int = 10_000, warn: bool = True, batched: bool = True,
            strict: bool = False) -> tuple[Any, IterateInfo]:
    """Run ``x ← step(x, *params)`` under ``no_grad`` until ``‖U(x) − x‖/(1+‖x‖) ≤ tol`` per
    instance (converged instances are frozen; an instance whose step returns NaN/Inf keeps its
    last finite iterate and is reported). Batched: dim 0 of every state tensor, unless
    ``batched=False`` (the whole state is one problem).

    Returns:
        ``(x, IterateInfo)``; warns :class:`FoldConvergenceWarning` naming unconverged
        instances when ``warn`` (``strict``: raises :class:`FoldError` instead).
    """
    parts, is_tuple = as_parts(x0, "iterate: x0")
    parts = tuple(t.detach() for t in parts)
    r = fixed_point_iteration(step, parts, is_tuple, params, tol=tol, maxiter=maxiter,
                              batched=batched, where="iterate")
    if (warn or strict) and not bool(r.converged.all()):
        remedy = "raise maxiter or use a better-conditioned step (larger step size)"
        if bool(r.diverged.any()):
            remedy = (f"the step returned NaN/Inf for instance(s) {instance_list(r.diverged)} "
                      "(kept at the last finite iterate): lower its step size; " + remedy)
        report_unconverged(~r.converged, r.residual,
                           f"iterate (tol {tol:.1e}, maxiter {maxiter}; error = "
                           "‖U(x) − x‖/(1+‖x‖))", remedy, strict)
    return pack(r.parts, is_tuple), IterateInfo(r.iterations, r.residual, r.converged,
                                                r.diverged)


def minimize_newton(objective: Callable[..., Tensor], x0: Tensor, *params: Any,
                    tol: float = 1e-12, maxiter: int = 100, regularization: float = 0.0,
                    warn: bool = True, strict: bool = False) -> tuple[Tensor, IterateInfo]:
    """Forward solve of ``min f(x, θ)`` by damped Newton with Armijo backtracking (no grad).

    Where the Hessian is not positive definite it is shifted by ``(|λ_min| + 1e-8·‖H‖) I``.
    Stops per instance when ``‖∇f‖ / (1 + |f|) ≤ tol``.

    Returns:
        ``(x, IterateInfo)`` with ``residual`` the final ``‖∇f‖/(1+|f|)``; unconverged
        instances warn :class:`FoldConvergenceWarning` when ``warn`` (``strict``: raise).
    """
    _check_state(x0, "minimize_newton")
    x = x0.detach().clone()
    B, n = x.shape
    pd = tuple(p.detach() if isinstance(p, Tensor) else p for p in params)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    its = torch.zeros(B, dtype=torch.int64, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    res = torch.full((B,), torch.inf, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for _ in range(maxiter):
            fx = objective(x, *pd)
            gx = autograd_grad(objective, x, pd)
            res = torch.where(done, res, gx.norm(dim=1) / (1 + fx.abs()))
            done = done | (res <= tol)
            if bool(done.all()):
                break
            H = autograd_hessian(objective, x, pd) + regularization * eye
            ev = torch.linalg.eigvalsh(H)
            shift = torch.where(ev[:, 0] > 1e-10 * ev[:, -1].abs(), torch.zeros_like(ev[:, 0]),
                                ev[:, 0].abs() + 1e-8 * ev[:, -1].abs() + 1e-12)
            d = -torch.linalg.solve(H + shift.view(B, 1, 1) * eye, gx.unsqueeze(-1)).squeeze(-1)
            slope = (gx * d).sum(dim=1)
            t = torch.ones(B, dtype=x.dtype, device=x.device)
            for _ls in range(60):
                ok = objective(x + t.view(B, 1) * d, *pd) <= fx + 1e-4 * t * slope + \
                    1e-14 * fx.abs()
                if bool(ok.all()):
                    break
                t = torch.where(ok, t, 0.5 * t)
            x = torch.where(done.view(B, 1), x, x + t.view(B, 1) * d)
            its = torch.where(done, its, its + 1)
    if (warn or strict) and not bool(done.all()):
        report_unconverged(~done, res, f"minimize_newton (tol {tol:.1e}, maxiter {maxiter}; "
                           "error = ‖∇f‖/(1+|f|))", "raise maxiter, start closer, or add "
                           "regularization=δ > 0 where the Hessian is ill-conditioned", strict)
    return x, IterateInfo(its, res, done)

