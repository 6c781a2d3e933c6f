"""Backward linear solvers sharing one batched, matrix-free protocol.

Every solver has the signature::

    solve(matvec, b, *, x0=None, tol=1e-10, maxiter=None, **options) -> (x, SolveInfo)

``b`` has shape ``(B, n)``: ``B`` independent systems of size ``n``. ``matvec`` maps a
``(B, n)`` tensor to ``(B, n)`` (``A`` applied to each instance) and may expose
``matvec.matmat(V)`` mapping ``(k, B, n) -> (k, B, n)`` for batched application (used by
:func:`dense`). Inner products, step sizes and stopping decisions are per instance: each
system stops when ``‖b − A x‖ ≤ tol · ‖b‖`` on its own. Results keep ``b``'s dtype and
device; nothing is allocated elsewhere.

In :func:`fold_plugins.fold` the operator is ``A = I − Φᵀ`` with ``Φ = ∂U/∂x`` at the
fixed point, applied through vector-Jacobian products of one update step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._conditioning import (
    krylov_rcond,
    not_isolated_threshold,
    operator_noise,
    rcond_from_factor,
    roundoff_floor,
)
from ._errors import FoldError

__all__ = ["SOLVERS", "SolveInfo", "auto", "bicgstab", "dense", "fixed_point", "get_solver",
           "gmres"]

MatVec = Callable[[Tensor], Tensor]


@dataclass
class SolveInfo:
    """Per-instance outcome of a batched linear solve.

    Attributes:
        iterations: ``(B,)`` int64, iterations each instance needed (``maxiter`` if it never
            converged). For :func:`dense` it is the number of operator applications (``n``).
        residual: ``(B,)`` relative residual ``‖b − A x‖ / ‖b‖`` of the returned ``x``
            (absolute where ``b = 0``).
        converged: ``(B,)`` bool, ``residual ≤ tol``.
        n_matvec: operator applications of ``A`` in total (one batched call counts once).
        diverged: ``(B,)`` bool, the iteration blew up (only :func:`fixed_point` sets it).
        solver: the solver's name.
        extra: solver-specific ``(B,)`` flags. Every built-in solver sets
            ``"not_isolated"`` (bool): ``I − Φ`` is singular to working precision there (the
            fixed point is not isolated), never counted as converged; and
            ``"roundoff_floor"``: the relative residual a backward-stable solve can reach in
            this dtype (an instance whose residual is below it counts as converged even when
            ``tol`` is smaller). :func:`gmres` adds ``"stagnated"``.
    """

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    n_matvec: int
    solver: str = ""
    diverged: Tensor | None = None
    extra: dict = field(default_factory=dict)


def _bdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=-1)


def _check_b(b: Tensor, name: str) -> None:
    if not isinstance(b, Tensor) or b.dim() != 2:
        shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
        raise FoldError(f"{name}: b must be a (B, n) tensor, got {shape}; flatten each "
                        "instance's right-hand side into one row.")
    if not b.is_floating_point():
        raise FoldError(f"{name}: b must be floating point, got {b.dtype}.")


def _effective_tol(tol: float, dtype: torch.dtype) -> float:
    """Relative tolerance floored at 50·eps of ``dtype`` (1e-10 is unreachable in float32)."""
    if tol < 0 or not math.isfinite(tol):
        raise FoldError(f"tol must be a finite number ≥ 0, got {tol!r}.")
    return max(float(tol), 50.0 * torch.finfo(dtype).eps)


def _residual(matvec: MatVec, b: Tensor, x: Tensor, bnorm: Tensor) -> Tensor:
    r = b - matvec(x)
    return r.norm(dim=1) / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))


def _verdict(matvec: MatVec, b: Tensor, x: Tensor, res: Tensor, tol: float, anorm: Tensor,
             extra: dict) -> tuple[Tensor, int]:
    """Final judgement shared by the iterative solvers: ``(converged, extra matvecs)``.

    Where some instance missed ``tol``, a short Arnoldi process
    (:func:`fold_plugins._conditioning.krylov_rcond`) first tells a singular ``I − Φ`` (the
    fixed point is not isolated: a gauge) from the rest; those are never converged. An
    instance that is not singular and whose residual is at the dtype's round-off floor
    (:func:`fold_plugins._conditioning.roundoff_floor`, capped at ``√eps``) counts as
    converged: asking for less is asking the impossible, and a warning would be a false alarm.
    """
    B, n = b.shape
    floor = roundoff_floor(anorm, x.norm(dim=1), b.norm(dim=1), n)
    floor = torch.minimum(floor, torch.full_like(floor, math.sqrt(torch.finfo(b.dtype).eps)))
    extra["roundoff_floor"] = floor
    extra["not_isolated"] = torch.zeros(B, dtype=torch.bool, device=b.device)
    converged = res <= tol
    missed = ~converged & torch.isfinite(res)
    if not bool(missed.any()):
        return converged, 0
    k = min(n, 40)
    rc = krylov_rcond(matvec, b, k=k)
    extra["rcond_estimate"] = rc
    singular = missed & (rc <= not_isolated_threshold(b.dtype, n))
    extra["not_isolated"] = singular
    # round-off inside the step (e.g. a Cholesky solve of an ill-conditioned matrix) makes the
    # operator itself inexact: measure it by its defect of linearity at x's scale
    noise = operator_noise(matvec, x)
    den = b.norm(dim=1)
    floor = torch.maximum(floor, 10 * noise / torch.where(den > 0, den, torch.ones_like(den)))
    floor = torch.minimum(floor, torch.full_like(floor, math.sqrt(torch.finfo(b.dtype).eps)))
    extra["roundoff_floor"] = floor
    converged = converged | (missed & ~singular & (res <= floor))
    return converged, k + 3


def fixed_point(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
                maxiter: int | None = None, divergence_factor: float = 1e8
                ) -> tuple[Tensor, SolveInfo]:
    """Linear fixed-point iteration ``x ← x + (b − A x)``, i.e. ``v ← Φᵀv + g`` for ``A = I − Φᵀ``.

    Started from ``x0 = 0`` its k-th iterate is ``Σ_{i<k} (Φᵀ)^i g``: exactly the gradient
    that unrolling k solver steps from the fixed point computes. Converges iff ``ρ(Φ) < 1``,
    at rate ``ρ(Φ)`` per iteration. One operator application per iteration.

    Args:
        divergence_factor: an instance whose residual grows past this multiple of ‖b‖ (or
            becomes non-finite) is stopped and flagged ``diverged``.
    """
    _check_b(b, "fixed_point")
    B, n = b.shape
    tol = _effective_tol(tol, b.dtype)
    maxiter = int(maxiter) if maxiter is not None else min(max(1000, 20 * n), 10_000)
    bnorm = b.norm(dim=1)
    denom = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    n_mv = 1 if x0 is not None else 0
    res = r.norm(dim=1) / denom
    active = res > tol
    diverged = torch.zeros(B, dtype=torch.bool, device=b.device)
    iters = torch.zeros(B, dtype=torch.int64, device=b.device)
    anorm = torch.zeros_like(res)  # ‖A‖ ≥ ‖A r‖/‖r‖ = ‖r − r_new‖/‖r‖ for each update r
    k = 0
    while k < maxiter and bool(active.any()):
        k += 1
        x = torch.where(active[:, None], x + r, x)
        r_new = b - matvec(x)
        n_mv += 1
        rn = r.norm(dim=1)
        anorm = torch.maximum(anorm, torch.where(rn > 0, (r - r_new).norm(dim=1) / rn.clamp_min(
            torch.finfo(rn.dtype).tiny), anorm))
        r = torch.where(active[:, None], r_new, r)
        res = r.norm(dim=1) / denom
        iters = torch.where(active, torch.full_like(iters, k), iters)
        blown = active & (~torch.isfinite(res) | (res > divergence_factor))
        diverged |= blown
        active = active & (res > tol) & ~blown
    extra: dict = {}
    conv, extra_mv = _verdict(matvec, b, x, res, tol, anorm, extra)
    converged = conv & ~diverged
    return x, SolveInfo(iters, res, converged, n_mv + extra_mv, "fixed_point", diverged, extra)


def gmres(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
          maxiter: int | None = None, restart: int | None = None) -> tuple[Tensor, SolveInfo]:
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
    """
    _check_b(b, "gmres")
    B, n = b.shape
    tol = _effective_tol(tol, b.dtype)
    maxiter = int(maxiter) if maxiter is not None else min(max(2 * n, 100), 5000)
    m = int(restart) if restart is not None else min(n, 60)
    m = max(1, min(m, n, maxiter))
    dev, dt = b.device, b.dtype
    eps100 = 100 * torch.finfo(dt).eps
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
            w = matvec(V[:, j])
            n_mv += 1
            total += 1
            k = j + 1
            w0 = w.norm(dim=1)
            anorm = torch.maximum(anorm, w0)
            # CGS2: A = I − Φᵀ maps v to nearly v, so one pass cancels heavily; the second
            # pass saves Krylov iterations (each a VJP) on non-normal Φ
            Vj = V[:, :k]
            h = torch.bmm(Vj, w.unsqueeze(2))
            w = w - torch.bmm(h.transpose(1, 2), Vj).squeeze(1)
            h2 = torch.bmm(Vj, w.unsqueeze(2))
            w = w - torch.bmm(h2.transpose(1, 2), Vj).squeeze(1)
            hn = w.norm(dim=1)
            # happy breakdown (an invariant subspace): a new direction that is round-off only
            # is dropped, never normalised into a non-orthogonal basis vector
            keep = hn > eps100 * w0
            inv = torch.where(keep, hn.reciprocal(), torch.zeros_like(hn))
            V[:, k] = w * inv.unsqueeze(1)
            col = torch.cat([(h + h2).squeeze(2), (hn * keep).unsqueeze(1)], dim=1)
            col = torch.bmm(Q[:, : k + 1, : k + 1], col.unsqueeze(2)).squeeze(2)
            a, c = col[:, j], col[:, k]
            rr = torch.hypot(a, c)
            zero = rr == 0  # an instance already broken down: identity rotation
            rr1 = rr + zero
            G = torch.stack([a + zero, c, -c, a + zero], dim=1).view(B, 2, 2) / rr1.view(B, 1, 1)
            Q[:, j: k + 1, : k + 1] = torch.bmm(G, Q[:, j: k + 1, : k + 1])
            col[:, j] = rr
            R[:, :k, j] = col[:, :k]
            est = (beta_rel * Q[:, k, 0]).abs()
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
        x = x + torch.bmm(y.transpose(1, 2), V[:, :k]).squeeze(1)
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
             maxiter: int | None = None) -> tuple[Tensor, SolveInfo]:
    """BiCGStab (van der Vorst), batched with per-instance scalars; two applications per iteration.

    Short recurrences (memory O(B·n), independent of the iteration count); no optimality
    guarantee. A breakdown (``⟨r̂, v⟩ = 0``, e.g. on a step with an exactly nilpotent part)
    restarts the instance with ``r̂ = r``; a second one in a row is reported as
    non-convergence.
    """
    _check_b(b, "bicgstab")
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
        v = matvec(p)
        alpha = sdiv(rho_new, _bdot(r_hat, v))
        s = r - alpha[:, None] * v
        t = matvec(s)
        n_mv += 2
        anorm = torch.maximum(anorm, torch.maximum(sdiv(v.norm(dim=1), p.norm(dim=1)),
                                                   sdiv(t.norm(dim=1), s.norm(dim=1))))
        omega = sdiv(_bdot(t, s), _bdot(t, t))
        x_new = x + alpha[:, None] * p + omega[:, None] * s
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


def dense(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
          maxiter: int | None = None, chunk_elements: int = 1 << 24) -> tuple[Tensor, SolveInfo]:
    """Materialise ``A`` column by column (``n`` applications, batched when the operator allows)
    and solve each instance with LU. Exact up to rounding; best for small ``n``.

    Uses ``matvec.matmat`` (``(k, B, n) -> (k, B, n)``) when present, in chunks of at most
    ``chunk_elements`` elements; otherwise ``n`` single applications. ``x0`` and ``maxiter``
    are accepted for the protocol and ignored.

    The LU factor also gives each instance's reciprocal condition estimate
    (:func:`fold_plugins._conditioning.rcond_from_factor`, in ``info.extra["rcond_estimate"]``).
    Where it is at round-off level (:func:`fold_plugins._conditioning.not_isolated_threshold`)
    ``I − Φ`` is singular: the instance is flagged in ``info.extra["not_isolated"]`` and
    never counted as converged (its ``x`` is one of infinitely many solutions, NaN where the
    factorisation broke down).
    """
    _check_b(b, "dense")
    B, n = b.shape
    tol = _effective_tol(tol, b.dtype)
    dev, dt = b.device, b.dtype
    cols = []
    matmat = getattr(matvec, "matmat", None)
    n_mv = 0
    if matmat is not None:
        k = max(1, min(n, chunk_elements // max(1, B * n)))
        for start in range(0, n, k):
            stop = min(n, start + k)
            E = torch.zeros(stop - start, B, n, dtype=dt, device=dev)
            idx = torch.arange(start, stop, device=dev)
            E[torch.arange(stop - start, device=dev), :, idx] = 1
            cols.append(matmat(E))
            n_mv += 1
        AT = torch.cat(cols, dim=0)  # (n, B, n): AT[j, b] = A_b e_j
    else:
        for j in range(n):
            e = torch.zeros(B, n, dtype=dt, device=dev)
            e[:, j] = 1
            cols.append(matvec(e))
            n_mv += 1
        AT = torch.stack(cols, dim=0)
    A = AT.permute(1, 2, 0)  # (B, n, n)
    LU, piv, status = torch.linalg.lu_factor_ex(A)
    usable = status == 0
    if bool(usable.all()):
        rcond = rcond_from_factor(A, "lu", LU, piv)
    else:  # an exactly singular factor: estimate on the others, solve those with I
        eye = torch.eye(n, dtype=dt, device=dev).expand(B, n, n)
        LU, piv, _ = torch.linalg.lu_factor_ex(torch.where(usable[:, None, None], A, eye))
        rcond = torch.where(usable, rcond_from_factor(A, "lu", LU, piv),
                            torch.zeros(B, dtype=dt, device=dev))
    x = torch.linalg.lu_solve(LU, piv, b.unsqueeze(2)).squeeze(2)
    # the fixed point is not isolated where I − Φᵀ is singular to working precision: LU then
    # returns one of infinitely many solutions (its component along the null space is
    # round-off amplified), so the instance is never reported converged
    finite_a = torch.isfinite(A).all(dim=2).all(dim=1)  # a NaN VJP is another verdict
    not_isolated = finite_a & (~usable | ~torch.isfinite(rcond)
                               | (rcond <= not_isolated_threshold(dt, n)))
    x = torch.where(usable[:, None], x, torch.full_like(x, math.nan))
    bnorm = b.norm(dim=1)
    res = (b - torch.einsum("bij,bj->bi", A, x)).norm(dim=1)
    res = res / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    res = torch.where(torch.isfinite(res), res, torch.full_like(res, math.inf))
    anorm = A.abs().sum(dim=-2).amax(dim=-1)  # ‖A‖₁ ≥ ‖A‖₂/√n: a floor on the safe side
    floor = roundoff_floor(anorm, x.norm(dim=1), bnorm, n)
    converged = ((res <= tol) | (res <= floor)) & ~not_isolated
    iters = torch.full((B,), n, dtype=torch.int64, device=dev)
    return x, SolveInfo(iters, res, converged, n_mv, "dense",
                        extra={"not_isolated": not_isolated, "rcond_estimate": rcond,
                               "roundoff_floor": floor})


#: ``auto`` uses :func:`dense` up to this many state entries per instance (measured in
#: ``comparisons`` scaling: dense's one batched VJP + LU beat GMRES's n sequential autograd
#: calls up to n ≈ 200, and lost 2.3× at n = 400) ...
AUTO_DENSE_MAX_N = 128
#: ... and while the materialised (B, n, n) system stays below this many elements.
AUTO_DENSE_MAX_ELEMENTS = 1 << 22


def auto(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
         maxiter: int | None = None, **options) -> tuple[Tensor, SolveInfo]:
    """:func:`dense` for small systems (``n ≤ AUTO_DENSE_MAX_N`` and ``B·n² ≤
    AUTO_DENSE_MAX_ELEMENTS``), :func:`gmres` otherwise; ``info.solver`` says which ran.

    At small sizes the cost of a Krylov method is its sequential operator applications (one
    autograd call each), which dense replaces with one batched application and an LU.
    """
    _check_b(b, "auto")
    B, n = b.shape
    if n <= AUTO_DENSE_MAX_N and B * n * n <= AUTO_DENSE_MAX_ELEMENTS:
        return dense(matvec, b, x0=x0, tol=tol, maxiter=maxiter)
    return gmres(matvec, b, x0=x0, tol=tol, maxiter=maxiter, **options)


SOLVERS: dict[str, Callable] = {
    "fixed_point": fixed_point,
    "gmres": gmres,
    "bicgstab": bicgstab,
    "dense": dense,
    "auto": auto,
}


def get_solver(solver: str | Callable) -> tuple[str, Callable]:
    """Resolve a solver name or callable to ``(name, callable)``."""
    if callable(solver):
        return getattr(solver, "__name__", "custom"), solver
    if isinstance(solver, str) and solver in SOLVERS:
        return solver, SOLVERS[solver]
    raise FoldError(f"solver must be one of {sorted(SOLVERS)} or a callable "
                    f"solve(matvec, b, *, x0, tol, maxiter) -> (x, info); got {solver!r}.")
