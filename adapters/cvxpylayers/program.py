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
is the same constant for every θ, so folding (2) gives the exact implicit derivative. The
backward's GMRES can be preconditioned by the inverse of ``I − Φᵀ`` built from P, G, R and
the projection's derivative (:mod:`.preconditioner`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fold_plugins import FoldError
from fold_plugins import cones as K
from fold_plugins.internal import self_contained

__all__ = ["ConeProgram", "ConeData", "admm_step", "factor", "kkt_residual", "weighted_gram",
           "x_update", "dense_mv", "shared", "chol_solve"]

#: A sparse canonical matrix denser than this is applied as a cached dense matrix.
DENSE_FRACTION = 0.05


def chol_solve(L: Tensor, b: Tensor) -> Tensor:
    """``(LLᵀ)⁻¹ b`` per instance (``L (B, n, n)`` or shared ``(1, n, n)``, ``b (B, n)``) by two
    triangular solves (``cholesky_solve`` copies ``L`` on every call: 3× slower at n = 200)."""
    if L.shape[0] == 1:  # one factor for the batch: the instances are the columns
        z = torch.linalg.solve_triangular(L[0], b.transpose(0, 1), upper=False)
        return torch.linalg.solve_triangular(L[0].transpose(0, 1), z, upper=True).transpose(0, 1)
    z = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)


def dense_mv(D: Tensor, x: Tensor) -> Tensor:
    """``D x`` per instance for ``D (B, m, n)``; ``D (1, m, n)`` (shared by every instance)
    as one matrix product ``x Dᵀ`` (reads D once, not B times)."""
    if D.shape[0] == 1:
        return x @ D[0].transpose(0, 1)
    return (D @ x.unsqueeze(-1)).squeeze(-1)


class _DenseMatvec(torch.autograd.Function):
    """``D x`` with a cached dense ``D`` (and its contiguous transpose for the VJP ``Dᵀu``);
    a ``(1, m, n)`` ``D`` is shared by every instance."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, D: Tensor, DT: Tensor) -> Tensor:
        return x @ DT[0] if D.shape[0] == 1 else (D @ x.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1] if inputs[1].shape[0] == 1 else inputs[2])

    @staticmethod
    def backward(ctx, u: Tensor):
        (S,) = ctx.saved_tensors  # D (shared) or Dᵀ (per instance)
        return (u @ S[0] if S.shape[0] == 1 else (S @ u.unsqueeze(-1)).squeeze(-1)), None, None


class _ValuesGrad(torch.autograd.Function):
    """Zero in value; carries ``∂(Mx̄)/∂values = u[rows]·x̄[cols]`` for a COO matrix ``M`` at a
    fixed ``x̄``. Kept apart from :class:`_DenseMatvec` so that VJPs with respect to ``x``
    (every GMRES iteration) never compute the ``nnz``-sized value gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(values: Tensor, xbar: Tensor, rows: Tensor, cols: Tensor, m: int) -> Tensor:
        return xbar.new_zeros(*xbar.shape[:-1], m)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, xbar, rows, cols, _ = inputs
        ctx.save_for_backward(xbar, rows, cols)

    @staticmethod
    def backward(ctx, u: Tensor):
        xbar, rows, cols = ctx.saved_tensors
        nx = xbar.shape[-1]
        if rows.numel() * 4 >= u.shape[-1] * nx:  # dense: one gather from the outer product
            outer = (u.unsqueeze(-1) * xbar.unsqueeze(-2)).flatten(-2)
            return outer.index_select(-1, rows * nx + cols), None, None, None, None
        return u.index_select(-1, rows) * xbar.index_select(-1, cols), None, None, None, None


def _coo_matvec(values: Tensor, x: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int],
                dense: tuple[Tensor, Tensor] | None, transpose: bool = False) -> Tensor:
    """``Mx`` (or ``Mᵀx``) for the COO matrix ``M`` with these ``values``, per instance;
    ``dense = (M, Mᵀ)`` cached (detached) when ``M`` is dense enough."""
    r, c = (cols, rows) if transpose else (rows, cols)
    r, c = r.to(x.device), c.to(x.device)
    m = shape[1] if transpose else shape[0]
    if dense is not None:
        D, DT = (dense[1], dense[0]) if transpose else dense
        return _DenseMatvec.apply(x, D, DT) + _ValuesGrad.apply(values, x.detach(), r, c, m)
    return x.new_zeros(x.shape[0], m).index_add(1, r, values * x[:, c])


def _depends_on_parameters(reduced: Any, first: int | None) -> bool:
    """Whether the first ``first`` canonical values (all: ``None``) of cvxpy's ``ReducedMat``
    (rows: values in CSC order; columns: parameter entries, then the constant) depend on a
    parameter. Unknown layouts count as dependent (gradients are then formed)."""
    mat = getattr(reduced, "reduced_mat", None)
    if mat is None or not hasattr(mat, "tocsr"):
        return True
    mat = mat.tocsr()
    if mat.shape[1] <= 1:
        return False
    return bool(abs(mat[:first, :-1]).sum() != 0)


def shared(values: Tensor) -> bool:
    """Whether every instance (row) of ``values (B, k)`` is the same."""
    return values.shape[0] == 1 or bool((values == values[:1]).all())


@dataclass(frozen=True)
class ConeData:
    """One call's data of (1), parsed once from cvxpylayers' ``(P, q, A)`` values
    (:meth:`ConeProgram.parse`) and handed to every stage of the call (forward, polish, KKT
    check, penalty, factor, preconditioner): ``P`` values ``(B, nnz_P)`` or ``None`` (an LP),
    ``c (B, n)``, ``G`` values ``(B, nnz_G)``, ``h (B, m)``."""

    P: Tensor | None
    c: Tensor
    G: Tensor
    h: Tensor

    def detach(self) -> ConeData:
        return ConeData(None if self.P is None else self.P.detach(), self.c.detach(),
                        self.G.detach(), self.h.detach())


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
    #: whether P's / G's values depend on a parameter (else no gradient is formed for them)
    P_param: bool = True
    G_param: bool = True
    _pairs: Any = field(default=None, repr=False, compare=False)

    @property
    def nnz_P(self) -> int:
        return 0 if self.P_rows is None else int(self.P_rows.numel())

    @property
    def nnz_G(self) -> int:
        return int(self.G_rows.numel())

    def P_index(self) -> tuple[Tensor, Tensor]:
        """``(P_rows, P_cols)``; raises where the program has no quadratic objective."""
        if self.P_rows is None or self.P_cols is None:
            raise FoldError("FoldedSolver: P values were given for a program without a "
                            "quadratic objective (no P structure in cvxpylayers' context).")
        return self.P_rows, self.P_cols

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
        nnz_G = int((~last).sum())
        return cls(n=n, m=m, dims=dims, P_rows=P_rows, P_cols=P_cols,
                   G_rows=torch.as_tensor(idx[~last], dtype=torch.long),
                   G_cols=torch.as_tensor(cols[~last], dtype=torch.long),
                   h_rows=torch.as_tensor(idx[last], dtype=torch.long),
                   P_param=_depends_on_parameters(ctx.reduced_P, None),
                   G_param=_depends_on_parameters(ctx.reduced_A, nnz_G))

    # ------------------------------------------------------------------ data from values
    def parse(self, P: Tensor | None, q: Tensor, A: Tensor) -> ConeData:
        """The data of (1) from cvxpylayers' ``(P, q, A)`` (differentiable: the folded step
        parses its arguments on every call; every other stage receives one parsed copy)."""
        Gv = A[:, :self.nnz_G] if self.G_param else A[:, :self.nnz_G].detach()
        P = P if (P is None or self.P_param) else P.detach()
        h = A.new_zeros(A.shape[0], self.m).index_add(1, self.h_rows.to(A.device),
                                                      A[:, self.nnz_G:])
        return ConeData(P, q[:, :self.n], Gv, h)

    def G(self, Gv: Tensor, x: Tensor, dense: Any = None) -> Tensor:
        """``Gx`` for every instance (``Gv (B, nnz)``, ``x (B, n)``; ``dense``: cached G)."""
        return _coo_matvec(Gv, x, self.G_rows, self.G_cols, (self.m, self.n), dense)

    def GT(self, Gv: Tensor, y: Tensor, dense: Any = None) -> Tensor:
        """``Gᵀy`` for every instance."""
        return _coo_matvec(Gv, y, self.G_rows, self.G_cols, (self.m, self.n), dense, True)

    def P(self, Pv: Tensor | None, x: Tensor, dense: Any = None) -> Tensor:
        """``½(P + Pᵀ)x`` (the gradient of ½xᵀPx for the stored entries, symmetric or not)."""
        if Pv is None:
            return torch.zeros_like(x)
        sh = (self.n, self.n)
        rows, cols = self.P_index()
        return 0.5 * (_coo_matvec(Pv, x, rows, cols, sh, dense)
                      + _coo_matvec(Pv, x, rows, cols, sh, dense, True))

    def dense_caches(self, Pv: Tensor | None, Gv: Tensor) -> tuple[Any, Any]:
        """Detached dense ``(P, Pᵀ)`` and ``(G, Gᵀ)`` (contiguous) where they are denser than
        :data:`DENSE_FRACTION` (else ``None``: applied by scatter); ``(1, ·, ·)`` where every
        instance has the same values (e.g. only ``c`` or ``h`` is a parameter)."""
        with torch.no_grad():
            Pd: tuple[Tensor, Tensor] | None = None
            Gd: tuple[Tensor, Tensor] | None = None
            if Pv is not None and self.nnz_P > DENSE_FRACTION * self.n * self.n:
                Pv = Pv.detach()
                Pv = Pv[:1] if shared(Pv) else Pv
                B = Pv.shape[0]
                Pm = Pv.new_zeros(B, self.n, self.n)
                b = torch.arange(B, device=Pv.device)[:, None]
                rows, cols = self.P_index()
                Pm.index_put_((b, rows.to(Pv.device)[None], cols.to(Pv.device)[None]), Pv,
                              accumulate=True)
                Pd = (Pm, Pm.transpose(1, 2).contiguous())
            if self.nnz_G > DENSE_FRACTION * self.m * self.n:
                Gv = Gv.detach()
                G = self.dense_G(Gv[:1] if shared(Gv) else Gv)
                Gd = (G, G.transpose(1, 2).contiguous())
            return Pd, Gd

    def dense_P(self, Pv: Tensor | None, B: int, like: Tensor) -> Tensor:
        """Symmetrised dense ``(B, n, n)`` P (zeros for an LP)."""
        out = like.new_zeros(B, self.n, self.n)
        if Pv is None:
            return out
        b = torch.arange(B, device=like.device)[:, None]
        rows, cols = self.P_index()
        r, c = rows.to(like.device), cols.to(like.device)
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


#: Most entry pairs sharing a row of G for which :func:`weighted_gram` scatters pair products
#: (beyond it: one sparse product per instance).
MAX_GRAM_PAIRS = 1 << 22


def _row_pairs(prog: ConeProgram) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(row, entry i, entry j)`` for every ordered pair of G's entries in one row (cached
    on ``prog``); ``None`` where there are more than :data:`MAX_GRAM_PAIRS`."""
    if prog._pairs is None:
        rows = prog.G_rows.numpy()
        counts = np.bincount(rows, minlength=prog.m)
        if int((counts.astype(np.int64) ** 2).sum()) > MAX_GRAM_PAIRS:
            prog._pairs = False
        else:
            order = np.argsort(rows, kind="stable")
            starts = np.concatenate([[0], np.cumsum(counts)])
            ii, jj = [], []
            for k in np.nonzero(counts)[0]:
                e = order[starts[k]:starts[k + 1]]
                ii.append(np.repeat(e, len(e)))
                jj.append(np.tile(e, len(e)))
            i = np.concatenate(ii) if ii else np.zeros(0, dtype=np.int64)
            j = np.concatenate(jj) if jj else np.zeros(0, dtype=np.int64)
            prog._pairs = tuple(torch.as_tensor(a, dtype=torch.long)
                                for a in (rows[i], i, j))
    return prog._pairs or None


def weighted_gram(prog: ConeProgram, Gv: Tensor, w: Tensor) -> Tensor:
    """``Gᵀ diag(w) G`` (no grad), ``(B, n, n)``, from the sparse G (never a dense
    ``(B, m, n)`` G); ``w (B, m)``: ``Σ_r w_r G_ri G_rj`` scattered over the entry pairs of
    each row, or one sparse product per instance where rows are too dense for that."""
    with torch.no_grad():
        B, n = w.shape[0], prog.n
        out = w.new_zeros(B, n, n)
        pairs = _row_pairs(prog)
        if pairs is not None:
            r, i, j = (t.to(w.device) for t in pairs)
            ci, cj = prog.G_cols.to(w.device)[i], prog.G_cols.to(w.device)[j]
            vals = w[:, r] * Gv[:, i] * Gv[:, j]
            return out.view(B, n * n).index_add_(1, ci * n + cj, vals).view(B, n, n)
        idx = torch.stack([prog.G_rows, prog.G_cols]).to(Gv.device)
        rows = prog.G_rows.to(Gv.device)
        for b in range(B):
            g = Gv[b if Gv.shape[0] > 1 else 0]
            Gs = torch.sparse_coo_tensor(idx, g, (prog.m, n))
            WGs = torch.sparse_coo_tensor(idx, g * w[b, rows], (prog.m, n))
            out[b] = torch.sparse.mm(Gs.t().coalesce(), WGs.coalesce()).to_dense()
        return out


def factor(prog: ConeProgram, Pv: Tensor | None, Gv: Tensor, R: Tensor, sigma: float
           ) -> Tensor:
    """Cholesky factor of ``M = P + σI + GᵀRG`` (no grad), ``(B, n, n)``; ``(1, n, n)`` when
    every instance has the same ``P``, ``G`` and ``R`` (one factor, and each solve with it one
    triangular solve for the whole batch)."""
    with torch.no_grad():
        if R.shape[0] > 1 and shared(R) and shared(Gv) and (Pv is None or shared(Pv)):
            Pv, Gv, R = None if Pv is None else Pv[:1], Gv[:1], R[:1]
        M = prog.dense_P(Pv, R.shape[0], R) + weighted_gram(prog, Gv, R)
        M.diagonal(dim1=1, dim2=2).add_(sigma)
        L, info = torch.linalg.cholesky_ex(M)
        if bool((info != 0).any()):
            bad = torch.nonzero(info).flatten().tolist()
            raise FoldError(f"FoldedSolver: P + σI + GᵀRG is not positive definite for "
                            f"instance(s) {bad} (P not PSD, or non-finite data); check the "
                            "problem data or raise sigma.")
        return L


def x_update(prog: ConeProgram, L: Tensor, R: Tensor, dense: tuple[Any, Any],
             state: tuple[Tensor, Tensor, Tensor], data: ConeData) -> tuple[Tensor, Tensor]:
    """``(x⁺, Gx⁺ + h)`` of (2) (the projection's argument is ``Gx⁺ + h − R⁻¹y``)."""
    Pd, Gd = dense
    x, s, y = state
    Pv, c, Gv, h = data.P, data.c, data.G, data.h
    rx = prog.P(Pv, x, Pd) + c - prog.GT(Gv, y + R * (s - prog.G(Gv, x, Gd) - h), Gd)
    x1 = x - chol_solve(L, rx)
    return x1, prog.G(Gv, x1, Gd) + h


def admm_step(prog: ConeProgram, L: Tensor, R: Tensor,
              dense: tuple[Any, Any] = (None, None)):
    """The update (2) as ``step((x, s, y), P, q, A) -> (x, s, y)`` on cvxpylayers' values
    (``dense``: detached dense P and G of these values, see :meth:`ConeProgram.dense_caches`)."""

    def step(state: tuple[Tensor, Tensor, Tensor], P: Tensor | None, q: Tensor, A: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        y = state[2]
        x1, Gx1h = x_update(prog, L, R, dense, state, prog.parse(P, q, A))
        s1 = K.product(Gx1h - y / R, prog.dims)
        y1 = y + R * (s1 - Gx1h)
        return x1, s1, y1

    # L, R and the dense caches are detached; skipping the op recorder matters here: a
    # Python call per torch op, thousands in the exponential cone's projection
    return self_contained(step)


def kkt_residual(prog: ConeProgram, data: ConeData, x: Tensor, s: Tensor, y: Tensor
                 ) -> Tensor:
    """``(B,)`` relative KKT residual of (1): stationarity, primal and cone feasibility,
    complementarity, each scaled by ``1 +`` the size of its terms."""
    with torch.no_grad():
        Pv, c, Gv, h = data.P, data.c, data.G, data.h
        Px, GTy, Gx = prog.P(Pv, x), prog.GT(Gv, y), prog.G(Gv, x)
        amax = lambda t: t.abs().amax(dim=1) if t.shape[1] else t.new_zeros(t.shape[0])  # noqa: E731
        dual = amax(Px + c - GTy) / (1 + torch.maximum(amax(Px), amax(c)).maximum(amax(GTy)))
        prim = amax(Gx + h - s) / (1 + torch.maximum(amax(Gx), amax(h)))
        cone = (amax(s - K.product(s, prog.dims)) + amax(y - K.product(y, prog.dims, dual=True))
                ) / (1 + amax(s) + amax(y))
        gap = (s * y).sum(1).abs() / (1 + (Px * x).sum(1).abs() + (c * x).sum(1).abs())
        return torch.stack([dual, prim, cone, gap]).amax(0)
