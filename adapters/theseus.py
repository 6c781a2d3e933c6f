"""FoldedTheseusLayer: a drop-in for ``th.TheseusLayer`` with the exact implicit gradient.

Switching an existing Theseus model is one line::

    layer = th.TheseusLayer(optimizer)            # before
    layer = FoldedTheseusLayer(optimizer)         # after (also accepts the TheseusLayer itself)
    values, info = layer(input_tensors, optimizer_kwargs)   # same call, same (dict, info)

The forward runs Theseus's own optimizer with no autograd graph. The backward folds one
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
``newton`` ``Φ = 0`` and the backward solve ends after one operator application.

Gradients reach every tensor the step touches: tensors in ``input_tensors`` (auxiliary
variables, targets, data, cost-weight variables), cost-weight tensors held by the objective,
and ``nn.Module`` parameters used inside ``AutoDiffCostFunction`` closures. The initial values
of the optimisation variables get an exact zero gradient.

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
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins._errors import instance_list, report_unconverged
from fold_plugins.fold import default_fixed_point_tol
from fold_plugins.solvers import get_solver

from .base import FoldedModule

__all__ = ["FoldedTheseusLayer", "STEPS", "FOLD_KWARGS"]

#: step names accepted by ``FoldedTheseusLayer(step=...)`` (plus the aliases "gn", "lm").
STEPS = ("auto", "gauss_newton", "levenberg_marquardt", "newton")
_ALIASES = {"gn": "gauss_newton", "lm": "levenberg_marquardt", "gauss-newton": "gauss_newton",
            "levenberg-marquardt": "levenberg_marquardt"}
#: per-call overrides read from ``optimizer_kwargs`` and removed before Theseus sees them.
FOLD_KWARGS = ("fold_step", "fold_backward", "fold_tol", "fold_maxiter")
# Theseus's own backward-mode keys: the folded backward replaces them, so they are removed too.
_THESEUS_BACKWARD_KWARGS = ("backward_mode", "backward_num_iterations", "dlm_epsilon")


def _import_theseus():
    try:
        with warnings.catch_warnings():
            # theseus warns at import when scikit-sparse is absent (only CholmodSparseSolver
            # needs it); FoldedTheseusLayer reports that where it matters instead.
            warnings.filterwarnings("ignore", message=".*skparse.cholmod.*")
            import theseus as th
    except ImportError as exc:  # pragma: no cover - exercised only without theseus
        raise ImportError(
            "fold_plugins.adapters.theseus needs theseus-ai (0.2.3): pip install torchlie "
            "torchkin and `pip install --no-deps --no-build-isolation theseus-ai==0.2.3` "
            "(see the README, 'Installing')."
        ) from exc
    return th


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
        optimizer_or_layer: a Theseus ``NonlinearLeastSquares`` optimizer (``GaussNewton``,
            ``LevenbergMarquardt``, ``Dogleg``) or a ``th.TheseusLayer`` wrapping one.
        backward: backward linear solver (``"gmres"``, ``"bicgstab"``, ``"dense"``,
            ``"fixed_point"`` or a callable, see :mod:`fold_plugins.solvers`).
        tol: relative residual of the backward solve, per instance.
        maxiter: backward iteration cap (``None``: the solver's default).
        step: the folded update (module docstring): ``"auto"`` (Gauss-Newton for
            ``GaussNewton``/``Dogleg``, Levenberg-Marquardt for ``LevenbergMarquardt``),
            ``"gauss_newton"``, ``"levenberg_marquardt"`` or ``"newton"``. The LM damping
            ``λ`` is the *configured* one, ``optimizer_kwargs["damping"]`` (Theseus's default
            1e-3), also with ``adaptive_damping=True``, where it is the initial value — not
            the optimizer's final adaptive ``λ``: once Theseus has converged every further
            step is rejected and multiplies ``λ`` by 11 (up to 1e7), and a large ``λ`` gives
            ``I − Φ = M⁻¹H ≈ H/λ``, ``ρ(Φ) → 1``, a slow backward. The gradient does not
            depend on ``λ`` (``M`` multiplies ``g(x*) = 0``); only the backward's speed does.
        strict: raise :class:`fp.FoldError` instead of warning on forward or backward
            non-convergence and on excluded (NaN/Inf or singular) instances.
        solver_options: extra keywords for the backward solver.
        vectorize: passed to ``th.TheseusLayer`` when an optimizer is given.
        fixed_point_tol: an instance counts as converged when its step length at x* satisfies
            ``‖M⁻¹g‖ / (1 + ‖x*‖) ≤ fixed_point_tol`` (default 1e-6 in float64, 1e-3 below).

    Cost: the forward adds one Jacobian evaluation at x* (and, for ``newton``, about
    ``colours × dof`` VJPs to form ``H``, a distance-2 colouring of the variables); each backward
    iteration is one VJP through ``g = Jᵀr`` plus a solve with the saved factor. ``newton``
    has ``Φ = 0``: with ``backward="fixed_point"`` its backward is a single VJP.

    Call: ``layer(input_tensors, optimizer_kwargs=None) -> (values, info)`` exactly as
    ``th.TheseusLayer``; ``info`` is Theseus's ``OptimizerInfo`` with ``info.fold_info``
    (a :class:`fp.FoldInfo`, also ``layer.last_info``). ``optimizer_kwargs`` may carry the
    per-call overrides ``fold_step``, ``fold_backward``, ``fold_tol``, ``fold_maxiter``;
    these and Theseus's ``backward_mode``/``backward_num_iterations``/``dlm_epsilon`` are
    removed before Theseus sees the dict.

    ``fold_info.forward_residual`` is the step length ``‖M⁻¹g‖/(1+‖x*‖)`` at x* when a gradient
    is wanted; without one it is NaN (not measured) and ``forward_converged`` is Theseus's
    status ``CONVERGED``. ``fold_info.extra`` holds ``step``, ``tangent_dim``,
    ``theseus_status``, ``forward_check`` (``"step_length"`` or ``"theseus_status"``) and, with
    a gradient, ``excluded``/``singular`` (``(B,)`` bool), ``rcond`` (``(B,)`` estimated
    ``1/(‖M‖₁‖M⁻¹‖₁)``, dense solvers), ``backward_tol`` (the tolerance after the
    conditioning floor, see :class:`_FlooredSolver`), ``damping`` (LM) and ``hessian_vjps``.
    Note that Theseus's Cholesky solvers fail the *whole* batch (status FAIL, iterates left
    where the failure happened) when one instance has NaN data; ``LUDenseSolver`` keeps the
    NaN in its instance, which is then excluded here.
    """

    def __init__(self, optimizer_or_layer: Any, backward: str | Callable = "gmres",
                 tol: float = 1e-10, maxiter: int | None = None, step: str = "auto",
                 strict: bool = False, solver_options: dict | None = None,
                 vectorize: bool = True, fixed_point_tol: float | None = None):
        super().__init__(backward=backward, tol=tol, maxiter=maxiter, strict=strict,
                         solver_options=solver_options)
        th = _import_theseus()
        if isinstance(optimizer_or_layer, th.TheseusLayer):
            layer = optimizer_or_layer
        elif isinstance(optimizer_or_layer, th.optimizer.Optimizer):
            layer = th.TheseusLayer(optimizer_or_layer, vectorize=vectorize)
        else:
            raise fp.FoldError(
                "optimizer_or_layer must be a theseus Optimizer (GaussNewton, "
                "LevenbergMarquardt, Dogleg) or a th.TheseusLayer, got "
                f"{type(optimizer_or_layer).__name__}.")
        if not isinstance(layer.optimizer, th.NonlinearLeastSquares):
            raise fp.FoldError(
                f"FoldedTheseusLayer folds a Gauss-Newton-type step, so it needs a "
                f"NonlinearLeastSquares optimizer (GaussNewton, LevenbergMarquardt, Dogleg); "
                f"got {type(layer.optimizer).__name__}.")
        self.step = _resolve_step_name(step)
        if fixed_point_tol is not None and not (isinstance(fixed_point_tol, (int, float))
                                                and fixed_point_tol > 0):
            raise fp.FoldError(f"fixed_point_tol must be a number > 0 or None, got "
                               f"{fixed_point_tol!r}.")
        self.fixed_point_tol = fixed_point_tol
        self.layer = layer
        self._th = th
        lin = layer.optimizer.linear_solver.linearization
        self._ordering = list(lin.ordering)
        self._dofs = [int(d) for d in lin.var_dims]
        self._starts = [int(s) for s in lin.var_start_cols]
        self._index = {v.name: k for k, v in enumerate(self._ordering)}
        # variables of one type are retracted together: (template container, their indices)
        groups: dict[tuple[type, int], list[int]] = {}
        for k, v in enumerate(self._ordering):
            groups.setdefault((type(v), self._dofs[k]), []).append(k)
        self._groups = [(self._ordering[ks[0]].copy(new_name=f"{self._ordering[ks[0]].name}"
                                                      "__fold"), ks) for ks in groups.values()]
        self._warned_backward_mode = False
        self._coloring: tuple[list[list[int]], list[Tensor]] | None = None

    # ------------------------------------------------------------------ pass-throughs
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

    def extra_repr(self) -> str:
        return f"step={self.step!r}, " + super().extra_repr()

    # ------------------------------------------------------------------ forward
    def forward(self, input_tensors: dict[str, Tensor] | None = None,
                optimizer_kwargs: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], Any]:
        """Solve with Theseus (no graph), then attach the folded gradient to the solution.

        Returns:
            ``(values, info)``: ``values`` maps each optimisation variable's name to its
            tensor at x* (differentiable); ``info`` is Theseus's ``OptimizerInfo`` with
            ``info.fold_info`` (:class:`fp.FoldInfo`).
        """
        if input_tensors is not None and not isinstance(input_tensors, dict):
            raise fp.FoldError(f"input_tensors must be a dict name -> Tensor (or None), got "
                               f"{type(input_tensors).__name__}.")
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
            raise fp.FoldError(f"optimizer_kwargs must be a dict (or None), got "
                               f"{type(optimizer_kwargs).__name__}.")
        input_tensors = dict(input_tensors or {})
        kwargs = dict(optimizer_kwargs or {})
        overrides = {k: kwargs.pop(k) for k in FOLD_KWARGS if k in kwargs}
        theseus_bwd = {k: kwargs.pop(k) for k in _THESEUS_BACKWARD_KWARGS if k in kwargs}
        self._note_backward_mode(theseus_bwd.get("backward_mode"))
        step_name = _resolve_step_name(overrides.get("fold_step", self.step))
        solver = overrides.get("fold_backward", self.backward)
        tol = float(overrides.get("fold_tol", self.tol))
        maxiter = overrides.get("fold_maxiter", self.maxiter)

        optimizer = self.optimizer
        with torch.no_grad():
            _, th_info = self.layer(input_tensors, optimizer_kwargs=kwargs)
        x_star = self._solution()
        kind = self._step_kind(step_name)
        B = x_star[0].shape[0]
        n = sum(self._dofs)
        dev, dt = x_star[0].device, x_star[0].dtype
        info = fp.FoldInfo(batch_size=B)
        info.extra.update(step=kind, tangent_dim=n, theseus_status=th_info.status)
        failed = self._status_mask(th_info, B, dev, self._th.NonlinearOptimizerStatus.FAIL)
        iters = th_info.converged_iter.detach().to(device=dev).reshape(-1)
        max_it = int(optimizer.params.max_iterations)
        info.forward_iterations = torch.where(iters >= 0, iters, torch.full_like(iters, max_it))
        name = f"FoldedTheseusLayer ({type(optimizer).__name__})"
        finite_x = torch.stack([torch.isfinite(x.reshape(B, -1)).all(dim=1) for x in x_star])
        finite_x = finite_x.all(dim=0)

        if not self._needs_graph(input_tensors):
            # inference: no gradient wanted, so no linearisation/factorisation at x*; forward
            # convergence is Theseus's own verdict (its status), which costs nothing
            conv = self._status_mask(th_info, B, dev,
                                     self._th.NonlinearOptimizerStatus.CONVERGED)
            converged = conv & finite_x & ~failed
            info.forward_residual = torch.full((B,), math.nan, dtype=dt, device=dev)
            info.forward_converged = converged
            info.extra["forward_check"] = "theseus_status"
            self.last_info = info
            last_err = th_info.last_err.detach().to(device=dev, dtype=dt).reshape(-1)
            # without a gradient nothing is biased: only real failures are reported here (a
            # FAIL status or a non-finite solution), not MAX_ITERATIONS, which th.TheseusLayer
            # users hit on purpose with fixed iteration counts; forward_converged still says it
            report_unconverged(
                failed | ~finite_x, last_err if last_err.numel() == B else last_err.expand(B),
                f"{name} forward (no gradient requested; error = final objective value)",
                "an instance with status FAIL hit an error in Theseus's linear solve (singular "
                "system or NaN data): check its data", self.strict, stacklevel=3)
            th_info.fold_info = info
            return self._outputs(x_star, x_star, None, input_tensors), th_info

        solve_kwargs = self._solve_kwargs(kind, kwargs)
        if "damping" in solve_kwargs:
            info.extra["damping"] = solve_kwargs["damping"]
        nonfinite = ~finite_x | self._nonfinite_inputs(input_tensors, B)
        if bool(nonfinite.all()):
            bad_vars = [v.name for v, x in zip(self._ordering, x_star)
                        if not bool(torch.isfinite(x).all())]
            raise fp.FoldError(
                f"the Theseus solution ({', '.join(bad_vars) or 'no variable'}) or the "
                f"per-instance input data is NaN/Inf for every instance ({B}); the forward "
                "solve failed — check the problem, the initial values, or use "
                "LevenbergMarquardt.")
        fp_tol = self.fixed_point_tol if self.fixed_point_tol is not None \
            else default_fixed_point_tol(dt)
        step_fn = _TangentStep(self, x_star, input_tensors, kind, solve_kwargs, nonfinite)
        xi0 = x_star[0].new_zeros(B, n)
        try:
            xi, info = fp.fold(step_fn, xi0, solver=_FlooredSolver(solver, step_fn), tol=tol,
                               maxiter=maxiter, batched=True, strict=self.strict,
                               return_info=True, fixed_point_tol=math.inf, info=info,
                               solver_options=self.solver_options)
        finally:
            self._restore(x_star, input_tensors)
        self.last_info = info
        info.extra["hessian_vjps"] = step_fn.hessian_vjps
        info.extra["forward_check"] = "step_length"
        info.extra["backward_tol"] = max(tol, step_fn.tol_floor)
        excluded = step_fn.excluded
        info.extra["excluded"] = excluded
        info.extra["singular"] = step_fn.singular
        if step_fn.rcond is not None:
            info.extra["rcond"] = step_fn.rcond

        # forward convergence: the step length at x* (what the gradient's accuracy rests on)
        xnorm = torch.cat([x.reshape(B, -1) for x in step_fn.x_used], dim=1).norm(dim=1)
        rel = (info.fixed_point_residual.detach() / (1 + xnorm)).to(dt)
        rel = torch.where(excluded, torch.full_like(rel, math.nan), rel)
        converged = (rel <= fp_tol) & ~failed & ~excluded
        info.forward_residual = rel
        info.forward_converged = converged
        self._report_excluded(name, nonfinite, step_fn)
        self._report_forward(
            converged | excluded, rel, name,
            f"the Gauss-Newton step at x* should satisfy ‖δ‖/(1+‖x*‖) ≤ {fp_tol:.0e}; raise "
            f"max_iterations (now {max_it}) or lower abs_err_tolerance/rel_err_tolerance of "
            "the Theseus optimizer")

        values = self._outputs(step_fn.x_used, x_star, xi, input_tensors, excluded)
        th_info.fold_info = info
        return values, th_info

    # ------------------------------------------------------------------ helpers
    def _note_backward_mode(self, mode: Any) -> None:
        if mode is None or self._warned_backward_mode:
            return
        name = mode.name if hasattr(mode, "name") else str(mode)
        if name.lower() in ("fold", "folded"):
            return
        self._warned_backward_mode = True
        warnings.warn(f"FoldedTheseusLayer ignores optimizer_kwargs['backward_mode']={name!r}: "
                      "the folded implicit backward replaces Theseus's backward modes (use "
                      "th.TheseusLayer to run them).", UserWarning, stacklevel=3)

    def _solution(self) -> list[Tensor]:
        """The optimisation variables' tensors after the solve, ``(B, ...)`` each (may hold
        NaN rows: those instances are excluded, see the module docstring)."""
        B = self.objective.batch_size
        out = []
        for var in self._ordering:
            t = var.tensor.detach()
            if t.shape[0] != B:
                t = t.expand(B, *t.shape[1:])
            out.append(t.clone())
        return out

    @staticmethod
    def _status_mask(th_info: Any, B: int, device: torch.device, status: Any) -> Tensor:
        """``(B,)`` bool: instances whose Theseus status is ``status``."""
        mask = torch.as_tensor([s == status for s in th_info.status], dtype=torch.bool,
                               device=device).reshape(-1)
        if mask.numel() != B:
            mask = mask.expand(B) if mask.numel() == 1 else mask[:B]
        return mask

    def _needs_graph(self, input_tensors: dict[str, Tensor]) -> bool:
        """Whether a gradient can be asked of the output: grad mode on and some input, cost
        weight or closure parameter requires grad (the last seen only in the error's graph)."""
        if not torch.is_grad_enabled():
            return False
        if any(isinstance(t, Tensor) and t.requires_grad for t in input_tensors.values()):
            return True
        objective = self.objective
        if any(v.tensor.requires_grad for v in objective.aux_vars.values()):
            return True
        # nn.Module parameters inside cost-function closures: one error evaluation (no
        # Jacobians) tells; the variables are at x* without graph after the solve
        return bool(objective.error().requires_grad)

    def _nonfinite_inputs(self, input_tensors: dict[str, Tensor], B: int) -> Tensor:
        """``(B,)`` bool: instances whose per-instance auxiliary inputs hold NaN/Inf."""
        bad = torch.zeros(B, dtype=torch.bool, device=self.device)
        aux = self.objective.aux_vars
        for k, t in input_tensors.items():
            if k in aux and isinstance(t, Tensor) and t.is_floating_point() \
                    and t.ndim >= 1 and t.shape[0] == B:
                bad |= ~torch.isfinite(t.detach().reshape(B, -1)).all(dim=1).to(bad.device)
        return bad

    def _report_excluded(self, name: str, nonfinite: Tensor, step: _TangentStep) -> None:
        """Warn (raise when ``strict``) naming excluded and ill-conditioned instances."""
        B = nonfinite.numel()
        if bool(nonfinite.any()):
            msg = (f"{name}: the Theseus solution or the per-instance input data is NaN/Inf "
                   f"for instance(s) {instance_list(nonfinite)}; those instances are excluded "
                   "(zero gradient), the others keep their exact gradients. Remedy: check "
                   "their data and initial values, or use LevenbergMarquardt.")
            if self.strict:
                raise fp.FoldError(msg)
            warnings.warn(msg, fp.FoldConvergenceWarning, stacklevel=4)
        if bool(step.singular.any()):
            rc = step.rcond[step.singular] if step.rcond is not None else None
            worst = f"; estimated rcond₁ up to {float(rc.max()):.1e}" if rc is not None and \
                bool(torch.isfinite(rc).all()) and float(rc.max()) > 0 else ""
            msg = (f"{name}: {step.matrix_name()} at x* is singular for instance(s) "
                   f"{instance_list(step.singular)} (factorisation failed or reciprocal "
                   f"condition ≤ eps{worst}); dx*/dθ is not defined there, so those instances "
                   f"are excluded (zero gradient); the other {B - int(step.excluded.sum())} "
                   f"keep their exact gradients. Remedy: {step.remedy()}.")
            if self.strict:
                raise fp.FoldError(msg)
            warnings.warn(msg, fp.FoldConvergenceWarning, stacklevel=4)
        if bool(step.illcond.any()):
            n = sum(self._dofs)
            eps = torch.finfo(self.dtype).eps
            rc = float(step.rcond[step.illcond].min())
            warnings.warn(
                f"{name}: {step.matrix_name()} at x* is ill-conditioned for instance(s) "
                f"{instance_list(step.illcond)} (estimated reciprocal condition number "
                f"rcond₁ down to {rc:.1e} ≤ n·eps = {n * eps:.1e}, {self.dtype}): the gradient "
                f"of these instances keeps about {max(0.0, math.log10(rc / eps)):.0f} correct "
                "digits. Remedy: use float64, or rescale the problem (cost weights, units).",
                fp.FoldConvergenceWarning, stacklevel=4)

    def _step_kind(self, name: str) -> str:
        th = self._th
        if name != "auto":
            return name
        if isinstance(self.optimizer, th.LevenbergMarquardt):
            return "levenberg_marquardt"
        return "gauss_newton"  # GaussNewton, Dogleg, other NLLS subclasses

    def _solve_kwargs(self, kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """LM keywords of the folded step: the *configured* damping (class docstring)."""
        if kind != "levenberg_marquardt":
            return {}
        damping = kwargs.get("damping", 1e-3)  # LevenbergMarquardt.reset's default
        if isinstance(damping, Tensor):
            damping = damping.detach().clone()
        elif not (isinstance(damping, (int, float)) and damping >= 0):
            raise fp.FoldError(f"optimizer_kwargs['damping'] must be a number ≥ 0 or a "
                               f"tensor, got {damping!r}.")
        out: dict[str, Any] = {"damping": damping}
        if isinstance(self.optimizer.linear_solver, self._th.DenseSolver):
            out["ellipsoidal_damping"] = bool(kwargs.get("ellipsoidal_damping", False))
            eps = kwargs.get("damping_eps")
            out["damping_eps"] = 1e-8 if eps is None else float(eps)
        elif isinstance(damping, Tensor) and damping.numel() > 1:
            raise fp.FoldError(
                f"{type(self.optimizer.linear_solver).__name__} takes only a scalar LM "
                f"damping, but optimizer_kwargs['damping'] is a tensor of shape "
                f"{tuple(damping.shape)}; pass a number, use a dense linear solver, or "
                "step='gauss_newton'/'newton'.")
        return out

    def _retract_all(self, x_star: list[Tensor], xi: Tensor) -> list[Tensor]:
        """``x* ⊕ ξ`` for every variable, one ``retract`` per variable type."""
        out: list[Tensor] = [xi] * len(x_star)
        B = xi.shape[0]
        for tmpl, ks in self._groups:
            xs = torch.cat([x_star[k] for k in ks]) if len(ks) > 1 else x_star[ks[0]]
            ds = [xi[:, self._starts[k]:self._starts[k] + self._dofs[k]] for k in ks]
            tmpl.update(xs)
            ys = tmpl.retract(torch.cat(ds) if len(ds) > 1 else ds[0]).tensor
            for k, y in zip(ks, ys.split(B)):
                out[k] = y
        for tmpl, ks in self._groups:
            tmpl.update(x_star[ks[0]].detach())  # hold no graph
        return out

    def _hessian_coloring(self) -> tuple[list[list[int]], list[Tensor]]:
        """Distance-2 colouring of the variables and each variable's column mask (cached)."""
        if self._coloring is not None and self._coloring[1][0].device == self.device:
            return self._coloring
        V = len(self._ordering)
        nbrs: list[set[int]] = [{k} for k in range(V)]
        for cf in self.objective.cost_functions.values():
            ks = [self._index[v.name] for v in cf.optim_vars]
            for a in ks:
                nbrs[a].update(ks)
        color = [-1] * V
        colors: list[list[int]] = []
        for a in sorted(range(V), key=lambda k: -len(nbrs[k])):
            near = set().union(*(nbrs[b] for b in nbrs[a]))  # within distance 2
            used = {color[b] for b in near if color[b] >= 0}
            c = next(i for i in range(len(colors) + 1) if i not in used)
            if c == len(colors):
                colors.append([])
            colors[c].append(a)
            color[a] = c
        n = sum(self._dofs)
        masks = []
        for a in range(V):
            m = torch.zeros(n, dtype=self.dtype, device=self.device)
            for b in nbrs[a]:
                m[self._starts[b]:self._starts[b] + self._dofs[b]] = 1
            masks.append(m)
        self._coloring = (colors, masks)
        return self._coloring

    def _set_vars(self, tensors: list[Tensor]) -> None:
        for var, t in zip(self._ordering, tensors):
            var.update(t)

    def _restore(self, x_star: list[Tensor], input_tensors: dict[str, Tensor]) -> None:
        """Leave the objective as Theseus left it: at x* with no graph (the graph lives in the
        folded op), the auxiliary variables holding the given inputs."""
        aux = {k: v for k, v in input_tensors.items() if k in self.objective.aux_vars}
        if aux:
            self.objective.update(aux, _update_vectorization=False)
        self._set_vars([x.detach() for x in x_star])

    def _outputs(self, x_used: list[Tensor], x_star: list[Tensor], xi: Tensor | None,
                 input_tensors: dict[str, Tensor],
                 excluded: Tensor | None = None) -> dict[str, Tensor]:
        """The values ``x*`` (bit for bit) with the derivative of ``x_used ⊕ ξ`` attached
        (none for the ``excluded`` instances)."""
        by_name: dict[str, Tensor] = {}
        retracted = self._retract_all(x_used, xi) if xi is not None and xi.requires_grad \
            else None
        for k, (var, x) in enumerate(zip(self._ordering, x_star)):
            if retracted is not None:
                r = retracted[k]
                d = r - r.detach()
                if excluded is not None and bool(excluded.any()):
                    # excluded instances: no derivative at all (so a NaN x* sends no NaN back)
                    d = torch.where(excluded.reshape(-1, *([1] * (d.ndim - 1))),
                                    torch.zeros_like(d), d)
                out = x + d  # value x* bit for bit, derivative of x* ⊕ ξ
            else:
                out = x.clone()
            init = input_tensors.get(var.name)
            if isinstance(init, Tensor) and init.requires_grad and torch.is_grad_enabled():
                out = out + (init - init.detach()) * 0  # a converged x* does not depend on it
            by_name[var.name] = out
        return {name: by_name[name] for name in self.objective.optim_vars}


class _TangentStep:
    """``U(ξ) = ξ − M⁻¹ g(x* ⊕ ξ)`` (module docstring), evaluated once at ``ξ = 0`` by the fold.

    ``g = Σ_c J_cᵀ e_c`` is assembled from each cost function's weighted Jacobians and errors
    (Theseus's ``Atb`` is ``−g``) and keeps the graph to ``ξ`` and to every input; ``M`` is
    formed and factored once, without graph, from Theseus's linearization at x* (``AtA``), or
    is the full Hessian ``∂g/∂ξ`` for ``newton``. The backward's VJPs then run through the
    small graph of ``g`` and a triangular (or LU) solve with the saved factor. Linear solvers
    other than the dense ones take Theseus's own path: ``linearize(_detach_hessian=True)`` and
    ``linear_solver.solve``.

    Excluded instances (``excluded``: NaN/Inf solution or data given at construction, plus
    those whose ``M`` turns out singular) are evaluated on a copy of the first good instance's
    data and solution and their output is the constant 0 (module docstring).

    Attributes:
        excluded, singular, illcond: ``(B,)`` bool masks filled when the step runs.
        rcond: ``(B,)`` estimated ``1 / (‖M‖₁ ‖M⁻¹‖₁)`` (dense solvers; ``None`` otherwise).
        x_used: the solution with excluded rows replaced (what the step is evaluated at).
    """

    def __init__(self, layer: FoldedTheseusLayer, x_star: list[Tensor],
                 input_tensors: dict[str, Tensor], kind: str, solve_kwargs: dict[str, Any],
                 exclude: Tensor):
        self.layer = layer
        self.kind = kind
        self.solve_kwargs = solve_kwargs
        self.dense = isinstance(layer.optimizer.linear_solver, layer._th.DenseSolver)
        self.factor: tuple[str, Tensor, Tensor | None] | None = None
        self.hessian_vjps = 0
        self.B = x_star[0].shape[0]
        self.excluded = exclude.clone()
        self.singular = torch.zeros_like(exclude)
        self.illcond = torch.zeros_like(exclude)
        self.rcond: Tensor | None = None
        self.tol_floor = 0.0
        objective = layer.objective
        aux = {k: v for k, v in input_tensors.items() if k in objective.aux_vars}
        self.x_used = [self._fill(x) for x in x_star]
        self.aux = {k: self._fill(v) for k, v in aux.items()}

    def _fill(self, t: Tensor) -> Tensor:
        """``t`` with the excluded rows replaced by the first good instance's row (no graph)."""
        bad = self.excluded
        if not bool(bad.any()) or not isinstance(t, Tensor) or t.ndim < 1 \
                or t.shape[0] != self.B or self.B == 1:
            return t
        k0 = int(torch.nonzero(~bad.cpu())[0])
        mask = bad.to(t.device).reshape(self.B, *([1] * (t.ndim - 1)))
        return torch.where(mask, t[k0:k0 + 1].detach(), t)

    def matrix_name(self) -> str:
        return {"newton": "the Hessian H = ∂(Jᵀr)/∂ξ",
                "gauss_newton": "the Gauss-Newton matrix JᵀJ"}.get(
                    self.kind, "the damped matrix JᵀJ + λD")

    def remedy(self) -> str:
        if self.kind == "newton":
            return ("x* is not an isolated minimiser there (a free direction or a saddle): add "
                    "a prior that fixes it")
        return ("use LevenbergMarquardt or step='newton' if the minimiser is isolated; "
                "otherwise add a prior that fixes the free directions (gauge)")

    def __call__(self, xi: Tensor) -> Tensor:
        L = self.layer
        if self.aux:
            # re-attach the inputs' graph
            L.objective.update(self.aux, _update_vectorization=False)
        L._set_vars(L._retract_all(self.x_used, xi))
        if self.kind != "newton" and not self.dense:
            out = xi + self._theseus_solve()
        else:
            g = self._gradient(xi.shape[0])
            if self.factor is None:
                M = self._hessian(g, xi) if self.kind == "newton" else self._gn_matrix()
                self.factor = self._factorise(M)
            how, F, piv = self.factor
            if how == "cholesky":
                delta = torch.cholesky_solve(g.unsqueeze(2), F)
            else:
                delta = torch.linalg.lu_solve(F, piv, g.unsqueeze(2))
            out = xi - delta.squeeze(2)
        if bool(self.excluded.any()):
            # the constant 0 (no graph): Φ = 0 and ∂U/∂θ = 0 for those rows, exactly
            out = torch.where(self.excluded[:, None].to(out.device), torch.zeros_like(out), out)
        return out

    def _gradient(self, B: int) -> Tensor:
        """``g = Jᵀe`` at the variables' current tensors, shape ``(B, n)``."""
        L = self.layer
        parts: list[list[Tensor]] = [[] for _ in L._ordering]
        for cf in L.objective._get_jacobians_iter():
            jacobians, err = cf.weighted_jacobians_error()
            for j, J in enumerate(jacobians):
                k = L._index[cf.optim_var_at(j).name]
                c = (J * err.unsqueeze(2)).sum(1)
                parts[k].append(c if c.shape[0] == B else c.expand(B, -1))
        cols = []
        for k, ps in enumerate(parts):
            if not ps:
                cols.append(self.x_used[0].new_zeros(B, L._dofs[k]))
            else:
                cols.append(ps[0] if len(ps) == 1 else torch.stack(ps).sum(0))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def _gn_matrix(self) -> Tensor:
        """``M = JᵀJ`` (+ LM damping) at x*, from Theseus's dense linearization (no graph)."""
        linear_solver = self.layer.optimizer.linear_solver
        with torch.no_grad():  # reuses the Jacobians just computed (vectorized objectives)
            linear_solver.linearization.linearize()
            M = linear_solver.linearization.AtA.detach()
        if self.kind == "levenberg_marquardt":
            lam = torch.as_tensor(self.solve_kwargs["damping"], dtype=M.dtype, device=M.device)
            if self.solve_kwargs.get("ellipsoidal_damping", False):
                diag = lam.reshape(-1, 1) * M.diagonal(dim1=1, dim2=2)
                M = M + torch.diag_embed(diag + self.solve_kwargs.get("damping_eps", 1e-8))
            else:
                eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
                M = M + lam.reshape(-1, 1, 1) * eye
        if M.shape[0] != self.B:
            M = M.expand(self.B, -1, -1)
        return M

    def _factorise(self, M: Tensor) -> tuple[str, Tensor, Tensor | None]:
        """Cholesky (LU for ``LUDenseSolver`` and ``newton``) of ``M``, judged per instance.

        An instance is singular when the factorisation fails or ``rcond₁ ≤ eps``; it is then
        excluded and its factor replaced by the identity. Ill-conditioned (``rcond₁ ≤ n·eps``)
        instances are only flagged.
        """
        B, n, _ = M.shape
        lu = self.kind == "newton" or isinstance(self.layer.optimizer.linear_solver,
                                                 self.layer._th.LUDenseSolver)
        if lu:
            F, piv, status = torch.linalg.lu_factor_ex(M)
            how = "lu"
        else:
            F, status = torch.linalg.cholesky_ex(M)
            piv, how = None, "cholesky"
        rcond = _rcond_estimate(M, how, F, piv)
        eps = torch.finfo(M.dtype).eps
        ok = (status == 0) & torch.isfinite(rcond) & (rcond > eps)
        rcond = torch.where(status == 0, rcond, torch.zeros_like(rcond))
        # rows excluded before (NaN data) were factored on a copy of another row's data
        self.rcond = torch.where(self.excluded.to(rcond.device),
                                 torch.full_like(rcond, math.nan), rcond)
        fresh = ~ok.to(self.excluded.device) & ~self.excluded
        self.singular = fresh
        self.excluded = self.excluded | fresh
        self.illcond = ok.to(self.excluded.device) & ~self.excluded & (rcond <= n * eps).to(
            self.excluded.device)
        if not bool(self.excluded.all()):
            worst = float(rcond[~self.excluded.to(rcond.device)].min())
            self.tol_floor = min(math.sqrt(eps), eps / worst) if worst > 0 else 0.0
        if bool(self.excluded.all()):
            raise fp.FoldError(
                f"{self.matrix_name()} at x* is singular for instance(s) "
                f"{instance_list(self.excluded)} (factorisation failed or reciprocal "
                f"condition ≤ eps = {eps:.1e}; estimates {_fmt_list(rcond)}, size {n}): "
                f"dx*/dθ is not defined there. Remedy: {self.remedy()}.")
        if bool(self.excluded.any()):
            bad = self.excluded.to(M.device)[:, None, None]
            eye = torch.eye(n, dtype=M.dtype, device=M.device).expand(B, n, n)
            F = torch.where(bad, eye, F)
            if piv is not None:
                ar = torch.arange(1, n + 1, dtype=piv.dtype, device=piv.device).expand(B, n)
                piv = torch.where(bad[:, :, 0], ar, piv)
        return how, F, piv

    def _hessian(self, g: Tensor, xi: Tensor) -> Tensor:
        """The full Hessian ``H = ∂g/∂ξ`` at x* from compressed VJPs (no graph).

        Row block ``a`` of ``H`` is non-zero only in the columns of the variables that share a
        cost function with ``a``; variables whose such column sets are disjoint get one colour
        (distance-2 colouring) and are read off one VJP together, so a chain-structured problem
        needs about ``3 · dof`` VJPs instead of ``n``.
        """
        B, n = g.shape
        if not g.requires_grad:
            raise fp.FoldError("step='newton': the gradient g = Jᵀr at x* does not depend on "
                               "the optimisation variables (no graph); nothing to fold.")
        L = self.layer
        colors, colmask = L._hessian_coloring()
        H = g.new_zeros(B, n, n)
        count = 0
        for members in colors:
            for j in range(max(L._dofs[a] for a in members)):
                rows = [L._starts[a] + j for a in members if j < L._dofs[a]]
                v = g.new_zeros(B, n)
                v[:, rows] = 1
                (r,) = torch.autograd.grad(g, xi, v, retain_graph=True, allow_unused=True)
                count += 1
                if r is None:
                    continue
                r = r.detach()
                for a in members:
                    if j < L._dofs[a]:
                        H[:, L._starts[a] + j] = r * colmask[a]
        self.hessian_vjps = count
        return H

    def _theseus_solve(self) -> Tensor:
        """Theseus's own ``linearize(_detach_hessian=True)`` + ``linear_solver.solve``: ``M⁻¹g``."""
        linear_solver = self.layer.optimizer.linear_solver
        linear_solver.linearization.linearize(_detach_hessian=True)
        try:
            return linear_solver.solve(**self.solve_kwargs)
        except RuntimeError as exc:
            if isinstance(exc, fp.FoldError):
                raise
            raise fp.FoldError(
                f"{type(linear_solver).__name__}.solve failed at x* ({exc}); the "
                f"{self.kind} system there is singular or not positive definite, so dx*/dθ "
                "is not defined. Remedy: add a prior that fixes the free directions, or use "
                "LevenbergMarquardt / step='newton'.") from exc


class _FlooredSolver:
    """The backward solver with its tolerance floored at ``min(√eps, eps / rcond₁(M))``.

    Below about ``eps · cond(M)`` the residual of ``(I − Φᵀ) v = g`` is round-off: ``v ↦ v − Φᵀv``
    goes through a solve with ``M``, and x* itself carries a relative error of that order. A
    tighter tolerance would only spend ``maxiter`` iterations and warn (measured: a 30-pose SE2
    graph in float32, cond(JᵀJ) ≈ 1.3e4, stalls at residual 1.1e-5 > 50·eps). The floor is
    known once the step has factored ``M`` (the worst instance of the batch sets it), hence
    this wrapper, read at backward time; the cap ``√eps`` keeps at least half the digits.
    """

    def __init__(self, solver: str | Callable, step: _TangentStep):
        self.__name__, self.solve = get_solver(solver)
        self.step = step

    def __call__(self, matvec: Callable, b: Tensor, *, x0: Tensor | None = None, tol: float,
                 maxiter: int | None, **options: Any):
        return self.solve(matvec, b, x0=x0, tol=max(tol, self.step.tol_floor),
                          maxiter=maxiter, **options)


def _fmt_list(t: Tensor, limit: int = 5) -> str:
    vals = [f"{v:.1e}" for v in t.detach().reshape(-1)[:limit].tolist()]
    return "[" + ", ".join(vals) + (" …]" if t.numel() > limit else "]")


def _rcond_estimate(M: Tensor, how: str, F: Tensor, piv: Tensor | None) -> Tensor:
    """``(B,)`` estimate of ``1 / (‖M‖₁ ‖M⁻¹‖₁)`` from the factor of ``M``: O(n²) per instance.

    ``‖M⁻¹‖₁`` by Hager's estimator (``y = M⁻¹x`` with ``x = 1/n``, ``z = M⁻ᵀ sign(y)``, then
    ``M⁻¹e_j`` with ``j = argmax |z_j|``) plus Higham's vector ``x_i ∝ (−1)ⁱ(1 + i/(n−1))`` —
    three calls of the factor's solve. Each probe ``‖M⁻¹x‖₁/‖x‖₁`` is a lower bound, so the
    estimate never exceeds ``‖M⁻¹‖₁`` (``rcond`` is never too pessimistic, up to round-off in
    the solves); it is usually within a factor 3. NaN where the factor is not usable.
    """
    B, n, _ = M.shape

    def solve(X: Tensor, adjoint: bool = False) -> Tensor:  # X: (B, n, k)
        if how == "cholesky":  # M⁻¹ = L⁻ᵀL⁻¹ (two triangular solves beat cholesky_solve)
            return torch.linalg.solve_triangular(
                F.mT, torch.linalg.solve_triangular(F, X, upper=False), upper=True)
        return torch.linalg.lu_solve(F, piv, X, adjoint=adjoint)

    # first probe x = 1/n and Higham's vector (scaled to ‖x‖₁ = 1) share one solve
    i = torch.arange(n, dtype=M.dtype, device=M.device)
    alt = (1 - 2 * (i % 2)) * (1 + i / max(n - 1, 1))
    X = torch.stack([M.new_full((n,), 1.0 / n), alt / alt.abs().sum()], dim=1)
    Y = solve(X.expand(B, n, 2).contiguous())
    y = Y[..., 0]
    est = Y.abs().sum(dim=1).amax(dim=1)
    if n > 1:
        z = solve(torch.where(y >= 0, 1.0, -1.0).to(M.dtype).unsqueeze(2), adjoint=True)
        e = torch.zeros_like(y).scatter_(1, z.squeeze(2).abs().argmax(dim=1, keepdim=True), 1.0)
        est = torch.maximum(est, solve(e.unsqueeze(2)).abs().sum(dim=(1, 2)))
    norm1 = M.abs().sum(dim=-2).amax(dim=-1)
    denom = norm1 * est
    return torch.where(denom > 0, 1 / denom, torch.full_like(denom, math.nan))
