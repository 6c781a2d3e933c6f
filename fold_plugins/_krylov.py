"""Krylov solvers of the :mod:`fold_plugins.solvers` protocol: restarted GMRES and BiCGStab,
batched with per-instance scalars (see that module for the protocol)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._solver_base import (
    MatVec,
    SolveInfo,
    _bdot,
    _check_b,
    _check_preconditioner,
    _effective_tol,
    _residual,
    _verdict,
)


def gmres(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
          maxiter: int | None = None, restart: int | None = None,
          preconditioner: MatVec | None = None) -> tuple[Tensor, SolveInfo]:
    """Restarted GMRES, batched: one Krylov basis per instance.

    Minimises ``‖b − A x‖`` over the Krylov space, tracking each instance's residual with
    Givens rotations; an instance is done when its relative residual is ≤ ``tol``. The
    estimate ends a cycle; the true residual, recomputed at each restart and at the end (one
    extra operator application), decides. An instance whose true residual gained < 1 % over a
    whole cycle has stagnated (round-off bounds it): it stops, unconverged, flagged in
    ``info.extra["stagnated"]``. Gram–Schmidt is classical and applied twice (CGS2).
    In exact arithmetic an instance converges in at most ``rank(A − I) + 1`` iterations.

    The inner loop (:class:`_Arnoldi`) is written for few tensor operations per iteration
    (≈30 small ones besides the operator, the basis in a buffer allocated once): at small
    sizes their dispatch, not the arithmetic, is what costs.

    Args:
        maxiter: total Krylov iterations over all restart cycles (default ``max(2n, 100)``,
            capped at 5000).
        restart: Krylov dimension per cycle (default ``min(n, 60)``); memory is
            ``restart · B · n`` elements.
        preconditioner: ``M⁻¹ ≈ A⁻¹``, a callable ``(B, n) -> (B, n)``, applied on the right
            (GMRES on ``A M⁻¹``, ``x = M⁻¹ u``): the residual minimised, tracked and judged is
            the true ``b − A x``, so ``tol`` means the same with or without it. One
            application per iteration (and per restart's update).
    """
    _check_b(b, "gmres")
    pc = _check_preconditioner(preconditioner, b, "gmres")
    B, n = b.shape
    tol = _effective_tol(tol, b.dtype)
    maxiter = int(maxiter) if maxiter is not None else min(max(2 * n, 100), 5000)
    m = int(restart) if restart is not None else min(n, 60)
    m = max(1, min(m, n, maxiter))
    dev = b.device
    bnorm = b.norm(dim=1)
    denom = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    iters = torch.full((B,), -1, dtype=torch.int64, device=dev)
    n_mv = 0
    total = 0
    fresh = False
    rel = bnorm / denom
    prev_rel = rel
    stalled = torch.zeros(B, dtype=torch.bool, device=dev)
    best_x, best_rel = x, torch.full_like(rel, math.inf)
    anorm = torch.zeros_like(rel)  # ‖A‖ ≥ ‖A v‖ for every unit basis vector v
    arnoldi = _Arnoldi(b, m, pc)
    while total < maxiter:
        if x0 is not None or total > 0:
            r = b - matvec(x)
            n_mv += 1
        else:
            r = b
        beta = r.norm(dim=1)
        rel = beta / denom
        fresh = True
        # judge each instance by its true residual at every restart: the Givens estimate can
        # claim convergence that round-off (ill-conditioning) has not delivered
        done = rel <= tol
        iters = torch.where(done, torch.where(iters < 0, total, iters), -1)
        # stagnation: a whole cycle that gained < 1 % means round-off (e.g. a step accurate
        # only to ~1e-10) bounds the residual; more cycles would only burn VJPs
        if total > 0:
            stalled = stalled | (~done & (rel > 0.99 * prev_rel))
        prev_rel = rel
        # at the noise floor the true residual fluctuates: keep each instance's best iterate
        better = rel < best_rel
        best_x = torch.where(better.unsqueeze(1), x, best_x)
        best_rel = torch.where(better, rel, best_rel)
        done = done | stalled
        if bool(done.all()):
            break
        k = arnoldi.cycle(matvec, r, beta, torch.where(done, torch.zeros_like(rel), rel), tol,
                          maxiter - total)
        n_mv += k
        total += k
        # the iteration at which each instance's estimate first met tol: the estimates never
        # increase (each is the last times s ≤ 1), so it is the count of those that met it
        met = (arnoldi.estimates(k) <= tol).sum(dim=1)
        iters = torch.where(~done & (iters < 0) & (met > 0), (total + 1) - met, iters)
        step, a_k = arnoldi.update(k, beta)
        anorm = torch.maximum(anorm, a_k)
        x = x + (step if pc is None else pc(step))
        fresh = False  # x changed: the next pass (or the end) recomputes the true residual
    if fresh:
        res = rel
    else:
        res = _residual(matvec, b, x, bnorm)
        n_mv += 1
    worse = best_rel < res
    x = torch.where(worse.unsqueeze(1), best_x, x)
    res = torch.where(worse, best_rel, res)
    extra: dict = {}
    converged, extra_mv = _verdict(matvec, b, x, res, tol, anorm, extra)
    # an instance that did not truly converge (or never met the estimate) used every iteration
    iters = torch.where((res <= tol) & (iters >= 0), iters, torch.full_like(iters, total))
    extra["stagnated"] = stalled & ~converged & ~extra["not_isolated"]
    return x, SolveInfo(iters, res, converged, n_mv + extra_mv, "gmres", extra=extra)


class _Arnoldi:
    """GMRES's Arnoldi cycles, written for few tensor operations per iteration.

    Per iteration: the operator, CGS2 as two ``bmm``/``baddbmm`` pairs with the basis in rows
    of a buffer allocated once (the fast orientation of batched matrix-vector products on
    CPU), and the Givens update of only the *last row* ``ℓ`` of the rotation product ``Q``
    (``Q H̄ = [R; 0]``): with ``a = ℓ·h``, ``r = hypot(a, h_{k+1,k})``, ``c = a/r``,
    ``s = h_{k+1,k}/r``, the finished row ``j`` of ``Q`` is ``[cℓ, s]``, the new last row
    ``[−sℓ, c]``, and the residual estimate is multiplied by ``s``. The Hessenberg columns and
    the finished rows are kept as lists and packed once per cycle, where ``R = Q H̄`` is one
    ``bmm``. Mathematically the usual Givens GMRES (Saad, Iterative Methods for Sparse Linear
    Systems, §6.5.3), in about 30 small tensor operations per iteration besides the operator.
    """

    def __init__(self, b: Tensor, m: int, pc: MatVec | None):
        B, n = b.shape
        self.m, self.pc = m, pc
        # 0-dim tensors: an operation with a Python float wraps it into a tensor every call
        self.eps100 = b.new_tensor(100 * torch.finfo(b.dtype).eps)
        self.zero, self.one = b.new_zeros(()), b.new_ones(())
        self.tiny = torch.finfo(b.dtype).tiny
        self.V = b.new_empty(B, m + 1, n)  # Krylov basis, one row per vector
        self.zn = b.new_ones(B, m) if pc is not None else None  # ‖M⁻¹v_j‖ (for ‖A‖)

    def cycle(self, matvec: MatVec, r: Tensor, beta: Tensor, est0: Tensor, tol: float,
              budget: int) -> int:
        """Arnoldi from ``r`` until every instance's estimate ``est0·∏s`` is ≤ ``tol``, the
        basis is full or ``budget`` iterations are spent; returns the iterations run
        (instances with ``est0 = 0`` are not waited for)."""
        V, pc, eps100, tiny, zero = self.V, self.pc, self.eps100, self.tiny, self.zero
        V[:, 0] = r * torch.where(beta > 0, beta.reciprocal(), torch.zeros_like(beta))[:, None]
        L = r.new_ones(r.shape[0], 1, 1)  # the last row of Q so far, (B, 1, j + 1)
        est = est0.view(-1, 1, 1)
        # per column j: h (B, 1, j+1), h_{j+1,j}, ℓ (B, 1, j+1), c and s
        hs: list[Tensor] = []
        hks: list[Tensor] = []
        ls: list[Tensor] = []
        cs: list[Tensor] = []
        ss: list[Tensor] = []
        self.h, self.hk, self.l, self.c, self.s = hs, hks, ls, cs, ss
        k = 0
        for j in range(min(self.m, budget)):
            if pc is None:
                w = matvec(V[:, j])
            else:
                zj = pc(V[:, j])
                assert self.zn is not None  # allocated with the preconditioner
                self.zn[:, j] = zj.norm(dim=1)
                w = matvec(zj)
            k = j + 1
            # CGS2: A = I − Φᵀ maps v to nearly v, so one pass cancels heavily; the second
            # pass saves Krylov iterations (each a VJP) on non-normal Φ
            w = w.unsqueeze(1)
            w0 = torch.linalg.vector_norm(w, dim=2, keepdim=True)
            Vj = V[:, :k]
            VjT = Vj.mT
            h = torch.bmm(w, VjT)
            w = torch.baddbmm(w, h, Vj, alpha=-1)
            h2 = torch.bmm(w, VjT)
            w = torch.baddbmm(w, h2, Vj, alpha=-1)
            h.add_(h2)
            hn = torch.linalg.vector_norm(w, dim=2, keepdim=True)
            # happy breakdown (an invariant subspace): a new direction that is round-off only
            # is dropped, never normalised into a non-orthogonal basis vector
            keep = hn > w0.mul_(eps100)
            hk = hn * keep
            V[:, k: k + 1] = torch.where(keep, w / hn, zero)  # (w / 0 is never selected)
            # Givens on the last row only. r = 0 (a = h_{k+1,k} = 0: the column is exactly
            # zero, the instance broke down before) gives c = s = 0: that row of R is zero,
            # so y = 0 there, and every later column of the cycle is zero too
            a = (L * h).sum(dim=2, keepdim=True)
            rr = torch.hypot(a, hk).clamp_min(tiny)
            c = a / rr
            s = hk / rr
            hs.append(h)
            hks.append(hk)
            ls.append(L)  # row j of Q is [cℓ, s]: scaled by c when packed
            cs.append(c)
            ss.append(s)
            L = torch.cat([L * -s, c], dim=2)
            est = est * s
            if est.max().item() <= tol:
                break
        self._est0 = est0
        return k

    def estimates(self, k: int) -> Tensor:
        """``(B, k)`` relative residual estimates after each iteration of the last cycle."""
        return self._est0[:, None] * torch.cumprod(torch.cat(self.s, dim=2)[:, 0], dim=1)

    def update(self, k: int, beta: Tensor) -> tuple[Tensor, Tensor]:
        """The cycle's correction ``V_k y`` (``y`` minimising ``‖βe₁ − H̄y‖``) and the cycle's
        lower bound on ``‖A‖`` (the largest ``‖A v_j‖ = ‖H̄ e_j‖``, over ``‖M⁻¹v_j‖``)."""
        B, dev = beta.shape[0], beta.device
        # row j of a packed (k, k+1) matrix: j + 1 entries, then one more in column j + 1
        rows, cols = torch.tril_indices(k, k + 1, offset=1, device=dev)
        flat = rows * (k + 1) + cols

        def pack(lower: list[Tensor], upper: list[Tensor]) -> Tensor:
            out = beta.new_zeros(B, k * (k + 1))
            parts = [t for pair in zip(lower, upper) for t in pair]
            out.index_copy_(1, flat, torch.cat(parts, dim=2)[:, 0])
            return out.view(B, k, k + 1)
        Ht = pack(self.h, self.hk)  # row j: column j of H̄
        F = pack(self.l, self.s)  # row j: [ℓ_j, s_j] …
        below = torch.ones(k, k + 1, dtype=torch.bool, device=dev).tril()
        F = F * torch.where(below, torch.cat(self.c, dim=1), self.one)  # … row j of Q: [cℓ, s]
        R = torch.bmm(F, Ht.mT)  # upper triangular up to round-off (only its upper part used)
        diag = torch.diagonal(R, dim1=1, dim2=2)
        R = R + torch.diag_embed((diag == 0).to(R.dtype))  # broken-down columns: y = 0 there
        y = torch.linalg.solve_triangular(R, beta[:, None, None] * F[:, :, :1], upper=True)
        step = torch.bmm(y.mT, self.V[:, :k]).squeeze(1)
        col = Ht.norm(dim=2)
        if self.zn is not None:  # a zero z_j (an instance that broke down) has a zero column
            zn = self.zn[:, :k]
            col = col / torch.where(zn > 0, zn, self.one)
        return step, col.amax(dim=1)


def bicgstab(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
             maxiter: int | None = None, preconditioner: MatVec | None = None
             ) -> tuple[Tensor, SolveInfo]:
    """BiCGStab (van der Vorst), batched with per-instance scalars; two applications per iteration.

    Short recurrences (memory O(B·n), independent of the iteration count); no optimality
    guarantee. A breakdown (``⟨r̂, v⟩ = 0``, e.g. on a step with an exactly nilpotent part)
    restarts the instance with ``r̂ = r``; a second one in a row is reported as
    non-convergence.

    Args:
        preconditioner: ``M⁻¹ ≈ A⁻¹`` (``(B, n) -> (B, n)``), applied on the right: the
            recurrences run on ``A M⁻¹`` and the residual judged is the true ``b − A x``.
            Two applications per iteration.
    """
    _check_b(b, "bicgstab")
    pc = _check_preconditioner(preconditioner, b, "bicgstab")
    B, n = b.shape
    tol = _effective_tol(tol, b.dtype)
    maxiter = int(maxiter) if maxiter is not None else min(max(2 * n, 100), 5000)
    dev, dt = b.device, b.dtype
    tiny = torch.finfo(dt).tiny
    bnorm = b.norm(dim=1)
    denom = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    n_mv = 1 if x0 is not None else 0
    r_hat = r.clone()
    ones = torch.ones(B, dtype=dt, device=dev)
    rho, alpha, omega = ones.clone(), ones.clone(), ones.clone()
    v = torch.zeros_like(b)
    p = torch.zeros_like(b)
    res = r.norm(dim=1) / denom
    active = res > tol
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    anorm = torch.zeros_like(res)  # ‖A‖ ≥ ‖Ap‖/‖p‖, ‖As‖/‖s‖
    restarted = torch.zeros(B, dtype=torch.bool, device=dev)

    def sdiv(a: Tensor, d: Tensor) -> Tensor:
        ok = d.abs() > tiny
        return torch.where(ok, a / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(a))

    k = 0
    while k < maxiter and bool(active.any()):
        k += 1
        rho_new = _bdot(r_hat, r)
        beta = sdiv(rho_new, rho) * sdiv(alpha, omega)
        p = r + beta[:, None] * (p - omega[:, None] * v)
        ph = p if pc is None else pc(p)
        v = matvec(ph)
        alpha = sdiv(rho_new, _bdot(r_hat, v))
        s = r - alpha[:, None] * v
        sh = s if pc is None else pc(s)
        t = matvec(sh)
        n_mv += 2
        anorm = torch.maximum(anorm, torch.maximum(sdiv(v.norm(dim=1), ph.norm(dim=1)),
                                                   sdiv(t.norm(dim=1), sh.norm(dim=1))))
        omega = sdiv(_bdot(t, s), _bdot(t, t))
        x_new = x + alpha[:, None] * ph + omega[:, None] * sh
        r_new = s - omega[:, None] * t
        x = torch.where(active[:, None], x_new, x)
        r = torch.where(active[:, None], r_new, r)
        rho = rho_new
        res_new = r.norm(dim=1) / denom
        res = torch.where(active, res_new, res)
        iters = torch.where(active, torch.full_like(iters, k), iters)
        blown = active & ~torch.isfinite(res)
        # breakdown (⟨r̂, v⟩ or ⟨r̂, r⟩ vanished): restart that instance with r̂ = r, once
        # per stretch of progress; a second breakdown in a row stops it
        broke = active & (alpha == 0) & (res > tol) & ~blown
        stop = blown | (broke & restarted)
        fresh = broke & ~restarted
        restarted = fresh
        if bool(fresh.any()):
            f = fresh[:, None]
            r_hat = torch.where(f, r, r_hat)
            p = torch.where(f, torch.zeros_like(p), p)
            v = torch.where(f, torch.zeros_like(v), v)
            rho = torch.where(fresh, ones, rho)
            alpha = torch.where(fresh, ones, alpha)
            omega = torch.where(fresh, ones, omega)
        active = active & (res > tol) & ~stop
    res = _residual(matvec, b, x, bnorm)
    n_mv += 1
    extra: dict = {}
    converged, extra_mv = _verdict(matvec, b, x, res, tol, anorm, extra)
    return x, SolveInfo(iters, res, converged, n_mv + extra_mv, "bicgstab", extra=extra)
