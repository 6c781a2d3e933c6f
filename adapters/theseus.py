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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins.fold import default_fixed_point_tol

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
            "adapters.theseus needs theseus-ai (0.2.3): pip install torchlie torchkin and "
            "`pip install --no-deps --no-build-isolation theseus-ai==0.2.3` (see DESIGN.md)."
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
            ``GaussNewton``/``Dogleg``, Levenberg-Marquardt with the optimizer's damping for
            ``LevenbergMarquardt``), ``"gauss_newton"``, ``"levenberg_marquardt"`` or
            ``"newton"``.
        strict: raise :class:`fp.FoldError` instead of warning on forward or backward
            non-convergence.
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
        solve_kwargs = self._solve_kwargs(kind, kwargs)
        B = x_star[0].shape[0]
        n = sum(self._dofs)
        xi0 = x_star[0].new_zeros(B, n)
        fp_tol = self.fixed_point_tol if self.fixed_point_tol is not None \
            else default_fixed_point_tol(x_star[0].dtype)
        info = fp.FoldInfo(batch_size=B)
        info.extra.update(step=kind, tangent_dim=n, theseus_status=th_info.status)
        try:
            if torch.is_grad_enabled():
                step_fn = _TangentStep(self, x_star, input_tensors, kind, solve_kwargs)
                xi, info = fp.fold(step_fn, xi0, solver=solver, tol=tol, maxiter=maxiter,
                                   batched=True, strict=self.strict, return_info=True,
                                   fixed_point_tol=math.inf, info=info,
                                   solver_options=self.solver_options)
                step_len = info.fixed_point_residual
                info.extra["hessian_vjps"] = step_fn.hessian_vjps
            else:
                # inference: no graph; only measure the Gauss-Newton step length at x*
                xi = xi0
                step_fn = _TangentStep(self, x_star, input_tensors,
                                       "gauss_newton" if kind == "newton" else kind,
                                       solve_kwargs)
                try:
                    step_len = step_fn(xi0).norm(dim=1)
                except RuntimeError:  # singular JᵀJ (FoldError too): reported below
                    step_len = xi0.new_full((B,), math.inf)
                info.fixed_point_residual = step_len
        finally:
            self._restore(x_star)
        self.last_info = info

        # forward convergence: the step length at x* (what the gradient's accuracy rests on)
        xnorm = torch.cat([x.reshape(B, -1) for x in x_star], dim=1).norm(dim=1)
        rel = (step_len.detach() / (1 + xnorm)).to(xi0.dtype)
        failed = torch.as_tensor(
            [s == self._th.NonlinearOptimizerStatus.FAIL for s in th_info.status],
            dtype=torch.bool, device=xi0.device).reshape(-1)
        if failed.numel() != B:
            failed = failed.expand(B) if failed.numel() == 1 else failed[:B]
        converged = (rel <= fp_tol) & ~failed
        iters = th_info.converged_iter.detach().to(device=xi0.device).reshape(-1)
        max_it = int(optimizer.params.max_iterations)
        info.forward_iterations = torch.where(iters >= 0, iters, torch.full_like(iters, max_it))
        info.forward_residual = rel
        info.forward_converged = converged
        self._report_forward(
            converged, rel, f"FoldedTheseusLayer ({type(optimizer).__name__})",
            f"the Gauss-Newton step at x* should satisfy ‖δ‖/(1+‖x*‖) ≤ {fp_tol:.0e}; raise "
            f"max_iterations (now {max_it}) or lower abs_err_tolerance/rel_err_tolerance of "
            "the Theseus optimizer")

        values = self._outputs(x_star, xi, input_tensors)
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
        B = self.objective.batch_size
        out = []
        for var in self._ordering:
            t = var.tensor.detach()
            if not bool(torch.isfinite(t).all()):
                raise fp.FoldError(
                    f"the Theseus solution of {var.name!r} contains NaN/Inf (shape "
                    f"{tuple(t.shape)}); the forward solve failed — check the problem, the "
                    "initial values, or use LevenbergMarquardt.")
            if t.shape[0] != B:
                t = t.expand(B, *t.shape[1:])
            out.append(t.clone())
        return out

    def _step_kind(self, name: str) -> str:
        th = self._th
        if name != "auto":
            return name
        if isinstance(self.optimizer, th.LevenbergMarquardt):
            return "levenberg_marquardt"
        return "gauss_newton"  # GaussNewton, Dogleg, other NLLS subclasses

    def _solve_kwargs(self, kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kind != "levenberg_marquardt":
            return {}
        damping = getattr(self.optimizer, "_damping", None)
        if damping is None:
            damping = kwargs.get("damping", 1e-3)
        if isinstance(damping, Tensor):
            damping = damping.detach().clone()
        out: dict[str, Any] = {"damping": damping}
        if isinstance(self.optimizer.linear_solver, self._th.DenseSolver):
            out["ellipsoidal_damping"] = bool(kwargs.get("ellipsoidal_damping", False))
            eps = kwargs.get("damping_eps")
            out["damping_eps"] = 1e-8 if eps is None else float(eps)
        elif isinstance(damping, Tensor):
            raise fp.FoldError(
                f"{type(self.optimizer.linear_solver).__name__} takes only a scalar LM "
                "damping, but the optimizer holds a per-instance one (adaptive_damping=True); "
                "use a dense linear solver or step='gauss_newton'/'newton'.")
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

    def _restore(self, x_star: list[Tensor]) -> None:
        # leave the objective at x* with no graph (the graph lives in the folded op)
        self._set_vars([x.detach() for x in x_star])

    def _outputs(self, x_star: list[Tensor], xi: Tensor,
                 input_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        by_name: dict[str, Tensor] = {}
        retracted = self._retract_all(x_star, xi) if xi.requires_grad else None
        for k, (var, x) in enumerate(zip(self._ordering, x_star)):
            if retracted is not None:
                r = retracted[k]
                out = x + (r - r.detach())  # value x* bit for bit, derivative of x* ⊕ ξ
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
    """

    def __init__(self, layer: FoldedTheseusLayer, x_star: list[Tensor],
                 input_tensors: dict[str, Tensor], kind: str, solve_kwargs: dict[str, Any]):
        self.layer = layer
        self.x_star = x_star
        self.input_tensors = input_tensors
        self.kind = kind
        self.solve_kwargs = solve_kwargs
        self.dense = isinstance(layer.optimizer.linear_solver, layer._th.DenseSolver)
        self.factor: tuple[str, Tensor, Tensor | None] | None = None
        self.hessian_vjps = 0

    def __call__(self, xi: Tensor) -> Tensor:
        L = self.layer
        objective = L.objective
        aux = {k: v for k, v in self.input_tensors.items() if k in objective.aux_vars}
        if aux:
            objective.update(aux, _update_vectorization=False)  # re-attach the inputs' graph
        L._set_vars(L._retract_all(self.x_star, xi))
        if self.kind != "newton" and not self.dense:
            return xi + self._theseus_solve()
        g = self._gradient(xi.shape[0])
        if self.factor is None:
            self.factor = self._hessian(g, xi) if self.kind == "newton" else self._gn_matrix()
        how, F, piv = self.factor
        if how == "cholesky":
            delta = torch.cholesky_solve(g.unsqueeze(2), F)
        else:
            delta = torch.linalg.lu_solve(F, piv, g.unsqueeze(2))
        return xi - delta.squeeze(2)

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
                cols.append(self.x_star[0].new_zeros(B, L._dofs[k]))
            else:
                cols.append(ps[0] if len(ps) == 1 else torch.stack(ps).sum(0))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def _gn_matrix(self) -> tuple[str, Tensor, Tensor | None]:
        """Factor ``M = JᵀJ`` (+ LM damping) at x*, from Theseus's dense linearization."""
        th = self.layer._th
        linear_solver = self.layer.optimizer.linear_solver
        with torch.no_grad():  # reuses the Jacobians just computed (vectorized objectives)
            linear_solver.linearization.linearize()
            M = linear_solver.linearization.AtA.detach()
        if self.kind == "gauss_newton":
            _raise_if_singular(M, "the Gauss-Newton matrix JᵀJ", "use LevenbergMarquardt or "
                               "step='newton' if the minimiser is isolated; otherwise add a "
                               "prior that fixes the free directions (gauge)")
        else:
            lam = torch.as_tensor(self.solve_kwargs["damping"], dtype=M.dtype, device=M.device)
            if self.solve_kwargs.get("ellipsoidal_damping", False):
                diag = lam.reshape(-1, 1) * M.diagonal(dim1=1, dim2=2)
                M = M + torch.diag_embed(diag + self.solve_kwargs.get("damping_eps", 1e-8))
            else:
                eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
                M = M + lam.reshape(-1, 1, 1) * eye
        if isinstance(linear_solver, th.LUDenseSolver):
            LU, piv, info = torch.linalg.lu_factor_ex(M)
            how, F = "lu", LU
        else:
            F, info = torch.linalg.cholesky_ex(M)
            how, piv = "cholesky", None
        bad = info != 0
        if bool(bad.any()):
            idx = torch.nonzero(bad.cpu()).flatten().tolist()
            raise fp.FoldError(
                f"factorising the {self.kind} matrix at x* failed for instance(s) {idx[:20]} "
                f"of {M.shape[0]} (not positive definite / singular); dx*/dθ is not defined "
                "there. Remedy: add a prior that fixes the free directions, or raise the LM "
                "damping.")
        return how, F, piv

    def _hessian(self, g: Tensor, xi: Tensor) -> tuple[str, Tensor, Tensor | None]:
        """Factor the full Hessian ``H = ∂g/∂ξ`` at x* from compressed VJPs.

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
        _raise_if_singular(H, "the Hessian H = ∂(Jᵀr)/∂ξ", "x* is not an isolated minimiser "
                           "(a free direction or a saddle): add a prior that fixes it",
                           symmetric=False)
        LU, piv, _ = torch.linalg.lu_factor_ex(H)
        return "lu", LU, piv

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


def _raise_if_singular(M: Tensor, what: str, remedy: str, symmetric: bool = True) -> None:
    """Raise :class:`fp.FoldError` naming the instances whose ``M`` is (numerically) singular."""
    n = M.shape[-1]
    if symmetric:
        ev = torch.linalg.eigvalsh(0.5 * (M + M.transpose(-1, -2))).abs()
    else:
        ev = torch.linalg.svdvals(M)
    big = ev.max(dim=-1).values
    small = ev.min(dim=-1).values
    rcond = torch.where(big > 0, small / torch.where(big > 0, big, torch.ones_like(big)),
                        torch.zeros_like(big))
    bad = ~torch.isfinite(rcond) | (rcond <= 10 * n * torch.finfo(M.dtype).eps)
    if bool(bad.any()):
        idx = torch.nonzero(bad.cpu()).flatten().tolist()
        raise fp.FoldError(
            f"{what} at x* is singular for instance(s) {idx[:20]}"
            f"{' …' if len(idx) > 20 else ''} of {M.shape[0]} (reciprocal condition number "
            f"{float(rcond[bad].min()):.1e} ≤ {10 * n * torch.finfo(M.dtype).eps:.1e}, size "
            f"{n}): dx*/dθ is not defined there. Remedy: {remedy}.")
