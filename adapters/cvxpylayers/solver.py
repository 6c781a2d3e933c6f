"""``FoldedSolver``: a cvxpylayers ``SolverInterface`` with a folded backward (see
:mod:`fold_plugins.adapters.cvxpylayers` for the user-facing docs and :mod:`.program` for the
maths)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from cvxpylayers.interfaces.base import SolverInterface
from torch import Tensor

import fold_plugins as fp
from fold_plugins.internal import linearize

from ..base import FoldedModule
from .forward import solve_clarabel, solve_torch_qp
from .preconditioner import cone_admm
from .program import ConeData, ConeProgram, admm_step, factor, kkt_residual, shared

__all__ = ["FoldedSolver", "FoldedCvxpyLayer", "SavedSolve"]

_FORWARDS = ("clarabel", "torch")
#: Largest folded state ``n + 2m`` whose forward solution is polished by dense semismooth
#: Newton (an ``N × N`` Jacobian per instance).
POLISH_MAX_STATE = 400
#: Above it, at most this many plain iterations of the step refine the forward's solution.
POLISH_ITERS = 200


class SavedSolve(NamedTuple):
    """What a forward call hands its backward (cvxpylayers' ``saved_state``)."""

    prog: ConeProgram
    data: ConeData          # the call's parsed data (detached)
    P: Tensor | None        # cvxpylayers' raw values, re-parsed by the folded step
    q: Tensor
    A: Tensor
    x: Tensor               # the polished solution (B, n), slack (B, m), dual (B, m)
    s: Tensor
    y: Tensor
    info: fp.FoldInfo
    R: Tensor               # the step's penalties (B, m), factor of M, dense caches
    L: Tensor
    dense: tuple[Any, Any]


class FoldedSolver(SolverInterface):
    """Solve cvxpylayers' cone program (Clarabel, or batched torch ADMM for LPs/QPs) and
    differentiate it by folding one ADMM step at the solution (:func:`fold_plugins.fold`).

    ``CvxpyLayer(problem, parameters, variables, solver=FoldedSolver(...))``.

    Args:
        forward: ``"clarabel"`` (default; every cone but the power cone, per instance on the
            CPU) or ``"torch"`` (LPs and QPs, batched on the inputs' device).
        backward: folded backward solver: ``"gmres"`` (default, matrix-free), ``"dense"``
            (small programs), ``"bicgstab"``, ``"auto"`` or a callable.
        tol, maxiter, strict, solver_options: as for every adapter (:class:`FoldedModule`).
        forward_options: Clarabel settings (e.g. ``{"max_iter": 1000}``) or
            :func:`~fold_plugins.steps.quadprog.solve_qp_admm` keywords; ``solver_args`` of a
            ``CvxpyLayer`` call override them for that call.
        rho: ADMM penalty of the folded step (``None``: ``max(‖P‖∞, ‖c‖∞, 1)/ max(‖G‖∞², 1)``
            per instance, its geometric mean over the batch where all instances share P and
            G, so that they share one factor of M). It changes how fast the backward solve
            converges, never the gradient.
        sigma: proximal weight of the step's x-update.
        precondition: give the backward's GMRES/BiCGStab the inverse of ``I − Φᵀ`` built from
            the step's own matrices (:func:`.preconditioner.cone_admm`: one ``n × n``
            Cholesky factor per instance, made in backward; GMRES then needs 2–3 iterations).
            ``"auto"`` (default): where zero and nonnegative rows are at least half of the
            constraint rows (LPs, QPs: the unpreconditioned step converges slowly along the
            active set, ≈ 60 VJPs at n = 50–200), not on programs dominated by second-order,
            PSD or exponential cones (there ≈ 9–17 VJPs suffice and the factorisation costs
            more than it saves). ``True``/``False`` force it; a ``"preconditioner"`` in
            ``solver_options`` replaces it.

    Attributes:
        last_info: :class:`fold_plugins.FoldInfo` of the last call (forward fields after the
            forward, backward fields after the backward).
    """

    canon_solver = "SCS"
    supports_quad_obj = True

    def __init__(self, *, forward: str = "clarabel", backward: str | Callable = "gmres",
                 tol: float = 1e-10, maxiter: int | None = None, strict: bool = False,
                 solver_options: dict | None = None, forward_options: dict | None = None,
                 rho: float | None = None, sigma: float = 1e-6,
                 precondition: bool | str = "auto", _module: FoldedModule | None = None):
        if forward not in _FORWARDS:
            raise fp.FoldError(f"forward must be one of {_FORWARDS}, got {forward!r}.")
        if rho is not None and not (isinstance(rho, (int, float)) and rho > 0):
            raise fp.FoldError(f"rho must be a positive number or None, got {rho!r}.")
        if not (isinstance(sigma, (int, float)) and sigma > 0):
            raise fp.FoldError(f"sigma must be a positive number, got {sigma!r}.")
        self._m = _module if _module is not None else FoldedModule(
            backward, tol, maxiter, strict, solver_options)
        self.forward = forward
        self.forward_options = dict(forward_options or {})
        self.rho = rho
        self.sigma = float(sigma)
        if not (isinstance(precondition, bool) or precondition == "auto"):
            raise fp.FoldError(f"precondition must be True, False or 'auto', got "
                               f"{precondition!r}.")
        self.precondition = precondition
        self._programs: dict[int, ConeProgram] = {}

    # the adapters' common settings live in one FoldedModule (shared with FoldedCvxpyLayer)
    backward = property(lambda self: self._m.backward)
    tol = property(lambda self: self._m.tol)
    maxiter = property(lambda self: self._m.maxiter)
    strict = property(lambda self: self._m.strict)

    @property
    def last_info(self) -> fp.FoldInfo | None:
        return self._m.last_info

    def __repr__(self) -> str:
        return f"FoldedSolver(forward={self.forward!r}, {self._m.extra_repr()})"

    def setup(self, ctx: Any) -> None:
        """Read the canonical program's structure once per layer (cvxpylayers hook)."""
        self._programs[id(ctx.cone_dims)] = ConeProgram.from_context(ctx)

    def _program(self, dims: Any) -> ConeProgram:
        prog = self._programs.get(id(dims))
        if prog is None:
            raise fp.FoldError("FoldedSolver was called for a program it was not set up for; "
                               "pass it to CvxpyLayer(..., solver=FoldedSolver()), which calls "
                               "its setup().")
        return prog

    def solve_torch_batch(self, P: Tensor | None, q: Tensor, A: Tensor, dims: Any,
                          solver_args: dict, needs_grad: bool) -> tuple[Tensor, Tensor, Any]:
        """Forward: ``(x (B, n), y (B, m), state)`` for cvxpylayers' batch-first values."""
        prog = self._program(dims)
        for name, t in (("P", P), ("q", q), ("A", A)):
            if t is not None and not bool(torch.isfinite(t).all()):
                bad = torch.nonzero(~torch.isfinite(t).reshape(t.shape[0], -1).all(1))
                raise fp.FoldError(f"FoldedSolver: the canonical {name} has NaN/Inf entries for "
                                   f"instance(s) {bad.flatten().tolist()}: check the "
                                   "parameter tensors passed to the layer.")
        opts = {**self.forward_options, **(solver_args or {})}
        data = prog.parse(P, q, A).detach()  # once per call: every stage below reads it
        if self.forward == "clarabel":
            x, s, y, its, ok = solve_clarabel(prog, data, opts)
            remedy = ("raise Clarabel's max_iter (solver_args={'max_iter': ...}), or check the "
                      "instance's scaling")
        else:
            x, s, y, its, ok = solve_torch_qp(prog, data, opts, strict=self._m.strict)
            remedy = "raise maxiter in forward_options, or use forward='clarabel'"
        x, s, y, R, L, dense = self._polish(prog, data, P, q, A, x, s, y)
        res = kkt_residual(prog, data, x, s, y)
        # an "AlmostSolved" (or stopped) instance that polishing brought to KKT accuracy is solved
        ok = ok | (res <= (1e-9 if q.dtype == torch.float64 else 1e-5))
        info = fp.FoldInfo(batch_size=q.shape[0], forward_iterations=its, forward_residual=res,
                           forward_converged=ok)
        self._m.last_info = info
        self._m._report_forward(ok, res, f"FoldedSolver ({self.forward})", remedy)
        return x, y, SavedSolve(prog, data, P, q, A, x, s, y, info, R, L, dense)

    def _polish(self, prog: ConeProgram, data: ConeData, P: Tensor | None, q: Tensor,
                A: Tensor, x: Tensor, s: Tensor, y: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[Any, Any]]:
        """Semismooth Newton on the fixed-point equation ``w = U(w)`` of (2) for curved cones.

        An interior-point solution with complementarity gap ε is only √ε-accurate on a
        second-order, exponential or PSD cone face (the angle between ``s`` and ``y`` enters the
        gap squared); ``w ← w + (I − Φ)⁻¹(U(w) − w)`` with the step's Jacobian ``Φ`` (dense,
        from batched VJPs) restores full accuracy in one or two iterations. Skipped for LPs and
        QPs it makes a nearly active constraint exactly active or inactive. Skipped for states
        above :data:`POLISH_MAX_STATE`; a Newton step is kept only where it reduces the
        fixed-point residual ``‖U(w) − w‖``.
        """
        Pv, Gv = data.P, data.G
        R = prog.rho_vector(self._rho(data))
        L = factor(prog, Pv, Gv, R, self.sigma)
        N = prog.n + 2 * prog.m
        dense = prog.dense_caches(Pv, Gv)
        step = admm_step(prog, L, R, dense)
        if N > POLISH_MAX_STATE:
            d = prog.dims
            if d.soc or d.psd or d.exp:  # LP/QP: the interior-point answer is accurate already
                x, s, y = self._polish_iterate(step, (x, s, y), P, q, A)
            return x, s, y, R, L, dense
        w = torch.cat([x, s, y], dim=1)
        B = w.shape[0]
        eye = torch.eye(N, dtype=w.dtype, device=w.device)
        prev = None
        active = torch.ones(B, dtype=torch.bool, device=w.device)
        for _ in range(5):
            with torch.enable_grad():
                lin = linearize(step, (w[:, :prog.n], w[:, prog.n:prog.n + prog.m],
                                       w[:, prog.n + prog.m:]), P, q, A)
                PhiT = lin.vjp_batched(eye[:, None, :].expand(N, B, N)).permute(1, 2, 0)
            with torch.no_grad():
                r = torch.cat([t.detach() for t in lin.out_parts], dim=1) - w
                rn = r.abs().amax(1)
                if prev is not None:  # undo the last step where it did not help, stop there
                    worse = active & (rn >= prev[0])
                    w = torch.where(worse[:, None], prev[1], w)
                    active = active & ~worse
                active = active & (rn > 1e-15 * (1 + w.abs().amax(1)))
                if not bool(active.any()):
                    break
                prev = (rn, w)
                # PhiT[b, :, j] = Φᵀ e_j  →  Φ[b] = PhiT[b]ᵀ
                dw, bad = torch.linalg.solve_ex(eye - PhiT.transpose(1, 2), r)
                ok = (bad == 0) & torch.isfinite(dw).all(1) & active
                w = torch.where(ok[:, None], w + dw, w)
        x, s, y = w[:, :prog.n], w[:, prog.n:prog.n + prog.m], w[:, prog.n + prog.m:]
        return x, s, y, R, L, dense

    @staticmethod
    def _polish_iterate(step: Callable, w: tuple[Tensor, Tensor, Tensor], P: Tensor | None,
                        q: Tensor, A: Tensor, iters: int = POLISH_ITERS
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Large states: up to ``iters`` plain iterations of (2) from the forward's solution
        (no grad), stopped once ``‖U(w) − w‖∞ ≤ 1e-14(1 + ‖w‖∞)`` for every instance."""
        with torch.no_grad():
            for k in range(iters):
                w1 = step(w, P, q, A)
                if k % 10 == 0:
                    r = max(float((a - b).abs().amax()) for a, b in zip(w1, w))
                    if r <= 1e-14 * (1 + max(float(t.abs().amax()) for t in w)):
                        return w1
                w = w1
        return w

    def _rho(self, data: ConeData) -> Tensor:
        Pv, c, Gv = data.P, data.c, data.G
        B = c.shape[0]
        if self.rho is not None:
            return c.new_full((B,), self.rho)

        def amax(t: Tensor | None) -> Tensor:
            if t is None or t.shape[1] == 0:
                return c.new_zeros(B)
            return t.abs().amax(1)

        num = torch.maximum(amax(Pv), amax(c)).clamp(min=1.0)
        rho = num / amax(Gv).square().clamp(min=1.0)
        if B > 1 and shared(Gv) and (Pv is None or shared(Pv)):
            # one ρ (the geometric mean) where P and G are the batch's: one factor of M for all
            rho = rho.log().mean().exp().expand(B)
        return rho

    def _preconditioned(self, prog: ConeProgram) -> bool:
        """``precondition``, with ``"auto"`` decided by the program's cones (see the class)."""
        if self.precondition != "auto":
            return bool(self.precondition)
        polyhedral = prog.dims.zero + prog.dims.nonneg
        return 2 * polyhedral >= prog.m

    def derivative_torch_batch(self, dprimal: Tensor, ddual: Tensor, saved_state: SavedSolve
                               ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Backward: fold the ADMM step (2) at ``(x, s, y)`` and return ``(dP, dq, dA)``."""
        prog, data, P, q, A, x, s, y, info, R, L, dense = saved_state
        # P only when a parameter enters it (else the step detaches it: no gradient formed)
        leaves = [None if P is None else P.detach().requires_grad_(prog.P_param),
                  q.detach().requires_grad_(True), A.detach().requires_grad_(True)]
        Pl, ql, Al = leaves
        step = admm_step(prog, L, R, dense)
        m = self._m
        opts = dict(m.solver_options)
        if (self._preconditioned(prog) and "preconditioner" not in opts
                and m.backward in ("gmres", "bicgstab", "auto")):
            opts["preconditioner"] = fp.preconditioners.lazy(
                cone_admm, prog, data, (x, s, y), R, L, self.sigma, dense)
        with torch.enable_grad():
            (xf, _, yf), m.last_info = fp.fold(
                step, (x, s, y), Pl, ql, Al, solver=m.backward, tol=m.tol, maxiter=m.maxiter,
                strict=m.strict, return_info=True, info=info, solver_options=opts)
            wrt = [t for t in leaves if t is not None and t.requires_grad]
            grads = torch.autograd.grad((xf, yf), wrt, (dprimal.to(xf.dtype),
                                                        ddual.to(yf.dtype)), allow_unused=True)
        out = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
        dP = None if P is None else (out.pop(0) if prog.P_param else torch.zeros_like(P))
        return dP, out[0], out[1]


class FoldedCvxpyLayer(FoldedModule):
    """``CvxpyLayer(problem, parameters, variables, solver=FoldedSolver(**fold_options))`` as
    one module: same call (``layer(*params, solver_args=None)`` → tuple of tensors), and the
    adapters' common keywords and ``last_info``.

    Args:
        problem, parameters, variables: as for ``cvxpylayers.torch.CvxpyLayer``.
        forward, backward, tol, maxiter, strict, solver_options, forward_options, rho, sigma,
            precondition: see :class:`FoldedSolver`.
        **layer_kwargs: further ``CvxpyLayer`` keywords (``gp``, ``verbose``, ``solver_args``).
    """

    def __init__(self, problem: Any, parameters: list, variables: list, *,
                 forward: str = "clarabel", backward: str | Callable = "gmres",
                 tol: float = 1e-10, maxiter: int | None = None, strict: bool = False,
                 solver_options: dict | None = None, forward_options: dict | None = None,
                 rho: float | None = None, sigma: float = 1e-6,
                 precondition: bool | str = "auto", **layer_kwargs: Any):
        super().__init__(backward, tol, maxiter, strict, solver_options)
        from cvxpylayers.torch import CvxpyLayer

        self.solver = FoldedSolver(forward=forward, forward_options=forward_options, rho=rho,
                                   sigma=sigma, precondition=precondition, _module=self)
        self.layer = CvxpyLayer(problem, parameters=list(parameters),
                                variables=list(variables), solver=self.solver, **layer_kwargs)

    def forward(self, *params: Tensor, solver_args: dict | None = None) -> tuple[Tensor, ...]:
        """The optimal ``variables`` for these parameter tensors (batched or not)."""
        return self.layer(*params, solver_args=solver_args)
