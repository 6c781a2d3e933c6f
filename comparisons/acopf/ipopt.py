"""Ipopt (through casadi) forward solve of the AC-OPF, parameterised by costs and loads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .network import OBJ_SCALE, CasadiOps, Network

__all__ = ["IpoptACOPF", "OPFSolution"]


@dataclass
class OPFSolution:
    """One Ipopt solve: primal ``y``, the multipliers in the step's sign convention
    (``λ ≥ 0`` of ``g ≤ 0`` rows, ``ν`` of ``h = 0`` rows, Lagrangian ``f + λᵀg + νᵀh`` with
    ``f = OBJ_SCALE · cost``), the cost in $/h and Ipopt's status."""

    y: np.ndarray
    lam: np.ndarray
    nu: np.ndarray
    cost: float
    status: str
    success: bool
    iterations: int


class IpoptACOPF:
    """The network's AC-OPF as a casadi ``nlpsol('ipopt')``, built once; costs (3·ngen) and
    loads (pd, qd per bus, per unit) are parameters.

    Args:
        net: the network.
        tol: Ipopt ``tol`` and ``constr_viol_tol``.
        max_iter: Ipopt iteration cap.
    """

    def __init__(self, net: Network, tol: float = 1e-10, max_iter: int = 500) -> None:
        import casadi as ca

        self.net, self.ca = net, ca
        ops = CasadiOps()
        nb, ng = net.nbus, net.ngen
        y = ca.SX.sym("y", net.n)
        p = ca.SX.sym("p", 3 * ng + 2 * nb)
        cost, pd, qd = p[:3 * ng], p[3 * ng:3 * ng + nb], p[3 * ng + nb:]
        f = OBJ_SCALE * ca.sum1(net.generation_cost(y, cost, ops))
        h = net.equalities(y, pd, qd, ops)
        th = net.thermal(y, ops)
        self.m_eq, self.n_th = int(h.shape[0]), int(th.shape[0])
        g = ca.vertcat(h, th)
        opts = {"ipopt.tol": tol, "ipopt.constr_viol_tol": tol, "ipopt.acceptable_iter": 0,
                "ipopt.max_iter": max_iter, "ipopt.print_level": 0, "print_time": 0,
                "ipopt.sb": "yes", "ipopt.mu_strategy": "adaptive"}
        self.solver = ca.nlpsol("acopf", "ipopt", {"x": y, "p": p, "f": f, "g": g}, opts)
        free = net.lb != net.ub
        self.lbx = np.where(free, net.lb, -np.inf)   # fixed variables are equality rows
        self.ubx = np.where(free, net.ub, np.inf)
        self.lbg = np.concatenate([np.zeros(self.m_eq), np.full(self.n_th, -np.inf)])
        self.ubg = np.zeros(self.m_eq + self.n_th)
        self.y0 = self.flat_start()

    def flat_start(self) -> np.ndarray:
        """va = 0, vm = 1, pg/qg at the middle of their bounds, dva = 0."""
        net, sl = self.net, self.net.slices()
        y = np.zeros(net.n)
        y[sl["vm"]] = 1.0
        for k in ("pg", "qg"):
            y[sl[k]] = 0.5 * (net.lb[sl[k]] + net.ub[sl[k]])
        return y

    def solve(self, cost: np.ndarray, pd: np.ndarray | None = None, qd: np.ndarray | None = None,
              y0: np.ndarray | None = None) -> OPFSolution:
        """Solve for costs ``(3·ngen,)`` (c₂, c₁, c₀) and per-unit bus loads (default: the
        case's)."""
        net = self.net
        pd = net.pd if pd is None else pd
        qd = net.qd if qd is None else qd
        p = np.concatenate([np.asarray(cost, dtype=np.float64).ravel(), pd, qd])
        r = self.solver(x0=self.y0 if y0 is None else y0, p=p, lbx=self.lbx, ubx=self.ubx,
                        lbg=self.lbg, ubg=self.ubg)
        stats = self.solver.stats()
        y = np.asarray(r["x"]).ravel()
        lam_g = np.asarray(r["lam_g"]).ravel()
        lam_x = np.asarray(r["lam_x"]).ravel()
        ub_idx, lb_idx = net.bounded()
        lam = np.concatenate([lam_g[self.m_eq:], np.maximum(lam_x[ub_idx], 0.0),
                              np.maximum(-lam_x[lb_idx], 0.0)])
        nu = lam_g[:self.m_eq].copy()
        total = float(np.asarray(r["f"]).ravel()[0]) / OBJ_SCALE
        return OPFSolution(y, lam, nu, total, stats["return_status"], bool(stats["success"]),
                           int(stats["iter_count"]))
