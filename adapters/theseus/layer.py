"""``FoldedTheseusLayer`` (the mathematics: :mod:`fold_plugins.adapters.theseus`).

``forward`` runs four stages: parse the call (:func:`.setup.parse_call`), solve with Theseus
(:meth:`FoldedTheseusLayer._solve`), fold one step at the solution (:meth:`_fold_solution`)
and classify each instance (:meth:`_classify`, with :class:`.policy.InstancePolicy`).
"""

from __future__ import annotations

import math
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins.internal import default_fixed_point_tol

from ..base import FoldedModule
from .geometry import TangentGeometry
from .policy import InstancePolicy, status_mask
from .setup import (
    Call,
    check_policy,
    import_theseus,
    lm_kwargs,
    parse_call,
    resolve_step_name,
    step_kind,
)
from .step import FlooredSolver, TangentStep

__all__ = ["FoldedTheseusLayer"]


@dataclass
class _Solved:
    """Theseus's forward of one call, read per instance (:meth:`FoldedTheseusLayer._solve`)."""

    th_info: Any
    x_star: list[Tensor]
    #: the forward's differentiable outputs where it ran with Theseus's graph, else None
    computed: dict[str, Tensor] | None
    kind: str                 # the folded step
    info: fp.FoldInfo
    failed: Tensor            # (B,) Theseus status FAIL
    th_converged: Tensor      # (B,) Theseus status CONVERGED
    finite: Tensor            # (B,) finite solution

    @property
    def batch_size(self) -> int:
        return self.x_star[0].shape[0]


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
            ``"fold"`` (folded anyway, biased) or ``"raise"``. Either way every such call
            warns :class:`fp.ForwardConvergenceWarning` naming the instances.
        strict: raise :class:`fp.FoldError` instead of warning on backward non-convergence,
            on unconverged instances (under every ``unconverged`` policy) and on excluded
            (NaN/Inf or singular) instances.
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
        self.step = resolve_step_name(step)
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
        self._policy = InstancePolicy(layer, self._geo)

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
        call = parse_call(input_tensors, optimizer_kwargs, self._defaults(), self._geo)
        if self._geo is None:  # no least-squares step to fold (DCEM)
            values, th_info, self.last_info = self._policy.theseus_backward(call)
            return values, th_info
        # Theseus sees its backward_mode: its forward values are exactly th.TheseusLayer's
        self._policy.note_backward_mode(call)
        run = self._solve(call)
        if not self._needs_graph(call):
            self.last_info = run.info
            values = self._policy.inference(
                run.x_star, run.th_info, run.info, run.th_converged & run.finite & ~run.failed,
                run.failed | ~run.finite, self.strict)
            return values, run.th_info
        step, xi = self._fold_solution(call, run)
        return self._classify(call, run, step, xi), run.th_info

    def _defaults(self) -> dict[str, Any]:
        return {"step": self.step, "backward": self.backward, "tol": self.tol,
                "maxiter": self.maxiter, "unconverged": self.unconverged}

    def _solve(self, call: Call) -> _Solved:
        """Theseus's own forward. Its ``unroll`` would record every iteration: run without a
        graph (re-run only if an instance needs it); implicit/truncated/dlm keep a graph of one
        or a few steps, so they run as th.TheseusLayer runs them and their graph serves the
        unconverged instances."""
        th = import_theseus()
        geo = self._geo
        assert geo is not None
        cheap_graph = call.mode != th.BackwardMode.UNROLL and torch.is_grad_enabled()
        with torch.set_grad_enabled(cheap_graph):
            computed, th_info = self.layer(call.input_tensors, optimizer_kwargs=call.kwargs)
        x_star = geo.solution()
        if cheap_graph:
            geo.set_vars(x_star)  # the fold reads the objective without Theseus's graph
        kind = step_kind(call.step, self.optimizer, geo)
        B = x_star[0].shape[0]
        dev = x_star[0].device
        info = fp.FoldInfo(batch_size=B)
        info.extra.update(step=kind, tangent_dim=geo.n, theseus_status=th_info.status)
        statuses = th.NonlinearOptimizerStatus
        iters = th_info.converged_iter.detach().to(device=dev).reshape(-1)
        max_it = int(self.optimizer.params.max_iterations)
        info.forward_iterations = torch.where(iters >= 0, iters, torch.full_like(iters, max_it))
        finite = torch.stack([torch.isfinite(x.reshape(B, -1)).all(dim=1) for x in x_star])
        return _Solved(th_info=th_info, x_star=x_star, computed=computed if cheap_graph else None,
                       kind=kind, info=info, failed=status_mask(th_info, B, dev, statuses.FAIL),
                       th_converged=status_mask(th_info, B, dev, statuses.CONVERGED),
                       finite=finite.all(dim=0))

    def _fold_solution(self, call: Call, run: _Solved) -> tuple[TangentStep, Tensor]:
        """Fold one update step at x* (the package docstring): the tangent displacement ``ξ``
        (zero, with the implicit gradient attached) and the step, with its verdicts."""
        geo, info, B = self._geo, run.info, run.batch_size
        assert geo is not None
        solve_kwargs = lm_kwargs(run.kind, self.optimizer, call.kwargs)
        if "damping" in solve_kwargs:
            info.extra["damping"] = solve_kwargs["damping"]
        nonfinite = ~run.finite | geo.nonfinite_inputs(call.input_tensors, B)
        if bool(nonfinite.all()):
            bad_vars = [v.name for v, x in zip(geo.ordering, run.x_star)
                        if not bool(torch.isfinite(x).all())]
            raise fp.FoldError(
                f"the Theseus solution ({', '.join(bad_vars) or 'no variable'}) or the "
                f"per-instance input data is NaN/Inf for every instance ({B}); the forward "
                "solve failed — check the problem, the initial values, or use "
                "LevenbergMarquardt.")
        step = TangentStep(geo, self.optimizer, run.x_star, call.input_tensors, run.kind,
                           solve_kwargs, nonfinite)
        try:
            xi, info = fp.fold(step, run.x_star[0].new_zeros(B, geo.n), *step.params,
                               solver=FlooredSolver(call.backward, step), tol=call.tol,
                               maxiter=call.maxiter, batched=True, strict=self.strict,
                               return_info=True, fixed_point_tol=sys.float_info.max, info=info,
                               solver_options=self.solver_options)
        finally:
            geo.restore(run.x_star, call.input_tensors)
        self.last_info = run.info = info
        info.extra.update(hessian_vjps=step.hessian_vjps, forward_check="theseus_status",
                          backward_tol=max(call.tol, step.tol_floor), excluded=step.excluded,
                          singular=step.singular)
        if step.rcond is not None:
            info.extra["rcond"] = step.rcond
        if step.solve_residual is not None:
            info.extra["linear_solve_residual"] = step.solve_residual
            self._policy.note_solve_floor(step, run.x_star[0].dtype)
        self._policy.report_excluded(nonfinite, step, self.strict, self.dtype)
        return step, xi

    def _classify(self, call: Call, run: _Solved, step: TangentStep, xi: Tensor
                  ) -> dict[str, Tensor]:
        """Each instance converged (Theseus's status, or a fixed point to working precision),
        unconverged (the ``unconverged`` policy) or excluded; the values, as th.TheseusLayer
        leaves them in the objective."""
        geo, info, B = self._geo, run.info, run.batch_size
        assert geo is not None
        dt = run.x_star[0].dtype
        fp_tol = self.fixed_point_tol if self.fixed_point_tol is not None \
            else default_fixed_point_tol(dt)
        excluded = step.excluded
        xnorm = torch.cat([x.reshape(B, -1) for x in step.x_used], dim=1).norm(dim=1)
        res = info.fixed_point_residual
        assert res is not None  # measured by fp.fold in the backward setup
        rel = (res.detach() / (1 + xnorm)).to(dt)
        rel = torch.where(excluded, torch.full_like(rel, math.nan), rel)
        converged = (run.th_converged | (rel <= fp_tol)) & ~excluded
        unconverged = ~converged & ~excluded
        info.forward_residual = rel
        info.forward_converged = converged

        values = geo.outputs(step.x_used, run.x_star, xi, call.input_tensors, excluded)
        unrolled = torch.zeros_like(unconverged)
        if bool(unconverged.any()):
            values, unrolled = self._policy.apply(call, unconverged, run.failed, rel, values,
                                                  run.computed, self.strict)
        notes = self._policy.notes
        for kind_name, mask in (("converged", converged), ("unconverged", unconverged),
                                ("unrolled", unrolled), ("excluded", excluded)):
            info.extra[kind_name] = mask
            notes.count(kind_name, mask)
        if bool((converged & ~unrolled).any()) and any(
                isinstance(t, Tensor) and t.requires_grad
                for k, t in call.input_tensors.items() if k in geo.index):
            notes.once("initial_values", f"{self._policy.name}: the initial values get an "
                       "exact zero gradient for the instances whose forward converged (the "
                       "minimiser does not depend on where the search started).")
        info.extra["counts"] = dict(notes.counts)
        geo.set_vars([values[v.name] for v in geo.ordering])  # as th.TheseusLayer leaves them
        run.th_info.fold_info = info
        return values

    # ------------------------------------------------------------------ helpers
    def _needs_graph(self, call: Call) -> bool:
        """Whether a gradient can be asked of the output: grad mode on and some input, initial
        value, cost weight or closure parameter requires grad (the last seen only in the
        error's graph)."""
        if not torch.is_grad_enabled():
            return False
        if any(isinstance(t, Tensor) and t.requires_grad
               for t in (*call.input_tensors.values(), *call.init.values())):
            return True
        objective = self.objective
        if any(v.tensor.requires_grad for v in objective.aux_vars.values()):
            return True
        # nn.Module parameters inside cost-function closures: one error evaluation (no
        # Jacobians) tells; the variables are at x* without graph after the solve
        return bool(objective.error().requires_grad)
