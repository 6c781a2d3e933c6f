"""DC3's nonconvex QP as a decision layer: Ipopt forward (CasADi), folded backward.

``y*(p) = argmin ½yᵀQy + pᵀsin(y)  s.t.  Ay = b,  Gy ≤ h`` (a local minimiser from
``y₀ = A⁺b``). Two folded backward passes of the same Ipopt solution:

* **folded SQP** — ``fp.steps.sqp`` (active-set QP subproblem) at the Ipopt primal-dual point;
* **folded PGD** — ``U(y) = Π_{Ay=b, Gy≤h}(y − α∇f(y, p))`` with the polytope projection
  ``fp.projections.polytope`` (an ADMM QP whose own solve is folded).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

import fold_plugins as fp

from .generators import NonconvexQP

__all__ = ["NonconvexLayer", "cvxpy_verdict"]


class NonconvexLayer:
    """Forward (Ipopt) and folded layers for one :class:`NonconvexQP` family."""

    def __init__(self, prob: NonconvexQP, alpha: float = 0.1):
        self.prob = prob
        self.alpha = alpha
        self.n = prob.Q.shape[0]
        self.y0 = torch.linalg.pinv(prob.A) @ prob.b
        self._nlp = None
        self.sqp_step = fp.steps.sqp(self.f, self.g, self.h, subproblem="active_set")
        self.pgd_step = fp.steps.projected_gradient(
            lambda y, p: self.prob.Q * y + p * torch.cos(y),
            lambda v: fp.projections.polytope(v, self.prob.A.to(v), self.prob.b.to(v),
                                              self.prob.G.to(v), self.prob.h.to(v)),
            alpha)
        self.ipopt_failures = 0

    def f(self, y: Tensor, p: Tensor) -> Tensor:
        return self.prob.objective(y, p)

    def g(self, y: Tensor, p: Tensor | None = None) -> Tensor:
        return y @ self.prob.G.to(y).T - self.prob.h.to(y)

    def h(self, y: Tensor, p: Tensor | None = None) -> Tensor:
        return y @ self.prob.A.to(y).T - self.prob.b.to(y)

    def _solver(self):
        if self._nlp is None:
            import casadi as ca

            n = self.n
            Q, A, b, G, h = (t.cpu().numpy() for t in (self.prob.Q, self.prob.A, self.prob.b,
                                                        self.prob.G, self.prob.h))
            y = ca.SX.sym("y", n)
            p = ca.SX.sym("p", n)
            obj = 0.5 * ca.dot(Q * y, y) + ca.dot(p, ca.sin(y))
            cons = ca.vertcat(ca.mtimes(ca.DM(A), y), ca.mtimes(ca.DM(G), y))
            opts = {"ipopt.print_level": 0, "print_time": 0, "ipopt.tol": 1e-12,
                    "ipopt.acceptable_tol": 1e-10, "ipopt.max_iter": 500,
                    "ipopt.sb": "yes", "ipopt.mu_strategy": "adaptive"}
            solver = ca.nlpsol("nc", "ipopt", {"x": y, "p": p, "f": obj, "g": cons}, opts)
            lbg = np.concatenate([b, -np.inf * np.ones(len(h))])
            ubg = np.concatenate([b, h])
            self._nlp = (solver, lbg, ubg)
        return self._nlp

    def solve(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(y*, λ*, ν*)`` per row of ``p`` by Ipopt (no grad): ``λ`` for ``Gy ≤ h``, ``ν`` for
        ``Ay = b`` (Lagrangian ``f + λᵀ(Gy − h) + νᵀ(Ay − b)``)."""
        solver, lbg, ubg = self._solver()
        m_eq = self.prob.A.shape[0]
        pn = p.detach().cpu().double().numpy()
        y0 = self.y0.cpu().numpy()
        ys, lams, nus = [], [], []
        for i in range(pn.shape[0]):
            sol = solver(x0=y0, p=pn[i], lbg=lbg, ubg=ubg)
            if not solver.stats()["success"]:
                self.ipopt_failures += 1
            lg = np.asarray(sol["lam_g"]).ravel()
            ys.append(np.asarray(sol["x"]).ravel())
            nus.append(lg[:m_eq])
            lams.append(np.maximum(lg[m_eq:], 0.0))
        return p.new_tensor(np.array(ys)), p.new_tensor(np.array(lams)), \
            p.new_tensor(np.array(nus))

    def folded_sqp(self, p: Tensor) -> Tensor:
        y, lam, nu = self.solve(p)
        out, _, _ = fp.fold(self.sqp_step, (y, lam, nu), p, solver="gmres", tol=1e-10)
        return out

    def folded_pgd(self, p: Tensor) -> Tensor:
        y, _, _ = self.solve(p)
        return fp.fold(self.pgd_step, y, p, solver="gmres", tol=1e-10)

    def relative_regret(self, y_hat: Tensor, y_true: Tensor, p: Tensor) -> Tensor:
        """``|f(ŷ, p) − f(y*, p)| / |f(y*, p)|`` per row."""
        f_true = self.f(y_true, p)
        return (self.f(y_hat, p) - f_true).abs() / f_true.abs()


def cvxpy_verdict() -> str:
    """What cvxpy/cvxpylayers say when handed this problem (the error text)."""
    try:
        import cvxpy as cp
    except ImportError as e:  # pragma: no cover - depends on the environment
        return f"cvxpy not installed ({e})"
    msgs = []
    y = cp.Variable(3)
    p = cp.Parameter(3)
    try:
        cp.sin(y)
    except AttributeError as e:
        msgs.append(f"`cp.sin(y)`: AttributeError: {e}")
    try:
        from cvxpylayers.torch import CvxpyLayer

        # the closest expressible nonconvex objective: a concave quadratic part
        prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(p, y)) - cp.sum_squares(y)),
                          [cp.sum(y) == 1, y <= 1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CvxpyLayer(prob, parameters=[p], variables=[y])
        msgs.append("CvxpyLayer accepted a nonconvex problem (unexpected)")
    except Exception as e:  # noqa: BLE001 - the error text is the result
        msgs.append(f"`CvxpyLayer` of a nonconvex (concave-quadratic) objective: "
                    f"{type(e).__name__}: {str(e).splitlines()[0]}")
    return "; ".join(msgs)
