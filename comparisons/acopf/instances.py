"""AC-OPF learning instances, the authors' ``bids-opf.jl`` recipe in Python.

Per dataset (seeded): previous-day temperature ``T ~ U(20, 110)``, next-day
``T′ = T + N(0, 20²)``, ``ΔT = |T′ − T|``. The case's generator costs (units with
``Pmax > 0``) are perturbed once, ``c₁ += N(0, (c₁/100)²)``, ``c₂ += N(0, (c₂/100)²)``, and
each instance scales them by ``1 + ΔT/100`` (``c₀ = 0``). Each load is raised, independently
per instance with probability 0.4, by ``0.2·e/max(e)`` of itself, ``e = |T′ − 65|/45`` (P and Q
alike). Ground truth: Ipopt on the resulting AC-OPF. Features ``(T, T′)``.

Note (measured, not assumed): every instance's costs are the dataset's costs times one common
factor, so the optimal dispatch depends on the loads only; a predicted cost vector gives zero
regret exactly when it is proportional to the true one on the units that can produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ipopt import IpoptACOPF
from .network import Network

__all__ = ["ACOPFData", "generate"]

T_MIN, T_MAX, T_SIGMA, T_IDEAL, T_SPREAD = 20.0, 110.0, 20.0, 65.0, 45.0
P_BID, LOAD_MAX = 0.4, 0.2


@dataclass
class ACOPFData:
    """Features, true costs, loads and (optionally) Ipopt ground truth of ``N`` instances.

    Attributes:
        feat: ``(N, 2)`` (T, T′); cost: ``(N, 3·ngen)`` (c₂, c₁, c₀ per unit);
        pd, qd: ``(N, nbus)`` per-unit bus loads; bids: ``(N, nload)`` 0/1 raised loads;
        base_cost: ``(3, ngen)`` the dataset's perturbed costs before the ΔT scaling;
        y, lam, nu, obj, ok: Ipopt solutions, multipliers, optimal cost ($/h), success flags
        (``None`` when not solved).
    """

    feat: np.ndarray
    cost: np.ndarray
    pd: np.ndarray
    qd: np.ndarray
    bids: np.ndarray
    base_cost: np.ndarray
    y: np.ndarray | None = None
    lam: np.ndarray | None = None
    nu: np.ndarray | None = None
    obj: np.ndarray | None = None
    ok: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.feat)


def _draw(net: Network, n: int, rng: np.random.Generator) -> ACOPFData:
    T = rng.uniform(T_MIN, T_MAX, n)
    T2 = T + rng.normal(0.0, T_SIGMA, n)
    dT = np.abs(T2 - T)
    base = net.cost.copy()
    prod = net.ub[net.slices()["pg"]] > 0
    for row in (0, 1):                        # c₂, c₁ of the producing units
        base[row, prod] += rng.normal(0.0, 1.0, prod.sum()) * np.abs(base[row, prod]) / 100
    base[2] = 0.0
    scale = 1.0 + dT / 100
    cost = np.concatenate([base[0] * scale[:, None], base[1] * scale[:, None],
                           np.zeros((n, net.ngen))], axis=1)
    extra = np.abs((T2 - T_IDEAL) / T_SPREAD)
    mult = extra / extra.max() * LOAD_MAX
    bids = rng.binomial(1, P_BID, (n, len(net.load_bus))).astype(np.float64)
    pd = np.tile(net.pd, (n, 1))
    qd = np.tile(net.qd, (n, 1))
    lb = net.load_bus
    pd[:, lb] *= 1 + mult[:, None] * bids
    qd[:, lb] *= 1 + mult[:, None] * bids
    return ACOPFData(np.stack([T, T2], 1), cost, pd, qd, bids, base)


def generate(net: Network, n: int = 64, seed: int = 0,
             solver: IpoptACOPF | None = None) -> ACOPFData:
    """``n`` instances of the recipe above. With ``solver``, 2n are drawn and the first ``n``
    that Ipopt solves are kept (the recipe keeps LOCALLY_SOLVED instances only: raised loads
    can make an instance infeasible); raises ``RuntimeError`` if fewer than ``n`` solve."""
    rng = np.random.default_rng(seed)
    if solver is None:
        return _draw(net, n, rng)
    d = _draw(net, 2 * n, rng)
    keep, sols = [], []
    for i in range(2 * n):
        s = solver.solve(d.cost[i], d.pd[i], d.qd[i])
        if s.success:
            keep.append(i)
            sols.append(s)
        if len(keep) == n:
            break
    if len(keep) < n:
        raise RuntimeError(f"only {len(keep)} of {2 * n} drawn AC-OPF instances solved; "
                           f"{n} were asked for.")
    idx = np.array(keep)
    return ACOPFData(d.feat[idx], d.cost[idx], d.pd[idx], d.qd[idx], d.bids[idx], d.base_cost,
                     np.stack([s.y for s in sols]), np.stack([s.lam for s in sols]),
                     np.stack([s.nu for s in sols]), np.array([s.cost for s in sols]),
                     np.array([s.success for s in sols]))
