"""diffcp reference: the derivative of a cvxpy problem's solution map, straight from diffcp.

Independent of cvxpylayers: cvxpy compiles the DPP problem once into its parametrized cone
program (``ParamConeProg``)

    minimize cᵀx   s.t.  b − A x = s ∈ K,     (c, A, b) affine in the parameters θ,

and for each instance this module applies the parameter values, calls
``diffcp.solve_and_derivative`` and, in backward, chains diffcp's adjoint derivative

    (dA, db, dc) = DTᵀ(dx, 0, 0),    dx = split_adjointᵀ(∂L/∂variables)

back to θ through the adjoint of cvxpy's parameter→(c, A, b) map (``apply_param_jac``) and
the reductions' own ``var_backward``/``param_backward`` (for lowered parameters and
variables). The solution is read off with ``split_solution``.

    from fold_plugins.adapters.diffcp import diffcp_reference
    ref = diffcp_reference(problem, [q, b], [x])
    (x_star,) = ref(q_t, b_t)

Calling the reference sets ``.value`` of the problem's parameters (one instance at a time).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fold_plugins import FoldError

from .cvxpylayers.reference import TIGHT_SOLVER_ARGS, _check_problem, batch_size_of, import_cvx

__all__ = ["diffcp_reference", "DiffcpReference"]

_METHODS = {"SCS": "SCS", "CLARABEL": "Clarabel"}


class DiffcpReference:
    """``ref(*param_tensors) -> tuple of variable tensors`` with diffcp's derivative.

    Attributes:
        solve_method: diffcp's forward solver (``"SCS"`` or ``"Clarabel"``); ``solver`` holds
            the same choice upper-cased, as in :class:`.cvxpylayers.CvxpyLayersReference`.
        mode: diffcp's derivative mode (``"dense"``: dense factorisation of the derivative
            system; ``"lsqr"``: iterative).
        solver_args: keywords for the solver.
        last_info: per instance of the latest call: relative primal/dual residuals and gap
            of the returned point (see :func:`_kkt_residuals`), and the solver's warnings.
        warn_tol, fail_tol: a worst residual above ``warn_tol`` warns (inaccurate reference),
            above ``fail_tol`` raises :class:`FoldError` (no solution: infeasible/unbounded).
    """

    __name__ = "diffcp"

    def __init__(self, problem: Any, parameters: Sequence[Any], variables: Sequence[Any],
                 solve_method: str | None = None, solver_args: dict[str, Any] | None = None,
                 mode: str = "dense", *, solver: str | None = None):
        cp, diffcp = import_cvx()
        _check_problem(cp, problem, parameters, variables)
        solve_method = _resolve_solver(solver, solve_method)
        key = str(solve_method).upper()
        if key not in _METHODS:
            raise ValueError(f"solver must be one of {sorted(_METHODS)} (diffcp's conic "
                             f"solvers installed with the cvx extra), got {solve_method!r}.")
        if mode not in ("dense", "lsqr", "lsmr"):
            raise ValueError(f"mode must be 'dense', 'lsqr' or 'lsmr', got {mode!r} (the lpgd "
                             "modes are finite-difference approximations, not references).")
        self._cp, self._diffcp = cp, diffcp
        self.parameters = list(parameters)
        self.variables = list(variables)
        self.solve_method = _METHODS[key]
        self.solver = key
        self.name = f"diffcp ({self.solve_method})"  # how fp.verify reports name this reference
        self.mode = mode
        args = {k: v for k, v in TIGHT_SOLVER_ARGS[key].items() if k != "mode"}
        args.update(solver_args or {})
        self.solver_args = args
        # a private Problem over the same expressions: its own compilation cache
        self._problem = cp.Problem(problem.objective, problem.constraints)
        # cvxpy's ParamConeProg and reduction Chain, compiled on the first call
        self._param_prob: Any | None = None
        self._chain: Any | None = None
        self._cone_dict: dict | None = None
        self.last_info: list[dict[str, Any]] = []
        self.warn_tol = 1e-7
        self.fail_tol = 1e-4

    # ------------------------------------------------------------------ cvxpy plumbing

    def _set_values(self, values: Sequence[np.ndarray]) -> None:
        for p, v in zip(self.parameters, values):
            p.value = v
        if self._param_prob is None:
            from cvxpy.reductions.solvers.conic_solvers.scs_conif import dims_to_solver_dict

            data, chain, _ = self._problem.get_problem_data(solver=self._cp.DIFFCP)
            self._param_prob = data[self._cp.settings.PARAM_PROB]
            self._chain = chain
            self._cone_dict = dims_to_solver_dict(data["dims"])
        else:
            _, chain = self._compiled()
            for r in chain.reductions:
                r.update_parameters(self._problem)

    def _compiled(self) -> tuple[Any, Any]:
        """``(param_prob, chain)``: cvxpy's compiled program (after :meth:`_set_values`)."""
        if self._param_prob is None or self._chain is None:
            raise RuntimeError("diffcp reference: the problem is compiled by the first solve")
        return self._param_prob, self._chain

    def _cone_data(self, values: Sequence[np.ndarray]):
        """``(A, b, c)`` in diffcp's convention ``Ax + s = b`` for one instance."""
        self._set_values(values)
        param_prob, _ = self._compiled()
        c, _, A, b = param_prob.apply_parameters(keep_zeros=True)
        return (-A).tocsc(), np.asarray(b, dtype=np.float64), np.asarray(c, dtype=np.float64)

    def _recover(self, x: np.ndarray) -> list[np.ndarray]:
        param_prob, chain = self._compiled()
        vals = param_prob.split_solution(x)
        for r in reversed(chain.reductions):
            vals = r.var_forward(vals)
        return [np.asarray(vals[v.id], dtype=np.float64).reshape(v.shape) for v in self.variables]

    def _solve_one(self, values: Sequence[np.ndarray], need_grad: bool, index: int):
        A, b, c = self._cone_data(values)
        kwargs = dict(self.solver_args)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if need_grad:
                    x, y, s, _, DT = self._diffcp.solve_and_derivative(
                        A, b, c, self._cone_dict, solve_method=self.solve_method,
                        mode=self.mode, **kwargs)
                else:
                    x, y, s = self._diffcp.solve_only(A, b, c, self._cone_dict,
                                                      solve_method=self.solve_method, **kwargs)
                    DT = None
        except Exception as e:  # diffcp.SolverError and solver failures
            raise FoldError(f"diffcp ({self.solve_method}) failed on instance {index}: {e}. "
                            "Check that the instance is feasible and bounded.") from e
        pres, dres, gap = _kkt_residuals(A, b, c, x, y, s)
        worst = max(pres, dres, gap)
        info = {"instance": index, "primal_residual": pres, "dual_residual": dres, "gap": gap,
                "solver_warnings": [str(w.message) for w in caught]}
        self.last_info.append(info)
        if not np.isfinite(worst) or worst > self.fail_tol:
            raise FoldError(f"diffcp ({self.solve_method}) returned no solution for instance "
                            f"{index}: relative primal residual {pres:.1e}, dual residual "
                            f"{dres:.1e}, gap {gap:.1e} (> {self.fail_tol:.0e}). Check that the "
                            "instance is feasible and bounded.")
        if worst > self.warn_tol:
            warnings.warn(f"diffcp ({self.solve_method}) solved instance {index} only to "
                          f"relative KKT residual {worst:.1e} > {self.warn_tol:.0e}; the reference "
                          "gradient is off by about as much. Tighten eps / raise max_iters.",
                          RuntimeWarning, stacklevel=4)
        return self._recover(x), DT, A.shape[0]

    def _adjoint_one(self, DT: Any, m: int, grads: Sequence[np.ndarray]) -> list[np.ndarray]:
        param_prob, chain = self._compiled()
        del_vars = {v.id: g for v, g in zip(self.variables, grads)}
        for r in chain.reductions:
            del_vars = r.var_backward(del_vars)
        del_vars = {k: np.asarray(v, dtype=np.float64) for k, v in del_vars.items()
                    if k in param_prob.id_to_var}
        dx = param_prob.split_adjoint(del_vars)
        zeros = np.zeros(m)
        dA, db, dc = DT(dx, zeros, zeros)
        # DT returns derivatives w.r.t. diffcp's A = −A_cvxpy
        dparams = param_prob.apply_param_jac(dc, -dA, db)
        for r in reversed(chain.reductions):
            dparams = r.param_backward(dparams)
        return [np.asarray(dparams.get(p.id, np.zeros(p.shape)), dtype=np.float64)
                .reshape(p.shape) for p in self.parameters]

    # ------------------------------------------------------------------ torch entry

    def __call__(self, *params: Tensor) -> tuple[Tensor, ...]:
        B = batch_size_of(params, self.parameters)
        return _DiffcpFunction.apply(self, B, *params)

    def __repr__(self) -> str:
        return (f"DiffcpReference(solve_method={self.solve_method!r}, mode={self.mode!r}, "
                f"variables={[v.name() for v in self.variables]})")


def _resolve_solver(solver: str | None, solve_method: str | None) -> str:
    """``solver`` (the name :func:`.cvxpylayers.cvxpylayers_reference` uses) or its
    alias ``solve_method`` (diffcp's own name); default ``"SCS"``."""
    if solver is not None and solve_method is not None and \
            str(solver).upper() != str(solve_method).upper():
        raise ValueError(f"solver={solver!r} and solve_method={solve_method!r} disagree; they "
                         "are the same setting (solve_method is an alias): give one.")
    chosen = solver if solver is not None else solve_method
    return "SCS" if chosen is None else chosen


def _instance_values(params: Sequence[Tensor], parameters: Sequence[Any], B: int | None,
                     i: int) -> list[np.ndarray]:
    out = []
    for t, p in zip(params, parameters):
        v = t.detach().to(device="cpu", dtype=torch.float64)
        if B is not None and t.dim() == len(p.shape) + 1:
            v = v[i]
        out.append(v.numpy().copy())
    return out


def _kkt_residuals(A: Any, b: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray,
                   s: np.ndarray) -> tuple[float, float, float]:
    """Relative primal residual ``Ax + s − b``, dual residual ``Aᵀy + c``, gap ``cᵀx + bᵀy``.

    Solver-independent check of diffcp's answer (its Clarabel path reports no status).
    """
    Ax, ATy = A @ x, A.T @ y
    nrm = np.linalg.norm
    pres = nrm(Ax + s - b) / (1.0 + max(nrm(b), nrm(Ax), nrm(s)))
    dres = nrm(ATy + c) / (1.0 + max(nrm(c), nrm(ATy)))
    cx, by = float(c @ x), float(b @ y)
    gap = abs(cx + by) / (1.0 + abs(cx) + abs(by))
    return float(pres), float(dres), float(gap)


class _DiffcpFunction(torch.autograd.Function):
    """Forward: diffcp solves each instance. Backward: diffcp's adjoint, chained to θ."""

    @staticmethod
    def forward(ctx, ref: DiffcpReference, B: int | None, *params: Tensor):
        need_grad = any(ctx.needs_input_grad[2:])
        n_inst = 1 if B is None else B
        ref.last_info = []
        sols, DTs, ms = [], [], []
        for i in range(n_inst):
            sol, DT, m = ref._solve_one(_instance_values(params, ref.parameters, B, i),
                                        need_grad, i)
            sols.append(sol)
            DTs.append(DT)
            ms.append(m)
        ctx.ref, ctx.B, ctx.DTs, ctx.ms = ref, B, DTs, ms
        ctx.param_meta = [(t.shape, t.dtype, t.device) for t in params]
        dtype, device = params[0].dtype, params[0].device
        outs = []
        for k in range(len(ref.variables)):
            arr = np.stack([s[k] for s in sols]) if B is not None else sols[0][k]
            outs.append(torch.as_tensor(arr, dtype=torch.float64).to(device=device,
                                                                      dtype=dtype))
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        ref, B = ctx.ref, ctx.B
        n_inst = 1 if B is None else B
        np_grads = []
        for g, v in zip(grads, ref.variables):
            shape = ((B,) if B is not None else ()) + tuple(v.shape)
            np_grads.append(np.zeros(shape) if g is None
                            else g.detach().to(device="cpu", dtype=torch.float64).numpy())
        per_inst = []
        for i in range(n_inst):
            gi = [g[i] if B is not None else g for g in np_grads]
            per_inst.append(ref._adjoint_one(ctx.DTs[i], ctx.ms[i], gi))
        out = []
        for k, (shape, dtype, device) in enumerate(ctx.param_meta):
            p = ref.parameters[k]
            if B is None:
                arr = per_inst[0][k]
            elif len(shape) == len(p.shape) + 1:
                arr = np.stack([d[k] for d in per_inst])
            else:  # shared across the batch: gradients add up
                arr = np.sum([d[k] for d in per_inst], axis=0)
            out.append(torch.as_tensor(arr, dtype=torch.float64).to(device=device, dtype=dtype))
        return (None, None, *out)


def diffcp_reference(problem: Any, parameters: Sequence[Any], variables: Sequence[Any],
                     solve_method: str | None = None, solver_args: dict[str, Any] | None = None,
                     mode: str = "dense", *, solver: str | None = None) -> DiffcpReference:
    """A torch function mapping parameter tensors to optimal variables, differentiated by diffcp.

    Args:
        problem: a DPP ``cvxpy.Problem`` (compiled once for cvxpy's ``DIFFCP`` target).
        parameters: its ``cvxpy.Parameter``s, in the order the tensors will be passed.
        variables: the primal ``cvxpy.Variable``s to return, in order.
        solve_method: diffcp's forward solver, ``"SCS"`` (default) or ``"CLARABEL"``
            (case-insensitive); an alias of ``solver``.
        solver_args: overrides of the tight defaults in
            :data:`.cvxpylayers.TIGHT_SOLVER_ARGS` (e.g. ``eps_abs``, ``max_iters``).
        mode: diffcp's derivative mode, ``"dense"`` (default, exact for small problems),
            ``"lsqr"`` or ``"lsmr"``.

        solver: the same setting under the name
            :func:`.cvxpylayers.cvxpylayers_reference` uses (``solver="CLARABEL"``);
            giving both with different values raises ``ValueError``.

    Returns:
        ``ref(*params) -> tuple[Tensor, ...]``; shapes as for
        :func:`fold_plugins.adapters.cvxpylayers.cvxpylayers_reference` (a leading batch dim on any
        parameter batches the call; instances are solved one after another).
    """
    return DiffcpReference(problem, parameters, variables, solve_method=solve_method,
                           solver_args=solver_args, mode=mode, solver=solver)
