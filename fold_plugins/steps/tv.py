"""Total-variation denoising by fast dual proximal gradient (FDPG): the update step
:func:`fdpg_tv`, the forward :func:`solve_tv` and the folded layer :func:`tv_denoise`.

Primal (per instance)::

    min_x ½‖x − y‖² + Σ_i λ_i |(Dx)_i|          D: (m, n),  λ ≥ 0

Dual: ``min_{|u_i| ≤ λ_i} ½‖y − Dᵀu‖²``, primal recovered as ``x = y − Dᵀu``. The step
folded is the dual projected-gradient map (FDPG without the momentum, which is
iteration-dependent; its fixed point is the same)::

    U(u) = Π_[−λ, λ](u + t D(y − Dᵀu))

Shapes: ``u (B, m)``, ``y (B, n)`` (or ``(n,)`` shared), ``D (m, n)`` or ``(B, m, n)``,
``λ ≥ 0``: a number or 0-d tensor (shared); ``(B, 1)`` (one per instance); ``(m,)`` or
``(1, m)`` (one per row of ``D``, shared); ``(B, m)`` (per instance and row). A bare 1-D
``(B,)`` is read as one per instance only when ``B ≠ m``; when ``B = m`` a 1-D λ is ambiguous
and raises :class:`~fold_plugins.steps.ShapeError` (reshape to ``(B, 1)`` or ``(1, m)``). To
differentiate ``x``: ``u = fp.fold(fdpg_tv(), u_star, y, lam, D)`` then ``x = tv_primal(u, y,
D)`` (:func:`tv_denoise` does both); gradients reach ``y``, ``λ`` and ``D``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._batched import ShapeError, as_tensor_like, bmtv, bmv, check_matrix, check_vector
from .._errors import FoldError, report_unconverged
from .._kinks import clip_free
from .._state import relative_residual
from ..fold import FoldInfo, fold
from ._common import self_contained

__all__ = ["fdpg_tv", "solve_tv", "tv_denoise", "tv_primal", "difference_matrix", "TVInfo"]


def difference_matrix(n: int, *, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> Tensor:
    """``(n−1, n)`` forward differences: ``(Dx)_i = x_{i+1} − x_i`` (1-D TV)."""
    if n < 2:
        raise FoldError(f"difference_matrix: n must be ≥ 2, got {n}.")
    D = torch.zeros(n - 1, n, dtype=dtype, device=device)
    idx = torch.arange(n - 1, device=device)
    D[idx, idx] = -1.0
    D[idx, idx + 1] = 1.0
    return D


def _lam(lam: float | Tensor, B: int, m: int, ref: Tensor, where: str) -> Tensor:
    """λ as a tensor broadcastable against ``u (B, m)``; the shape convention is in the module
    docstring (a 1-D λ of length ``B = m`` is ambiguous and rejected)."""
    t = as_tensor_like(lam, ref)
    shape = tuple(t.shape)
    if t.dim() == 0 or shape in ((B, 1), (1, m), (B, m)):
        out = t
    elif shape == (m,) and B == m and m > 1:
        raise ShapeError(
            f"{where}: lam has shape {shape} and B = m = {m}, so it could mean one weight per "
            f"instance or one weight per row of D. Reshape it: ({B}, 1) for one per instance "
            f"(lam.reshape(-1, 1)), or (1, {m}) for one per row of D shared by the batch "
            "(lam.reshape(1, -1)).")
    elif shape == (B,):  # B ≠ m (or B = m = 1): one per instance
        out = t.reshape(B, 1)
    elif shape == (m,):  # B ≠ m: one per row of D
        out = t
    else:
        raise ShapeError(f"{where}: lam has shape {shape}; give a number or 0-d tensor, "
                         f"({B}, 1) (one weight per instance), ({m},) or (1, {m}) (per row of "
                         f"D), or ({B}, {m}) (per instance and row).")
    if bool((out.detach() < 0).any()):
        raise FoldError(f"{where}: lam must be ≥ 0, got min {float(out.min()):.3g}.")
    return out


def _check(u: Tensor, y: Tensor, D: Tensor, where: str) -> tuple[int, int, int]:
    if not isinstance(u, Tensor) or u.dim() != 2:
        raise ShapeError(f"{where}: the dual state u must be (B, m), got "
                         f"{tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}.")
    B, m = u.shape
    if not isinstance(y, Tensor) or y.dim() not in (1, 2):
        raise ShapeError(f"{where}: y must be (n,) or ({B}, n), got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}.")
    n = y.shape[-1]
    check_vector(y, "y", B, n, where)
    check_matrix(D, "D", B, m, n, where)
    return B, m, n


def _default_step(D: Tensor) -> Tensor:
    """``1/‖D‖₂²`` (detached): ``t ≤ 1/λ_max(DDᵀ)`` makes the dual step nonexpansive."""
    with torch.no_grad():
        s = torch.linalg.matrix_norm(D.detach(), ord=2)
        return (1.0 / (s * s)).reshape(-1, 1) if s.dim() else 1.0 / (s * s)


def tv_primal(u: Tensor, y: Tensor, D: Tensor) -> Tensor:
    """Primal solution ``x = y − Dᵀu`` (differentiable in all three)."""
    return y - bmtv(D, u)


def fdpg_tv(step_size: float | Tensor | None = None) -> Callable[..., Tensor]:
    """Dual projected-gradient step for TV denoising, ``U(u) = Π_[−λ,λ](u + t D(y − Dᵀu))``.

    Fixed points are exactly the dual optima (``x = y − Dᵀu`` is then the primal optimum).
    ``Φ = J_Π (I − t DDᵀ)``: with ``D`` of full row rank and ``0 < t < 2/λ_max(DDᵀ)``,
    ``ρ(Φ) ≤ ‖I − tDDᵀ‖ < 1``. Default ``t = 1/‖D‖₂²`` (detached; the fixed point does not
    depend on it). At a weakly active dual bound (``|u_i| = λ_i`` with ``(Dx)_i = 0``) the
    projection's "free" convention applies (finite, one-sided gradient). If ``D`` has more
    rows than rank, the dual solution is not unique and ``I − Φ`` is singular: fold the
    primal problem instead (e.g. ``admm_qp``).

    Returns:
        ``step(u, y, lam, D)`` with shapes as in the module docstring; ``y``, ``lam`` and ``D``
        are differentiable.
    """
    def step(u: Tensor, y: Tensor, lam: float | Tensor, D: Tensor) -> Tensor:
        B, m, n = _check(u, y, D, "fdpg_tv")
        lm = _lam(lam, B, m, u, "fdpg_tv")
        t = _default_step(D) if step_size is None else as_tensor_like(step_size, u).detach()
        if isinstance(t, Tensor) and t.dim() == 1:
            t = t.reshape(-1, 1)
        v = u + t * bmv(D, tv_primal(u, y, D))
        return clip_free(v, -lm, lm)  # free at the kink (as fp.projections.box)
    return self_contained(step)  # t is detached


@dataclass
class TVInfo:
    """Per-instance outcome of :func:`solve_tv`: ``iterations``, ``residual``
    (``‖U(u) − u‖/(1+‖u‖)`` of the plain dual step), ``converged``, ``polished`` (the active-set
    solve was accepted)."""

    iterations: Tensor
    residual: Tensor
    converged: Tensor
    polished: Tensor


def _polish(u: Tensor, y: Tensor, lm: Tensor, D: Tensor) -> Tensor:
    """Exact dual solution for the active set of ``u``: free rows solve
    ``(DDᵀ u)_F = (Dy)_F``, active rows are fixed at ``±λ``."""
    B, m = u.shape
    lmb = lm.expand(B, m) if isinstance(lm, Tensor) else torch.full_like(u, float(lm))
    act = u.abs() >= lmb * (1 - 1e-9)
    Db = D.expand(B, *D.shape) if D.dim() == 2 else D
    G = Db @ Db.transpose(1, 2)
    Dy = bmv(D, y if y.dim() == 2 else y.expand(B, -1))
    eye = torch.eye(m, dtype=u.dtype, device=u.device).expand(B, m, m)
    M = torch.where(act.unsqueeze(-1), eye, G)
    rhs = torch.where(act, torch.sign(u) * lmb, Dy)
    sol, info = torch.linalg.solve_ex(M, rhs.unsqueeze(-1))
    sol = sol.squeeze(-1)
    return torch.where((info == 0).view(B, 1), sol, u)


def solve_tv(y: Tensor, lam: float | Tensor, D: Tensor | None = None, *, tol: float = 1e-12,
             maxiter: int = 20_000, check_every: int = 20, polish: bool = True,
             warn: bool = True, strict: bool = False) -> tuple[Tensor, TVInfo]:
    """FDPG forward (FISTA on the dual, adaptive restart) under ``no_grad``, with an optional
    active-set polish every ``check_every`` iterations (accepted when it lowers the residual).

    Args:
        y: ``(B, n)`` signals. lam: see module docstring. D: ``(m, n)``/``(B, m, n)``;
            default the 1-D difference matrix.

    Returns:
        ``(u, TVInfo)``: the dual solution ``(B, m)``; recover ``x = tv_primal(u, y, D)``.
        Unconverged instances warn :class:`FoldConvergenceWarning` when ``warn``
        (``strict``: raise :class:`FoldError`).
    """
    if not isinstance(y, Tensor) or y.dim() != 2:
        raise ShapeError(f"solve_tv: y must be (B, n), got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}.")
    B, n = y.shape
    if D is None:
        D = difference_matrix(n, dtype=y.dtype, device=y.device)
    m = D.shape[-2]
    plain = fdpg_tv()
    with torch.no_grad():
        y, D = y.detach(), D.detach()
        lam_d = lam.detach() if isinstance(lam, Tensor) else lam
        u = y.new_zeros(B, m)
        _check(u, y, D, "solve_tv")
        lm = _lam(lam_d, B, m, u, "solve_tv")
        w, tk = u, torch.ones(B, 1, dtype=y.dtype, device=y.device)
        its = torch.zeros(B, dtype=torch.int64, device=y.device)
        done = torch.zeros(B, dtype=torch.bool, device=y.device)
        polished = torch.zeros_like(done)
        res = torch.full((B,), torch.inf, dtype=y.dtype, device=y.device)

        def resid(v: Tensor) -> Tensor:
            return relative_residual((plain(v, y, lm, D),), (v,))

        for k in range(1, maxiter + 1):
            un = plain(w, y, lm, D)
            tn = 0.5 * (1 + torch.sqrt(1 + 4 * tk * tk))
            wn = un + ((tk - 1) / tn) * (un - u)
            # gradient-based restart (O'Donoghue & Candès): momentum points uphill
            restart = ((w - un) * (un - u)).sum(1, keepdim=True) > 0
            tn = torch.where(restart, torch.ones_like(tn), tn)
            wn = torch.where(restart, un, wn)
            keep = done.view(B, 1)
            u = torch.where(keep, u, un)
            w = torch.where(keep, w, wn)
            tk = torch.where(keep, tk, tn)
            its = torch.where(done, its, its + 1)
            if k % check_every and k != maxiter:
                continue
            r = resid(u)
            if polish:
                up = _polish(u, y, lm, D)
                rp = resid(up)
                better = (rp < r) & ~done
                u = torch.where(better.view(B, 1), up, u)
                w = torch.where(better.view(B, 1), up, w)
                polished |= better & (rp <= tol)
                r = torch.where(better, rp, r)
            res = torch.where(done, res, r)
            done |= r <= tol
            if bool(done.all()):
                break
    if (warn or strict) and not bool(done.all()):
        report_unconverged(~done, res, f"solve_tv (tol {tol:.1e}, maxiter {maxiter}; error = "
                           "‖U(u) − u‖/(1+‖u‖) of the dual step)", "raise maxiter, or loosen "
                           "tol", strict)
    return u, TVInfo(its, res, done, polished)


def tv_denoise(y: Tensor, lam: float | Tensor, D: Tensor | None = None, *,
               backward: str = "gmres", backward_tol: float = 1e-12, return_info: bool = False,
               strict: bool = False, **solve_options):
    """Differentiable TV denoising ``x*(y, λ, D)``: :func:`solve_tv` forward, the dual fixed
    point folded with :func:`fdpg_tv`, then ``x = y − Dᵀu``. ``strict``: raise
    :class:`FoldError` when the forward or the folded backward does not converge.

    Returns:
        ``x (B, n)`` (and ``(FoldInfo, TVInfo)`` with ``return_info``).
    """
    if D is None:
        D = difference_matrix(y.shape[-1], dtype=y.dtype, device=y.device)
    u_star, info = solve_tv(y, lam, D, **{"strict": strict, **solve_options})
    finfo = FoldInfo()
    finfo.forward_iterations, finfo.forward_residual = info.iterations, info.residual
    finfo.forward_converged = info.converged
    lam_t = as_tensor_like(lam, y)
    u = fold(fdpg_tv(), u_star, y, lam_t, D, solver=backward, tol=backward_tol, info=finfo,
             strict=strict)
    x = tv_primal(u, y, D)
    return (x, finfo, info) if return_info else x
