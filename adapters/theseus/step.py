"""The folded Gauss-Newton / LM / Newton step of :class:`FoldedTheseusLayer` in tangent space.

Private to :mod:`fold_plugins.adapters.theseus` (its package docstring has the mathematics):
:class:`TangentStep` (``U(ξ) = ξ − M⁻¹ g(x* ⊕ ξ)``, with ``M`` judged by
:func:`fold_plugins.internal.rcond_from_factor`, the core's factor-based condition
estimate) and :class:`FlooredSolver` (the backward solver around it: its tolerance floor, and
no solve at all where ``Φ = 0``). Which step is :mod:`.setup`; the variables' layout is
:mod:`.geometry`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins.internal import exact_solve_info, get_solver, instance_list, rcond_from_factor

from .geometry import TangentGeometry
from .setup import import_theseus

__all__ = ["TangentStep", "FlooredSolver"]


class TangentStep:
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

    def __init__(self, geo: TangentGeometry, optimizer: Any, x_star: list[Tensor],
                 input_tensors: dict[str, Tensor], kind: str, solve_kwargs: dict[str, Any],
                 exclude: Tensor):
        th = import_theseus()
        self.geo = geo
        self.optimizer = optimizer
        self.objective = optimizer.objective
        self.kind = kind
        self.solve_kwargs = solve_kwargs
        self.dense = isinstance(optimizer.linear_solver, th.DenseSolver)
        self.lu = isinstance(optimizer.linear_solver, th.LUDenseSolver)
        self.solve_residual: Tensor | None = None
        self.factor: tuple[str, Tensor, Tensor | None] | None = None
        self.hessian_vjps = 0
        self.B = x_star[0].shape[0]
        self.excluded = exclude.clone()
        self.singular = torch.zeros_like(exclude)
        self.illcond = torch.zeros_like(exclude)
        self.rcond: Tensor | None = None
        self.tol_floor = 0.0
        #: set once the Hessian build has verified that no instance reads another's state
        #: (read by fp.fold, which then skips its own one-VJP probe)
        self.batch_independent = False
        aux = {k: v for k, v in input_tensors.items() if k in self.objective.aux_vars}
        self.x_used = [self._fill(x) for x in x_star]
        self.aux = {k: self._fill(v) for k, v in aux.items()}
        if self.aux:  # now, so that the step never touches the NaN rows it replaces
            self.objective.update(self.aux, _update_vectorization=False)
        # every auxiliary tensor that needs a gradient (inputs, cost weights) is an explicit
        # param of the fold, so fp.fold can skip its op recorder (record_captured below):
        # closure parameters are leaves that its graph walk finds
        self.param_names = [k for k, v in self.objective.aux_vars.items()
                            if isinstance(v.tensor, Tensor) and v.tensor.requires_grad]
        self.params = [v.tensor for v in map(self.objective.aux_vars.get, self.param_names)]

    def _fill(self, t: Tensor) -> Tensor:
        """``t`` with the excluded rows replaced by the first good instance's row (no graph)."""
        bad = self.excluded
        if not bool(bad.any()) or not isinstance(t, Tensor) or t.ndim < 1 \
                or t.shape[0] != self.B or self.B == 1:
            return t
        k0 = int(torch.nonzero(~bad.cpu())[0])
        mask = bad.to(t.device).reshape(self.B, *([1] * (t.ndim - 1)))
        return torch.where(mask, t[k0:k0 + 1].detach(), t)

    @property
    def phi_zero(self) -> bool:
        """``Φ = I − H⁻¹ ∂g/∂ξ = 0`` at x* by construction: the Newton step whose ``H`` was
        built by autograd from the very graph of ``g`` the backward differentiates."""
        return self.kind == "newton" and self.factor is not None

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

    #: fp.fold reads it: this step passes its non-leaf inputs as params (see __init__)
    record_captured = False

    def __call__(self, xi: Tensor, *params: Tensor) -> Tensor:
        if self.aux or params:
            # re-attach the inputs' graph, through the very tensors fold was given
            self.objective.update({**self.aux, **dict(zip(self.param_names, params))},
                                  _update_vectorization=False)
        self.geo.set_vars(self.geo.retract_all(self.x_used, xi))
        with _jacobians_with_graph(self.objective):
            return self._step(xi)

    def _step(self, xi: Tensor) -> Tensor:
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
        geo = self.geo
        parts: list[list[Tensor]] = [[] for _ in geo.ordering]
        for cf in self.objective._get_jacobians_iter():
            jacobians, err = cf.weighted_jacobians_error()
            for j, J in enumerate(jacobians):
                k = geo.index[cf.optim_var_at(j).name]
                c = (J * err.unsqueeze(2)).sum(1)
                parts[k].append(c if c.shape[0] == B else c.expand(B, -1))
        cols = []
        for k, ps in enumerate(parts):
            if not ps:
                cols.append(self.x_used[0].new_zeros(B, geo.dofs[k]))
            else:
                cols.append(ps[0] if len(ps) == 1 else torch.stack(ps).sum(0))
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def _gn_matrix(self) -> Tensor:
        """``M = JᵀJ`` (+ LM damping) at x*, from Theseus's dense linearization (no graph)."""
        linear_solver = self.optimizer.linear_solver
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
        if self.kind == "newton" or self.lu:
            F, piv, status = torch.linalg.lu_factor_ex(M)
            how = "lu"
        else:
            F, status = torch.linalg.cholesky_ex(M)
            piv, how = None, "cholesky"
        rcond = rcond_from_factor(M, how, F, piv)
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
        needs about ``3 · dof`` VJPs instead of ``n``. All of them run as one vmapped backward
        (``is_grads_batched``; a loop where an op has no batching rule), together with one
        probe row whose cotangent lives in instance 0 only: every other instance's row of its
        result must be exactly zero, or the cost functions mix instances (``H`` would then sum
        several instances' curvature) and :class:`fp.FoldError` is raised. Having checked it,
        the step vouches for batch independence to :func:`fp.fold` (no second probe).
        """
        B, n = g.shape
        if not g.requires_grad:
            raise fp.FoldError("step='newton': the gradient g = Jᵀr at x* does not depend on "
                               "the optimisation variables (no graph); nothing to fold.")
        seeds, row_of, mask = self.geo.hessian_compression()
        V = seeds[:, None, :].expand(-1, B, -1).contiguous()  # (vmap is ≈ 8 % faster on it)
        if B > 1:  # the probe: a cotangent in instance 0 only
            probe = g.new_zeros(1, B, n)
            probe[0, 0] = torch.linspace(1.0, 2.0, n, dtype=g.dtype, device=g.device)
            V = torch.cat([V, probe])
        rows = _batched_vjp(g, xi, V)
        self.hessian_vjps = V.shape[0]
        if rows is None:  # g does not depend on ξ through a differentiable path
            return g.new_zeros(B, n, n)
        H = rows[row_of].transpose(0, 1) * mask  # row i of H from its seed's VJP
        if B > 1:
            mixed = (rows[-1, 1:] != 0).any(dim=1)
            if bool(mixed.any()):
                raise fp.FoldError(
                    "the objective's cost functions mix batch instances: ∂g[i]/∂ξ[0] ≠ 0 for "
                    f"instance(s) {instance_list(torch.cat([mixed.new_zeros(1), mixed]))} "
                    "(e.g. an error function that reduces over dim 0). Theseus solves every "
                    "instance's system on its own, so such a model has no per-instance "
                    "solution to differentiate: remove the coupling from the error function.")
        self.batch_independent = True
        return H

    def _theseus_solve(self) -> Tensor:
        """Theseus's own ``linearize(_detach_hessian=True)`` + ``linear_solver.solve``: ``M⁻¹g``."""
        linear_solver = self.optimizer.linear_solver
        linear_solver.linearization.linearize(_detach_hessian=True)
        try:
            delta = linear_solver.solve(**self.solve_kwargs)
        except RuntimeError as exc:
            if isinstance(exc, fp.FoldError):
                raise
            raise fp.FoldError(
                f"{type(linear_solver).__name__}.solve failed at x* ({exc}); the "
                f"{self.kind} system there is singular or not positive definite, so dx*/dθ "
                "is not defined. Remedy: add a prior that fixes the free directions, or use "
                "LevenbergMarquardt / step='newton'.") from exc
        if self.solve_residual is None:
            self._measure_solve(delta)
        return delta

    def _measure_solve(self, delta: Tensor) -> None:
        """Floor the backward tolerance at the linear solver's measured precision.

        ``solve_residual = ‖M δ − Atb‖ / ‖Atb‖`` per instance, with ``M = AᵀA + λI`` applied
        through the linearization (``Av`` and its transpose by one VJP): a solver that rounds
        through float32 (Theseus's CHOLMOD path) shows ~1e-7 here, and the backward iteration
        cannot get below that (its operator contains the solve), so ``tol_floor`` becomes
        ``10 × the worst good instance`` (at most 1e-2). Nothing is floored if ``M`` cannot be
        applied (the measurement is then NaN).
        """
        linear_solver = self.optimizer.linear_solver
        lin = linear_solver.linearization
        d = delta.detach()
        try:
            with torch.no_grad():
                b = lin.Atb.detach().reshape(d.shape)
            if hasattr(lin, "A_val"):  # sparse: Aᵀ(A d) as the gradient of ½‖A v‖² at v = d
                with torch.enable_grad():
                    v = d.clone().requires_grad_(True)
                    y = lin.Av(v)
                    (Md,) = torch.autograd.grad(0.5 * (y * y).sum(), v)
            else:
                with torch.no_grad():
                    Md = (lin.AtA.detach() @ d.unsqueeze(2)).squeeze(2)
        except (RuntimeError, NotImplementedError, AttributeError):
            self.solve_residual = torch.full((self.B,), math.nan, dtype=d.dtype, device=d.device)
            return
        lam = self.solve_kwargs.get("damping", getattr(linear_solver, "_damping", 0.0)) or 0.0
        lam_t = torch.as_tensor(lam, dtype=d.dtype, device=d.device).reshape(-1, 1)
        r = (Md.detach() + lam_t * d - b).norm(dim=1)
        bn = b.norm(dim=1)
        rel = torch.where(bn > 0, r / bn.clamp_min(torch.finfo(d.dtype).tiny), r)
        rel = rel.expand(self.B) if rel.numel() == 1 else rel
        self.solve_residual = rel
        good = ~self.excluded.to(rel.device) & torch.isfinite(rel)
        if bool(good.any()):
            self.tol_floor = max(self.tol_floor, min(1e-2, 10 * float(rel[good].max())))


def _fmt_list(t: Tensor, limit: int = 5) -> str:
    vals = [f"{v:.1e}" for v in t.detach().reshape(-1)[:limit].tolist()]
    return "[" + ", ".join(vals) + (" …]" if t.numel() > limit else "]")


@contextlib.contextmanager
def _jacobians_with_graph(objective: Any) -> Iterator[None]:
    """Every ``AutoDiffCostFunction`` computes its Jacobians with a graph while the step runs.

    ``autograd_create_graph=False`` (in the ``dense``/``loop_batch`` autograd modes) speeds up
    Theseus's own iterations, but Jacobians without a graph would drop ``Σ rᵢ∇²rᵢ`` from the
    folded step's ``∂g/∂ξ``: its gradient would silently be the Gauss-Newton one (measured
    3.7e-2 off finite differences on the noisy exp fit). Copies the vectorizer keeps of the
    cost functions are switched too; everything is restored afterwards.
    """
    th = import_theseus()
    fns = list(objective.cost_functions.values())
    vectorizer = getattr(getattr(objective, "_vectorization_run", None), "__self__", None)
    fns += list(getattr(vectorizer, "_vectorized_cost_fns", {}).values())
    flipped = [cf for cf in fns if isinstance(cf, th.AutoDiffCostFunction)
               and getattr(cf, "_autograd_create_graph", True) is False]
    for cf in flipped:
        cf._autograd_create_graph = True
    try:
        yield
    finally:
        for cf in flipped:
            cf._autograd_create_graph = False


def _batched_vjp(out: Tensor, inp: Tensor, V: Tensor) -> Tensor | None:
    """``V[k] ᵀ ∂out/∂inp`` for every ``k`` (``V``: ``(k, B, n)``), detached; one vmapped
    backward, or one backward per row where an op of the graph has no batching rule."""
    try:
        with warnings.catch_warnings():  # vmap's "performance drop" notice: not the user's
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            (R,) = torch.autograd.grad(out, inp, V, retain_graph=True, allow_unused=True,
                                       is_grads_batched=True)
    except RuntimeError:
        rs = [torch.autograd.grad(out, inp, v, retain_graph=True, allow_unused=True)[0]
              for v in V]
        if any(r is None for r in rs):
            return None
        R = torch.stack(rs)
    return None if R is None else R.detach()


class FlooredSolver:
    """The backward solver with its tolerance floored at ``min(√eps, eps / rcond₁(M))``.

    Below about ``eps · cond(M)`` the residual of ``(I − Φᵀ) v = g`` is round-off: ``v ↦ v − Φᵀv``
    goes through a solve with ``M``, and x* itself carries a relative error of that order. A
    tighter tolerance would only spend ``maxiter`` iterations and warn (measured: a 30-pose SE2
    graph in float32, cond(JᵀJ) ≈ 1.3e4, stalls at residual 1.1e-5 > 50·eps). The floor is
    known once the step has factored ``M`` (the worst instance of the batch sets it), hence
    this wrapper, read at backward time; the cap ``√eps`` keeps at least half the digits.
    """

    def __init__(self, solver: str | Callable, step: TangentStep):
        self.__name__, self.solve = get_solver(solver)
        self.step = step

    def __call__(self, matvec: Callable, b: Tensor, *, x0: Tensor | None = None, tol: float,
                 maxiter: int | None, **options: Any):
        if self.__name__ == "auto" and self.step.phi_zero:
            # (I − Φᵀ) = I exactly: v = b, no operator application (and none to judge)
            not_isolated = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
            return b.clone(), exact_solve_info(b, "none: Φ = 0",
                                               extra={"not_isolated": not_isolated})
        return self.solve(matvec, b, x0=x0, tol=max(tol, self.step.tol_floor),
                          maxiter=maxiter, **options)
