"""The inverse of ``I − Φᵀ`` for the folded cone-program ADMM step (2) of :mod:`.program`.

Linearising (2) (with ``M = P + σI + GᵀRG``, ``x⁺ = M⁻¹(σx − c + Gᵀy + GᵀR(s − h))``) gives

    dx⁺ = M⁻¹(σ dx + Gᵀdy + GᵀR ds),   ds⁺ = D(G dx⁺ − R⁻¹dy),   dy⁺ = dy + R(ds⁺ − G dx⁺)   (C1)

with ``D = ∂Π_K(v)`` the cone projection's derivative at ``v = Gx⁺ + h − R⁻¹y`` (block diagonal
over the cones: 0 on zero-cone rows, 0/1 on nonnegative rows, a symmetric ``0 ≼ D_b ≼ I``
block per second-order, PSD or exponential cone; ``R`` is constant on each block, so ``R`` and
``D`` commute). Solving ``(I − Φ)(dx, ds, dy) = (r_x, r_s, r_y)`` with ``u = dx − r_x``
eliminates ``M`` and ``σ`` (``Mu − σu = (P + GᵀRG)u``) and ``ds = Gu + r_s − R⁻¹r_y``:

    P u − Gᵀdy = σ r_x + GᵀR r_s − Gᵀr_y,     (I − D) G u + D R⁻¹dy = R⁻¹r_y.              (C2)

The second row is a constraint ``Gu = R⁻¹r_y`` where ``D`` vanishes (active constraints),
``dy = r_y`` where ``D = I`` (inactive ones), and in between a finite coupling. Shifting
``D`` to ``D_ε = D + εR/r₀`` (``ε = √(machine ε)``, ``r₀ = min R``: a penalty of weight
``r₀/ε`` on every active row) lets the second row be solved for ``dy`` and leaves one
symmetric positive definite ``n × n`` system, with ``W = D_ε⁻¹(I − D)`` (symmetric, ``≽ 0``):

    H = P + GᵀRWG,     u = H⁻¹(σ r_x + GᵀR r_s + Gᵀ(D_ε⁻¹ − I) r_y),
    dx = u + r_x,   ds = Gu + r_s − R⁻¹r_y,   dy = D_ε⁻¹r_y − RWGu.                        (C3)

(C3) is the exact inverse of ``I − Φ`` with ``D_ε`` in place of ``D``, ``O(ε)`` from the exact
one (measured on the tests' LP, QP, SOCP, exponential and PSD programs: relative error
``≈ Cε`` with ``C`` from 2 to 4·10⁵, linear over four decades of ``ε``), so GMRES needs two or
three iterations. Its transpose, applied by :func:`cone_admm`, maps ``(g_x, g_s, g_y)`` to

    p = H⁻¹(g_x + Gᵀ(g_s − RW g_y)),
    r_x = g_x + σp,   r_s = g_s + RGp,   r_y = D_ε⁻¹(g_y + Gp) − Gp − R⁻¹g_s.                (C4)

Every function of ``D`` above is taken blockwise: in closed form on zero (``D = 0``) and
nonnegative rows (``D = [v > 0]``) and on second-order cones, where off the cone and its
polar ``D = ½[[1, ūᵀ], [ū, (1 + τ)I − τūūᵀ]]`` (``v = (t, u)``, ``ū = u/‖u‖``,
``τ = t/‖u‖``) has eigenvalue 1 on ``(1, ū)``, 0 on ``(−1, ū)`` and ``(1 + τ)/2`` on the rest,
so ``f(D) = f((1+τ)/2) I + V C Vᵀ`` with ``V = [e₀, (0, ū)]`` and a 2 × 2 ``C``
(``GᵀRf(D)G`` is a scaled Gram matrix plus rank two); densely on PSD and exponential cones
(their Jacobian by autograd of :mod:`fold_plugins.cones`, one batched VJP per column of the
widest block). One Cholesky factor of ``H`` per instance (``n × n``, however many
constraints) is made when it is built; an instance where ``H`` is not positive definite (a
non-unique solution) gets the identity, and GMRES's own verdict speaks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fold_plugins import cones as K

from .program import ConeData, ConeProgram, chol_solve, dense_mv, shared, weighted_gram, x_update

__all__ = ["cone_admm", "ConeBlocks", "cone_blocks"]

Spectral = Callable[[Tensor, Tensor], Tensor]  # f(λ, shift) applied to D's eigenvalues


def _groups(widths: list[int], start: int, device: torch.device) -> list[Tensor]:
    """Row indices ``(k, w)`` of consecutive blocks of these widths, grouped by width."""
    by_width: dict[int, list[int]] = {}
    for w in widths:
        by_width.setdefault(w, []).append(start)
        start += w
    return [torch.tensor(st, device=device)[:, None] + torch.arange(w, device=device)
            for w, st in sorted(by_width.items())]


class ConeBlocks:
    """``D = ∂Π_K(v)`` over a product cone, kept in the pieces that functions of it need:
    ``diag`` on zero and nonnegative rows, ``(rows, τ, ū, inside, polar)`` per group of
    second-order cones of one width, ``(rows, D_b)`` per group of dense (PSD, exponential)
    blocks. :meth:`function` gives ``f(D_ε)``-type matrices in the same layout."""

    def __init__(self, diag: Tensor, soc: list[tuple], dense: list[tuple[Tensor, Tensor]]):
        self.diag, self.soc, self.dense = diag, soc, dense

    def function(self, f: Spectral, shift: Tensor, scale: Tensor) -> BlockFunction:
        """``diag(scale) f(D, shift)`` (``shift``, ``scale``: ``(B, m)``, constant per cone)."""
        d0 = self.diag.shape[1]
        diag = scale[:, :d0] * f(self.diag, shift[:, :d0])
        soc = []
        for rows, tau, ubar, inside, polar in self.soc:
            sh, sc = shift[:, rows[:, 0]], scale[:, rows[:, 0]]          # (B, k)
            f0, f1 = f(torch.zeros_like(sh), sh), f(torch.ones_like(sh), sh)
            fc = f((1 + tau) / 2, sh)
            alpha = torch.where(inside, f1, torch.where(polar, f0, fc))
            on = (~(inside | polar)).to(sh.dtype)
            # in V = [e₀, (0, ū)]: f(1)·aaᵀ + f(0)·bbᵀ − f(c)I₂, a = (1, 1)/√2, b = (1, −1)/√2
            d, o = 0.5 * (f1 + f0) - fc, 0.5 * (f1 - f0)
            C = torch.stack([torch.stack([d, o], -1), torch.stack([o, d], -1)], -2)
            soc.append((rows, sc * alpha, ubar, (sc * on)[..., None, None] * C))
        dense = []
        for rows, Db in self.dense:
            sh = shift[:, rows[:, 0]][..., None]                            # (B, k, 1)
            lam, Q = torch.linalg.eigh(Db)
            lam = lam.clamp(0, 1)                    # 0 ≼ D ≼ I up to roundoff
            fb = (Q * f(lam, sh).unsqueeze(-2)) @ Q.transpose(-1, -2)
            dense.append((rows, scale[:, rows[:, 0]][..., None, None] * fb))
        return BlockFunction(diag, soc, dense)


class BlockFunction:
    """A symmetric block-diagonal ``(m, m)`` matrix per instance in :class:`ConeBlocks`'
    layout: ``diag``; per second-order group ``α I + V C Vᵀ``; per dense group a block."""

    def __init__(self, diag: Tensor, soc: list[tuple], dense: list[tuple[Tensor, Tensor]]):
        self.diag, self.soc, self.dense = diag, soc, dense

    def mv(self, v: Tensor) -> Tensor:
        """``self · v`` for ``v (B, m)``."""
        d0 = self.diag.shape[1]
        out = torch.empty_like(v)
        out[:, :d0] = self.diag * v[:, :d0]
        for rows, alpha, ubar, C in self.soc:
            vb = v[:, rows]                                                 # (B, k, w)
            Vv = torch.stack([vb[..., 0], (ubar * vb[..., 1:]).sum(-1)], -1)
            CV = (C @ Vv.unsqueeze(-1)).squeeze(-1)
            ob = alpha.unsqueeze(-1) * vb
            ob[..., 0] += CV[..., 0]
            ob[..., 1:] += CV[..., 1:] * ubar
            out[:, rows] = ob
        for rows, blk in self.dense:
            out[:, rows] = (blk @ v[:, rows].unsqueeze(-1)).squeeze(-1)
        return out

    def add_gram(self, H: Tensor, prog: ConeProgram, Gv: Tensor, Gd: Tensor | None,
                 one_G: bool) -> Tensor:
        """``H += Gᵀ · self · G`` for ``H (B, n, n)`` (``Gd``: dense ``(B, m, n)`` G, or
        ``None`` when the program has zero and nonnegative cones only; ``one_G``: G is the
        same for all instances, ``Gd (1, m, n)``)."""
        B, d0 = self.diag.shape
        n = prog.n
        if Gd is None:
            return H.add_(weighted_gram(prog, Gv, torch.cat(
                [self.diag, self.diag.new_zeros(B, prog.m - d0)], 1)))
        if d0:
            Gz = Gd[:, :d0].expand(B, -1, -1)
            H.baddbmm_(Gz.transpose(1, 2), self.diag.unsqueeze(-1) * Gz)
        for rows, alpha, ubar, C in self.soc:
            k, w = rows.shape
            Gb = Gd[:, rows.reshape(-1)].reshape(Gd.shape[0], k, w, n)    # (B|1, k, w, n)
            if one_G and k * n * n <= 2 ** 24:  # one Gram per cone, weighted per instance
                gram = (Gb[0].transpose(-1, -2) @ Gb[0]).reshape(k, n * n)
                H.add_((alpha @ gram).reshape(B, n, n))
            else:
                Gf = Gb.reshape(-1, k * w, n).expand(B, -1, -1)
                H.baddbmm_(Gf.transpose(1, 2), (Gb * alpha[..., None, None]).reshape(B, -1, n))
            VG = torch.cat([Gb[..., :1, :].expand(B, -1, -1, -1),
                            ubar.unsqueeze(-2) @ Gb[..., 1:, :]], -2)      # (B, k, 2, n)
            H.baddbmm_(VG.reshape(B, 2 * k, n).transpose(1, 2), (C @ VG).reshape(B, 2 * k, n))
        for rows, blk in self.dense:
            k, w = rows.shape
            Gb = Gd[:, rows.reshape(-1)].reshape(Gd.shape[0], k, w, n).expand(B, -1, -1, -1)
            H.baddbmm_(Gb.reshape(B, k * w, n).transpose(1, 2),
                       (blk @ Gb).reshape(B, k * w, n))
        return H


def cone_blocks(v: Tensor, dims: K.ConeDims) -> ConeBlocks:
    """``∂Π_K(v)`` (``v (B, m)``) with the kink conventions of :mod:`fold_plugins.cones`
    (``[v > 0]`` on nonnegative rows; a second-order cone's boundary ``‖u‖ = t`` counts as
    inside, ``‖u‖ = −t`` as polar); PSD and exponential blocks by autograd."""
    dev = v.device
    d0 = dims.zero + dims.nonneg
    diag = torch.cat([v.new_zeros(v.shape[0], dims.zero),
                      (v[:, dims.zero:d0] > 0).to(v.dtype)], 1)
    soc = []
    for rows in _groups(list(dims.soc), d0, dev):
        vb = v[:, rows]
        t, u = vb[..., 0], vb[..., 1:]
        nu = torch.linalg.vector_norm(u, dim=-1)
        inside, polar = nu <= t, nu <= -t
        safe = torch.where(inside | polar, torch.ones_like(nu), nu)
        soc.append((rows, t / safe, u / safe.unsqueeze(-1), inside, polar))
    o = d0 + sum(dims.soc)
    dense = []
    for fn, widths in ((K.psd, [k * (k + 1) // 2 for k in dims.psd]),
                       (K.exponential, [3] * dims.exp)):
        for rows in _groups(widths, o, dev):
            dense.append((rows, _block_jacobian(fn, v[:, rows])))
        o += sum(widths)
    return ConeBlocks(diag, soc, dense)


def _block_jacobian(fn: Callable[[Tensor], Tensor], vb: Tensor) -> Tensor:
    """Symmetrised Jacobians ``(B, k, w, w)`` of a projection acting on ``vb (B, k, w)``."""
    w = vb.shape[-1]
    with torch.enable_grad():
        x = vb.detach().requires_grad_(True)
        out = fn(x)
        probes = torch.eye(w, dtype=vb.dtype, device=vb.device)[:, None, None, :].expand(
            w, *vb.shape)
        (J,) = torch.autograd.grad(out, x, probes, is_grads_batched=True)  # J[j] = e_jᵀ D
    J = J.permute(1, 2, 0, 3)
    return 0.5 * (J + J.transpose(-1, -2))


def _inv(lam: Tensor, shift: Tensor) -> Tensor:
    return 1 / (lam + shift)


def _weight(lam: Tensor, shift: Tensor) -> Tensor:
    return (1 - lam) / (lam + shift)


def cone_admm(prog: ConeProgram, data: ConeData, state: tuple[Tensor, Tensor, Tensor],
              R: Tensor, L: Tensor, sigma: float, dense: tuple[Any, Any] = (None, None),
              eps: float | None = None
              ) -> Callable[[Tensor], Tensor]:
    """``(I − Φᵀ)⁻¹`` of the step (2) at ``state = (x, s, y)``, up to ``O(eps)`` (eq. (C4)).

    Args:
        prog, data: the program and this call's parsed data (:meth:`ConeProgram.parse`).
        state: the point ``(x (B, n), s (B, m), y (B, m))`` the step is folded at.
        R, L, sigma, dense: the step's penalties, Cholesky factor of ``M``, proximal weight
            and dense caches (as given to :func:`admm_step`).
        eps: the shift of ``D`` (default ``√(machine ε)`` of the dtype).

    Returns:
        ``(B, n + 2m) -> (B, n + 2m)`` on the flattened state ``[x | s | y]``.
    """
    with torch.no_grad():
        x, s, y = (t.detach() for t in state)
        data, R = data.detach(), R.detach()
        B, n, m = x.shape[0], prog.n, prog.m
        dt, dev = x.dtype, x.device
        Pv, Gv = data.P, data.G
        _, Gx1h = x_update(prog, L, R, dense, (x, s, y), data)
        D = cone_blocks(Gx1h - y / R, prog.dims)
        one_G = shared(Gv)
        Gd = dense[1][0] if dense[1] is not None else None
        if Gd is None and (D.soc or D.dense):
            Gd = prog.dense_G(Gv[:1] if one_G else Gv)
        e = float(torch.finfo(dt).eps) ** 0.5 if eps is None else float(eps)
        shift = e * R / R.amin(1, keepdim=True).clamp(min=torch.finfo(dt).tiny)
        Dinv = D.function(_inv, shift, torch.ones_like(R))                # D_ε⁻¹
        RW = D.function(_weight, shift, R)                                 # R D_ε⁻¹(I − D)
        if dense[0] is not None:  # the step's dense P (shared or per instance), symmetrised
            H = (0.5 * (dense[0][0] + dense[0][1])).expand(B, -1, -1).clone()
        else:
            H = prog.dense_P(Pv, B, x)
        H = RW.add_gram(H, prog, Gv, Gd, one_G)                          # (C3)
        Lh, status = torch.linalg.cholesky_ex(0.5 * (H + H.transpose(1, 2)))
        ok = status == 0
        all_ok = bool(ok.all())
        if not all_ok:
            Lh = torch.where(ok[:, None, None], Lh, torch.eye(n, dtype=dt, device=dev))
        Rinv = 1 / R
        if dense[1] is not None:
            Gm, GTm = dense[1]
            G = lambda u: dense_mv(Gm, u)                                   # noqa: E731
            GT = lambda w: dense_mv(GTm, w)                                 # noqa: E731
        else:
            G = lambda u: prog.G(Gv, u)                                     # noqa: E731
            GT = lambda w: prog.GT(Gv, w)                                   # noqa: E731

    def apply(g: Tensor) -> Tensor:
        """Eq. (C4): cotangents of ``(r_x, r_s, r_y)`` from those of ``(dx, ds, dy)``."""
        gx, gs, gy = g[:, :n], g[:, n:n + m], g[:, n + m:]
        rhs = gx + GT(gs - RW.mv(gy))
        p = chol_solve(Lh, rhs)
        Gp = G(p)
        out = torch.cat([gx + sigma * p, gs + R * Gp, Dinv.mv(gy + Gp) - Gp - Rinv * gs], 1)
        return out if all_ok else torch.where(ok[:, None], out, g)

    return apply
