"""cvxpylayers' canonical cone program in torch: structure, data, the folded ADMM step.

cvxpylayers hands a :class:`~cvxpylayers.interfaces.base.SolverInterface` the values of

    P (B, nnz_P)   the objective's ½xᵀPx, P symmetric (both triangles stored), CSC order
    q (B, n + 1)   c (the linear objective) and a constant offset (no effect on x)
    A (B, nnz_A)   the augmented matrix [G | h] (m × (n + 1)), CSC order

of the program (SCS's layout: cones in the order zero, nonnegative, second-order, PSD,
exponential)

    min ½xᵀPx + cᵀx   s.t.   s = Gx + h ∈ K,                                   (1)

whose dual ``y ∈ K*`` (what cvxpylayers returns for dual variables, diffcp's convention) solves
``Px + c − Gᵀy = 0``, ``sᵀy = 0``. The folded backward uses one ADMM step on (1) with slack
``s`` and scaled multiplier ``y`` (state ``(x, s, y)``, penalty ``R = diag(ρ)``, proximal
weight ``σ``, ``M = P + σI + GᵀRG`` factored once and held fixed):

    x⁺ = x − M⁻¹ (Px + c − Gᵀ(y + R(s − Gx − h)))
    s⁺ = Π_K(Gx⁺ + h − R⁻¹y)                                                     (2)
    y⁺ = y + R(s⁺ − Gx⁺ − h)

Its fixed points are exactly the KKT points of (1) (``y⁺ = y`` gives ``s = Gx + h``;
``s = Π_K(s − R⁻¹y)`` is ``s ∈ K, y ∈ K*, sᵀy = 0``; then ``x⁺ = x`` is stationarity), and M
is the same constant for every θ, so folding (2) gives the exact implicit derivative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fold_plugins import FoldError
from fold_plugins import cones as K

__all__ = ["ConeProgram", "admm_step", "factor", "kkt_residual"]


@dataclass
class ConeProgram:
    """Sparsity structure of (1), from cvxpylayers' ``LayersContext`` (torch index tensors)."""

    n: int
    m: int
    dims: K.ConeDims
    P_rows: Tensor | None
    P_cols: Tensor | None
    G_rows: Tensor
    G_cols: Tensor
    h_rows: Tensor

    @property
    def nnz_P(self) -> int:
        return 0 if self.P_rows is None else int(self.P_rows.numel())

    @property
    def nnz_G(self) -> int:
        return int(self.G_rows.numel())

    @classmethod
    def from_context(cls, ctx: Any) -> ConeProgram:
        """Structure of cvxpylayers' canonical matrices (raises for unsupported cones)."""
        d = ctx.cone_dims
        bad = [name for name in ("p3d", "pnd") if getattr(d, name, None)]
        if bad:
            raise FoldError(f"FoldedSolver: the problem has power-cone constraints ({bad}); "
                            "the folded step projects onto zero, nonnegative, second-order, "
                            "exponential and PSD cones only. Rewrite the power-cone constraint, "
                            "or use CvxpyLayer's default solver for this problem.")
        dims = K.ConeDims(zero=int(d.zero), nonneg=int(d.nonneg), soc=tuple(d.soc),
                          psd=tuple(d.psd), exp=int(d.exp))
        P_rows = P_cols = None
        if ctx.reduced_P.problem_data_index is not None:
            pidx, pptr, (n_p, _) = ctx.reduced_P.problem_data_index
            pptr = np.asarray(pptr)
            P_rows = torch.as_tensor(np.asarray(pidx), dtype=torch.long)
            P_cols = torch.as_tensor(np.repeat(np.arange(len(pptr) - 1), np.diff(pptr)),
                                     dtype=torch.long)
        if ctx.reduced_A.problem_data_index is None:  # no constraints at all
            idx = cols = np.zeros(0, dtype=np.int64)
            n, m = int(n_p), 0
        else:
            idx, ptr, (m, n1) = ctx.reduced_A.problem_data_index
            idx, ptr = np.asarray(idx), np.asarray(ptr)
            cols = np.repeat(np.arange(n1), np.diff(ptr))
            n, m = int(n1) - 1, int(m)
        if dims.size != m:
            raise FoldError(f"FoldedSolver: cone sizes add up to {dims.size} but the program "
                            f"has {m} constraint rows; this cvxpylayers layout is not supported.")
        last = cols == n
        return cls(n=n, m=m, dims=dims, P_rows=P_rows, P_cols=P_cols,
                   G_rows=torch.as_tensor(idx[~last], dtype=torch.long),
                   G_cols=torch.as_tensor(cols[~last], dtype=torch.long),
                   h_rows=torch.as_tensor(idx[last], dtype=torch.long))

    # ------------------------------------------------------------------ data from values
    def split(self, P: Tensor | None, q: Tensor, A: Tensor
              ) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        """``(P values, c (B, n), G values, h (B, m))`` from cvxpylayers' ``(P, q, A)``."""
        Gv = A[:, :self.nnz_G]
        h = A.new_zeros(A.shape[0], self.m).index_add(1, self.h_rows.to(A.device),
                                                      A[:, self.nnz_G:])
        return P, q[:, :self.n], Gv, h

    def G(self, Gv: Tensor, x: Tensor) -> Tensor:
        """``Gx`` for every instance (``Gv (B, nnz)``, ``x (B, n)``)."""
        r, c = self.G_rows.to(x.device), self.G_cols.to(x.device)
        return x.new_zeros(x.shape[0], self.m).index_add(1, r, Gv * x[:, c])

    def GT(self, Gv: Tensor, y: Tensor) -> Tensor:
        """``Gᵀy`` for every instance."""
        r, c = self.G_rows.to(y.device), self.G_cols.to(y.device)
        return y.new_zeros(y.shape[0], self.n).index_add(1, c, Gv * y[:, r])

    def P(self, Pv: Tensor | None, x: Tensor) -> Tensor:
        """``½(P + Pᵀ)x`` (the gradient of ½xᵀPx for the stored entries, symmetric or not)."""
        if Pv is None:
            return torch.zeros_like(x)
        r, c = self.P_rows.to(x.device), self.P_cols.to(x.device)
        z = x.new_zeros(x.shape[0], self.n)
        return 0.5 * (z.index_add(1, r, Pv * x[:, c]) + z.index_add(1, c, Pv * x[:, r]))

    def dense_P(self, Pv: Tensor | None, B: int, like: Tensor) -> Tensor:
        """Symmetrised dense ``(B, n, n)`` P (zeros for an LP)."""
        out = like.new_zeros(B, self.n, self.n)
        if Pv is None:
            return out
        b = torch.arange(B, device=like.device)[:, None]
        r, c = self.P_rows.to(like.device), self.P_cols.to(like.device)
        out.index_put_((b, r[None], c[None]), Pv.expand(B, -1), accumulate=True)
        return 0.5 * (out + out.transpose(1, 2))

    def dense_G(self, Gv: Tensor) -> Tensor:
        """Dense ``(B, m, n)`` G."""
        B = Gv.shape[0]
        out = Gv.new_zeros(B, self.m, self.n)
        b = torch.arange(B, device=Gv.device)[:, None]
        r, c = self.G_rows.to(Gv.device), self.G_cols.to(Gv.device)
        out.index_put_((b, r[None], c[None]), Gv, accumulate=True)
        return out

    def rho_vector(self, rho: Tensor) -> Tensor:
        """``(B, m)`` penalties: ``ρ`` per instance, ``10³ρ`` on zero-cone (equality) rows
        (constant on every other cone block, so ``Π_K`` stays a projection in (2))."""
        R = rho[:, None].expand(-1, self.m).clone()
        R[:, :self.dims.zero] *= 1e3
        return R


def factor(prog: ConeProgram, Pv: Tensor | None, Gv: Tensor, R: Tensor, sigma: float
           ) -> Tensor:
    """Cholesky factor of ``M = P + σI + GᵀRG`` (no grad), ``(B, n, n)``."""
    with torch.no_grad():
        B = Gv.shape[0]
        Gd = prog.dense_G(Gv)
        M = prog.dense_P(Pv, B, Gv) + Gd.transpose(1, 2) @ (R[:, :, None] * Gd)
        M.diagonal(dim1=1, dim2=2).add_(sigma)
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info != 0).any()):
            bad = torch.nonzero(info).flatten().tolist()
            raise FoldError(f"FoldedSolver: P + σI + GᵀRG is not positive definite for "
                            f"instance(s) {bad} (P not PSD, or non-finite data); check the "
                            "problem data or raise sigma.")
        return L


def admm_step(prog: ConeProgram, L: Tensor, R: Tensor):
    """The update (2) as ``step((x, s, y), P, q, A) -> (x, s, y)`` on cvxpylayers' values."""

    def step(state: tuple[Tensor, Tensor, Tensor], P: Tensor | None, q: Tensor, A: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        x, s, y = state
        Pv, c, Gv, h = prog.split(P, q, A)
        rx = prog.P(Pv, x) + c - prog.GT(Gv, y + R * (s - prog.G(Gv, x) - h))
        x1 = x - torch.cholesky_solve(rx.unsqueeze(-1), L).squeeze(-1)
        Gx1h = prog.G(Gv, x1) + h
        s1 = K.product(Gx1h - y / R, prog.dims)
        y1 = y + R * (s1 - Gx1h)
        return x1, s1, y1

    return step


def kkt_residual(prog: ConeProgram, P: Tensor | None, q: Tensor, A: Tensor, x: Tensor,
                 s: Tensor, y: Tensor) -> Tensor:
    """``(B,)`` relative KKT residual of (1): stationarity, primal and cone feasibility,
    complementarity, each scaled by ``1 +`` the size of its terms."""
    with torch.no_grad():
        Pv, c, Gv, h = prog.split(P, q, A)
        Px, GTy, Gx = prog.P(Pv, x), prog.GT(Gv, y), prog.G(Gv, x)
        amax = lambda t: t.abs().amax(dim=1) if t.shape[1] else t.new_zeros(t.shape[0])  # noqa: E731
        dual = amax(Px + c - GTy) / (1 + torch.maximum(amax(Px), amax(c)).maximum(amax(GTy)))
        prim = amax(Gx + h - s) / (1 + torch.maximum(amax(Gx), amax(h)))
        cone = (amax(s - K.product(s, prog.dims)) + amax(y - K.product(y, prog.dims, dual=True))
                ) / (1 + amax(s) + amax(y))
        gap = (s * y).sum(1).abs() / (1 + (Px * x).sum(1).abs() + (c * x).sum(1).abs())
        return torch.stack([dual, prim, cone, gap]).amax(0)
