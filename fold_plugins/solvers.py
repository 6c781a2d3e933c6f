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

Preconditioning: :func:`gmres`, :func:`bicgstab` and :func:`auto` take an optional
``preconditioner``, a callable ``(B, n) -> (B, n)`` applying ``M⁻¹ ≈ A⁻¹`` row by row (pass
it from :func:`fold_plugins.fold` as ``solver_options={"preconditioner": pc}``). It is
applied on the right (the method runs on ``A M⁻¹`` and returns ``x = M⁻¹u``), so the residual
tracked, the tolerance and the final verdict are those of the unpreconditioned system; its
first output is checked (shape, dtype, device, finite). Ready ones for the library's steps
(the exact KKT-structured inverse for ``admm_qp``, the Hessian factor for Newton-type steps,
any dense ``M``) are in :mod:`fold_plugins.preconditioners`. :func:`dense` and
:func:`fixed_point` do not take one.

Every built-in solver ends with the same verdict (``fold_plugins._solver_base``): tol met,
or a residual at the round-off floor (converged, no warning), or a singular ``I − Φ``
(``info.extra["not_isolated"]``: the fixed point is not isolated). :func:`gmres` and
:func:`bicgstab` live in ``fold_plugins._krylov`` and are re-exported here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._conditioning import not_isolated_threshold, rcond_from_factor, roundoff_floor
from ._errors import FoldError
from ._krylov import bicgstab, gmres
from ._solver_base import MatVec, SolveInfo, _check_b, _effective_tol, _verdict
from .protocols import SupportsMatmat, cost_key

__all__ = ["SOLVERS", "SolveInfo", "auto", "bicgstab", "dense", "fixed_point", "get_solver",
           "gmres"]


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
    rnorm = r.norm(dim=1)
    res = rnorm / denom
    active = res > tol
    diverged = torch.zeros(B, dtype=torch.bool, device=b.device)
    iters = torch.zeros(B, dtype=torch.int64, device=b.device)
    anorm = torch.zeros_like(res)  # ‖A‖ ≥ ‖A r‖/‖r‖ = ‖r − r_new‖/‖r‖ for each update r
    tiny = torch.finfo(res.dtype).tiny
    k = 0
    n_active = int(active.sum())
    while k < maxiter and n_active:
        k += 1
        # every instance still iterating (the common case): no masking
        x = x + r if n_active == B else torch.where(active[:, None], x + r, x)
        r_new = b - matvec(x)
        n_mv += 1
        # A r = r − r_new (exactly 0 for a zero r: the operator is linear); fmax keeps a
        # NaN of a blown-up instance out of the bound
        anorm = torch.fmax(anorm, (r - r_new).norm(dim=1) / rnorm.clamp_min(tiny))
        r = r_new if n_active == B else torch.where(active[:, None], r_new, r)
        rnorm = r.norm(dim=1)
        res = rnorm / denom
        iters = iters + active  # active instances are the ones still counting
        ok = res <= divergence_factor  # False for NaN/Inf too
        diverged |= active & ~ok
        active = active & ok & (res > tol)
        n_active = int(active.sum())
    extra: dict = {}
    conv, extra_mv = _verdict(matvec, b, x, res, tol, anorm, extra)
    converged = conv & ~diverged
    return x, SolveInfo(iters, res, converged, n_mv + extra_mv, "fixed_point", diverged, extra)


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
    matmat = matvec.matmat if isinstance(matvec, SupportsMatmat) else None
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


#: ``auto`` never materialises more than this many elements (``B·n²``) for :func:`dense`.
AUTO_DENSE_MAX_ELEMENTS = 1 << 22
#: GMRES iterations assumed for a step ``auto`` has not yet seen run (then: the last count).
AUTO_GMRES_ITERS_GUESS = 30


@dataclass
class _Costs:
    """What ``auto`` knows of one (step, B, n, dtype, device): probes, then measured times."""

    vjp: float  # one operator application (s)
    col: float  # each further column of a batched application (s)
    lu: float  # dense's factorisation, condition estimate and residual (s)
    over: float  # GMRES's own work per iteration besides the operator (s)
    dense: list[float] = field(default_factory=list)  # measured wall times of dense
    gmres: list[float] = field(default_factory=list)  # … of (preconditioned) gmres
    iters: int | None = None  # operator applications gmres needed last time


#: ``auto``'s cost cache, keyed by ``(step code, B, n, dtype, device, preconditioned)``
_AUTO_CACHE: dict[tuple, _Costs] = {}


def _timed(fn: Callable, dev: torch.device) -> tuple[Any, float]:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


def _probe(matvec: MatVec, b: Tensor) -> _Costs:
    """One operator application, one batched application of a few columns, a small LU and
    GMRES's orthogonalisation kernels at this size, each timed once (their results are
    discarded: the only cost of ``auto``'s first call for a step)."""
    B, n = b.shape
    dev, dt = b.device, b.dtype
    _, t1 = _timed(lambda: matvec(b), dev)
    _, t1 = _timed(lambda: matvec(b), dev)  # the first call may pay one-time set-up
    matmat = matvec.matmat if isinstance(matvec, SupportsMatmat) else None
    col = t1
    if matmat is not None and n > 1:
        k = min(n, 8)
        E = b.unsqueeze(0).expand(k, B, n).contiguous()
        _, tk = _timed(lambda: matmat(E), dev)
        col = max(tk - t1, 0.0) / (k - 1)
    # LU: measured at a size capped at ~2e7 flops, scaled by B·n³
    nl, Bl = min(n, 128), max(1, min(B, int(2e7 // max(1, min(n, 128) ** 3))))
    M = torch.eye(nl, dtype=dt, device=dev).expand(Bl, nl, nl) + 1e-3
    _, tl = _timed(lambda: torch.linalg.lu_factor_ex(M), dev)
    lu = 2.0 * tl * (B * n ** 3) / (Bl * nl ** 3)  # LU, then rcond + residual: ≈ 2 LUs
    # GMRES's own kernels (fold_plugins._krylov): two bmm + two baddbmm at half a restart's
    # basis, in the orientation it uses, and ~30 small ops
    kb = max(1, min(n, AUTO_GMRES_ITERS_GUESS) // 2)
    V = b.new_ones(B, kb, n)
    w = b.unsqueeze(1)

    def orth() -> Tensor:
        h = torch.bmm(w, V.mT)
        return torch.baddbmm(w, h, V, alpha=-1)
    def small() -> list[Tensor]:
        return [b.norm(dim=1) for _ in range(10)]
    # the fastest of three calls after a first one: that may pay a kernel's one-time set-up
    # (MKL's small-matrix kernels are generated on first use), which GMRES pays once, not
    # per iteration, and one call of a few µs is at the timer's noise
    tb = min(_timed(orth, dev)[1] for _ in range(4))
    tsmall = min(_timed(small, dev)[1] for _ in range(4))
    return _Costs(vjp=t1, col=col, lu=lu, over=2 * tb + 3 * tsmall)


def _estimates(c: _Costs, n: int) -> tuple[float, float]:
    """(dense, gmres) seconds: the fastest measured run where there is one, else the model."""
    dense_t = min(c.dense) if c.dense else c.vjp + (n - 1) * c.col + c.lu
    k = c.iters if c.iters is not None else min(n, AUTO_GMRES_ITERS_GUESS) + 2
    gmres_t = min(c.gmres) if c.gmres else k * (c.vjp + c.over)
    return dense_t, gmres_t


def _choose_dense(c: _Costs, n: int) -> bool:
    """The cheaper by :func:`_estimates`, except that the other one is tried once while it is
    unmeasured and estimated within 2× of the choice."""
    dense_t, gmres_t = _estimates(c, n)
    use_dense = dense_t <= gmres_t
    other, other_t, best_t = (c.gmres, gmres_t, dense_t) if use_dense else (c.dense, dense_t,
                                                                            gmres_t)
    if not other and other_t < 2.0 * best_t:
        use_dense = not use_dense
    return use_dense


def auto(matvec: MatVec, b: Tensor, *, x0: Tensor | None = None, tol: float = 1e-10,
         maxiter: int | None = None, preconditioner: MatVec | None = None, **options
         ) -> tuple[Tensor, SolveInfo]:
    """:func:`dense` or :func:`gmres` (preconditioned when ``preconditioner`` is given),
    whichever a cost model says is faster for this step at this ``(B, n)``; ``info.solver``
    says which ran.

    Cost model (cached per step code, ``B``, ``n``, dtype and device; the first call probes):
    dense ≈ one batched application of ``n`` columns (one application plus ``n − 1`` times
    the measured cost of a further column) + the LU (timed at a capped size, scaled by
    ``B·n³``); GMRES ≈ (iterations + 2) × (one application + its orthogonalisation). The
    iteration count is a guess (:data:`AUTO_GMRES_ITERS_GUESS`) until GMRES has run on the
    step, then the last count. Measured wall times (the fastest of the last five runs) replace
    the estimates (the first call's, which also probes, is not kept), and the method not
    chosen is tried once while it is unmeasured and estimated within 2× of the choice, so from
    the third or fourth call on the choice rests on measurements of both where they are close.
    Dense is never used beyond :data:`AUTO_DENSE_MAX_ELEMENTS` (memory). The probes (two
    operator applications and one batched application of a few columns) count in
    ``info.n_matvec``.
    """
    _check_b(b, "auto")
    B, n = b.shape
    run_gmres = lambda: gmres(matvec, b, x0=x0, tol=tol, maxiter=maxiter,  # noqa: E731
                              preconditioner=preconditioner, **options)
    if B * n * n > AUTO_DENSE_MAX_ELEMENTS:
        return run_gmres()
    key = (cost_key(matvec), B, n, b.dtype, b.device, preconditioner is None)
    c = _AUTO_CACHE.get(key)
    n_probe = 0
    if c is None:
        c = _probe(matvec, b)
        n_probe = 2 + (1 if isinstance(matvec, SupportsMatmat) and n > 1 else 0)
        if len(_AUTO_CACHE) > 256:
            _AUTO_CACHE.clear()
        _AUTO_CACHE[key] = c
    # the probing call runs cold (caches, allocator): its time is not kept
    if _choose_dense(c, n):
        (x, info), t = _timed(lambda: dense(matvec, b, x0=x0, tol=tol, maxiter=maxiter), b.device)
        c.dense = c.dense if n_probe else (c.dense + [t])[-5:]
    else:
        (x, info), t = _timed(run_gmres, b.device)
        c.gmres = c.gmres if n_probe else (c.gmres + [t])[-5:]
        c.iters = info.n_matvec
    info.n_matvec += n_probe
    return x, info


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
