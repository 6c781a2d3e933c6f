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

    The inner loop is written for few tensor operations per iteration (≈30, besides the
    operator): at small sizes their dispatch, not the arithmetic, is what costs.

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
    dev, dt = b.device, b.dtype
    eps100 = 100 * torch.finfo(dt).eps
    inf_b = torch.full((B, 1), math.inf, dtype=dt, device=dev)
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
        iters = torch.where(done & (iters < 0), torch.full_like(iters, total), iters)
        iters = torch.where(done, iters, torch.full_like(iters, -1))
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
        V = torch.zeros(B, m + 1, n, dtype=dt, device=dev)  # Krylov basis, rows per instance
        R = torch.zeros(B, m, m, dtype=dt, device=dev)
        # Q: product of the Givens rotations so far, so each new Hessenberg column is rotated
        # with one small bmm instead of j sequential rotations
        Q = torch.eye(m + 1, dtype=dt, device=dev).repeat(B, 1, 1)
        est_hist = torch.zeros(B, m, dtype=dt, device=dev)
        beta_rel = rel  # ‖r‖/‖b‖: the estimate is |beta_rel · Q[j+1, 0]|
        V[:, 0] = r * torch.where(beta > 0, beta.reciprocal(), torch.zeros_like(beta))[:, None]
        k = 0
        for j in range(m):
            if total >= maxiter:
                break
            vj = V[:, j]
            if pc is None:
                w = matvec(vj)
                w0 = w.norm(dim=1)
                anorm = torch.maximum(anorm, w0)  # ‖A‖ ≥ ‖A v‖, ‖v‖ = 1
            else:
                zj = pc(vj)
                w = matvec(zj)
                w0 = w.norm(dim=1)
                zn = zj.norm(dim=1)
                anorm = torch.maximum(anorm, w0 / torch.where(zn > 0, zn, torch.ones_like(zn)))
            n_mv += 1
            total += 1
            k = j + 1
            # CGS2: A = I − Φᵀ maps v to nearly v, so one pass cancels heavily; the second
            # pass saves Krylov iterations (each a VJP) on non-normal Φ. Rows kept (B, 1, n)
            # so each pass is one bmm and one fused baddbmm
            Vj = V[:, :k]
            w = w.unsqueeze(1)
            h = torch.bmm(Vj, w.mT)
            w = torch.baddbmm(w, h.mT, Vj, alpha=-1)
            h2 = torch.bmm(Vj, w.mT)
            w = torch.baddbmm(w, h2.mT, Vj, alpha=-1)
            hn = w.norm(dim=2)  # (B, 1)
            # happy breakdown (an invariant subspace): a new direction that is round-off only
            # is dropped, never normalised into a non-orthogonal basis vector
            keep = hn > eps100 * w0.unsqueeze(1)
            hk = hn * keep
            V[:, k: k + 1] = w / torch.where(keep, hn, inf_b).unsqueeze(2)
            col = torch.bmm(Q[:, : k + 1, : k + 1], torch.cat([h + h2, hk.unsqueeze(2)], dim=1))
            a, c = col[:, j, 0], col[:, k, 0]
            rr = torch.hypot(a, c)
            zero = rr == 0  # an instance already broken down: identity rotation
            a1 = a + zero
            G = torch.stack([a1, c, -c, a1], dim=1).view(B, 2, 2) / (rr + zero).view(B, 1, 1)
            Q[:, j: k + 1, : k + 1] = torch.bmm(G, Q[:, j: k + 1, : k + 1])
            R[:, :k, j] = col[:, :k, 0]
            R[:, j, j] = rr
            est = Q[:, k, 0].abs() * beta_rel
            est_hist[:, j] = est
            if bool(((est <= tol) | done).all()):
                break
        # first iteration of this cycle at which each instance's estimate met tol
        met = est_hist[:, :k] <= tol
        first = torch.where(met.any(dim=1), met.float().argmax(dim=1) + 1,
                            torch.full_like(iters, k))
        iters = torch.where(~done & (iters < 0) & met.any(dim=1), total - k + first, iters)
        Rk = R[:, :k, :k]
        diag = torch.diagonal(Rk, dim1=1, dim2=2)
        Rk = Rk + torch.diag_embed((diag == 0).to(dt))  # broken-down columns: y = 0 there
        gk = beta.unsqueeze(1) * Q[:, :k, 0]
        y = torch.linalg.solve_triangular(Rk, gk.unsqueeze(2), upper=True)
        step = torch.bmm(y.transpose(1, 2), V[:, :k]).squeeze(1)
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
