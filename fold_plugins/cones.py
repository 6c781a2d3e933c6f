"""Differentiable Euclidean projections onto the cones of conic programs, in torch.

Each projection acts on the last dim of ``x`` (batched over all leading dims), keeps dtype and
device, and is differentiable by autograd (including ``is_grads_batched``). The cones and
their vector layouts are those of SCS / cvxpy's canonical cone programs:

- ``zero``: ``{0}``; its dual cone is the whole space.
- ``nonnegative``: ``ℝ^k_+`` (self-dual).
- ``second_order``: ``{(t, u): ‖u‖ ≤ t}`` (self-dual).
- ``exponential``: ``cl{(x, y, z): y > 0, y·e^{x/y} ≤ z}``; dual via Moreau,
  ``Π_{K*}(v) = v + Π_K(−v)``.
- ``psd``: symmetric ``k × k`` PSD matrices as a scaled lower-triangular column-major vector
  (``svec``: off-diagonals times √2, so ``⟨svec A, svec B⟩ = tr(AB)``; self-dual).

:func:`product` projects a concatenation of such blocks (the order cvxpy uses: zero,
nonnegative, second-order, PSD, exponential) described by a :class:`ConeDims`.

Kinks (a point exactly on the boundary between two smooth pieces) take the derivative of the
piece selected by the case test; it is one element of the B-subdifferential and finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._errors import FoldError

__all__ = ["zero", "nonnegative", "second_order", "exponential", "exponential_dual", "psd",
           "svec", "smat", "ConeDims", "product"]


def _check(x: object, where: str, last: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        desc = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor)
                else type(x).__name__)
        raise FoldError(f"{where}: x must be a floating-point tensor with at least 1 dim, got "
                        f"{desc}.")
    if last is not None and x.shape[-1] != last:
        raise FoldError(f"{where}: the last dim of x must be {last}, got shape "
                        f"{tuple(x.shape)}.")
    return x


def zero(x: Tensor) -> Tensor:
    """``Π_{0}(x) = 0`` (keeps the graph: the derivative is 0)."""
    return _check(x, "zero") * 0


def nonnegative(x: Tensor) -> Tensor:
    """``max(x, 0)``."""
    return torch.relu(_check(x, "nonnegative"))


def second_order(x: Tensor) -> Tensor:
    """Projection onto ``{(t, u): ‖u‖ ≤ t}`` (``x[..., 0]`` is ``t``).

    Cases: ``‖u‖ ≤ t`` → ``x``; ``‖u‖ ≤ −t`` → ``0``; else ``(‖u‖ + t)/2 · (1, u/‖u‖)``.
    """
    _check(x, "second_order")
    t, u = x[..., :1], x[..., 1:]
    with torch.no_grad():
        nu0 = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
        inside = nu0 <= t
        polar = nu0 <= -t
    nu = torch.linalg.vector_norm(torch.where(inside | polar, torch.ones_like(u), u), dim=-1,
                                  keepdim=True)  # safe norm: no NaN derivative at u = 0
    a = 0.5 * (nu + t)
    boundary = torch.cat([a, a * u / nu], dim=-1)
    return torch.where(inside, x, torch.where(polar, torch.zeros_like(x), boundary))


# ----------------------------------------------------------------------------- exponential

def _exp_ray(r: Tensor) -> Tensor:
    """Boundary ray ``(r, 1, e^r)`` of the exponential cone, scaled by ``e^{-max(r,0)}``."""
    sc = torch.exp(-torch.clamp(r, min=0))
    return torch.stack([r * sc, sc, torch.exp(r - torch.clamp(r, min=0))], dim=-1)


def _exp_normal_eq(r: Tensor, v: Tensor) -> Tensor:
    """``⟨v, n(r)⟩`` scaled by ``e^{-|r|}``-type factors; zero at the projection's ray parameter.

    ``n(r) = (r, 1, e^r) × (e^r, (1−r)e^r, −1)`` is normal to the plane holding both the
    boundary ray and the cone's outward normal there; the projection ``p = a(r, 1, e^r)``
    satisfies ``v − p ∥ normal`` iff ``⟨v, n(r)⟩ = 0``. Divided by ``e^{2 max(r,0)}`` for range.
    """
    m = torch.clamp(r, min=0)
    e2 = torch.exp(2 * r - 2 * m)
    n0 = -torch.exp(-2 * m) - (1 - r) * e2
    n1 = e2 + r * torch.exp(-2 * m)
    n2 = -(r * r - r + 1) * torch.exp(r - 2 * m)
    return v[..., 0] * n0 + v[..., 1] * n1 + v[..., 2] * n2


def _exp_solve_r(v: Tensor, iters: int = 40) -> Tensor:
    """Ray parameter ``r`` of the projection of ``v`` onto the exponential cone's boundary
    (no grad): a grid search maximising the cosine between ``v`` and the ray, then safeguarded
    Newton on :func:`_exp_normal_eq` within the bracketing grid cell."""
    grid = torch.linspace(-200.0, 200.0, 1601, dtype=v.dtype, device=v.device)
    d = _exp_ray(grid)                                                  # (G, 3)
    cos = (v @ d.T) / torch.linalg.vector_norm(d, dim=-1)               # (..., G)
    k = cos.argmax(dim=-1)
    h = float(grid[1] - grid[0])
    lo = grid[(k - 1).clamp(min=0)]
    hi = grid[(k + 1).clamp(max=grid.numel() - 1)]
    r = grid[k]
    flo = _exp_normal_eq(lo, v)
    eps = 1e-7 * max(h, 1.0)
    # stop once no iterate moves by more than this (relative): the differentiable Newton
    # correction in :func:`exponential` squares the remaining error
    tiny = 1e3 * torch.finfo(v.dtype).eps
    for _ in range(iters):
        f = _exp_normal_eq(r, v)
        same = torch.sign(f) == torch.sign(flo)
        lo = torch.where(same, r, lo)
        flo = torch.where(same, f, flo)
        hi = torch.where(same, hi, r)
        df = (_exp_normal_eq(r + eps, v) - _exp_normal_eq(r - eps, v)) / (2 * eps)
        newton = r - f / torch.where(df != 0, df, torch.ones_like(df))
        # the bracket is closed: a converged iterate sits on its own end (lo = r), and an
        # open test would throw it back to the midpoint (then bisection crawls home)
        ok = (newton >= torch.minimum(lo, hi)) & (newton <= torch.maximum(lo, hi))
        r_next = torch.where(ok, newton, 0.5 * (lo + hi))
        # every instance's iterate stopped moving (Newton converges quadratically from the
        # grid: typically a handful of steps of the 40): the rest would only repeat it
        done = bool(((r_next - r).abs() <= tiny * (1 + r.abs())).all())
        r = r_next
        if done:
            break
    return r


def _exp_cases(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks of :func:`exponential`'s cases: ``x ∈ K``, ``−x ∈ K*``, the corner
    ``x₀ ≤ 0, x₁ ≤ 0``, and the rest (projected onto the boundary ray, "hard")."""
    v0, v1, v2 = (t.detach() for t in (x[..., 0], x[..., 1], x[..., 2]))
    pos1 = v1 > 0
    safe1 = torch.where(pos1, v1, torch.ones_like(v1))
    in_k = (pos1 & (safe1 * torch.exp(torch.clamp(v0 / safe1, max=700.0)) <= v2)) | (
        (v0 <= 0) & (v1 == 0) & (v2 >= 0))
    pos0 = v0 > 0
    safe0 = torch.where(pos0, v0, torch.ones_like(v0))
    in_polar = (pos0 & (safe0 * torch.exp(torch.clamp(v1 / safe0, max=700.0))
                        <= -torch.e * v2)) | ((v0 == 0) & (v1 <= 0) & (v2 <= 0))
    corner = (v0 <= 0) & (v1 <= 0) & ~in_k & ~in_polar
    return in_k, in_polar, corner, ~(in_k | in_polar | corner)


def exponential(x: Tensor) -> Tensor:
    """Projection onto the exponential cone ``cl{(x, y, z): y > 0, y e^{x/y} ≤ z}``.

    Cases: ``x ∈ K`` → ``x``; ``−x ∈ K*`` → ``0``; ``x₀ ≤ 0, x₁ ≤ 0`` → ``(x₀, 0, max(x₂, 0))``;
    else ``p = a·(r, 1, e^r)`` with ``r`` the root of ``⟨x, n(r)⟩ = 0`` (Newton, no grad) made
    differentiable by one implicit-function Newton correction (exact first derivative:
    ``dr/dx = −∂_x f / ∂_r f``) and ``a = ⟨x, d(r)⟩ / ‖d(r)‖²``.
    """
    _check(x, "exponential", 3)
    v0, v1, v2 = x[..., 0], x[..., 1], x[..., 2]
    in_k, in_polar, corner, hard = _exp_cases(x)
    with torch.no_grad():
        xd = x.detach()
        r0 = _exp_solve_r(torch.where(hard[..., None], xd, xd.new_tensor([1.0, 1.0, 1.0])))
    # one Newton correction with grad: r = r0 − f(r0, x)/∂_r f(r0, x)
    r0g = r0.detach().requires_grad_(True)
    with torch.enable_grad():
        f_r = torch.autograd.grad(_exp_normal_eq(r0g, xd).sum(), r0g)[0]
    xs = torch.where(hard[..., None], x, torch.ones_like(x))
    f_r = torch.where(f_r.abs() > 0, f_r, torch.ones_like(f_r))
    r = r0 - _exp_normal_eq(r0, xs) / f_r
    d = _exp_ray(r)
    a = (xs * d).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True)
    p_hard = a * d
    p_corner = torch.stack([v0, torch.zeros_like(v1), torch.relu(v2)], dim=-1)
    out = torch.where(hard[..., None], p_hard, p_corner)
    out = torch.where(in_polar[..., None], torch.zeros_like(x), out)
    return torch.where(in_k[..., None], x, out)


def exponential_dual(x: Tensor) -> Tensor:
    """Projection onto the dual exponential cone, ``x + Π_K(−x)`` (Moreau)."""
    return x + exponential(-x)


# ----------------------------------------------------------------------------- PSD

def _svec_index(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row/col of each svec entry: lower triangle, column-major (SCS's order)."""
    rows, cols = [], []
    for j in range(k):
        for i in range(j, k):
            rows.append(i)
            cols.append(j)
    return (torch.tensor(rows, device=device), torch.tensor(cols, device=device))


def _svec_dim(n: int, where: str) -> int:
    k = int(round(((8 * n + 1) ** 0.5 - 1) / 2))
    if k * (k + 1) // 2 != n:
        raise FoldError(f"{where}: the last dim of x must be k(k+1)/2 for some k, got {n}.")
    return k


def smat(x: Tensor) -> Tensor:
    """Scaled lower-triangular column-major vector → symmetric ``(…, k, k)`` matrix."""
    k = _svec_dim(x.shape[-1], "smat")
    i, j = _svec_index(k, x.device)
    scale = torch.where(i == j, x.new_ones(()), x.new_full((), 0.5 ** 0.5))
    M = x.new_zeros(*x.shape[:-1], k, k)
    M[..., i, j] = x * scale
    M[..., j, i] = x * scale
    return M


def svec(M: Tensor) -> Tensor:
    """Symmetric ``(…, k, k)`` matrix → scaled lower-triangular column-major vector."""
    k = M.shape[-1]
    i, j = _svec_index(k, M.device)
    scale = torch.where(i == j, M.new_ones(()), M.new_full((), 2.0 ** 0.5))
    return M[..., i, j] * scale


class _PSDProject(torch.autograd.Function):
    """``Q max(Λ, 0) Qᵀ`` with the Löwner derivative ``Q (Γ ∘ QᵀHQ) Qᵀ``,
    ``Γ_ij = (f(λ_i) − f(λ_j))/(λ_i − λ_j)`` (``f'(λ_i)`` on ties): finite at repeated
    eigenvalues, where differentiating ``eigh`` is not."""

    generate_vmap_rule = True

    @staticmethod
    def forward(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lam, Q = torch.linalg.eigh(M)
        return (Q * torch.relu(lam).unsqueeze(-2)) @ Q.transpose(-1, -2), lam, Q

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, lam, Q = output
        ctx.save_for_backward(lam, Q)
        ctx.mark_non_differentiable(lam, Q)

    @staticmethod
    def backward(ctx, g: Tensor, _gl, _gq):
        lam, Q = ctx.saved_tensors
        f = torch.relu(lam)
        dl = lam.unsqueeze(-1) - lam.unsqueeze(-2)
        df = f.unsqueeze(-1) - f.unsqueeze(-2)
        tie = dl.abs() <= 1e-12 * (1 + lam.abs().amax(-1, keepdim=True).unsqueeze(-1))
        fp = (lam > 0).to(lam.dtype)
        avg = 0.5 * (fp.unsqueeze(-1) + fp.unsqueeze(-2))
        gamma = torch.where(tie, avg, df / torch.where(tie, torch.ones_like(dl), dl))
        gs = 0.5 * (g + g.transpose(-1, -2))
        inner = Q.transpose(-1, -2) @ gs @ Q
        return Q @ (gamma * inner) @ Q.transpose(-1, -2)


def psd(x: Tensor) -> Tensor:
    """Projection onto the PSD cone of a scaled lower-triangular column-major ``svec``."""
    _check(x, "psd")
    M = smat(x)
    P, _, _ = _PSDProject.apply(M)
    return svec(P)


# ----------------------------------------------------------------------------- products

@dataclass(frozen=True)
class ConeDims:
    """Sizes of a product cone in cvxpy/SCS order: zero, nonnegative, second-order (each
    cone's dimension), PSD (each matrix's side ``k``; ``k(k+1)/2`` entries), exponential
    (number of 3-dim cones)."""

    zero: int = 0
    nonneg: int = 0
    soc: Sequence[int] = field(default_factory=tuple)
    psd: Sequence[int] = field(default_factory=tuple)
    exp: int = 0

    @property
    def size(self) -> int:
        return (self.zero + self.nonneg + sum(self.soc) + sum(k * (k + 1) // 2 for k in self.psd)
                + 3 * self.exp)


def product(x: Tensor, dims: ConeDims, dual: bool = False) -> Tensor:
    """Projection onto the product cone ``dims`` (or its dual: the zero cone's dual is the
    whole space, the exponential cone's is :func:`exponential_dual`; the rest are self-dual).

    Second-order and PSD blocks of equal size are projected together (one batched call).
    """
    _check(x, "product", dims.size)
    parts: list[Tensor] = []
    o = 0
    if dims.zero:
        z = x[..., :dims.zero]
        parts.append(z if dual else zero(z))
        o = dims.zero
    if dims.nonneg:
        parts.append(nonnegative(x[..., o:o + dims.nonneg]))
        o += dims.nonneg
    for sizes, fn, width in ((dims.soc, second_order, lambda q: q),
                             (dims.psd, psd, lambda k: k * (k + 1) // 2)):
        blocks: list[Tensor | None] = [None] * len(sizes)
        starts = []
        for q in sizes:
            starts.append(o)
            o += width(q)
        for q in sorted(set(sizes)):
            idx = [i for i, s in enumerate(sizes) if s == q]
            w = width(q)
            stacked = torch.stack([x[..., starts[i]:starts[i] + w] for i in idx], dim=-2)
            proj = fn(stacked)
            for j, i in enumerate(idx):
                blocks[i] = proj[..., j, :]
        parts.extend(b for b in blocks if b is not None)
    if dims.exp:
        e = x[..., o:o + 3 * dims.exp].reshape(*x.shape[:-1], dims.exp, 3)
        pe = exponential_dual(e) if dual else exponential(e)
        parts.append(pe.reshape(*x.shape[:-1], 3 * dims.exp))
    return torch.cat(parts, dim=-1) if parts else x * 0
