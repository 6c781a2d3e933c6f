"""Folded backward for a user's own loop: :class:`FoldedLoop`, :func:`folded`, and the
unrolling references :func:`unroll` and :func:`truncated`.

A loop ``for _ in range(K): x = step(x, θ)`` differentiated by autograd computes, from the
fixed point, exactly ``K`` iterations of ``v ← Φᵀv + g`` on ``(I − Φ)ᵀ v = g``
(``Φ = ∂U/∂x (x*)``): its gradient error decays like ``ρ(Φ)^K`` and its memory grows with
``K``. :class:`FoldedLoop` keeps the loop body ``step`` and replaces the backward by one
folded solve (:func:`fold_plugins.fold`); the forward runs without a graph.

Before / after::

    x = x0                                     loop = FoldedLoop(step, x0=x0)
    for _ in range(500):                       x = loop(theta)
        x = step(x, theta)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins import diagnostics as fpd
from fold_plugins.internal import (
    State,
    as_parts,
    check_step_output,
    default_fixed_point_tol,
    fixed_point_iteration,
    get_solver,
    instance_list,
    linearize,
    pack,
    validate_state,
)

from ._diagnosis import UnrollingDiagnosis
from .base import FoldedModule

__all__ = ["FoldedLoop", "UnrollingDiagnosis", "folded", "truncated", "unroll"]


# ----------------------------------------------------------------------------- helpers
# (state parts, output checks, residual and the forward iteration: fold_plugins.internal)

def _check_n_iter(n_iter: Any, name: str = "n_iter") -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise fp.FoldError(f"{name} must be an int ≥ 0, got {n_iter!r}.")
    return n_iter


# ----------------------------------------------------------------------------- references

def unroll(step: Callable, x0: State, *params: Any, n_iter: int) -> State:
    """``n_iter`` steps ``x ← step(x, *params)`` with plain autograd through all of them.

    The reference a folded backward is measured against: from a fixed point, its gradient is
    ``Ψᵀ Σ_{i<K} (Φᵀ)^i g`` (``K = n_iter``), i.e. ``K`` fixed-point iterations on
    ``(I − Φ)ᵀ v = g``. Memory grows linearly in ``K``. The graph reaches ``x0`` too when it
    requires grad.
    """
    if not callable(step):
        raise fp.FoldError(f"step must be callable step(x, *params) -> x, got "
                           f"{type(step).__name__}.")
    n_iter = _check_n_iter(n_iter)
    parts, is_tuple = as_parts(x0, "x0")
    x = pack(parts, is_tuple)
    for k in range(n_iter):
        out = check_step_output(step(x, *params), parts, is_tuple, f"unroll, step {k}")
        x = pack(out, is_tuple)
    return x


def truncated(step: Callable, x0: State, *params: Any, n_iter: int, k: int) -> State:
    """``n_iter`` steps of which only the last ``k`` keep an autograd graph.

    The first ``n_iter − k`` steps run under ``torch.no_grad()`` (no gradient reaches ``x0``
    unless ``k = n_iter``, when this is :func:`unroll`); from a converged iterate the gradient
    is ``Ψᵀ Σ_{i<k} (Φᵀ)^i g``.
    """
    n_iter = _check_n_iter(n_iter)
    k = _check_n_iter(k, "k")
    if k > n_iter:
        raise fp.FoldError(f"k (steps kept in the graph) must be ≤ n_iter, got k={k}, "
                           f"n_iter={n_iter}.")
    if k == n_iter:
        return unroll(step, x0, *params, n_iter=n_iter)
    _, is_tuple = as_parts(x0, "x0")
    with torch.no_grad():
        x = unroll(step, x0, *params, n_iter=n_iter - k)
    x_parts, _ = as_parts(x, "x")
    x = pack(tuple(t.detach() for t in x_parts), is_tuple)
    return unroll(step, x, *params, n_iter=k)


# ----------------------------------------------------------------------------- FoldedLoop

class FoldedLoop(FoldedModule):
    """Replace ``for _ in range(K): x = step(x, *params)`` by a forward without a graph and a
    folded backward ``(I − Φ)ᵀ v = g`` (:func:`fold_plugins.fold`).

    ``loop(*params, x0=None)`` returns ``x*`` (Tensor or tuple, as the state), differentiable
    w.r.t. ``params`` and everything ``step`` captures.

    Forward: with ``solver=None`` it iterates ``x ← step(x, *params)`` under ``no_grad`` until
    ``‖U(x) − x‖ ≤ forward_tol · (1 + ‖x‖)`` for each instance on its own (an instance that
    has converged stops changing), at most ``forward_maxiter`` steps; otherwise it calls
    ``solver(*params)`` (any code, under ``no_grad``; it also gets ``x0=`` when its signature
    has an ``x0`` parameter and an initial state is known). A forward that did not converge
    warns :class:`fp.FoldConvergenceWarning` naming the instances (``strict``: raises).

    Initial state: the call's ``x0=``, else the constructor's ``x0`` (a state, or a callable
    ``x0(*params) -> state``); with ``warm_start=True`` the previous call's solution replaces
    it when every part has the same shape, dtype and device (``reset()`` forgets it). The
    built-in loop needs one of them.

    Args:
        step: ``step(x, *params) -> x``, the loop body; a tuple state in, a tuple out.
        solver: optional forward ``solver(*params) -> x*``.
        backward: backward solver name or callable (see :mod:`fold_plugins.solvers`).
        tol: backward relative tolerance; also the forward tolerance unless ``forward_tol``.
        maxiter: backward iteration cap; also the forward cap unless ``forward_maxiter``.
        strict: raise :class:`fp.FoldError` on forward or backward non-convergence.
        forward_tol: forward stopping tolerance (floored at ``50·eps`` of the dtype).
        forward_maxiter: forward step cap.
        warm_start: start from the previous call's solution when shapes match.
        batched: dim 0 of every state tensor is the batch (default); ``False``: one problem.
        x0: default initial state, or a callable ``x0(*params) -> state``. A tensor (or
            tuple of tensors) is registered as a buffer — ``x0`` (``x0_0``, ``x0_1``, … for a
            tuple) — so it follows ``.to()``/``.cuda()`` and is saved in ``state_dict()``.
        solver_options: extra keywords for the backward solver.

    After a call, ``last_info`` is an :class:`fp.FoldInfo` with ``forward_iterations``,
    ``forward_residual``, ``forward_converged`` (per instance; residuals only for a user
    solver) and, once backward ran, the backward figures.
    """

    def __init__(self, step: Callable, solver: Callable | None = None,
                 backward: str | Callable = "gmres", tol: float = 1e-10, maxiter: int = 1000,
                 strict: bool = False, *, forward_tol: float | None = None,
                 forward_maxiter: int | None = None, warm_start: bool = False,
                 batched: bool = True, x0: State | Callable | None = None,
                 solver_options: dict | None = None):
        super().__init__(backward=backward, tol=tol, maxiter=maxiter, strict=strict,
                         solver_options=solver_options)
        if not callable(step):
            raise fp.FoldError(f"step must be callable step(x, *params) -> x, got "
                               f"{type(step).__name__}.")
        if solver is not None and not callable(solver):
            raise fp.FoldError(f"solver must be None (iterate step) or callable "
                               f"solver(*params) -> x_star, got {type(solver).__name__}.")
        if forward_tol is not None and not (isinstance(forward_tol, (int, float))
                                            and forward_tol >= 0):
            raise fp.FoldError(f"forward_tol must be a number ≥ 0 or None, got {forward_tol!r}.")
        if forward_maxiter is not None and (isinstance(forward_maxiter, bool)
                                            or not isinstance(forward_maxiter, int)
                                            or forward_maxiter < 1):
            raise fp.FoldError(f"forward_maxiter must be a positive int or None, got "
                               f"{forward_maxiter!r}.")
        if maxiter is None and forward_maxiter is None and solver is None:
            raise fp.FoldError("maxiter=None leaves the forward loop without a cap: give "
                               "forward_maxiter (or an int maxiter).")
        if x0 is not None and not callable(x0):
            as_parts(x0, "x0")
        self.step = step
        self.solver = solver
        self.forward_tol = float(tol if forward_tol is None else forward_tol)
        self.forward_maxiter = int(forward_maxiter if forward_maxiter is not None else maxiter
                                   if maxiter is not None else 0)
        self.warm_start = bool(warm_start)
        self.batched = bool(batched)
        # a tensor initial state is a buffer (follows .to(), .cuda(), state_dict: key "x0";
        # a tuple state: "x0_0", "x0_1", …); a callable stays a plain attribute
        self._x0_parts = 0
        if x0 is None or callable(x0):
            self.x0 = x0
        else:
            x0_parts, x0_tuple = as_parts(x0, "x0")
            if x0_tuple:
                self.x0 = None
                self._x0_parts = len(x0_parts)
                for i, t in enumerate(x0_parts):
                    self.register_buffer(f"x0_{i}", t.detach().clone())
            else:
                self.register_buffer("x0", x0_parts[0].detach().clone())
        self._warm: tuple[Tensor, ...] | None = None
        self._warm_tuple = False
        self._solver_takes_x0 = solver is not None and _accepts_x0(solver)

    # ------------------------------------------------------------------ forward
    def reset(self) -> None:
        """Forget the warm-start state."""
        self._warm = None

    def _initial(self, params: tuple[Any, ...], x0: Any
                 ) -> tuple[tuple[Tensor, ...], bool, bool] | None:
        """``(parts, is_tuple, warm)`` of the initial state, or ``None`` when none is known."""
        if x0 is not None:
            src, name = x0, "x0 (call)"
        elif self._x0_parts:
            src, name = tuple(getattr(self, f"x0_{i}") for i in range(self._x0_parts)), "x0"
        elif callable(self.x0) and not isinstance(self.x0, Tensor):
            with torch.no_grad():
                src = self.x0(*params)
            name = "x0(*params)"
        else:
            src, name = self.x0, "x0"
        parts = None
        if src is not None:
            parts, is_tuple = as_parts(src, name)
        if self.warm_start and self._warm is not None and (
                parts is None or (is_tuple == self._warm_tuple
                                  and _same_layout(self._warm, parts))):
            return self._warm, self._warm_tuple, True
        if parts is None:
            return None
        validate_state(parts, is_tuple, self.batched, name)
        return tuple(t.detach() for t in parts), is_tuple, False

    def _iterate(self, parts: tuple[Tensor, ...], is_tuple: bool, params: tuple[Any, ...]
                 ) -> tuple[tuple[Tensor, ...], Tensor, Tensor, Tensor, Tensor]:
        """Iterate ``step`` per instance: ``(x, iterations, residual, converged, diverged)``."""
        tol = max(self.forward_tol, 50.0 * torch.finfo(parts[0].dtype).eps)
        r = fixed_point_iteration(self.step, parts, is_tuple, params, tol=tol,
                                  maxiter=self.forward_maxiter, batched=self.batched,
                                  where="FoldedLoop forward")
        return r.parts, r.iterations, r.residual, r.converged, r.diverged

    def _forward_solve(self, params: tuple[Any, ...], x0: Any
                       ) -> tuple[State, fp.FoldInfo, bool]:
        """Run the forward: ``(x_star, info with forward fields, judged_here)``."""
        init = self._initial(params, x0)
        info = fp.FoldInfo()
        if self.solver is not None:
            kw = ({"x0": pack(init[0], init[1])}
                  if init is not None and self._solver_takes_x0 else {})
            with torch.no_grad():
                x_star = self.solver(*params, **kw)
            parts, is_tuple = as_parts(x_star, "solver(*params) output")
            validate_state(parts, is_tuple, self.batched, "solver(*params) output")
            info.extra["warm_started"] = bool(init is not None and init[2] and kw)
            return pack(tuple(t.detach() for t in parts), is_tuple), info, False
        if init is None:
            raise fp.FoldError("FoldedLoop needs an initial state for its forward loop: pass "
                               "loop(*params, x0=...), FoldedLoop(step, x0=state or "
                               "callable(*params)), or a solver=.")
        parts, is_tuple, warm = init
        x, iters, res, conv, diverged = self._iterate(parts, is_tuple, params)
        info.forward_iterations = iters
        info.forward_residual = res
        info.forward_converged = conv
        info.extra["warm_started"] = warm
        if bool(diverged.any()):
            info.extra["forward_diverged"] = diverged
        if not bool(conv.all()):
            remedy = (f"raise forward_maxiter (now {self.forward_maxiter}) or forward_tol (now "
                      f"{self.forward_tol:.0e}), or check that step contracts (loop.diagnose "
                      "reports ρ(Φ))")
            if bool(diverged.any()):
                remedy = (f"step produced NaN/Inf for instance(s) {instance_list(diverged)} "
                          "(kept at the last finite iterate): lower its step size; " + remedy)
            self._report_forward(conv, res, "FoldedLoop", remedy)
        return pack(x, is_tuple), info, True

    def forward(self, *params: Any, x0: State | None = None) -> State:
        """Solve (no graph), then attach the folded backward at the solution."""
        x_star, info, judged = self._forward_solve(params, x0)
        parts, is_tuple = as_parts(x_star, "x_star")
        if self.warm_start:
            self._warm = tuple(t.detach() for t in parts)
            self._warm_tuple = is_tuple
        # the built-in loop judged convergence itself (and already warned when it failed)
        fp_tol = None
        if judged:
            conv = info.forward_converged
            assert conv is not None  # set by the built-in loop
            fp_tol = math.inf if not bool(conv.all()) else None
        x = self._fold(self.step, x_star, *params, batched=self.batched, info=info,
                       fixed_point_tol=fp_tol)
        if not judged:
            res = info.fixed_point_residual
            assert res is not None  # measured by fold
            info.forward_residual = res
            info.forward_converged = res <= default_fixed_point_tol(parts[0].dtype)
        return x

    # ------------------------------------------------------------------ diagnosis
    def diagnose(self, *params: Any, x0: State | None = None, x_star: State | None = None,
                 accuracies: tuple[float, ...] = (1e-2, 1e-4, 1e-6, 1e-8),
                 n_iter: int | None = None, method: str = "arnoldi",
                 backward_check: bool = True, seed: int = 0) -> UnrollingDiagnosis:
        """For users migrating from unrolling: ``ρ(Φ)`` at the solution and the unrolled
        iterations ``K = ⌈log(acc)/log ρ⌉`` each gradient accuracy needs (``ρ^K ≤ acc``).

        Args:
            x_star: the solution, if known (otherwise the forward runs here; warm state is
                not changed).
            accuracies: relative gradient accuracies to size ``K`` for.
            n_iter: the unroll length the old code used: reports ``ρ^n_iter``.
            method: ``spectral_radius`` method, ``"arnoldi"`` or ``"power"``.
            backward_check: also run this module's folded backward solve once for a random
                cotangent and report its iterations.

        Returns:
            an :class:`UnrollingDiagnosis` (``print`` it for a summary).
        """
        fwd_info = None
        if x_star is None:
            x_star, fwd_info, _ = self._forward_solve(params, x0)
        rho = fpd.spectral_radius(self.step, x_star, *params, batched=self.batched,
                                  method=method, seed=seed)
        res = fpd.fixed_point_residual(self.step, x_star, *params, batched=self.batched)
        # rho is a tensor, so are these (fpd's helpers are annotated Tensor | float)
        its = {float(a): cast(Tensor, fpd.unroll_iterations_needed(rho, float(a)))
               for a in accuracies}
        lin = linearize(self.step, x_star, *params, batched=self.batched)
        n_unit, rho_rest = fpd.unit_eigenvalues(self.step, x_star, *params, batched=self.batched,
                                                seed=seed)
        out = UnrollingDiagnosis(spectral_radius=rho, fixed_point_residual=res,
                                 unroll_iterations=its, state_size=lin.spec.n,
                                 unit_eigenvalues=n_unit, rho_without_unit=rho_rest)
        weak = lin.notes.get("weakly_active")
        if weak:
            out.weakly_active = sum(w.detach() for w in weak)
        if n_iter is not None:
            out.n_iter = _check_n_iter(n_iter)
            out.predicted_unroll_error = cast(Tensor, fpd.predicted_unroll_error(rho, out.n_iter))
        if fwd_info is not None:
            out.forward_iterations = fwd_info.forward_iterations
            out.forward_converged = fwd_info.forward_converged
        if backward_check:
            name, solve = get_solver(self.backward)
            ref = lin.x_parts[0]
            gen = torch.Generator(device=ref.device).manual_seed(seed)
            g = torch.randn(lin.spec.B, lin.spec.n, generator=gen, dtype=ref.dtype,
                            device=ref.device)
            _, sinfo = solve(lambda v: v - lin.vjp(v), g, x0=None, tol=self.tol,
                             maxiter=self.maxiter, **self.solver_options)
            out.backward_solver, out.backward_tol = name, self.tol
            out.backward_iterations = sinfo.iterations
            out.backward_residual = sinfo.residual
            flag = getattr(sinfo, "extra", {}).get("not_isolated")
            out.backward_not_isolated = None if flag is None else flag.to(torch.bool)
        return out

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", forward_tol={self.forward_tol:g}, forward_maxiter="
                f"{self.forward_maxiter}, warm_start={self.warm_start}, batched={self.batched}, "
                f"solver={'None' if self.solver is None else 'custom'}")


def _accepts_x0(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    p = sig.parameters.get("x0")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _same_layout(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    return len(a) == len(b) and all(s.shape == t.shape and s.dtype == t.dtype
                                    and s.device == t.device for s, t in zip(a, b))


def folded(step: Callable, **kwargs: Any) -> Callable[[Callable], FoldedLoop]:
    """Decorator: ``@folded(step)`` on ``def my_solver(*params) -> x_star`` (any code).

    ``my_solver(*params)`` then runs the function without a graph and returns its solution
    with the folded backward of ``step`` attached; it is a :class:`FoldedLoop` (so
    ``my_solver.last_info`` and ``my_solver.diagnose(...)`` work). ``kwargs`` go to
    :class:`FoldedLoop` (``backward``, ``tol``, ``maxiter``, ``strict``, ``batched``, …).
    """
    if not callable(step):
        raise fp.FoldError(f"folded(step): step must be callable step(x, *params) -> x, got "
                           f"{type(step).__name__}.")
    if "solver" in kwargs:
        raise fp.FoldError("folded(step, ...): do not pass solver=, the decorated function is "
                           "the solver.")

    def decorate(fn: Callable) -> FoldedLoop:
        if not callable(fn):
            raise fp.FoldError(f"@folded(step) must decorate a function, got "
                               f"{type(fn).__name__}.")
        loop = FoldedLoop(step, solver=fn, **kwargs)
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, attr):
                object.__setattr__(loop, attr, getattr(fn, attr))
        object.__setattr__(loop, "__wrapped__", fn)
        return loop

    return decorate
