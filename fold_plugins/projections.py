"""Differentiable Euclidean projections ``Π_C(x) = argmin_{z∈C} ½‖z − x‖²``, batched over all
leading dims of ``x`` (the set lives on the last dim), keeping dtype and device.

Weakly active convention (all projections, one rule): where ``x`` lies *at or within the
band* ``δ = √eps · scale`` of the boundary between two pieces of the piecewise-smooth map — a
coordinate at a bound, a point on the sphere / hyperplane, a simplex coordinate at the
threshold — the constraint is *weakly active* and the derivative of the piece on which it is
inactive ("free") is used. ``scale`` is the row's own magnitude (the largest ``|x_i|`` and the
set's finite parameters, :func:`fold_plugins.steps._common.kink_band`), so the choice is
decided by the problem, never by round-off: ``√eps ≈ 1.5e-8`` relative in float64,
``3.5e-4`` in float32. The free derivative is one of the one-sided derivatives (an element of
the B-subdifferential), it is finite, and it agrees with ``torch.clamp``'s rule. The value is
always the exact projection; inside the band only the derivative is the free piece's. The
set's parameters (bounds, radius, ``A``, ``b`` …) get the matching gradient.

Inside :func:`fold_plugins.fold` each projection reports the number of weakly active
constraints per instance (``FoldInfo.extra["weakly_active"]``, a ``(B,)`` int tensor): there
the derivative is not unique, and a finite-difference check may legitimately disagree.

Each projection is written as ``where(mask, smooth piece, other piece)`` with the mask (the
active set) computed without grad, so autograd (including double backward and
``is_grads_batched``) differentiates the selected smooth piece exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._batched import ShapeError, as_tensor_like, bmtv, bmv
from ._errors import FoldError
from ._kinks import clip_free, kink_band, note_weakly_active, value_of
from .prox import elastic_net, group_lasso, nonnegative_l1, soft_threshold
from .steps.quadprog import INF, qp

__all__ = ["nonnegative", "box", "simplex", "k_subset", "l2_ball", "l1_ball", "affine",
           "halfspace", "polytope"]


def _check_x(x: Any, where: str, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < min_dim:
        desc = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor)
                else type(x).__name__)
        raise FoldError(f"{where}: x must be a floating-point tensor with at least {min_dim} "
                        f"dim(s), got {desc}.")


def _row_param(value: Any, x: Tensor, name: str, where: str) -> Tensor:
    """A per-row scalar (radius, k, b): number, 0-d, ``x.shape[:-1]`` or ``x.shape[:-1]+(1,)``
    → a tensor broadcastable against ``x`` (trailing dim 1)."""
    t = as_tensor_like(value, x)
    lead = tuple(x.shape[:-1])
    if t.dim() == 0:
        return t
    if tuple(t.shape) == lead:
        return t.unsqueeze(-1)
    if tuple(t.shape) == lead + (1,):
        return t
    raise ShapeError(f"{where}: {name} has shape {tuple(t.shape)}; give a number, a 0-d tensor, "
                     f"or one value per row of x: shape {lead} (x has shape {tuple(x.shape)}).")


def nonnegative(x: Tensor) -> Tensor:
    """``max(x, 0)``; derivative 1 at ``x = 0`` (free convention)."""
    _check_x(x, "nonnegative", 0)
    return clip_free(x, x.new_zeros(()))


def box(x: Tensor, lower: float | Tensor | None = None,
        upper: float | Tensor | None = None) -> Tensor:
    """``min(max(x, lower), upper)``; ``lower``/``upper`` numbers, tensors broadcastable to ``x``,
    or ``None`` (no bound). ``∂/∂x = 1`` on ``lower ≤ x ≤ upper`` (free at the bounds),
    ``∂/∂lower = 1`` where ``x < lower``, ``∂/∂upper = 1`` where ``x > upper``.
    """
    _check_x(x, "box", 0)
    lo = None if lower is None else as_tensor_like(lower, x)
    hi = None if upper is None else as_tensor_like(upper, x)
    for name, t in (("lower", lo), ("upper", hi)):
        if t is not None:
            try:
                torch.broadcast_shapes(t.shape, x.shape)
            except RuntimeError:
                raise ShapeError(f"box: {name} has shape {tuple(t.shape)}, not broadcastable "
                                 f"to x's shape {tuple(x.shape)}.") from None
    if lo is not None and hi is not None and bool((lo.detach() > hi.detach()).any()):
        raise FoldError("box: lower > upper somewhere (empty box); check the bounds.")
    return clip_free(x, lo, hi)


def _simplex_tau(v: Tensor, r: Tensor) -> Tensor:
    """Threshold ``τ`` with ``Σ max(v − τ, 0) = r`` (sort-based, no grad), shape ``(..., 1)``."""
    s, _ = torch.sort(v, dim=-1, descending=True)
    cs = torch.cumsum(s, dim=-1) - r
    k = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    cond = s - cs / k > 0
    K = cond.sum(dim=-1, keepdim=True).clamp_min(1)
    return cs.gather(-1, K - 1) / K.to(v.dtype)


def simplex(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto ``{z ≥ 0, 1ᵀz = r}`` (sort-based, ``O(n log n)``): ``z = max(x − τ, 0)``.

    Jacobian on the support ``S = {x_i ≥ τ}``: ``diag(1_S) − 1_S 1_Sᵀ/|S|``; ``∂z/∂r = 1_S/|S|``.
    A coordinate within the weakly active band of the threshold (``|x_i − τ| ≤ δ``) counts as
    in the support (free convention). ``radius > 0``: number, 0-d, or one per row
    (``x.shape[:-1]``).
    """
    _check_x(x, "simplex")
    r = _row_param(radius, x, "radius", "simplex")
    if bool((r.detach() <= 0).any()):
        raise FoldError(f"simplex: radius must be > 0, got min {float(r.min()):.3g}.")
    with torch.no_grad():
        tau0 = _simplex_tau(x.detach(), r.detach())
        exact = _on_support(x.detach(), r.detach(), x.detach() >= tau0)
        delta = kink_band(x, r, tau0)
        weak = (x.detach() - tau0).abs() <= delta
        mask = x.detach() >= tau0 - delta  # the band counts as support (free)
    note_weakly_active(weak)
    return value_of(_on_support(x, r, mask), exact)


def _on_support(x: Tensor, r: Tensor, mask: Tensor) -> Tensor:
    """``max(x − τ, 0)`` with ``τ = (Σ_S x − r)/|S|`` on the support mask ``S``: exact to
    rounding on that piece, and differentiable in ``x`` and ``r`` through it."""
    mf = mask.to(x.dtype)
    tau = ((x * mf).sum(-1, keepdim=True) - r) / mf.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(mask, x - tau, torch.zeros_like(x))


def _k_subset_tau(x: Tensor, k: Tensor) -> Tensor:
    """Exact threshold ``τ`` with ``s(τ) = Σ_i clip(x_i − τ, 0, 1) = k`` (no grad), ``(..., 1)``.

    ``s`` is piecewise linear and nonincreasing, with breakpoints ``x_i − 1`` (coordinate ``i``
    leaves the upper set) and ``x_i`` (it leaves the free set). With the ``2n`` breakpoints
    ``T`` sorted, the number of free coordinates on ``(T_j, T_{j+1})`` is ``f_j`` (a running
    count of ±1) and ``s(T_{j+1}) = s(T_j) − f_j (T_{j+1} − T_j)``, ``s(T_0) = n``: one sort and
    two cumulative sums, ``O(n log n)``. The root is interpolated on the piece that brackets
    ``k``; where ``s ≡ k`` on a piece of positive length (no free coordinate: ``k`` an integer
    with a gap wider than 1 between the ``k``-th and ``k+1``-th largest ``x``), ``τ`` is that
    piece's midpoint, so the free set is empty and ``z`` is locally constant.
    """
    n = x.shape[-1]
    T, order = torch.sort(torch.cat([x - 1, x], dim=-1), dim=-1)
    ones = torch.ones_like(x, dtype=torch.int64)
    kind = torch.cat([ones, -ones], dim=-1).gather(-1, order)  # +1: enters F, −1: leaves F
    nfree = torch.cumsum(kind, dim=-1)[..., :-1]  # free count on (T_j, T_{j+1})
    nupper = n - torch.cumsum((kind > 0).to(torch.int64), dim=-1)[..., :-1]  # |U| there
    dT = T[..., 1:] - T[..., :-1]
    drop = torch.cumsum(nfree.to(x.dtype) * dT, dim=-1)
    s = torch.cat([torch.zeros_like(T[..., :1]), drop], dim=-1).neg_().add_(n)  # s(T_j)
    kb = k.expand(*x.shape[:-1], 1)
    # last breakpoint with s ≥ k (s is monotone, so those form a prefix); s(T_0) = n ≥ k
    j = ((s >= kb).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)
    Tj, Tj1, sj = T.gather(-1, j), T.gather(-1, j + 1), s.gather(-1, j)
    fj = nfree.gather(-1, j).to(x.dtype)
    tau = torch.where(fj > 0, Tj + (sj - kb) / fj.clamp_min(1), Tj)
    tau = torch.minimum(torch.maximum(tau, Tj), Tj1)
    # a flat piece with s ≡ k exactly: counts are integers, so the test is exact
    flat = (nfree == 0) & (dT > 0) & (nupper.to(x.dtype) == kb)
    has_flat = flat.any(-1, keepdim=True)
    jf = flat.to(torch.int64).argmax(-1, keepdim=True)
    mid = 0.5 * (T.gather(-1, jf) + T.gather(-1, jf + 1))
    return torch.where(has_flat, mid, tau)


def k_subset(x: Tensor, k: float | Tensor, *, iters: int | None = None) -> Tensor:
    """Projection onto the LML polytope ``{0 ≤ z ≤ 1, 1ᵀz = k}``: ``z = clip(x − τ, 0, 1)``.

    The dual scalar ``τ`` solves the piecewise-linear equation ``Σ clip(x − τ, 0, 1) = k``
    exactly (sort of the ``2n`` breakpoints, ``O(n log n)``, see :func:`_k_subset_tau`), then
    is made exact to rounding on its linear piece: with free set ``F = {0 ≤ x − τ ≤ 1}``
    (kinks counted as free) and upper set ``U = {x − τ > 1}``, ``τ = (Σ_F x + |U| − k)/|F|``.
    Jacobian: ``diag(1_F) − 1_F 1_Fᵀ/|F|``, ``∂z/∂k = 1_F/|F|``. If ``F`` is empty (``k`` an
    integer and a gap between the ``k``-th and ``k+1``-th largest ``x`` wider than 1), ``z``
    is locally constant: zero gradient. ``0 ≤ k ≤ n``: number, 0-d, or one per row.
    ``iters`` (the former bisection count) is deprecated and ignored.
    """
    if iters is not None:
        warnings.warn("k_subset: iters is deprecated and ignored (the threshold is now exact, "
                      "sort-based); drop the argument.", DeprecationWarning, stacklevel=2)
    _check_x(x, "k_subset")
    n = x.shape[-1]
    kk = _row_param(k, x, "k", "k_subset")
    if bool(((kk.detach() < 0) | (kk.detach() > n)).any()):
        raise FoldError(f"k_subset: k must lie in [0, n={n}], got {kk.detach().flatten()[:5]}.")
    with torch.no_grad():
        xd, kd = x.detach(), kk.detach()
        tau = _k_subset_tau(xd, kd)
        for _ in range(2):
            d = xd - tau
            F = (d >= 0) & (d <= 1)
            U = d > 1
            nf = F.sum(-1, keepdim=True)
            t_new = ((xd * F).sum(-1, keepdim=True) + U.sum(-1, keepdim=True) - kd) / \
                nf.clamp_min(1)
            tau = torch.where(nf > 0, t_new, tau)
        d = xd - tau
        F0, U0 = (d >= 0) & (d <= 1), d > 1
        exact = torch.where(F0, xd - ((xd * F0).sum(-1, keepdim=True) + U0.sum(-1, keepdim=True)
                                      - kd) / F0.sum(-1, keepdim=True).clamp_min(1),
                            U0.to(x.dtype))
        delta = kink_band(x, kk, tau)
        weak = (d.abs() <= delta) | ((d - 1).abs() <= delta)
        F = (d >= -delta) & (d <= 1 + delta)  # the bands count as free
        U = d > 1 + delta
    Ff = F.to(x.dtype)
    nf = Ff.sum(-1, keepdim=True)
    tau_g = ((x * Ff).sum(-1, keepdim=True) + U.sum(-1, keepdim=True).to(x.dtype) - kk) / \
        nf.clamp_min(1)
    note_weakly_active(weak)
    return value_of(torch.where(F, x - tau_g, U.to(x.dtype)), exact)


def l2_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto ``{‖z‖₂ ≤ r}`` (last dim): ``x · min(1, r/‖x‖)``; identity Jacobian on
    (and within the weakly active band of) ``‖x‖ = r`` (free convention), ``(r/‖x‖)(I − x̂x̂ᵀ)``
    outside."""
    _check_x(x, "l2_ball")
    r = _row_param(radius, x, "radius", "l2_ball")
    if bool((r.detach() < 0).any()):
        raise FoldError(f"l2_ball: radius must be ≥ 0, got min {float(r.min()):.3g}.")
    nrm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    with torch.no_grad():
        nd, rd = nrm.detach(), r.detach()
        exact = torch.where(nd > rd, x.detach() * (rd / torch.where(nd > rd, nd, torch.ones_like(
            nd))), x.detach())
        delta = kink_band(nd, rd)
        weak = (nd - rd).abs() <= delta
        out = nd > rd + delta  # on (or within the band of) the sphere: free
    safe = torch.where(out, nrm, torch.ones_like(nrm))
    note_weakly_active(weak.squeeze(-1))
    return value_of(torch.where(out, x * (r / safe), x), exact)


def l1_ball(x: Tensor, radius: float | Tensor = 1.0) -> Tensor:
    """Projection onto ``{‖z‖₁ ≤ r}`` (last dim): identity inside (and on or within the band of
    the sphere: free), else ``sign(x) max(|x| − τ, 0)`` with ``τ`` from the simplex projection
    of ``|x|``; coordinates within the band of ``|x_i| = τ`` count as in the support."""
    _check_x(x, "l1_ball")
    r = _row_param(radius, x, "radius", "l1_ball")
    if bool((r.detach() <= 0).any()):
        raise FoldError(f"l1_ball: radius must be > 0, got min {float(r.min()):.3g}.")
    a = x.abs()
    with torch.no_grad():
        ad, rd = a.detach(), r.detach()
        s1 = ad.sum(-1, keepdim=True)
        tau0 = _simplex_tau(ad, rd)
        exact = torch.where(s1 <= rd, x.detach(),
                            torch.sign(x.detach()) * _on_support(ad, rd, ad >= tau0))
        delta = kink_band(x, rd, tau0)
        band_r = kink_band(s1, rd)
        inside = s1 <= rd + band_r  # on (or within the band of) the sphere: free
        weak_sphere = (s1 - rd).abs() <= band_r
        weak = ((ad - tau0).abs() <= delta) & ~inside
        mask = ad >= tau0 - delta
    proj = torch.sign(x) * _on_support(a, r, mask)
    note_weakly_active(torch.cat([weak, weak_sphere], dim=-1))
    return value_of(torch.where(inside, x, proj), exact)


def _check_rows(x: Tensor, M: Tensor, v: Tensor | None, nameM: str, namev: str,
                where: str) -> int:
    B, n = x.shape
    if not isinstance(M, Tensor) or M.dim() not in (2, 3) or M.shape[-1] != n or \
            (M.dim() == 3 and M.shape[0] != B):
        raise ShapeError(f"{where}: {nameM} has shape "
                         f"{tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__}, "
                         f"expected (m, {n}) or ({B}, m, {n}) for x of shape ({B}, {n}).")
    m = M.shape[-2]
    if v is not None and (not isinstance(v, Tensor) or tuple(v.shape) not in ((m,), (B, m))):
        raise ShapeError(f"{where}: {namev} has shape "
                         f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
                         f"expected ({m},) or ({B}, {m}) to match {nameM} {tuple(M.shape)}.")
    return m


def affine(x: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """Projection onto ``{z : Az = b}``: ``x − Aᵀ(AAᵀ)⁻¹(Ax − b)`` (smooth; needs full row rank).

    Args:
        x: ``(B, n)``. A: ``(m, n)`` or ``(B, m, n)``. b: ``(m,)`` or ``(B, m)``.
    """
    _check_x(x, "affine", 2)
    if x.dim() != 2:
        raise ShapeError(f"affine: x must be (B, n), got {tuple(x.shape)}.")
    _check_rows(x, A, b, "A", "b", "affine")
    G = A @ A.transpose(-1, -2)
    L, info = torch.linalg.cholesky_ex(G)
    if bool((info != 0).any()):
        raise FoldError(f"affine: A A^T is singular (A of shape {tuple(A.shape)} is not of full "
                        "row rank); remove redundant rows of A.")
    r = bmv(A, x) - b
    if L.dim() == 2:
        w = torch.cholesky_solve(r.T, L).T
    else:
        w = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    return x - bmtv(A, w)


def halfspace(x: Tensor, a: Tensor, b: float | Tensor) -> Tensor:
    """Projection onto ``{z : aᵀz ≤ b}``: ``x − max(aᵀx − b, 0)/‖a‖² · a``; identity Jacobian
    on (and within the weakly active band of) the hyperplane (free convention).

    Args:
        x: ``(..., n)``. a: ``(n,)`` or ``x.shape``. b: number, 0-d or ``x.shape[:-1]``.
    """
    _check_x(x, "halfspace")
    if not isinstance(a, Tensor) or (tuple(a.shape) != (x.shape[-1],) and a.shape != x.shape):
        raise ShapeError(f"halfspace: a has shape "
                         f"{tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}, "
                         f"expected ({x.shape[-1]},) or {tuple(x.shape)}.")
    bb = _row_param(b, x, "b", "halfspace")
    viol = (x * a).sum(-1, keepdim=True) - bb
    with torch.no_grad():
        vd = viol.detach()
        ad = a.detach()
        exact = torch.where(vd > 0, x.detach() - vd / (ad * ad).sum(-1, keepdim=True) * ad,
                            x.detach())
        # the band in units of aᵀx: √eps times the scale of its terms and of b
        delta = kink_band((x.detach() * ad).abs().sum(-1, keepdim=True), bb.detach())
        weak = vd.abs() <= delta
        out = vd > delta  # on (or within the band of) the hyperplane: free
    note_weakly_active(weak.squeeze(-1))
    return value_of(torch.where(out, x - viol / (a * a).sum(-1, keepdim=True) * a, x), exact)


def polytope(x: Tensor, A: Tensor | None = None, b: Tensor | None = None,
             G: Tensor | None = None, h: Tensor | None = None, *,
             backward: str | Callable = "gmres", backward_tol: float = 1e-12,
             admm_options: dict[str, Any] | None = None, strict: bool = False) -> Tensor:
    """Projection onto ``{z : Az = b, Gz ≤ h}`` — a QP whose solve is itself folded.

    Forward: :func:`fold_plugins.steps.solve_qp_admm` on ``min ½‖z‖² − xᵀz`` (no grad, with
    polishing). Backward: :func:`fold_plugins.fold` with the
    :func:`fold_plugins.steps.admm_qp` step — the implicit solve at the ADMM fixed point, no
    unrolling of the inner iterations. Differentiable w.r.t. ``x, A, b, G, h``. At a weakly
    active row the ADMM step's projection uses the free convention (finite one-sided gradient).
    An empty polytope raises :class:`fold_plugins.steps.QPInfeasibleError`.

    Args:
        x: ``(B, n)``. A: ``(m, n)``/``(B, m, n)`` with b: ``(m,)``/``(B, m)``; G: ``(p, n)``/
            ``(B, p, n)`` with h: ``(p,)``/``(B, p)``. Either pair may be ``None``.
        admm_options: keywords for ``solve_qp_admm`` (default ``tol=1e-12``).
        backward, backward_tol: solver (name or callable) and tolerance of the folded backward.
        strict: raise :class:`fold_plugins.FoldError` instead of warning when the inner ADMM
            forward or its folded backward does not converge.

    Returns:
        ``(B, n)``.
    """
    _check_x(x, "polytope", 2)
    if x.dim() != 2:
        raise ShapeError(f"polytope: x must be (B, n), got {tuple(x.shape)}.")
    B, n = x.shape
    if (A is None) != (b is None) or (G is None) != (h is None):
        raise FoldError("polytope: give A with b and G with h (or leave a pair None).")
    rows, lo, up = [], [], []
    for M, v, eq, nm in ((A, b, True, ("A", "b")), (G, h, False, ("G", "h"))):
        if M is None or v is None:
            continue
        m = _check_rows(x, M, v, nm[0], nm[1], "polytope")
        Mb = M if M.dim() == 3 else M.expand(B, m, n)
        vb = v if v.dim() == 2 else v.expand(B, m)
        rows.append(Mb)
        up.append(vb)
        lo.append(vb if eq else torch.full_like(vb, -INF))
    if not rows:
        return x
    Aq = torch.cat(rows, dim=1)
    lq, uq = torch.cat(lo, dim=1), torch.cat(up, dim=1)
    P = torch.eye(n, dtype=x.dtype, device=x.device)
    opts = {"tol": 1e-12}
    opts.update(admm_options or {})
    return qp(P, -x, Aq, lq, uq, backward=backward, backward_tol=backward_tol,
              admm_options=opts, strict=strict)

__all__ += ["soft_threshold", "elastic_net", "group_lasso", "nonnegative_l1"]
