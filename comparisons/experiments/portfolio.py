"""The risk-constrained portfolio decision problem and every layer the portfolio suite trains.

Decision (per sample, returns ``c``)::

    x*(c) = argmax_x  cᵀx − ρ‖x‖²   s.t.  xᵀΣx ≤ γ,  1ᵀx ≤ 1,  x ≥ 0          (ρ = 0.1)

written for the library as ``min f = −cᵀx + ρ‖x‖²`` s.t. ``g(x) = (xᵀΣx − γ, 1ᵀx − 1, −x) ≤ 0``.
Σ and γ are scaled by 1e6 (as the authors do; the feasible set is unchanged).

Forward: Clarabel on the equivalent SOCP (``‖Fx‖ ≤ √γ`` with ``Σ = FᵀF``), one instance at a
time; the multiplier of the quadratic constraint is recovered from the cone dual ``(z₀, z₁)``
as ``λ = z₀ / (2√γ)`` (stationarity ``−Fᵀz₁ = 2λΣx``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

import fold_plugins as fp

__all__ = ["Portfolio"]

#: Clarabel tolerances: the SQP step's fixed-point residual at the forward solution is below
#: 1e-8, far inside the fold's 1e-6 acceptance
CLARABEL_TIGHT = {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11,
                  "tol_ktratio": 1e-9, "max_iter": 200}


class Portfolio:
    """The decision problem with covariance ``cov`` (unscaled); ``γ = gamma_factor·w̄ᵀΣw̄``
    with ``w̄ = 1/n`` (the authors' 11.25)."""

    def __init__(self, cov: Tensor, reg: float = 0.1, gamma_factor: float = 11.25,
                 scale: float = 1e6):
        self.n = cov.shape[0]
        self.reg = reg
        self.Sigma = cov * scale
        w = cov.new_full((self.n,), 1.0 / self.n)
        self.gamma = float(gamma_factor * w @ self.Sigma @ w)
        self.F = torch.linalg.cholesky(self.Sigma).T  # Σ = FᵀF
        self._solver_data: dict[bool, tuple] = {}
        # the ADMM-subproblem step drives the unrolled baseline (it works from any start); the
        # folded layer uses the active-set subproblem (same fixed point and derivative at the
        # Clarabel solution, no nested ADMM fold in its backward)
        self.step = fp.steps.sqp(self.f, self.g, None, qp_options={"tol": 1e-12})
        self.fold_step = fp.steps.sqp(self.f, self.g, None, subproblem="active_set")

    # ------------------------------------------------------------------ the problem in torch
    def f(self, x: Tensor, c: Tensor) -> Tensor:
        """Minimisation objective ``−cᵀx + ρ‖x‖²`` per row."""
        return -(c * x).sum(-1) + self.reg * (x * x).sum(-1)

    def g(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Inequalities ``(xᵀΣx − γ, 1ᵀx − 1, −x) ≤ 0`` per row, ``(B, 2 + n)``."""
        risk = ((x @ self.Sigma.to(x)) * x).sum(-1, keepdim=True) - self.gamma
        return torch.cat([risk, x.sum(-1, keepdim=True) - 1, -x], dim=1)

    def value(self, x: Tensor, c: Tensor) -> Tensor:
        """The maximised objective ``cᵀx − ρ‖x‖²`` per row."""
        return -self.f(x, c)

    # ------------------------------------------------------------------ forward (Clarabel)
    def _clarabel(self, quadratic: bool):
        if quadratic not in self._solver_data:
            import clarabel
            from scipy import sparse

            n = self.n
            P = sparse.csc_matrix(2 * self.reg * np.eye(n)) if quadratic else \
                sparse.csc_matrix((n, n))
            F = self.F.detach().cpu().numpy()
            A = sparse.csc_matrix(np.vstack([np.ones((1, n)), -np.eye(n), np.zeros((1, n)), -F]))
            b = np.concatenate([[1.0], np.zeros(n), [math.sqrt(self.gamma)], np.zeros(n)])
            cones = [clarabel.NonnegativeConeT(1 + n), clarabel.SecondOrderConeT(n + 1)]
            settings = clarabel.DefaultSettings()
            settings.verbose = False
            for k, v in CLARABEL_TIGHT.items():
                setattr(settings, k, v)
            solver = clarabel.DefaultSolver(P, np.zeros(n), A, b, cones, settings)
            self._solver_data[quadratic] = solver
        return self._solver_data[quadratic]

    def solve(self, c: Tensor, quadratic: bool = True) -> tuple[Tensor, Tensor]:
        """``(x*, λ*)`` per row of ``c`` (no grad); ``λ*`` are the multipliers of ``g``
        ``(B, 2 + n)``. ``quadratic=False`` drops ``ρ‖x‖²`` (SPO+'s linear objective)."""
        solver = self._clarabel(quadratic)
        cn = c.detach().cpu().double().numpy()
        n = self.n
        xs = np.empty_like(cn)
        lam = np.empty((cn.shape[0], 2 + n))
        bad = []
        for i in range(cn.shape[0]):
            solver.update(q=-cn[i])  # same matrices: only the linear term changes
            sol = solver.solve()
            if str(sol.status) not in ("Solved", "AlmostSolved"):
                bad.append((i, str(sol.status)))
            z = np.asarray(sol.z)
            xs[i] = np.asarray(sol.x)
            lam[i, 0] = z[1 + n] / (2 * math.sqrt(self.gamma))
            lam[i, 1:] = z[:1 + n]
        if bad:
            warnings.warn(f"Portfolio.solve: Clarabel did not solve instance(s) {bad[:5]}",
                          fp.FoldConvergenceWarning, stacklevel=2)
        return c.new_tensor(xs), c.new_tensor(lam)

    # ------------------------------------------------------------------ differentiable layers
    def folded(self, c: Tensor, subproblem: str = "active_set") -> Tensor:
        """Clarabel forward with duals, one SQP step folded (GMRES backward); ``subproblem``
        selects the SQP step's QP solve (``"admm"``: the nested folded ADMM)."""
        xs, lam = self.solve(c)
        nu = c.new_zeros(c.shape[0], 0)
        step = self.fold_step if subproblem == "active_set" else self.step
        with torch.no_grad():  # polish: one active-set Newton step onto the exact KKT point
            xp, lp, _ = self.fold_step((xs, lam, nu), c.detach())
            ok = (lp.amin(1) >= 0) & (self.g(xp).amax(1) <= 1e-12)
            xs = torch.where(ok.view(-1, 1), xp, xs)
            lam = torch.where(ok.view(-1, 1), lp, lam)
        x, _, _ = fp.fold(step, (xs, lam, nu), c, solver="gmres", tol=1e-10)
        return x

    def unrolled(self, c: Tensor, K: int) -> Tensor:
        """K full SQP steps from ``x₀ = 1/n`` (feasible), ``λ₀ = 0``, differentiated by autograd
        through every step (each step's QP subproblem is itself folded)."""
        B, n = c.shape
        x = c.new_full((B, n), 1.0 / n)
        lam = c.new_zeros(B, 2 + n)
        nu = c.new_zeros(B, 0)
        for _ in range(K):
            x, lam, nu = self.step((x, lam, nu), c)
        return x

    def cvxpylayer(self, solver_args: dict | None = None) -> Callable[[Tensor], Tensor]:
        """cvxpylayers' layer of the same problem (diffcp backward, default solver)."""
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        n = self.n
        F = self.F.detach().cpu().numpy()
        x = cp.Variable(n)
        c = cp.Parameter(n)
        prob = cp.Problem(cp.Maximize(c @ x - self.reg * cp.sum_squares(x)),
                          [cp.sum_squares(F @ x) <= self.gamma, cp.sum(x) <= 1, x >= 0])
        layer = CvxpyLayer(prob, parameters=[c], variables=[x])
        args = {"n_jobs_forward": 1, "n_jobs_backward": 1, **(solver_args or {})}

        def call(c_hat: Tensor) -> Tensor:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"__array__ implementation")
                (xl,) = layer(c_hat.to("cpu", torch.float64), solver_args=args)
            return xl.to(c_hat.device, c_hat.dtype)
        return call

    def spo_plus(self, c_hat: Tensor, c: Tensor, x_true_lin: Tensor) -> Tensor:
        """SPO+ loss on the linear objective ``cᵀx`` over the same feasible set (the
        minimisation form with costs ``−c``, ``−ĉ``): ``max_x (2ĉ − c)ᵀx − 2ĉᵀx*(c) + cᵀx*(c)``
        ≥ 0 (0 at ĉ = c); its gradient in ``ĉ`` is ``2(x*(2ĉ − c) − x*(c))`` (x* maximises)."""
        x_adv, _ = self.solve(2 * c_hat.detach() - c, quadratic=False)
        return ((2 * c_hat - c) * x_adv).sum(-1) - (2 * c_hat * x_true_lin).sum(-1) \
            + (c * x_true_lin).sum(-1)

    def regret(self, x_hat: Tensor, x_true: Tensor, c: Tensor) -> float:
        """Normalised regret ``Σ (v(x*(c)) − v(x̂)) / Σ |v(x*(c))|``, ``v = cᵀx − ρ‖x‖²``."""
        v_opt = self.value(x_true, c)
        return float((v_opt - self.value(x_hat, c)).sum() / v_opt.abs().sum())
