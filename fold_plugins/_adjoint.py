"""The linear solves of the folded op, for every derivative PyTorch asks for.

At a fixed point ``x* = U(x*, θ)`` with ``Φ = ∂U/∂x`` and ``Ψ = ∂U/∂θ`` (θ: every tensor the
step reads), the implicit function theorem gives ``dx* = (I − Φ)⁻¹ Ψ dθ``. Hence

* backward (VJP):     ``(I − Φ)ᵀ v = g``,  ``θ̄ = Ψᵀ v``                         (1)
* forward mode (JVP): ``(I − Φ) u = Ψ t``,  ``ẋ = u``                          (2)
* double backward: the VJP (1) is itself a function ``G(g, x*, θ) = Ψᵀ v``. For cotangents
  ``w`` on ``G``, with ``a = Ψ w`` and ``u = (I − Φ)⁻¹ a``:

      ḡ = u,      (x̄, θ̄) = ∂/∂(x, θ) ⟨v, Φ u + Ψ w⟩  (u, v, w held fixed)        (3)

  (differentiate ``⟨w, Ψᵀv⟩ = ⟨v, Ψw⟩`` and use ``dv = (I − Φ)⁻ᵀ dΦᵀ v``). ``x̄`` flows back
  into ``x*``, whose own backward is (1) again, so the second derivative is exact.

:class:`Adjoint` holds one linearization and the solver settings and runs (1) and (2);
:class:`FoldVJP` is the differentiable form of (1) whose backward is (3).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._errors import FoldConvergenceWarning, FoldError, instance_list, report_unconverged
from ._linearize import AdjointOperator, Linearization
from ._solver_base import exact_solve_info
from ._verdicts import backward_remedy
from .protocols import SupportsMatmat, cost_key, normalize_solve_info
from .solvers import SolveInfo, get_solver

__all__ = ["Adjoint", "FoldVJP"]


class _IminusPhi:
    """``u ↦ u − Φu`` (forward mode, JVPs of the step) in the solver protocol."""

    def __init__(self, lin: Linearization):
        self.lin = lin
        self.count = 0

    def __call__(self, u: Tensor) -> Tensor:
        self.count += 1
        return u - self.lin.jvp(u)


class _Masked:
    """An operator acting as the identity on excluded instances (their step is NaN/Inf at
    ``x*``, so ``Φ`` is meaningless there); the other instances are untouched."""

    def __init__(self, op: Any, excluded: Tensor | None):
        self.op, self.excluded = op, excluded
        if isinstance(op, SupportsMatmat):
            self.matmat = self._matmat

    @property
    def count(self) -> int:
        return self.op.count

    @property
    def cost_key(self) -> Any:
        """The step's identity, for ``solver="auto"``'s cost cache."""
        return cost_key(self.op)

    def __call__(self, v: Tensor) -> Tensor:
        out = self.op(v)
        if self.excluded is None:
            return out
        return torch.where(self.excluded[:, None], v, torch.nan_to_num(out))

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.op.matmat(V)
        if self.excluded is None:
            return out
        return torch.where(self.excluded[None, :, None], V, torch.nan_to_num(out))


def _masked(op: Any, excluded: Tensor | None) -> Any:
    """``op`` itself when no instance is excluded (one call layer less per Krylov iteration),
    else :class:`_Masked`."""
    return op if excluded is None else _Masked(op, excluded)


class Adjoint:
    """Solver settings and one linearization: runs the solves (1) and (2) and reports them.

    Args:
        lin: the one differentiable step at ``x*``.
        solver, tol, maxiter, strict, solver_options: as in :func:`fold_plugins.fold`.
        info: the :class:`fold_plugins.FoldInfo` the backward fields are written to.
    """

    def __init__(self, lin: Linearization, solver: str | Callable, tol: float,
                 maxiter: int | None, strict: bool, info: Any, solver_options: dict):
        self.lin = lin
        self.solver_name, self.solver = get_solver(solver)
        self.tol = tol
        self.maxiter = maxiter
        self.strict = strict
        self.info = info
        self.solver_options = solver_options
        self._independence_checked = False
        #: (B,) bool: instances whose step is NaN/Inf at x* (reported by fold): NaN results
        self.excluded: Tensor | None = None

    # ------------------------------------------------------------------ checks
    def check_batch_independence(self) -> None:
        """Raise if the step mixes batch instances (``∂U[i]/∂x[j] ≠ 0`` for ``i ≠ j``).

        One VJP with a cotangent in instance 0 only: every other row of ``Φᵀ e₀`` must be
        exactly zero when instances are independent (autograd produces exact zeros for rows
        that do not depend on the cotangent). Run once per linearization; skipped for a step
        that declares ``batch_independent = True`` (see :func:`fold_plugins.fold`).
        """
        lin = self.lin
        if self._independence_checked or not lin.spec.batched or lin.spec.B < 2 \
                or lin.batch_independent:
            return
        self._independence_checked = True
        # probe from the first instance whose step is finite; an excluded (NaN/Inf) instance's
        # rows are NaN whatever the coupling (0·NaN), so they are not evidence of mixing
        ok = torch.ones(lin.spec.B, dtype=torch.bool, device=lin.x_parts[0].device) \
            if self.excluded is None else ~self.excluded
        if int(ok.sum()) < 2:
            return
        i0 = int(torch.nonzero(ok)[0])
        x0 = lin.x_parts[0]
        probe = x0.new_zeros(lin.spec.B, lin.spec.n)
        probe[i0] = torch.linspace(1.0, 2.0, lin.spec.n, dtype=x0.dtype, device=x0.device)
        rows = lin.vjp_fn()(probe)
        mixed = ((rows != 0) & torch.isfinite(rows)).any(dim=1) & ok
        mixed[i0] = False
        if bool(mixed.any()):
            raise FoldError(
                f"step mixes batch instances: its output for instance {i0} depends on the "
                f"state of instance(s) {instance_list(mixed)} (∂U(x)[{i0}]/∂x[j] ≠ 0; e.g. "
                "a mean over "
                "dim 0, BatchNorm in training mode, or a coupling constraint), but with "
                "batched=True (the default) each instance's linear system is solved and judged "
                "on its own. Pass batched=False to fold the whole batch as one problem, or "
                "remove the coupling from the step.")

    # ------------------------------------------------------------------ (1) backward
    def solve_adjoint(self, grads: Sequence[Tensor | None]) -> Tensor:
        """``v = (I − Φᵀ)⁻¹ g`` as a ``(B, n)`` tensor (NaN rows where ``g`` is NaN/Inf)."""
        lin = self.lin
        g = lin.spec.flatten(list(grads), lin.x_parts).detach()
        if not bool(g.any()):
            self._record(exact_solve_info(g, self.solver_name), 0)
            return torch.zeros_like(g)
        self.check_batch_independence()
        g, finite = self._finite_rhs(g, "incoming gradient of fold's output", "gradients")
        op = _masked(AdjointOperator(lin), self.excluded)
        v, sinfo = self._run(op, g)
        self._record(sinfo, op.count)
        self._judge(sinfo, "folded backward")
        if finite is not None:
            v = torch.where(finite[:, None], v, torch.full_like(v, float("nan")))
        return v

    # ------------------------------------------------------------------ (2) forward mode
    def solve_tangent(self, rhs: Tensor) -> Tensor:
        """``u = (I − Φ)⁻¹ rhs`` for a ``(B, n)`` right-hand side (a JVP ``Ψ t`` or ``Ψ w``)."""
        if not bool(rhs.any()):
            return torch.zeros_like(rhs)
        self.check_batch_independence()
        rhs, finite = self._finite_rhs(rhs.detach(), "tangent of fold's inputs", "tangents")
        op = _masked(_IminusPhi(self.lin), self.excluded)
        u, sinfo = self._run(op, rhs)
        self.info.extra["tangent_solve"] = {"iterations": sinfo.iterations,
                                            "residual": sinfo.residual,
                                            "converged": sinfo.converged}
        self._judge(sinfo, "folded forward-mode (JVP) solve")
        if finite is not None:
            u = torch.where(finite[:, None], u, torch.full_like(u, float("nan")))
        return u

    # ------------------------------------------------------------------ helpers
    def _run(self, op: Any, b: Tensor) -> tuple[Tensor, SolveInfo]:
        t0 = time.perf_counter()
        x, sinfo = self.solver(op, b, x0=None, tol=self.tol, maxiter=self.maxiter,
                               **self.solver_options)
        self.info.backward_time = time.perf_counter() - t0
        if not (isinstance(x, Tensor) and x.shape == b.shape):
            seen = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise FoldError(f"backward solver {self.solver_name!r} returned x of shape {seen} "
                            f"for b of shape {tuple(b.shape)}: a solver must return (x, info) "
                            "with x shaped like b.")
        return x, normalize_solve_info(sinfo, b, self.solver_name)

    def _finite_rhs(self, b: Tensor, what: str, plural: str) -> tuple[Tensor, Tensor | None]:
        finite = torch.isfinite(b).all(dim=1)
        if self.excluded is not None:  # already reported at the call: NaN out, no solve
            b = torch.where(self.excluded[:, None], torch.zeros_like(b), b)
            finite = finite | self.excluded
            if bool(finite.all()):
                return b, ~self.excluded
        elif bool(finite.all()):
            return b, None
        # NaN in, NaN out for those instances, without spending a solve on them
        msg = (f"the {what} is NaN/Inf for instance(s) {instance_list(~finite)}: it comes "
               f"from outside fold (the loss, later layers or the inputs); those instances get "
               f"NaN {plural}")
        if self.strict:
            raise FoldError(msg)
        warnings.warn(msg, FoldConvergenceWarning, stacklevel=5)
        if self.excluded is not None:
            finite = finite & ~self.excluded
        return torch.where(finite[:, None], b, torch.zeros_like(b)), finite

    def _record(self, s: SolveInfo, count: int) -> None:
        info = self.info
        # a dispatching solver (``auto``) names what actually ran: "auto (dense)"
        ran = s.solver
        info.backward_solver = (self.solver_name if not ran or ran == self.solver_name
                                else f"{self.solver_name} ({ran})")
        info.backward_iterations = s.iterations
        info.backward_residual = s.residual
        info.backward_converged = s.converged
        info.backward_matvecs = count
        if s.diverged is not None:
            info.extra["backward_diverged"] = s.diverged
        for key in ("not_isolated", "stagnated"):
            if key in s.extra:
                info.extra[f"backward_{key}"] = s.extra[key]

    def _judge(self, s: SolveInfo, what: str) -> None:
        bad = ~s.converged
        if not bool(bad.any()):
            return
        remedy = backward_remedy(s, self.solver_name, self.maxiter)
        what = (f"{what} ({self.solver_name}, tol {self.tol:.1e}, "
                f"{int(s.iterations[bad].max())} iterations; error = relative residual)")
        report_unconverged(bad, s.residual, what, remedy, self.strict, stacklevel=6)


def _flat_dot(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> Tensor | None:
    total = None
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        term = (x * y).sum()
        total = term if total is None else total + term
    return total


class FoldVJP(torch.autograd.Function):
    """``(g, x*, θ) ↦ Ψᵀ v`` with ``(I − Φ)ᵀ v = g`` — eq. (1) as a differentiable function.

    Its backward is eq. (3); it is called by the folded op's backward when autograd records
    the backward (``create_graph=True``: double backward, Hessians, ``autograd.functional``).
    Third and higher derivatives raise :class:`FoldError`.
    """

    @staticmethod
    def forward(ctx, adj: Adjoint, n_x: int, *tensors: Tensor):
        v = adj.solve_adjoint(tensors[:n_x])
        ctx.adj, ctx.n_x, ctx.v = adj, n_x, v
        ctx.save_for_backward(*tensors)
        return tuple(adj.lin.input_vjp(v))

    @staticmethod
    def backward(ctx, *w: Tensor):
        adj: Adjoint = ctx.adj
        n_x, n_in = ctx.n_x, len(adj.lin.inputs)
        if all(wi is None for wi in w):
            return (None, None, *([None] * (2 * n_x + n_in)))
        w = tuple(torch.zeros_like(p) if wi is None else wi for wi, p in zip(w, adj.lin.inputs))
        if not torch.is_grad_enabled():
            return (None, None, *_second_order(adj, ctx.v, w))
        # create_graph=True again (e.g. autograd.functional.hvp): exact and differentiable in
        # w; a third derivative (w.r.t. g, x* or θ) raises when the engine asks for it
        anchors = [t for t in ctx.saved_tensors if t.requires_grad]
        out = _SecondOrder.apply(adj, ctx.v, n_x, len(w), *w, *anchors)
        return (None, None, *out)


def _hvp(lin: Linearization, v: Tensor, dx: Sequence[Tensor], dp: Sequence[Tensor]
         ) -> list[Tensor]:
    """``∂/∂(x, θ) ⟨∂_(x,θ)⟨v, U⟩, (dx, dp)⟩``: the Hessian of ``⟨v, U⟩`` at ``(x*, θ)`` applied
    to ``(dx, dp)``; returns the ``x`` parts then one tensor per input (zeros where unused)."""
    wrt = list(lin.x_parts) + list(lin.inputs)
    with torch.enable_grad():
        outs = [lin.out_parts[i] for i in lin._diff]
        cot = lin.spec.unflatten(v)
        first = torch.autograd.grad(outs, wrt, [cot[i] for i in lin._diff],
                                    create_graph=True, retain_graph=True, allow_unused=True)
        s = _flat_dot(first, list(dx) + list(dp))
        second: Sequence[Tensor | None]
        if s is None or not s.requires_grad:
            second = [None] * len(wrt)
        else:
            second = torch.autograd.grad(s, wrt, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if h is None else h.detach() for h, t in zip(second, wrt)]


def _psi(lin: Linearization, w: Sequence[Tensor], like: Tensor) -> Tensor:
    """``Ψ w`` as a ``(B, n)`` tensor, by the double-VJP identity ``Ψw = ∂/∂y ⟨Ψᵀy, w⟩``."""
    with torch.enable_grad():
        y = torch.zeros_like(like).requires_grad_(True)
        s = _flat_dot(lin.input_vjp(y, create_graph=True), w)
        if s is None or not s.requires_grad:
            return torch.zeros_like(like)
        (a,) = torch.autograd.grad(s, y, allow_unused=True)
    return torch.zeros_like(like) if a is None else a.detach()


def _second_order(adj: Adjoint, v: Tensor, w: Sequence[Tensor]) -> list[Tensor]:
    """Eq. (3): ``ḡ`` parts (``u``), then ``x̄`` parts, then ``θ̄`` per input."""
    lin = adj.lin
    u = adj.solve_tangent(_psi(lin, w, v))
    u_parts = lin.spec.unflatten(u)
    return [*u_parts, *_hvp(lin, v, u_parts, w)]


class _SecondOrder(torch.autograd.Function):
    """Eq. (3) as a function of ``w`` (linear), for a recorded double backward.

    Backward (the transpose in ``w``): with ``K = (I − Φ)⁻¹Ψ`` and ``H`` the Hessian of
    ``⟨v, U⟩``, eq. (3) is ``w ↦ (Kw, H[Kw; w])``, so for cotangents ``(c_g, c_x, c_θ)``:
    ``(e_x, e_θ) = H[c_x; c_θ]`` and ``w̄ = Ψᵀ(I − Φ)⁻ᵀ(c_g + e_x) + e_θ``. Derivatives w.r.t.
    the anchors (``g``, ``x*``, ``θ``) would be third order: they raise when requested.
    """

    @staticmethod
    def forward(ctx, adj: Adjoint, v: Tensor, n_x: int, n_w: int, *tensors: Tensor):
        w, anchors = tensors[:n_w], tensors[n_w:]
        ctx.adj, ctx.v, ctx.n_x, ctx.n_w = adj, v, n_x, n_w
        ctx.anchors = [torch.autograd.graph.get_gradient_edge(t).node for t in anchors]
        return tuple(_second_order(adj, v, w))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        if any(torch._C._will_engine_execute_node(node) for node in ctx.anchors):
            raise FoldError(
                "third and higher derivatives through fp.fold are not supported (first and "
                "second order are exact): take the second derivative without "
                "create_graph=True, or use finite differences of it.")
        adj: Adjoint = ctx.adj
        lin, n_x = adj.lin, ctx.n_x
        c = [torch.zeros_like(o) if ci is None else ci for ci, o in
             zip(grads, list(lin.x_parts) * 2 + list(lin.inputs))]
        c_g, c_x, c_p = c[:n_x], c[n_x:2 * n_x], c[2 * n_x:]
        e = _hvp(lin, ctx.v, c_x, c_p)
        rhs = [cg + ex for cg, ex in zip(c_g, e[:n_x])]
        z = adj.solve_adjoint(rhs)
        w_bar = [a + b for a, b in zip(lin.input_vjp(z), e[n_x:])]
        return (None, None, None, None, *w_bar, *([None] * len(ctx.anchors)))
