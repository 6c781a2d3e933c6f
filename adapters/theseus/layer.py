"""FoldedTheseusLayer: a drop-in for ``th.TheseusLayer`` with the exact implicit gradient.

Switching an existing Theseus model is one line::

    layer = th.TheseusLayer(optimizer)            # before
    layer = FoldedTheseusLayer(optimizer)         # after (also accepts the TheseusLayer itself)
    values, info = layer(input_tensors, optimizer_kwargs)   # same call, same (dict, info)

The forward is Theseus's own, with the caller's ``backward_mode`` (so the values are
``th.TheseusLayer``'s bit for bit), run without an autograd graph for ``unroll`` (Theseus's
default). Afterwards the objective's optimisation variables hold the returned, differentiable
values, as ``th.TheseusLayer`` leaves them. For every instance whose forward converged
(module :mod:`._theseus_policy`: Theseus's status, or a fixed point to working precision) the
backward folds one
update step ``U`` at the solution, written in the tangent coordinates ``ξ`` of the
optimisation variables (``x = x* ⊕ ξ`` with each variable's own ``retract``):

    U(ξ) = ξ − M⁻¹ g(x* ⊕ ξ, θ),    g = Jᵀr  (Theseus's ``Atb`` is ``−g``)

    gauss_newton:          M = JᵀJ at x*                 (Theseus's linearization ``AtA``)
    levenberg_marquardt:   M = JᵀJ + λD at x*, λ fixed   (D = I, or diag(JᵀJ) when ellipsoidal)
    newton:                M = H = ∂g/∂ξ at x*           (the full Hessian of ½‖r‖², by autograd)

``J`` and ``r`` are Theseus's own weighted Jacobians and errors in tangent coordinates. With a
dense linear solver ``M`` is factored once (Cholesky, or LU for ``LUDenseSolver``) and every
backward VJP reuses the factor; other linear solvers (e.g. ``CholmodSparseSolver``) are
called as Theseus calls them, ``linearize(_detach_hessian=True)`` then ``solve()``.

``M`` is held constant (it multiplies ``g(x*) = 0``, so its derivative does not enter), and
the folded op solves ``(I − Φ)ᵀ v = ∂L/∂ξ`` with ``I − Φ = M⁻¹H`` at x*. Its result is the
implicit-function-theorem gradient ``dξ*/dθ = −H⁻¹ ∂g/∂θ`` with the *full* Hessian
``H = JᵀJ + Σᵢ rᵢ∇²rᵢ``; Theseus's ``implicit`` mode uses ``JᵀJ`` in its place. For
``newton`` ``Φ = 0`` by construction, so the default ``backward="auto"`` skips the solve
(``v = ∂L/∂ξ``) and the backward is one VJP of the step into the inputs — Theseus
``implicit``'s one backward, with the full Hessian. ``H`` is built in the forward from
colour-compressed VJPs run as one vmapped backward, which also checks that no instance reads
another's state.

Which step by default (``step="auto"``): ``newton`` with a dense linear solver when that
compressed Hessian needs at most :data:`NEWTON_MAX_ROWS` VJP rows (small problems, and
sparse ones whose cost functions touch few variables: the 90-dimensional SE2 pose graph needs
9); otherwise the optimizer's own matrix (``gauss_newton`` for ``GaussNewton``/``Dogleg``,
``levenberg_marquardt`` for ``LevenbergMarquardt``, also for every sparse linear solver)
with a Krylov backward.

Gradients reach every tensor the step touches: tensors in ``input_tensors`` (auxiliary
variables, targets, data, cost-weight variables), cost-weight tensors held by the objective,
and ``nn.Module`` parameters used inside ``AutoDiffCostFunction`` closures. The initial values
of the optimisation variables get an exact zero gradient where the forward converged. Where it
did not (a truncated inner loop, ``MAX_ITERATIONS``), the default ``unconverged="unroll"``
gives those instances Theseus's own backward of what was computed (non-zero for the initial
values), exactly as ``th.TheseusLayer``; ``"fold"`` and ``"raise"`` are the alternatives.

Conditioning is judged on the factor of ``M`` (no eigen- or singular-value decomposition): the
reciprocal condition number ``rcond₁ = 1 / (‖M‖₁ ‖M⁻¹‖₁)`` with ``‖M⁻¹‖₁`` estimated from
three solves with the saved factor (Hager's 1-norm estimator with Higham's extra vector, the
method of LAPACK's ``xPOCON``/``xGECON``; the estimate never exceeds ``‖M⁻¹‖₁``). Per instance:
the factorisation fails, or ``rcond₁ ≤ eps`` of the dtype → singular; ``eps < rcond₁ ≤ n·eps``
→ a :class:`fp.FoldConvergenceWarning` that the gradient has few correct digits.

Per-instance failures do not spoil the batch. An instance whose Theseus solution (or whose
per-instance input data) is NaN/Inf, or whose ``M`` is singular, is *excluded*: its step is
replaced by the constant ``U = 0`` (so ``Φ = 0``, ``∂U/∂θ = 0``) evaluated on a copy of a
good instance's data, so it contributes **exactly zero** to every gradient — its own inputs
and shared parameters alike — while the other instances keep their exact gradients. It is
flagged (``FoldInfo.forward_converged`` False, ``info.extra["excluded"]``) and named in a
warning (a :class:`fp.FoldError` with ``strict=True``, or when no instance is left).

Without a gradient to compute (under ``torch.no_grad()``, or when no input, cost weight or
closure parameter requires grad) the layer is Theseus's forward only: no linearisation or
factorisation at x*, and forward convergence is Theseus's own per-instance status
(``FoldInfo.forward_converged``); only failures (status FAIL, non-finite solution) warn then.
"""

from __future__ import annotations

import math
import pickle
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins.internal import default_fixed_point_tol

from ._theseus_geometry import TangentGeometry
from ._theseus_policy import (
    Notes,
    apply_policy,
    check_policy,
    inference,
    note_backward_mode,
    note_solve_floor,
    report_excluded,
    status_mask,
    theseus_backward,
)
from ._theseus_setup import NEWTON_MAX_ROWS, FlooredSolver, import_theseus, lm_kwargs, step_kind
from ._theseus_step import TangentStep
from .base import FoldedModule

__all__ = ["FoldedTheseusLayer", "STEPS", "FOLD_KWARGS", "NEWTON_MAX_ROWS"]

#: step names accepted by ``FoldedTheseusLayer(step=...)`` (plus the aliases "gn", "lm").
STEPS = ("auto", "gauss_newton", "levenberg_marquardt", "newton")
_ALIASES = {"gn": "gauss_newton", "lm": "levenberg_marquardt", "gauss-newton": "gauss_newton",
            "levenberg-marquardt": "levenberg_marquardt"}
#: per-call overrides read from ``optimizer_kwargs`` and removed before Theseus sees them.
FOLD_KWARGS = ("fold_step", "fold_backward", "fold_tol", "fold_maxiter", "fold_unconverged")


def _resolve_step_name(step: str) -> str:
    if not isinstance(step, str):
        raise fp.FoldError(f"step must be one of {STEPS} (or 'gn'/'lm'), got "
                           f"{type(step).__name__} {step!r}.")
    name = _ALIASES.get(step.lower(), step.lower())
    if name not in STEPS:
        raise fp.FoldError(f"step must be one of {STEPS} (or 'gn'/'lm'), got {step!r}.")
    return name


class FoldedTheseusLayer(FoldedModule):
    """``th.TheseusLayer`` with a folded implicit backward (exact with the full Hessian).

    Args:
        optimizer: a Theseus optimizer (``GaussNewton``, ``LevenbergMarquardt``, ``Dogleg``;
            others such as ``DCEM`` run with Theseus's own backward) or a ``th.TheseusLayer``.
        vectorize, empty_cuda_cache: as ``th.TheseusLayer`` (ignored when a layer is given).
        backward: backward linear solver: ``"auto"`` (default: no solve where ``Φ = 0``,
            i.e. the ``newton`` step; otherwise dense or GMRES from the core's cost model),
            ``"gmres"``, ``"bicgstab"``, ``"dense"``, ``"fixed_point"`` or a callable (see
            :mod:`fold_plugins.solvers`).
        tol: relative residual of the backward solve, per instance.
        maxiter: backward iteration cap (``None``: the solver's default).
        step: the folded update (module docstring): ``"auto"`` (``newton`` when the
            linear solver is dense and the compressed Hessian needs ≤ :data:`NEWTON_MAX_ROWS`
            VJP rows; else Gauss-Newton for ``GaussNewton``/``Dogleg``, Levenberg-Marquardt
            for ``LevenbergMarquardt``), ``"gauss_newton"``, ``"levenberg_marquardt"`` or
            ``"newton"``. Every step gives the same exact gradient. The LM damping
            ``λ`` is the *configured* one, ``optimizer_kwargs["damping"]`` (Theseus's default
            1e-3), not the optimizer's final adaptive ``λ`` (which grows by 11× per rejected
            step once converged, up to 1e7, and would make ``ρ(Φ) → 1``). The gradient does
            not depend on ``λ`` (``M`` multiplies ``g(x*) = 0``); only the backward's speed does.
        unconverged: what an instance whose forward did not converge gets (module docstring):
            ``"unroll"`` (default: Theseus's own unrolled backward, as ``th.TheseusLayer``),
            ``"fold"`` (folded anyway, biased; warned once) or ``"raise"``.
        strict: raise :class:`fp.FoldError` instead of warning on backward non-convergence,
            on folded unconverged instances and on excluded (NaN/Inf or singular) instances.
        solver_options: extra keywords for the backward solver.
        fixed_point_tol: besides Theseus's ``CONVERGED`` status, an instance counts as
            converged when ``‖M⁻¹g‖ / (1 + ‖x*‖) ≤ fixed_point_tol`` at the returned point
            (default 1e-6 in float64, 1e-3 below).

    Call: ``layer(input_tensors, optimizer_kwargs=None) -> (values, info)`` exactly as
    ``th.TheseusLayer``; afterwards the objective's optimisation variables hold ``values``
    (differentiable, as Theseus leaves them). ``info`` is Theseus's ``OptimizerInfo`` with
    ``info.fold_info`` (a :class:`fp.FoldInfo`, also ``layer.last_info``). ``optimizer_kwargs``
    may carry the per-call overrides ``fold_step``, ``fold_backward``, ``fold_tol``,
    ``fold_maxiter``, ``fold_unconverged`` (removed before Theseus sees the dict).
    ``backward_mode`` is validated as Theseus validates it; ``"implicit"`` is what folding
    replaces, ``"unroll"``/``"truncated"`` are used for the unconverged instances only.

    ``fold_info.extra``: ``step``, ``tangent_dim``, ``theseus_status``, ``forward_check``
    and, with a gradient, ``converged``/``unconverged``/``unrolled``/``excluded``/``singular``
    (``(B,)`` bool), ``rcond`` (dense solvers), ``linear_solve_residual`` (other linear
    solvers: the measured ``‖Mδ − b‖/‖b‖`` that floors the backward tolerance),
    ``backward_tol``, ``damping`` (LM), ``hessian_vjps`` and ``counts`` (instances per kind
    of message since the layer was built). ``forward_residual`` is the step length
    ``‖M⁻¹g‖/(1+‖x*‖)`` at the returned point (NaN when no gradient was wanted).
    """

    def __init__(self, optimizer: Any, vectorize: bool = True, empty_cuda_cache: bool = False,
                 *, backward: str | Callable = "auto", tol: float = 1e-10,
                 maxiter: int | None = None, step: str = "auto", unconverged: str = "unroll",
                 strict: bool = False, solver_options: dict | None = None,
                 fixed_point_tol: float | None = None):
        super().__init__(backward=backward, tol=tol, maxiter=maxiter, strict=strict,
                         solver_options=solver_options)
        th = import_theseus()
        if isinstance(optimizer, th.TheseusLayer):
            layer = optimizer
        elif isinstance(optimizer, th.optimizer.Optimizer):
            layer = th.TheseusLayer(optimizer, vectorize=vectorize,
                                    empty_cuda_cache=empty_cuda_cache)
        else:
            raise fp.FoldError(
                "optimizer must be a theseus Optimizer (GaussNewton, LevenbergMarquardt, "
                f"Dogleg, DCEM, …) or a th.TheseusLayer, got {type(optimizer).__name__}.")
        self.step = _resolve_step_name(step)
        self.unconverged = check_policy(unconverged)
        if fixed_point_tol is not None and not (isinstance(fixed_point_tol, (int, float))
                                                and fixed_point_tol > 0):
            raise fp.FoldError(f"fixed_point_tol must be a number > 0 or None, got "
                               f"{fixed_point_tol!r}.")
        self.fixed_point_tol = fixed_point_tol
        self.layer = layer
        # optimizers without a least-squares step (DCEM) keep Theseus's backward
        self._geo = TangentGeometry(layer.optimizer) \
            if isinstance(layer.optimizer, th.NonlinearLeastSquares) else None
        self._notes = Notes()

    # ------------------------------------------------------------------ th.TheseusLayer API
    @property
    def objective(self):
        return self.layer.objective

    @property
    def optimizer(self):
        return self.layer.optimizer

    @property
    def device(self) -> torch.device:
        return self.layer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.dtype

    def to(self, *args: Any, **kwargs: Any) -> FoldedTheseusLayer:
        """Move the module and the Theseus objective (as ``th.TheseusLayer.to``)."""
        super().to(*args, **kwargs)
        self.layer.to(*args, **kwargs)
        return self

    def verify_jacobians(self, num_checks: int = 1, tol: float = 1.0e-3) -> None:
        """Theseus's Jacobian check of every cost function (prints, as ``th.TheseusLayer``)."""
        return self.layer.verify_jacobians(num_checks=num_checks, tol=tol)

    def compute_samples(self, linear_solver: Any = None, n_samples: int = 10,
                        temperature: float = 1.0) -> Tensor | None:
        """Samples around the solution from the linear system (``th.TheseusLayer``'s, LEO)."""
        return self.layer.compute_samples(linear_solver, n_samples=n_samples,
                                          temperature=temperature)

    def __deepcopy__(self, memo: dict) -> FoldedTheseusLayer:
        """A deep copy made by pickling. Theseus's ``Variable.__deepcopy__`` renames each
        variable (``a`` → ``a_copy``), which disconnects the optimizer's linearization from the
        objective: a deep-copied ``th.TheseusLayer`` returns its initial values unsolved."""
        try:
            return pickle.loads(pickle.dumps(self))
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise fp.FoldError(
                f"FoldedTheseusLayer cannot be deep-copied: its objective does not pickle "
                f"({exc}). Define cost-function callables at module level (not as lambdas or "
                "local functions); Theseus's own deepcopy would leave the copy unsolvable."
            ) from exc

    def extra_repr(self) -> str:
        return f"step={self.step!r}, unconverged={self.unconverged!r}, " + super().extra_repr()

    # ------------------------------------------------------------------ forward
    def forward(self, input_tensors: dict[str, Tensor] | None = None,
                optimizer_kwargs: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], Any]:
        """Solve with Theseus (no graph), then attach the folded gradient to the solution.

        Returns:
            ``(values, info)``: ``values`` maps each optimisation variable's name to its
            tensor at x* (differentiable); ``info`` is Theseus's ``OptimizerInfo`` with
            ``info.fold_info`` (:class:`fp.FoldInfo`).
        """
        th = import_theseus()
        if input_tensors is not None and not isinstance(input_tensors, dict):
            raise fp.FoldError(f"input_tensors must be a dict name -> Tensor (or None), got "
                               f"{type(input_tensors).__name__}.")
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
            raise fp.FoldError(f"optimizer_kwargs must be a dict (or None), got "
                               f"{type(optimizer_kwargs).__name__}.")
        input_tensors = dict(input_tensors or {})
        kwargs = dict(optimizer_kwargs or {})
        overrides = {k: kwargs.pop(k) for k in FOLD_KWARGS if k in kwargs}
        # validated exactly as th.TheseusLayer does (ValueError)
        mode = th.BackwardMode.resolve(kwargs.get("backward_mode", "unroll"))
        eps_dlm = kwargs.get("dlm_epsilon", 1e-2)
        if mode == th.BackwardMode.DLM and not isinstance(eps_dlm, float):
            raise ValueError(f"dlm_epsilon must be a float but {type(eps_dlm)} was given.")
        if self._geo is None:
            return theseus_backward(self, input_tensors, kwargs, mode)
        # Theseus sees its backward_mode: its forward values are exactly th.TheseusLayer's
        note_backward_mode(self, mode, "backward_mode" in kwargs)
        step_name = _resolve_step_name(overrides.get("fold_step", self.step))
        solver = overrides.get("fold_backward", self.backward)
        tol = float(overrides.get("fold_tol", self.tol))
        maxiter = overrides.get("fold_maxiter", self.maxiter)
        policy = check_policy(overrides.get("fold_unconverged", self.unconverged))

        geo = self._geo
        init = {v.name: v.tensor for v in geo.ordering}  # to re-run the forward with autograd
        optimizer = self.optimizer
        # Theseus's unroll would record every iteration: run it without a graph (re-run only
        # if an instance needs it); implicit/truncated/dlm keep a graph of one or a few steps,
        # so they run as th.TheseusLayer runs them and their graph serves unconverged instances
        cheap_graph = mode != th.BackwardMode.UNROLL and torch.is_grad_enabled()
        with torch.set_grad_enabled(cheap_graph):
            computed, th_info = self.layer(input_tensors, optimizer_kwargs=kwargs)
        x_star = self._geo.solution()
        if cheap_graph:
            geo.set_vars(x_star)  # the fold reads the objective without Theseus's graph
        else:
            computed = None
        kind = step_kind(step_name, self.optimizer, self._geo)
        B = x_star[0].shape[0]
        dev, dt = x_star[0].device, x_star[0].dtype
        info = fp.FoldInfo(batch_size=B)
        info.extra.update(step=kind, tangent_dim=geo.n, theseus_status=th_info.status)
        statuses = th.NonlinearOptimizerStatus
        failed = status_mask(th_info, B, dev, statuses.FAIL)
        th_conv = status_mask(th_info, B, dev, statuses.CONVERGED)
        iters = th_info.converged_iter.detach().to(device=dev).reshape(-1)
        max_it = int(optimizer.params.max_iterations)
        info.forward_iterations = torch.where(iters >= 0, iters, torch.full_like(iters, max_it))
        name = f"FoldedTheseusLayer ({type(optimizer).__name__})"
        finite_x = torch.stack([torch.isfinite(x.reshape(B, -1)).all(dim=1) for x in x_star])
        finite_x = finite_x.all(dim=0)

        if not self._needs_graph(input_tensors, init):
            return inference(self, x_star, th_info, info, th_conv & finite_x & ~failed,
                                   failed | ~finite_x, name)

        solve_kwargs = lm_kwargs(kind, self.optimizer, kwargs)
        if "damping" in solve_kwargs:
            info.extra["damping"] = solve_kwargs["damping"]
        nonfinite = ~finite_x | geo.nonfinite_inputs(input_tensors, B)
        if bool(nonfinite.all()):
            bad_vars = [v.name for v, x in zip(geo.ordering, x_star)
                        if not bool(torch.isfinite(x).all())]
            raise fp.FoldError(
                f"the Theseus solution ({', '.join(bad_vars) or 'no variable'}) or the "
                f"per-instance input data is NaN/Inf for every instance ({B}); the forward "
                "solve failed — check the problem, the initial values, or use "
                "LevenbergMarquardt.")
        fp_tol = self.fixed_point_tol if self.fixed_point_tol is not None \
            else default_fixed_point_tol(dt)
        step_fn = TangentStep(geo, optimizer, x_star, input_tensors, kind, solve_kwargs,
                              nonfinite)
        try:
            xi, info = fp.fold(step_fn, x_star[0].new_zeros(B, geo.n), *step_fn.params,
                               solver=FlooredSolver(solver, step_fn), tol=tol, maxiter=maxiter,
                               batched=True, strict=self.strict, return_info=True,
                               fixed_point_tol=sys.float_info.max, info=info,
                               solver_options=self.solver_options)
        finally:
            geo.restore(x_star, input_tensors)
        self.last_info = info
        excluded = step_fn.excluded
        info.extra.update(hessian_vjps=step_fn.hessian_vjps, forward_check="theseus_status",
                          backward_tol=max(tol, step_fn.tol_floor), excluded=excluded,
                          singular=step_fn.singular)
        if step_fn.rcond is not None:
            info.extra["rcond"] = step_fn.rcond
        if step_fn.solve_residual is not None:
            info.extra["linear_solve_residual"] = step_fn.solve_residual
            note_solve_floor(self, name, step_fn, dt)

        # convergence as Theseus judges it, or a fixed point to working precision
        xnorm = torch.cat([x.reshape(B, -1) for x in step_fn.x_used], dim=1).norm(dim=1)
        rel = (info.fixed_point_residual.detach() / (1 + xnorm)).to(dt)
        rel = torch.where(excluded, torch.full_like(rel, math.nan), rel)
        converged = (th_conv | (rel <= fp_tol)) & ~excluded
        unconverged = ~converged & ~excluded
        info.forward_residual = rel
        info.forward_converged = converged
        report_excluded(self, name, nonfinite, step_fn)

        values = geo.outputs(step_fn.x_used, x_star, xi, input_tensors, excluded)
        unrolled = torch.zeros_like(unconverged)
        if bool(unconverged.any()):
            values, unrolled = apply_policy(
                self, policy, unconverged, failed, rel, values, init, input_tensors, kwargs,
                mode, name, max_it, computed)
        notes = self._notes
        for kind_name, mask in (("converged", converged), ("unconverged", unconverged),
                                ("unrolled", unrolled), ("excluded", excluded)):
            info.extra[kind_name] = mask
            notes.count(kind_name, mask)
        if bool((converged & ~unrolled).any()) and any(
                isinstance(t, Tensor) and t.requires_grad
                for k, t in input_tensors.items() if k in geo.index):
            notes.once("initial_values", f"{name}: the initial values get an exact zero "
                       "gradient for the instances whose forward converged (the minimiser "
                       "does not depend on where the search started).")
        info.extra["counts"] = dict(notes.counts)
        geo.set_vars([values[v.name] for v in geo.ordering])  # as th.TheseusLayer leaves them
        th_info.fold_info = info
        return values, th_info

    # ------------------------------------------------------------------ helpers
    def _needs_graph(self, input_tensors: dict[str, Tensor], init: dict[str, Tensor]) -> bool:
        """Whether a gradient can be asked of the output: grad mode on and some input, initial
        value, cost weight or closure parameter requires grad (the last seen only in the
        error's graph)."""
        if not torch.is_grad_enabled():
            return False
        if any(isinstance(t, Tensor) and t.requires_grad
               for t in (*input_tensors.values(), *init.values())):
            return True
        objective = self.objective
        if any(v.tensor.requires_grad for v in objective.aux_vars.values()):
            return True
        # nn.Module parameters inside cost-function closures: one error evaluation (no
        # Jacobians) tells; the variables are at x* without graph after the solve
        return bool(objective.error().requires_grad)
