"""Conditioning of the backward system ``(I − Φ)ᵀ v = g``: one judgement for every solver.

Three questions decide whether an unconverged (or suspiciously converged) backward solve is a
failure, an artefact of rounding, or a problem without an isolated fixed point:

* :func:`rcond_from_factor` — the reciprocal 1-norm condition number of a factored dense
  matrix (LU or Cholesky), ``O(n²)`` per instance (Hager–Higham estimator).
* :func:`krylov_rcond` — for a matrix-free operator, ``σ_min / σ_max`` of the Hessenberg
  matrix of a short Arnoldi process; ``σ_min(H̄_k) ≥ σ_min(A)``, so a tiny value proves that
  ``A`` is (numerically) singular.
* :func:`roundoff_floor` — the smallest relative residual a backward-stable solve can reach
  in the operator's dtype: ``c·eps·‖A‖‖x‖ / ‖b‖``.

A reciprocal condition number at or below :func:`not_isolated_threshold` means ``I − Φ`` is
singular to working precision: ``Φ`` has an eigenvalue 1, so the fixed point is not isolated
(a gauge or a symmetry, e.g. Sinkhorn potentials defined up to an additive constant) and
``dx*/dθ`` is not defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["krylov_rcond", "noise_and_gain", "not_isolated_threshold", "operator_noise",
           "rcond_from_factor", "roundoff_floor"]


def not_isolated_threshold(dtype: torch.dtype, n: int) -> float:
    """Reciprocal condition at or below which ``I − Φ`` counts as singular: ``10·eps``.

    An exact eigenvalue 1 of ``Φ`` (a gauge) leaves ``σ_min(I − Φ)`` at round-off, so both
    estimators read ``≤ eps`` (measured on log-domain Sinkhorn: 1e-17 – 1.3e-16 in float64,
    4e-9 – 8e-8 in float32); 10 covers their slack. An isolated but ill-conditioned system
    stays above it (``ρ(Φ) = 1 − 1e-7``: ≈ 5e-8 in float64; a float32 QP with κ ≈ 1e5).
    ``n`` is accepted for callers that scale by size and unused.
    """
    return 10.0 * torch.finfo(dtype).eps


def roundoff_floor(anorm: Tensor, xnorm: Tensor, bnorm: Tensor, n: int) -> Tensor:
    """``(B,)`` relative residual a backward-stable solve reaches: ``10·√n·eps·‖A‖‖x‖/‖b‖``.

    A residual below it cannot be asked of any solver in this dtype (the residual itself is
    computed with that error); it grows with the condition of ``A`` through ``‖x‖/‖b‖``.
    """
    eps = torch.finfo(xnorm.dtype).eps
    den = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    return 10.0 * math.sqrt(max(n, 1)) * eps * anorm * xnorm / den


def operator_noise(matvec: Callable[[Tensor], Tensor], x: Tensor, seed: int = 0) -> Tensor:
    """``(B,)`` absolute round-off of ``A`` at ``x``'s scale: ``‖A(x+w) − A x − A w‖ / √3``.

    ``w`` is a random vector with ``‖w‖ = ‖x‖``. In exact arithmetic the defect is 0; in
    floating point it is the error of three applications of ``A`` to vectors of that size —
    the accuracy of the step's VJP, including round-off amplified inside the step (a
    Cholesky solve of an ill-conditioned matrix …), which no dtype constant knows. Three
    applications of ``A``.
    """
    return noise_and_gain(matvec, x, seed)[0]


def noise_and_gain(matvec: Callable[[Tensor], Tensor], x: Tensor, seed: int = 0
                   ) -> tuple[Tensor, Tensor]:
    """:func:`operator_noise` and, from the same three applications, ``‖A w‖ / ‖w‖`` for the
    random ``w``: a lower bound of ``‖A‖`` for a caller that never applied ``A`` to a
    plain vector (a right-preconditioned solver applies it to ``M⁻¹v`` only)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    w = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    xn = x.norm(dim=1, keepdim=True)
    w = w * torch.where(xn > 0, xn, torch.ones_like(xn)) / w.norm(dim=1, keepdim=True)
    aw = matvec(w)
    defect = matvec(x + w) - matvec(x) - aw
    wn = w.norm(dim=1)
    return defect.norm(dim=1) / math.sqrt(3.0), aw.norm(dim=1) / torch.where(
        wn > 0, wn, torch.ones_like(wn))


#: up to this size :func:`rcond_from_factor` forms ``M⁻¹`` and is exact (cheaper than estimating)
EXACT_RCOND_MAX_N = 16


def rcond_from_factor(M: Tensor, how: str, F: Tensor, piv: Tensor | None) -> Tensor:
    """``(B,)`` estimate of ``1 / (‖M‖₁ ‖M⁻¹‖₁)`` from a factor of ``M`` (``(B, n, n)``).

    Args:
        how: ``"lu"`` (``F, piv`` from ``torch.linalg.lu_factor``) or ``"cholesky"`` (``F`` the
            lower Cholesky factor, ``piv`` unused).

    ``‖M⁻¹‖₁`` comes from Hager's estimator (``y = M⁻¹x`` with ``x = 1/n``, ``z = M⁻ᵀsign(y)``,
    then ``M⁻¹e_j`` at ``j = argmax |z_j|``) together with Higham's alternating vector
    ``x_i ∝ (−1)ⁱ(1 + i/(n−1))``: three solves with the factor. Every probe
    ``‖M⁻¹x‖₁/‖x‖₁`` is a lower bound of ``‖M⁻¹‖₁``, so the estimate errs on the optimistic
    side (usually within a factor 3). NaN where the factor is not usable. For ``n ≤``
    :data:`EXACT_RCOND_MAX_N` ``M⁻¹`` itself is formed from the factor (one solve with ``n``
    right-hand sides, fewer kernels than the estimator's three) and ``‖M⁻¹‖₁`` is exact.
    """
    B, n, _ = M.shape

    def solve(X: Tensor, adjoint: bool = False) -> Tensor:  # X: (B, n, k)
        if how == "cholesky":  # M⁻¹ = L⁻ᵀL⁻¹: two triangular solves
            return torch.cholesky_solve(X, F) if X.shape[-1] == n else \
                torch.linalg.solve_triangular(
                    F.mT, torch.linalg.solve_triangular(F, X, upper=False), upper=True)
        return torch.linalg.lu_solve(F, piv, X, adjoint=adjoint)

    if n <= EXACT_RCOND_MAX_N:
        eye = torch.eye(n, dtype=M.dtype, device=M.device).expand(B, n, n)
        est = solve(eye).abs().sum(dim=-2).amax(dim=-1)  # ‖M⁻¹‖₁ itself
    else:
        est = _inverse_norm1_estimate(solve, M)
    denom = M.abs().sum(dim=-2).amax(dim=-1) * est
    ok = torch.isfinite(denom) & (denom > 0)
    return torch.where(ok, 1 / torch.where(ok, denom, torch.ones_like(denom)),
                       torch.full_like(denom, math.nan))


def _inverse_norm1_estimate(solve: Callable[..., Tensor], M: Tensor) -> Tensor:
    """Hager's lower bound of ``‖M⁻¹‖₁`` with Higham's extra vector: three ``solve`` calls
    (:func:`rcond_from_factor`'s docstring)."""
    B, n, _ = M.shape
    i = torch.arange(n, dtype=M.dtype, device=M.device)
    alt = (1 - 2 * (i % 2)) * (1 + i / max(n - 1, 1))
    X = torch.stack([M.new_full((n,), 1.0 / n), alt / alt.abs().sum()], dim=1)
    Y = solve(X.expand(B, n, 2).contiguous())
    y = Y[..., 0]
    est = Y.abs().sum(dim=1).amax(dim=1)
    if n > 1:
        z = solve(torch.where(y >= 0, 1.0, -1.0).to(M.dtype).unsqueeze(2), adjoint=True)
        e = torch.zeros_like(y).scatter_(1, z.squeeze(2).abs().argmax(dim=1, keepdim=True), 1.0)
        est = torch.maximum(est, solve(e.unsqueeze(2)).abs().sum(dim=(1, 2)))
    return est


def krylov_rcond(matvec: Callable[[Tensor], Tensor], like: Tensor, k: int = 40,
                 seed: int = 0) -> Tensor:
    """``(B,)`` ``σ_min(H̄_k) / σ_max(H̄_k)`` of ``k`` Arnoldi steps on ``A`` from a random start.

    ``H̄_k`` (``(k+1) × k``) satisfies ``A V_k = V_{k+1} H̄_k``, so ``σ_min(H̄_k) ≥ σ_min(A)``
    and ``σ_max(H̄_k) ≤ σ_max(A)``: the ratio is an upper bound of ``A``'s reciprocal
    2-norm condition only up to the second factor, and it converges from above as ``k``
    grows. A value near round-off is hard evidence of a singular ``A``; the eigenvalue 1 of a
    non-expansive ``Φ`` (a gauge) sits on the boundary of its spectrum, which Arnoldi
    resolves within a few tens of steps. Costs ``k`` applications of ``A``.

    Args:
        like: ``(B, n)`` tensor giving shape, dtype and device.
    """
    B, n = like.shape
    k = max(1, min(int(k), n))
    dt, dev = like.dtype, like.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    v = torch.randn(B, n, generator=gen, dtype=dt, device=dev)
    V = [v / v.norm(dim=1, keepdim=True)]
    H = torch.zeros(B, k + 1, k, dtype=dt, device=dev)
    brk = 100 * torch.finfo(dt).eps
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    ncols = torch.zeros(B, dtype=torch.int64, device=dev)
    for j in range(k):
        ncols = ncols + alive.to(torch.int64)
        w = matvec(V[j])
        w0 = w.norm(dim=1)
        Vs = torch.stack(V, dim=1)  # (B, j+1, n)
        for _ in range(2):  # CGS2
            h = torch.bmm(Vs, w.unsqueeze(2)).squeeze(2)
            w = w - torch.bmm(h.unsqueeze(1), Vs).squeeze(1)
            H[:, : j + 1, j] += h * alive[:, None]
        hn = w.norm(dim=1)
        ok = alive & (hn > brk * w0)
        H[:, j + 1, j] = torch.where(ok, hn, torch.zeros_like(hn))
        # an invariant subspace was found: the instance's H̄ stays as it is (exact there)
        alive = ok
        V.append(torch.where(ok[:, None], w / torch.where(ok, hn, torch.ones_like(hn))[:, None],
                             torch.zeros_like(w)))
        if not bool(alive.any()):
            k = j + 1
            break
    # columns after an instance's breakdown are zero: drop them from its singular values
    s = torch.linalg.svdvals(H[:, : k + 1, :k])
    smin = s.gather(1, (ncols.clamp(1, k) - 1).unsqueeze(1)).squeeze(1)
    smax = s[:, 0]
    return torch.where(smax > 0, smin / torch.where(smax > 0, smax, torch.ones_like(smax)),
                       torch.zeros_like(smax))
