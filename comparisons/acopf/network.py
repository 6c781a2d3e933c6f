"""The polar-form AC-OPF of a MATPOWER case (PowerModels' ACP model), written once for torch
(batched, differentiable) and casadi (Ipopt's symbolic input).

Variables (per unit, radians), in this order::

    y = (va (nbus), vm (nbus), pg (ngen), qg (ngen), dva (nbranch))        # 208 for case57

Equalities ``h(y) = 0``: active and reactive power balance at every bus (2·nbus = 114),
``dva = va_f − va_t`` on every branch (nbranch = 80), the reference angle ``va_ref = 0`` and
every fixed variable (``Pmin = Pmax``: the synchronous condensers' ``pg = 0``). Inequalities
``g(y) ≤ 0``: the thermal limits ``p² + q² ≤ rate_a²`` at both ends of every branch
(2·nbranch = 160), then the finite, non-fixed box bounds (vm, pg, qg, dva) as rows
``y − ub ≤ 0`` and ``lb − y ≤ 0``. Branch flows (π model, tap ``τ``, shift ``σ``,
``t = τe^{jσ}``, series admittance ``g + jb = 1/(r + jx)``, charging split ``b_c/2``)::

    p_fr = (g/τ²) v_f² + (−g t_R + b t_I)/τ² v_f v_t cos δ + (−b t_R − g t_I)/τ² v_f v_t sin δ
    q_fr = −((b + b_c/2)/τ²) v_f² − (−b t_R − g t_I)/τ² v_f v_t cos δ
           + (−g t_R + b t_I)/τ² v_f v_t sin δ
    p_to = g v_t² + (−g t_R − b t_I)/τ² v_f v_t cos δ − (−b t_R + g t_I)/τ² v_f v_t sin δ
    q_to = −(b + b_c/2) v_t² − (−b t_R + g t_I)/τ² v_f v_t cos δ
           − (−g t_R − b t_I)/τ² v_f v_t sin δ

with ``δ = dva``. Objective ``Σ c₂ (S pg)² + c₁ (S pg) + c₀`` ($/h, ``S`` = baseMVA), scaled
by :data:`OBJ_SCALE` for the solvers. The authors' code has the same 208 variables, 114
balance equalities and 160 thermal inequalities but no ``dva = va_f − va_t`` rows (its
``dva`` is free: a relaxation); they are included here, so the optimum is the case's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .case import MatpowerCase

__all__ = ["Network", "OBJ_SCALE", "TorchOps", "CasadiOps"]

#: solvers see ``cost · OBJ_SCALE`` (≈ 3.8 for case57): multipliers of order one
OBJ_SCALE = 1e-4


class TorchOps:
    """Array operations on batched torch tensors ``(B, k)``."""

    @staticmethod
    def take(x: Tensor, idx: np.ndarray) -> Tensor:
        return x[:, torch.as_tensor(idx, device=x.device)]

    @staticmethod
    def mat(A: np.ndarray, v: Tensor) -> Tensor:
        return v @ torch.as_tensor(A, dtype=v.dtype, device=v.device).T

    @staticmethod
    def const(a: np.ndarray, like: Tensor) -> Tensor:
        return torch.as_tensor(a, dtype=like.dtype, device=like.device)

    sin, cos = staticmethod(torch.sin), staticmethod(torch.cos)

    @staticmethod
    def cat(parts: list) -> Tensor:
        return torch.cat(parts, dim=1)


class CasadiOps:
    """The same operations on casadi column vectors (one instance)."""

    def __init__(self) -> None:
        import casadi as ca

        self.ca = ca

    def take(self, x: Any, idx: np.ndarray) -> Any:
        return x[[int(i) for i in idx]]

    def mat(self, A: np.ndarray, v: Any) -> Any:
        return self.ca.mtimes(self.ca.DM(A), v)

    def const(self, a: np.ndarray, like: Any) -> Any:
        return self.ca.DM(np.asarray(a, dtype=np.float64).reshape(-1, 1))

    def sin(self, v: Any) -> Any:
        return self.ca.sin(v)

    def cos(self, v: Any) -> Any:
        return self.ca.cos(v)

    def cat(self, parts: list) -> Any:
        return self.ca.vertcat(*parts)


@dataclass
class Network:
    """Per-unit arrays and index layout of a case's AC-OPF (see the module docstring)."""

    name: str
    base_mva: float
    nbus: int
    ngen: int
    nbranch: int
    ref_bus: int
    pd: np.ndarray          # (nbus,) per unit, the case's loads
    qd: np.ndarray
    gs: np.ndarray          # shunts, per unit at 1 p.u. voltage
    bs: np.ndarray
    load_bus: np.ndarray    # buses carrying a load (PowerModels' "load" entries)
    gen_bus: np.ndarray
    f_bus: np.ndarray
    t_bus: np.ndarray
    coef: dict[str, np.ndarray]   # flow coefficients (module docstring)
    rate_a: np.ndarray
    lb: np.ndarray          # (n,) box bounds of y (±inf where none)
    ub: np.ndarray
    cost: np.ndarray        # (3, ngen): c₂, c₁, c₀ of the case ($/h with pg in MW)
    Cg: np.ndarray          # (nbus, ngen) generator-bus incidence
    Cf: np.ndarray          # (nbus, nbranch) from-bus incidence
    Ct: np.ndarray          # (nbus, nbranch) to-bus incidence

    @classmethod
    def from_case(cls, case: MatpowerCase) -> Network:
        """Build the network of a parsed case (in-service branches and generators only)."""
        S = case.base_mva
        bus, gen, br, gc = case.bus, case.gen, case.branch, case.gencost
        gen_on = gen[:, 7] > 0
        br_on = br[:, 10] > 0
        gen, gc, br = gen[gen_on], gc[gen_on], br[br_on]
        if np.any(gc[:, 0] != 2) or np.any(gc[:, 3] > 3):
            raise ValueError(f"{case.name}: only polynomial costs of degree ≤ 2 are supported.")
        ids = bus[:, 0].astype(np.int64)
        pos = {int(b): i for i, b in enumerate(ids)}
        nb, ng, nl = len(ids), len(gen), len(br)
        refs = np.flatnonzero(bus[:, 1] == 3)
        if len(refs) != 1:
            raise ValueError(f"{case.name}: expected one reference bus, found {len(refs)}.")
        gen_bus = np.array([pos[int(b)] for b in gen[:, 0]])
        f_bus = np.array([pos[int(b)] for b in br[:, 0]])
        t_bus = np.array([pos[int(b)] for b in br[:, 1]])
        r, x, bc = br[:, 2], br[:, 3], br[:, 4]
        g, b = r / (r ** 2 + x ** 2), -x / (r ** 2 + x ** 2)
        tap = np.where(br[:, 8] == 0, 1.0, br[:, 8])
        shift = np.deg2rad(br[:, 9])
        tr, ti, tm = tap * np.cos(shift), tap * np.sin(shift), tap ** 2
        coef = {"pf_ff": g / tm, "pf_c": (-g * tr + b * ti) / tm, "pf_s": (-b * tr - g * ti) / tm,
                "qf_ff": -(b + bc / 2) / tm, "qf_c": -(-b * tr - g * ti) / tm,
                "qf_s": (-g * tr + b * ti) / tm,
                "pt_tt": g, "pt_c": (-g * tr - b * ti) / tm, "pt_s": -(-b * tr + g * ti) / tm,
                "qt_tt": -(b + bc / 2), "qt_c": -(-b * tr + g * ti) / tm,
                "qt_s": -(-g * tr - b * ti) / tm}
        ncost = gc[:, 3].astype(int)
        cost = np.zeros((3, ng))
        for k in range(ng):
            c = gc[k, 4:4 + ncost[k]][::-1]          # c0, c1, c2
            for j, v in enumerate(c):
                cost[2 - j, k] = v
        inf = np.inf
        lb = np.concatenate([np.full(nb, -inf), bus[:, 12], gen[:, 9] / S, gen[:, 4] / S,
                             np.deg2rad(br[:, 11])])
        ub = np.concatenate([np.full(nb, inf), bus[:, 11], gen[:, 8] / S, gen[:, 3] / S,
                             np.deg2rad(br[:, 12])])
        lb[refs[0]] = ub[refs[0]] = 0.0
        rate = br[:, 5] / S
        if np.any(rate <= 0):
            raise ValueError(f"{case.name}: branches without a thermal limit are unsupported.")
        inc = np.zeros((nb, ng))
        inc[gen_bus, np.arange(ng)] = 1.0
        Cf = np.zeros((nb, nl))
        Cf[f_bus, np.arange(nl)] = 1.0
        Ct = np.zeros((nb, nl))
        Ct[t_bus, np.arange(nl)] = 1.0
        return cls(case.name, S, nb, ng, nl, int(refs[0]), bus[:, 2] / S, bus[:, 3] / S,
                   bus[:, 4] / S, bus[:, 5] / S,
                   np.flatnonzero((bus[:, 2] != 0) | (bus[:, 3] != 0)), gen_bus, f_bus, t_bus,
                   coef, rate, lb, ub, cost, inc, Cf, Ct)

    # ------------------------------------------------------------------ layout
    @property
    def n(self) -> int:
        """Number of variables: 2·nbus + 2·ngen + nbranch."""
        return 2 * self.nbus + 2 * self.ngen + self.nbranch

    def slices(self) -> dict[str, slice]:
        """Where va, vm, pg, qg, dva sit in ``y``."""
        nb, ng, nl = self.nbus, self.ngen, self.nbranch
        o = np.cumsum([0, nb, nb, ng, ng, nl])
        return {k: slice(int(o[i]), int(o[i + 1]))
                for i, k in enumerate(("va", "vm", "pg", "qg", "dva"))}

    def fixed(self) -> np.ndarray:
        """Indices of fixed variables (``lb = ub``; includes the reference angle)."""
        return np.flatnonzero(self.lb == self.ub)

    def bounded(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices with a finite upper / lower bound that are not fixed."""
        free = self.lb != self.ub
        return np.flatnonzero(free & np.isfinite(self.ub)), np.flatnonzero(free
                                                                           & np.isfinite(self.lb))

    def counts(self) -> dict[str, int]:
        """Sizes of the NLP: variables, equality rows by kind, inequality rows by kind."""
        ub_idx, lb_idx = self.bounded()
        return {"variables": self.n, "balance": 2 * self.nbus, "angle_links": self.nbranch,
                "fixed": len(self.fixed()), "thermal": 2 * self.nbranch,
                "bounds": len(ub_idx) + len(lb_idx)}

    # ------------------------------------------------------------------ expressions
    def flows(self, vm: Any, dva: Any, ops: Any) -> tuple[Any, Any, Any, Any]:
        """Branch flows ``(p_fr, q_fr, p_to, q_to)`` (module docstring)."""
        k = {key: ops.const(val, vm) for key, val in self.coef.items()}
        vf, vt = ops.take(vm, self.f_bus), ops.take(vm, self.t_bus)
        vff, vtt, vft = vf * vf, vt * vt, vf * vt
        c, s = vft * ops.cos(dva), vft * ops.sin(dva)
        pf = k["pf_ff"] * vff + k["pf_c"] * c + k["pf_s"] * s
        qf = k["qf_ff"] * vff + k["qf_c"] * c + k["qf_s"] * s
        pt = k["pt_tt"] * vtt + k["pt_c"] * c + k["pt_s"] * s
        qt = k["qt_tt"] * vtt + k["qt_c"] * c + k["qt_s"] * s
        return pf, qf, pt, qt

    def parts(self, y: Any, ops: Any) -> dict[str, Any]:
        """va, vm, pg, qg, dva of ``y``."""
        return {k: ops.take(y, np.arange(s.start, s.stop)) for k, s in self.slices().items()}

    def equalities(self, y: Any, pd: Any, qd: Any, ops: Any) -> Any:
        """``h(y)``: P balance, Q balance, angle links, fixed variables (module docstring)."""
        v = self.parts(y, ops)
        pf, qf, pt, qt = self.flows(v["vm"], v["dva"], ops)
        vm2 = v["vm"] * v["vm"]
        gs, bs = ops.const(self.gs, vm2), ops.const(self.bs, vm2)
        bal_p = (ops.mat(self.Cg, v["pg"]) - pd - gs * vm2 - ops.mat(self.Cf, pf)
                 - ops.mat(self.Ct, pt))
        bal_q = (ops.mat(self.Cg, v["qg"]) - qd + bs * vm2 - ops.mat(self.Cf, qf)
                 - ops.mat(self.Ct, qt))
        link = v["dva"] - ops.take(v["va"], self.f_bus) + ops.take(v["va"], self.t_bus)
        fx = self.fixed()
        fixed = ops.take(y, fx) - ops.const(self.lb[fx], vm2)
        return ops.cat([bal_p, bal_q, link, fixed])

    def thermal(self, y: Any, ops: Any) -> Any:
        """Thermal limits ``p² + q² − rate_a²`` (from ends, then to ends)."""
        v = self.parts(y, ops)
        pf, qf, pt, qt = self.flows(v["vm"], v["dva"], ops)
        r2 = ops.const(self.rate_a ** 2, pf)
        return ops.cat([pf * pf + qf * qf - r2, pt * pt + qt * qt - r2])

    def inequalities(self, y: Any, ops: Any) -> Any:
        """``g(y) ≤ 0``: thermal limits, then ``y − ub`` and ``lb − y`` on bounded entries."""
        ub_idx, lb_idx = self.bounded()
        return ops.cat([self.thermal(y, ops),
                        ops.take(y, ub_idx) - ops.const(self.ub[ub_idx], y),
                        ops.const(self.lb[lb_idx], y) - ops.take(y, lb_idx)])

    def generation_cost(self, y: Any, cost: Any, ops: Any) -> Any:
        """Generation cost in $/h; ``cost`` holds (c₂, c₁, c₀) stacked (3·ngen entries)."""
        pg = self.base_mva * self.parts(y, ops)["pg"]
        ng = self.ngen
        idx = np.arange(ng)
        c2, c1, c0 = ops.take(cost, idx), ops.take(cost, idx + ng), ops.take(cost, idx + 2 * ng)
        return c2 * pg * pg + c1 * pg + c0
