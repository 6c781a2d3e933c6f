"""Synthetic data of the three learning experiments, written from the published recipes.

* :func:`portfolio_data` — the SPO+ portfolio generator (Elmachtoub & Grigas): features
  ``x ~ N(0, I_p)``, mean returns ``r̄ = (0.05/√p · Bx + 0.1^{1/deg})^deg``, realised returns
  ``r = r̄ + Lf + 0.01τ ε`` with ``f ~ N(0, I_4)``, ``ε ~ N(0, I_n)``, covariance
  ``Σ = LLᵀ + (0.01τ)² I``.
* :func:`optnet_signals` — OptNet's piecewise-constant 1-D signals (1–9 breakpoints, heights
  in 10..99, Gaussian noise σ).
* :func:`nonconvex_qp_data` — DC3's nonconvex QP ``½yᵀQy + pᵀsin(y)`` s.t. ``Ay = b``,
  ``Gy ≤ h`` with ``Q = diag(U[0,1])``, ``A, G ~ N(0,1)``, ``h = Σ_j |(GA⁺)_ij|``,
  ``b ~ U[0,1]``; per instance ``p ~ U[0,1]^n`` and features from a fixed random network.

All draws use a CPU ``torch.Generator`` in float64 (same numbers on every device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PortfolioData", "portfolio_data", "optnet_signals", "NonconvexQP",
           "nonconvex_qp_data"]

F64 = torch.float64


@dataclass
class PortfolioData:
    """Features ``x (N, p)``, realised returns ``c (N, n)``, mean returns ``mean (N, n)``,
    covariance ``cov (n, n)`` and the factor loadings ``L (n, 4)``."""

    x: Tensor
    c: Tensor
    mean: Tensor
    cov: Tensor
    L: Tensor


def portfolio_data(N: int, p: int, n: int, deg: int, tau: float, seed: int) -> PortfolioData:
    """The SPO+ portfolio generator (see the module docstring), float64 on the CPU."""
    if deg < 1 or N < 1 or p < 1 or n < 1:
        raise ValueError(f"portfolio_data: N, p, n, deg must be ≥ 1, got {N}, {p}, {n}, {deg}.")
    g = torch.Generator().manual_seed(seed)
    B = torch.bernoulli(torch.full((n, p), 0.5, dtype=F64), generator=g)
    L = (torch.rand(n, 4, generator=g, dtype=F64) * 2 - 1) * 0.0025 * tau
    x = torch.randn(N, p, generator=g, dtype=F64)
    mean = (0.05 * x @ B.T / math.sqrt(p) + 0.1 ** (1.0 / deg)) ** deg
    f = torch.randn(N, 4, generator=g, dtype=F64)
    eps = torch.randn(N, n, generator=g, dtype=F64)
    c = mean + f @ L.T + 0.01 * tau * eps
    cov = L @ L.T + (0.01 * tau) ** 2 * torch.eye(n, dtype=F64)
    return PortfolioData(x, c, mean, cov, L)


def optnet_signals(N: int, n: int = 100, sigma: float = 10.0, seed: int = 0,
                   max_breaks: int = 9) -> tuple[Tensor, Tensor]:
    """``(clean, noisy)`` piecewise-constant signals ``(N, n)``: 1..max_breaks breakpoints at
    distinct positions in 1..n−1, each piece's height uniform in the integers 10..99, plus
    ``N(0, σ²)`` noise."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.empty(N, n, dtype=F64)
    for i in range(N):
        k = int(torch.randint(1, max_breaks + 1, (1,), generator=g))
        cuts = (torch.randperm(n - 1, generator=g)[:k] + 1).sort().values.tolist()
        edges = [0, *cuts, n]
        heights = torch.randint(10, 100, (k + 1,), generator=g).to(F64)
        for j in range(k + 1):
            clean[i, edges[j]:edges[j + 1]] = heights[j]
    noisy = clean + sigma * torch.randn(N, n, generator=g, dtype=F64)
    return clean, noisy


@dataclass
class NonconvexQP:
    """DC3's nonconvex QP family: ``Q (n,)`` (the diagonal), ``A (m_eq, n)``, ``b (m_eq,)``,
    ``G (m_in, n)``, ``h (m_in,)``; per instance true ``p (N, n)`` and features ``z (N, d)``."""

    Q: Tensor
    A: Tensor
    b: Tensor
    G: Tensor
    h: Tensor
    p: Tensor
    z: Tensor

    def objective(self, y: Tensor, p: Tensor) -> Tensor:
        """``½ yᵀQy + pᵀ sin(y)`` per row."""
        return 0.5 * (self.Q * y * y).sum(-1) + (p * torch.sin(y)).sum(-1)


def feature_net(d: int, hidden: int, layers: int, seed: int) -> torch.nn.Sequential:
    """A fixed random MLP (ReLU, default init) mapping true parameters to features."""
    g = torch.Generator().manual_seed(seed)
    dims = [d] + [hidden] * layers + [d]
    mods: list[torch.nn.Module] = []
    for i in range(len(dims) - 1):
        lin = torch.nn.Linear(dims[i], dims[i + 1]).to(F64)
        bound = 1 / math.sqrt(dims[i])
        with torch.no_grad():
            lin.weight.copy_((torch.rand(dims[i + 1], dims[i], generator=g, dtype=F64) * 2 - 1)
                             * bound)
            lin.bias.copy_((torch.rand(dims[i + 1], generator=g, dtype=F64) * 2 - 1) * bound)
        mods += [lin, torch.nn.ReLU()] if i < len(dims) - 2 else [lin]
    net = torch.nn.Sequential(*mods)
    net.requires_grad_(False)
    return net


def nonconvex_qp_data(N: int, n: int, m_eq: int, m_in: int, seed: int,
                      feat_layers: int = 2) -> NonconvexQP:
    """DC3's recipe (module docstring); features ``z = net(p)`` with a fixed random network
    (``feat_layers`` hidden layers of 50)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.rand(n, generator=g, dtype=F64)
    A = torch.randn(m_eq, n, generator=g, dtype=F64)
    G = torch.randn(m_in, n, generator=g, dtype=F64)
    h = (G @ torch.linalg.pinv(A)).abs().sum(1)
    b = torch.rand(m_eq, generator=g, dtype=F64)
    p = torch.rand(N, n, generator=g, dtype=F64)
    with torch.no_grad():
        z = feature_net(n, 50, feat_layers, seed + 1)(p)
    return NonconvexQP(Q, A, b, G, h, p, z)
