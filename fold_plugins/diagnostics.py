"""Diagnostics of an update step at its fixed point: ρ(Φ), residuals, unrolling predictions.

Unrolling K steps from the fixed point computes K iterations of ``v ← Φᵀv + g``, whose error
decays like ``ρ(Φ)^K`` (``Φ = ∂U/∂x`` at ``x*``). These helpers measure ``ρ(Φ)`` per
instance with VJPs only and turn it into the iteration count an unrolled backward needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._errors import FoldError, instance_list
from ._verdicts import NOT_ISOLATED
from .fold import State, linearize

__all__ = [
    "fixed_point_residual",
    "predicted_unroll_error",
    "spectral_radius",
    "unit_eigenvalues",
    "unroll_iterations_needed",
    "unrolling_report",
]


def spectral_radius(step: Callable, x_star: State, *params: Any, batched: bool = True,
                    method: str = "arnoldi", maxiter: int | None = None, tol: float = 1e-7,
                    window: int = 10, seed: int = 0) -> Tensor:
    """Estimate ``ρ(Φ)``, ``Φ = ∂U/∂x (x*)``, per instance, from VJPs with ``Φᵀ`` only.

    Args:
        method: ``"arnoldi"`` (default): ``k`` Arnoldi steps on ``Φᵀ`` from a random start and
            the largest Ritz value modulus; exact (up to rounding) when ``k ≥ n``, and the
            extremal eigenvalues converge first otherwise. ``"power"``: power iteration, the
            estimate being the larger Ritz value modulus on the last two iterates (exact for
            a dominant real eigenvalue, ± pair or complex pair once they align), stopped
            when it changed by < ``tol`` for ``window`` consecutive iterations.
        maxiter: VJPs to spend (default: ``min(n, 80)`` for Arnoldi, 500 for power).

    Returns:
        ``(B,)`` tensor (``(1,)`` when ``batched=False``) in the state's dtype/device.
    """
    if method not in ("arnoldi", "power"):
        raise FoldError(f"spectral_radius: method must be 'arnoldi' or 'power', got {method!r}.")
    lin, v = _linearize_with_start(step, x_star, params, batched, seed)
    ref = lin.x_parts[0]
    B, n = lin.spec.B, lin.spec.n
    tiny = torch.finfo(ref.dtype).tiny
    if method == "arnoldi":
        k = max(1, min(n, maxiter if maxiter is not None else 80))
        return _ritz_values(lin, v, k).abs().max(dim=1).values.to(ref.dtype).detach()
    maxiter = 500 if maxiter is None else int(maxiter)
    if maxiter < 2 or window < 1:
        raise FoldError(f"spectral_radius: need maxiter ≥ 2 and window ≥ 1, got maxiter="
                        f"{maxiter}, window={window}.")
    # Estimate: Rayleigh–Ritz on span{v_{k-1}, v_k}, where Φᵀv_{k-1} = ‖w_{k-1}‖·v_k and
    # Φᵀv_k = w_k are both known (no extra VJP). Its 2×2 Ritz values converge to a dominant
    # real eigenvalue, a ± pair or a complex pair alike (the norm growth ‖Φᵀv‖ alone
    # oscillates for a complex pair). Where v_k ∥ v_{k-1} the estimate is ‖Φᵀv_k‖.
    est = torch.zeros(B, dtype=ref.dtype, device=ref.device)
    v_prev: Tensor | None = None
    nw_prev = torch.zeros(B, dtype=ref.dtype, device=ref.device)
    degenerate = math.sqrt(torch.finfo(ref.dtype).eps) * 1e-1
    still = 0
    for k in range(maxiter):
        w = lin.vjp(v)
        nw = w.norm(dim=1)
        zero = nw <= tiny
        new = nw.clone()
        if v_prev is not None:
            c = (v_prev * v).sum(dim=1)
            u = v - c[:, None] * v_prev
            nu = u.norm(dim=1)
            two = nu > degenerate
            safe = torch.where(two, nu, torch.ones_like(nu))
            q2 = u / safe[:, None]
            a1 = nw_prev[:, None] * v  # Φᵀ v_prev
            a2 = (w - c[:, None] * a1) / safe[:, None]  # Φᵀ q2
            h11, h12 = (v_prev * a1).sum(1), (v_prev * a2).sum(1)
            h21, h22 = (q2 * a1).sum(1), (q2 * a2).sum(1)
            tr, det = h11 + h22, h11 * h22 - h12 * h21
            disc = tr * tr / 4 - det
            ritz = torch.where(disc >= 0, tr.abs() / 2 + torch.sqrt(disc.clamp(min=0)),
                               torch.sqrt(det.clamp(min=0)))
            new = torch.where(two, ritz, nw)
        new = torch.where(zero, torch.zeros_like(new), new)
        v_prev, nw_prev = v, nw
        v = torch.where(zero[:, None], v, w / torch.where(zero, torch.ones_like(nw), nw)[:, None])
        changed = (new - est).abs() > tol * new.clamp(min=tiny)
        still = 0 if bool(changed.any()) else still + 1
        est = new
        if k >= 2 * window and still >= window:
            break
    return est.detach()


def _linearize_with_start(step: Callable, x_star: State, params: tuple, batched: bool,
                          seed: int) -> tuple[Any, Tensor]:
    """The step linearised at ``x*`` and a seeded random unit start vector ``(B, n)``."""
    lin = linearize(step, x_star, *params, batched=batched)
    ref = lin.x_parts[0]
    gen = torch.Generator(device=ref.device).manual_seed(seed)
    v = torch.randn(lin.spec.B, lin.spec.n, generator=gen, dtype=ref.dtype, device=ref.device)
    return lin, v / v.norm(dim=1, keepdim=True)


def _ritz_values(lin: Any, v: Tensor, k: int) -> Tensor:
    """``(B, k)`` complex Ritz values of ``Φᵀ`` from ``k`` Arnoldi steps started at ``v``."""
    B = v.shape[0]
    ref = lin.x_parts[0]
    tiny = torch.finfo(ref.dtype).tiny
    V = [v]
    H = torch.zeros(B, k + 1, k, dtype=ref.dtype, device=ref.device)
    # breakdown: an invariant Krylov subspace was found (e.g. Φ of low rank). Normalising
    # the round-off left after orthogonalisation would give a non-orthogonal basis and
    # wrong Ritz values, so the instance stops there (its H block is then exact).
    brk = max(1e-10, 1e3 * torch.finfo(ref.dtype).eps)
    for j in range(k):
        w = lin.vjp(V[j])
        w0 = w.norm(dim=1)
        for _ in range(2):  # re-orthogonalise: Ritz values need an orthonormal basis
            Vs = torch.stack(V)
            h = torch.einsum("kbn,bn->bk", Vs, w)
            w = w - torch.einsum("bk,kbn->bn", h, Vs)
            H[:, : j + 1, j] += h
        hn = w.norm(dim=1)
        ok = (hn > brk * w0) & (hn > 1e3 * tiny)
        H[:, j + 1, j] = torch.where(ok, hn, torch.zeros_like(hn))
        V.append(torch.where(ok[:, None], w / torch.where(ok, hn, torch.ones_like(hn))[:, None],
                             torch.zeros_like(w)))
    return torch.linalg.eigvals(H[:, :k, :k])


def unit_eigenvalues(step: Callable, x_star: State, *params: Any, batched: bool = True,
                     maxiter: int | None = None, tol: float | None = None, seed: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Eigenvalues of ``Φ`` equal to 1 (a gauge), and the spectral radius without them.

    An eigenvalue 1 of ``Φ = ∂U/∂x (x*)`` means ``I − Φ`` is singular: the fixed point is not
    isolated (a gauge or a symmetry: e.g. Sinkhorn potentials shifted by ``(+c, −c)``), and
    ``dx*/dθ`` is not defined. Unrolling then still converges — at the rate ``ρ'`` of the
    *other* eigenvalues — for a loss the gauge does not move, which is why a long unroll can
    look converged while ``ρ(Φ) = 1``.

    Args:
        maxiter: Arnoldi steps (default ``min(n, 80)``).
        tol: a Ritz value within ``tol`` of 1 counts (default ``eps^(2/3)``: 1.1e-10 in
            float64, far from the ``1e-7`` gap of a slow but isolated ``ρ = 1 − 1e-7``).

    Returns:
        ``(count, rho_rest)``: ``(B,)`` int64 number of Ritz values at 1 (≥ 1 exactly where
        ``Φ`` has the eigenvalue 1; a repeated eigenvalue may show once in a Krylov space) and
        ``(B,)`` largest ``|λ|`` over the other eigenvalues.
    """
    lin, v = _linearize_with_start(step, x_star, params, batched, seed)
    ref = lin.x_parts[0]
    k = max(1, min(lin.spec.n, maxiter if maxiter is not None else 80))
    eig = _ritz_values(lin, v, k)
    tol = torch.finfo(ref.dtype).eps ** (2 / 3) if tol is None else float(tol)
    unit = (eig - 1).abs() <= tol
    rest = torch.where(unit, torch.zeros_like(eig.real), eig.abs())
    return unit.sum(dim=1), rest.max(dim=1).values.to(ref.dtype).detach()


def fixed_point_residual(step: Callable, x_star: State, *params: Any, batched: bool = True,
                         relative: bool = True) -> Tensor:
    """``(B,)`` residual ``‖U(x*) − x*‖`` per instance, over ``1 + ‖x*‖`` when ``relative``."""
    lin = linearize(step, x_star, *params, batched=batched)
    with torch.no_grad():
        if relative:
            return lin.residual()
        d = lin.spec.flatten([o - x for o, x in zip(lin.out_parts, lin.x_parts)], lin.x_parts)
        return d.norm(dim=1)


def predicted_unroll_error(rho: Tensor | float, n_iter: int) -> Tensor | float:
    """Relative gradient error of K-step unrolling from the fixed point, to first order: ``ρ^K``."""
    return rho ** n_iter


def unroll_iterations_needed(rho: Tensor | float, accuracy: float) -> Tensor | float:
    """Smallest ``K`` with ``ρ^K ≤ accuracy`` (``inf`` where ``ρ ≥ 1``, ``0`` where ``ρ = 0``)."""
    if not 0 < accuracy < 1:
        raise FoldError(f"accuracy must be in (0, 1), got {accuracy!r}.")
    if isinstance(rho, Tensor):
        out = torch.ceil(math.log(accuracy) / torch.log(rho.clamp(min=1e-300)))
        out = torch.where(rho >= 1, torch.full_like(out, math.inf), out)
        return torch.where(rho <= 0, torch.zeros_like(out), out.clamp(min=1))
    if rho >= 1:
        return math.inf
    if rho <= 0:
        return 0
    return max(1, math.ceil(math.log(accuracy) / math.log(rho)))


def unrolling_report(step: Callable, x_star: State, *params: Any, batched: bool = True,
                     accuracies: tuple[float, ...] = (1e-2, 1e-4, 1e-6, 1e-8)) -> str:
    """A short text for users migrating from unrolling: ρ(Φ) and the K each accuracy needs."""
    rho = spectral_radius(step, x_star, *params, batched=batched)
    res = fixed_point_residual(step, x_star, *params, batched=batched)
    lines = [f"instances: {rho.numel()}",
             f"fixed-point residual ‖U(x*)−x*‖/(1+‖x*‖): max {float(res.max()):.2e}",
             f"spectral radius ρ(Φ): min {float(rho.min()):.4f}, max {float(rho.max()):.4f}"]
    n_unit, rho_rest = unit_eigenvalues(step, x_star, *params, batched=batched)
    lines += gauge_lines(n_unit, rho_rest, accuracies)
    for acc in accuracies:
        k = unroll_iterations_needed(rho.max(), acc)
        k = float(k)
        lines.append(f"unrolled iterations for gradient error {acc:.0e}: "
                     + ("never (ρ ≥ 1)" if math.isinf(k) else f"{int(k)}"))
    lines.append("folded backward (GMRES) needs at most rank(Φ)+1 VJPs, independent of ρ.")
    return "\n".join(lines)


def gauge_lines(n_unit: Tensor, rho_rest: Tensor, accuracies: tuple[float, ...]) -> list[str]:
    """Report lines for instances with an eigenvalue 1 of Φ (empty when there is none)."""
    has = n_unit > 0
    if not bool(has.any()):
        return []
    rr = float(rho_rest[has].max())
    out = [f"eigenvalue 1 of Φ (×{int(n_unit.max())}) for instance(s) {instance_list(has)}: "
           f"{NOT_ISOLATED}.",
           f"  unrolling converges there only for a loss the gauge does not move, at the rate "
           f"of the other eigenvalues ρ' = {rr:.4f}; in the gauge direction it never does:"]
    for acc in accuracies:
        k = float(unroll_iterations_needed(rho_rest[has].max(), acc))
        out.append(f"  gauge-invariant loss, gradient error {acc:.0e}: "
                   + ("never (ρ' ≥ 1)" if math.isinf(k) else f"{int(k)} unrolled iterations"))
    return out
