"""OSQP-style ADMM for convex QPs: the update step :func:`admm_qp`, the forward solver
:func:`solve_qp_admm` (adaptive ρ, polishing, infeasibility certificates) and the folded layer
:func:`qp`.

Problem (per instance)::

    min_x ½ xᵀPx + qᵀx   s.t.  l ≤ Ax ≤ u          (equalities: l_i = u_i)

Shapes (``B`` instances, ``n`` variables, ``m`` constraint rows): ``P (n, n)`` or
``(B, n, n)`` (symmetric PSD), ``q (n,)`` or ``(B, n)``, ``A (m, n)`` or ``(B, m, n)``,
``l, u (m,)`` or ``(B, m)``. A bound with ``|l_i|`` or ``|u_i| ≥ INF = 1e20`` (or ±inf) is
treated as absent. :func:`fold_plugins.fold` rejects non-finite explicit params, so pass
``l.clamp(-INF, INF)`` (the clamp is differentiable, zero gradient on infinite entries) — or
use :func:`qp`, which does this for you.

State ``(x (B, n), z (B, m), y (B, m))``; ``y`` is the multiplier of ``l ≤ Ax ≤ u``
(``y_i > 0``: upper bound active, ``y_i < 0``: lower bound active), so the KKT conditions are
``Px + q + Aᵀy = 0``, ``z = Ax``, ``y ∈ N_[l,u](z)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._batched import ShapeError, bmtv, bmv
from .._errors import FoldError, report_unconverged
from .._kinks import clip_free
from .._preconditioner_base import lazy
from ..fold import FoldInfo, fold
from ._common import self_contained
from ._qp_kkt import (
    INF,
    QPInfo,
    _active_guess,
    _amax,
    _check_finite_data,
    _expand,
    _polish,
    _qp_shapes,
    _rho_vector,
    qp_kkt_residual,
)
from ._qp_preconditioner import admm_qp as admm_qp_preconditioner

__all__ = ["admm_qp", "solve_qp_admm", "qp", "QPInfo", "QPInfeasibleError", "INF",
           "qp_kkt_residual"]

class QPInfeasibleError(FoldError):
    """The forward QP solve found a certificate of primal (or dual) infeasibility."""


def _kkt_matrix(P: Tensor, A: Tensor, rho_vec: Tensor, sigma: float) -> Tensor:
    n = P.shape[-1]
    eye = torch.eye(n, dtype=P.dtype, device=P.device)
    return P + sigma * eye + A.transpose(-1, -2) @ (rho_vec.unsqueeze(-1) * A)


def _cholesky(K: Tensor, where: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(K)
    if bool((info != 0).any()):
        bad = torch.nonzero(info.reshape(-1)).flatten().tolist()
        raise FoldError(f"{where}: P + σI + AᵀρA is not positive definite for instance(s) "
                        f"{bad[:20]}: P must be symmetric positive semidefinite (check P's "
                        "eigenvalues; a nonconvex QP needs sqp with a convexified Hessian).")
    return L


def admm_qp(rho: float | Tensor = 0.1, sigma: float = 1e-6, alpha: float = 1.6,
            rho_eq_scale: float = 1e3) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """One OSQP ADMM iteration as an update step ``(x, z, y) ↦ (x⁺, z⁺, y⁺)``::

        x̃  = (P + σI + AᵀRA)⁻¹ (σx − q + Aᵀ(Rz − y)),   z̃ = Ax̃         R = diag(ρ)
        x⁺ = αx̃ + (1−α)x
        z⁺ = Π_[l,u](αz̃ + (1−α)z + R⁻¹y)
        y⁺ = y + R(αz̃ + (1−α)z − z⁺)

    Its fixed points are exactly the KKT points (``Px+q+Aᵀy = 0``, ``z = Ax``,
    ``y ∈ N_[l,u](z)``) for every ``ρ > 0``, ``σ > 0``, ``α ∈ (0, 2)``. ADMM converges for all
    such values; ``ρ(Φ) < 1`` at a nondegenerate solution (strict complementarity, linearly
    independent active rows, P positive definite on their null space). A weakly active row
    (``z_i`` on a bound with ``y_i = 0``) hits the projection's kink, where the "free"
    convention (derivative 1) is used: the gradient is finite (one-sided).

    Args:
        rho: ρ: a number, or a ``(m,)``/``(B, m)``/``(B, 1)`` tensor (detached). Equality rows
            use ``ρ·rho_eq_scale``, rows with no finite bound ``1e-6``. The forward
            (:func:`solve_qp_admm`) reports its final adaptive ρ in ``QPInfo.rho``: pass it here.
        sigma: σ > 0, the proximal weight on ``x``.
        alpha: relaxation α ∈ (0, 2).

    Returns:
        ``step(state, P, q, A, l, u)`` with ``state = (x, z, y)``; shapes as in the module
        docstring (shared or batched params, checked against the state). Every one of
        ``P, q, A, l, u`` is differentiable (P through the Cholesky factor of the step's matrix).
        ``P`` enters only through ``½(P + Pᵀ)``, so its gradient is symmetric (the gradient on
        the space of symmetric matrices, as in OptNet/qpth). ``l, u`` must be finite (use
        ``INF = 1e20`` for absent bounds).
    """
    if not (0 < alpha < 2):
        raise FoldError(f"admm_qp: alpha must lie in (0, 2), got {alpha!r}.")
    if not sigma > 0:
        raise FoldError(f"admm_qp: sigma must be > 0, got {sigma!r}.")

    def step(state: tuple[Tensor, Tensor, Tensor], P: Tensor, q: Tensor, A: Tensor, l: Tensor,
             u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise FoldError("admm_qp: the state must be a tuple (x (B, n), z (B, m), y (B, m)), "
                            "got "
                            f"{type(state).__name__}"
                            + (f" of length {len(state)}" if isinstance(state, (tuple, list))
                               else "") + ".")
        x, z, y = state
        if x.dim() != 2 or z.dim() != 2 or y.shape != z.shape or z.shape[0] != x.shape[0]:
            raise ShapeError(f"admm_qp: state shapes x {tuple(x.shape)}, z {tuple(z.shape)}, y "
                             f"{tuple(y.shape)}; expected (B, n), (B, m), (B, m).")
        B, n = x.shape
        m = z.shape[1]
        _, n2, m2 = _qp_shapes(P, q, A, l, u, B, "admm_qp")
        if (n2, m2) != (n, m):
            raise ShapeError(f"admm_qp: params give n={n2}, m={m2} (q {tuple(q.shape)}, A "
                             f"{tuple(A.shape)}) but the state has n={n}, m={m}.")
        R = _rho_vector(l, u, rho, rho_eq_scale)
        Ps = 0.5 * (P + P.transpose(-1, -2))
        L = _cholesky(_kkt_matrix(Ps, A, R, sigma), "admm_qp")
        rhs = sigma * x - q + bmtv(A, R * z - y)
        if L.dim() == 2:
            xt = torch.cholesky_solve(rhs.T, L).T
        else:
            xt = torch.cholesky_solve(rhs.unsqueeze(-1), L.expand(B, n, n)).squeeze(-1)
        zt = bmv(A, xt)
        xn = alpha * xt + (1 - alpha) * x
        zr = alpha * zt + (1 - alpha) * z
        zn = clip_free(zr + y / R, l, u)  # free at the kink (as fp.projections.box)
        yn = y + R * (zr - zn)
        return xn, zn, yn
    return self_contained(step)  # ρ is detached


# ----------------------------------------------------------------------------- forward solver

def solve_qp_admm(P: Tensor, q: Tensor, A: Tensor, l: Tensor, u: Tensor, *,
                  rho: float = 0.1, sigma: float = 1e-6, alpha: float = 1.6,
                  rho_eq_scale: float = 1e3, tol: float = 1e-10, maxiter: int = 20_000,
                  check_every: int = 10, adaptive_rho: bool = True, polish: bool = True,
                  warm_start: tuple[Tensor, Tensor, Tensor] | None = None,
                  eps_infeasible: float = 1e-6, raise_infeasible: bool = True,
                  warn: bool = True, strict: bool = False
                  ) -> tuple[tuple[Tensor, Tensor, Tensor], QPInfo]:
    """Forward QP solve by OSQP's ADMM (:func:`admm_qp` iterations) under ``no_grad``.

    Every ``check_every`` iterations: residuals ``r_p = ‖Ax − z‖∞``, ``r_d = ‖Px+q+Aᵀy‖∞``;
    adaptive ρ (``ρ ← ρ·√((r_p/‖·‖)/(r_d/‖·‖))`` when it moves by > 5×); polishing (an
    active-set KKT solve, accepted when its KKT residuals are below ``tol``); OSQP's
    infeasibility certificates on ``δy`` (primal) and ``δx`` (dual) with ``eps_infeasible``.
    An instance is solved when ``r_p ≤ tol·(1+max(‖Ax‖∞,‖z‖∞))`` and
    ``r_d ≤ tol·(1+max(‖Px‖∞,‖Aᵀy‖∞,‖q‖∞))``.

    Args:
        P, q, A, l, u: see the module docstring; shared or batched. ``B`` is taken from the
            batched ones (1 when all are shared). ±inf bounds are allowed here.
        warm_start: optional ``(x, z, y)`` of shapes ``(B, n), (B, m), (B, m)``.
        raise_infeasible: raise :class:`QPInfeasibleError` (naming the instances) when a
            certificate is found; otherwise report it in ``QPInfo.status``.

    Returns:
        ``((x, z, y), QPInfo)``; tensors detached, in ``q``'s dtype/device. Warns
        :class:`FoldConvergenceWarning` for instances that hit ``maxiter`` when ``warn``
        (``strict``: raises :class:`FoldError` instead).
    """
    where = "solve_qp_admm"
    B, n, m = _qp_shapes(P, q, A, l, u, None, where)
    with torch.no_grad():
        P, q, A, l, u = (t.detach() for t in (P, q, A, l, u))
        _check_finite_data(P, q, A, where)
        P = 0.5 * (P + P.transpose(-1, -2))
        l = l.clamp(-INF, INF)
        u = u.clamp(-INF, INF)
        if bool((l > u).any()):
            idx = torch.nonzero((l > u).reshape(-1, m).any(dim=0)).flatten().tolist()
            raise QPInfeasibleError(f"{where}: l > u in row(s) {idx[:20]}: the QP is infeasible; "
                                    "check the bounds.")
        dt, dev = q.dtype, q.device
        if warm_start is not None:
            x, z, y = (t.detach().clone() for t in warm_start)
            if x.shape != (B, n) or z.shape != (B, m) or y.shape != (B, m):
                raise ShapeError(f"{where}: warm_start shapes x {tuple(x.shape)}, z "
                                 f"{tuple(z.shape)}, y {tuple(y.shape)}; expected ({B}, {n}), "
                                 f"({B}, {m}), ({B}, {m}).")
        else:
            x = torch.zeros(B, n, dtype=dt, device=dev)
            z = torch.zeros(B, m, dtype=dt, device=dev)
            y = torch.zeros(B, m, dtype=dt, device=dev)
        lb, ub = _expand(l, B, 1), _expand(u, B, 1)
        rho_s = torch.full((B, 1), float(rho), dtype=dt, device=dev)
        R = _rho_vector(lb, ub, rho_s, rho_eq_scale)
        L = _cholesky(_kkt_matrix(P, A, R, sigma), where)
        its = torch.zeros(B, dtype=torch.int64, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        polished = torch.zeros(B, dtype=torch.bool, device=dev)
        status = ["max_iter"] * B
        rp = torch.full((B,), torch.inf, dtype=dt, device=dev)
        rd = torch.full((B,), torch.inf, dtype=dt, device=dev)
        Lb = L if L.dim() == 3 else L.expand(B, n, n)
        x_prev, y_prev = x, y
        n_check = 0
        tried = torch.zeros(B, dtype=torch.bool, device=dev)
        last_sig = torch.zeros(B, 3 * m, dtype=torch.bool, device=dev)
        for k in range(1, maxiter + 1):
            x_prev, y_prev = x, y
            rhs = sigma * x - q + bmtv(A, R * z - y)
            xt = torch.cholesky_solve(rhs.unsqueeze(-1), Lb).squeeze(-1)
            zt = bmv(A, xt)
            xn = alpha * xt + (1 - alpha) * x
            zr = alpha * zt + (1 - alpha) * z
            zn = torch.minimum(torch.maximum(zr + y / R, lb), ub)
            yn = y + R * (zr - zn)
            keep = done.view(B, 1)
            x = torch.where(keep, x, xn)
            z = torch.where(keep, z, zn)
            y = torch.where(keep, y, yn)
            its = torch.where(done, its, its + 1)
            if k % check_every and k != maxiter:
                continue
            n_check += 1
            Ax, Px, Aty = bmv(A, x), bmv(P, x), bmtv(A, y)
            qb = _expand(q, B, 1)
            rp_new = (Ax - z).abs().amax(dim=1) if m else x.new_zeros(B)
            rd_new = (Px + qb + Aty).abs().amax(dim=1)
            rp = torch.where(done, rp, rp_new)
            rd = torch.where(done, rd, rd_new)
            sp = 1 + torch.maximum(Ax.abs().amax(dim=1), z.abs().amax(dim=1)) if m else \
                torch.ones_like(rp)
            sd = 1 + torch.stack([_amax(Px), _amax(Aty), _amax(qb)]).amax(dim=0)
            ok = (rp <= tol * sp) & (rd <= tol * sd) & ~done
            # polishing: try once the iterate is moderately accurate
            # (also once an instance met tol: on an ill-conditioned or degenerate QP the ADMM
            # residuals reach tol while x is still ~√tol off, which polishing makes exact)
            cand = ~done & (rp <= 1e-3 * sp) & (rd <= 1e-3 * sd)
            if polish and bool(cand.any()):
                upper, lower = _active_guess(z, y, lb, ub, R)
                tiny_y = y.abs() <= 1e-6 * (1 + y.abs().amax(dim=1, keepdim=True))
                sig = torch.cat([upper, lower, tiny_y], dim=1)
                # skip instances whose guessed active set already failed to polish
                cand &= ~(tried & (sig == last_sig).all(dim=1))
                last_sig = torch.where(cand.view(B, 1), sig, last_sig)
                tried |= cand
            if polish and bool(cand.any()):
                # two guesses: first with the rows whose multiplier is indistinguishable from 0
                # at this accuracy dropped (a weakly active row: its sign is round-off, and
                # the exact KKT point has y_i = 0 there), then OSQP's own guess
                fresh = cand.clone()
                for up_g, lo_g in ((upper & ~tiny_y, lower & ~tiny_y), (upper, lower)):
                    todo = fresh & ~polished
                    if not bool(todo.any()):
                        break
                    sel = torch.nonzero(todo).flatten()
                    Pc, Ac = _expand(P, B, 2)[sel], _expand(A, B, 2)[sel]
                    qc, lc, uc = qb[sel], lb[sel], ub[sel]
                    xp, zp, yp, pok = _polish(Pc, qc, Ac, lc, uc, up_g[sel], lo_g[sel])
                    s_, f_, c_ = qp_kkt_residual(Pc, qc, Ac, lc, uc, xp, yp)
                    pok &= (s_ <= tol * sd[sel]) & (f_ <= tol * sp[sel]) & \
                        (c_ <= tol * sd[sel])
                    if bool(pok.any()):
                        good = sel[pok]
                        x, z, y = x.clone(), z.clone(), y.clone()
                        x[good], z[good], y[good] = xp[pok], zp[pok], yp[pok]
                        polished[good] = True
                        rp[good], rd[good] = f_[pok], s_[pok]
                        ok[good] = True
            for i in torch.nonzero(ok).flatten().tolist():
                status[i] = "solved"
            done |= ok
            # infeasibility certificates (OSQP §3.4) on the last iteration's differences
            dy, dx = y - y_prev, x - x_prev
            live = ~done
            if bool(live.any()):
                ndy = dy.abs().amax(dim=1) if m else x.new_zeros(B)
                atdy = _amax(bmtv(A, dy))
                up_fin, lo_fin = ub < INF, lb > -INF
                pos, neg = dy.clamp_min(0), dy.clamp_max(0)
                bad_inf = ((pos > eps_infeasible * ndy.view(B, 1)) & ~up_fin) | \
                          ((neg < -eps_infeasible * ndy.view(B, 1)) & ~lo_fin)
                supp = (torch.where(up_fin, ub, torch.zeros_like(ub)) * pos).sum(1) + \
                       (torch.where(lo_fin, lb, torch.zeros_like(lb)) * neg).sum(1)
                pinf = live & (ndy > 1e-10) & (atdy <= eps_infeasible * ndy) & \
                    (supp < -eps_infeasible * ndy) & ~bad_inf.any(dim=1)
                ndx = dx.abs().amax(dim=1)
                Adx, Pdx = bmv(A, dx), bmv(P, dx)
                e = eps_infeasible * ndx.view(B, 1)
                one_side = torch.where(lo_fin, Adx >= -e, torch.ones_like(up_fin))
                a_ok = torch.where(up_fin & lo_fin, Adx.abs() <= e,
                                   torch.where(up_fin, Adx <= e, one_side))
                dinf = live & (ndx > 1e-10) & (_amax(Pdx) <= eps_infeasible * ndx) & \
                    ((_expand(q, B, 1) * dx).sum(1) < -eps_infeasible * ndx) & a_ok.all(dim=1)
                if n_check >= 3:
                    for i in torch.nonzero(pinf).flatten().tolist():
                        status[i] = "primal_infeasible"
                    for i in torch.nonzero(dinf & ~pinf).flatten().tolist():
                        status[i] = "dual_infeasible"
                    done |= pinf | dinf
            if bool(done.all()):
                break
            if adaptive_rho and n_check % 5 == 0:
                Ax, Px, Aty = bmv(A, x), bmv(P, x), bmtv(A, y)
                num = rp / sp.clamp_min(1e-30)
                den = rd / sd.clamp_min(1e-30)
                ratio = torch.sqrt(num.clamp_min(1e-30) / den.clamp_min(1e-30))
                change = (~done) & ((ratio > 5) | (ratio < 0.2))
                if bool(change.any()):
                    rho_s = torch.where(change.view(B, 1), (rho_s * ratio.view(B, 1)).clamp(1e-6,
                                                                                          1e6),
                                        rho_s)
                    R = _rho_vector(lb, ub, rho_s, rho_eq_scale)
                    Lb = _cholesky(_kkt_matrix(P, A, R, sigma), where).expand(B, n, n)
    infeas = [i for i, s in enumerate(status) if s.endswith("infeasible")]
    info = QPInfo(status, its, rp, rd, torch.tensor([s == "solved" for s in status],
                                                    device=dev), polished, rho_s)
    if infeas and raise_infeasible:
        kinds = {status[i] for i in infeas}
        raise QPInfeasibleError(
            f"{where}: the QP is {' / '.join(sorted(k.replace('_', ' ') for k in kinds))} for "
            f"instance(s) {infeas[:20]} of {B} (certificate found after "
            f"{int(its[infeas[0]])} ADMM iterations, eps_infeasible={eps_infeasible:g}); no "
            "solution exists, so there is no gradient. Check l ≤ Ax ≤ u (primal) or that P, q "
            "make the objective bounded below (dual). Pass raise_infeasible=False to get the "
            "status instead.")
    unconv = torch.tensor([s == "max_iter" for s in status], device=dev)
    if (warn or strict) and bool(unconv.any()):
        report_unconverged(unconv, torch.maximum(rp, rd),
                           f"{where} (maxiter {maxiter}, tol {tol:.1e}; primal residual "
                           f"‖Ax − z‖∞ up to {float(rp[unconv].max()):.2e}, dual ‖Px + q + Aᵀy‖∞ "
                           f"up to {float(rd[unconv].max()):.2e}; error = the larger)",
                           "raise maxiter, rescale the problem, or loosen tol", strict)
    return (x, z, y), info


def qp(P: Tensor, q: Tensor, A: Tensor, l: Tensor, u: Tensor, *,
       backward: str | Callable = "gmres",
       backward_tol: float = 1e-12, return_state: bool = False, return_info: bool = False,
       admm_options: dict[str, Any] | None = None, warm_start=None, strict: bool = False,
       precondition: bool = True):
    """Differentiable QP solution ``x*(P, q, A, l, u)``: :func:`solve_qp_admm` forward, then
    :func:`fold_plugins.fold` with :func:`admm_qp` (no unrolling of the ADMM iterations).

    Infinite bounds are clamped to ``±INF`` (differentiably; zero gradient there).
    ``strict``: raise :class:`FoldError` when the forward (unless ``admm_options`` sets its
    own ``strict``) or the folded backward does not converge, instead of warning.

    ``backward_tol`` (default ``1e-12``) is the backward's relative residual; an instance
    whose residual stops at the step's round-off floor (measured by the solver: ``eps·‖A‖‖v‖``
    and the VJP's own rounding, which grows with the conditioning of ``P + σI + AᵀRA``; at
    most ``√eps``) counts as converged, so a correct gradient of an ill-conditioned QP neither
    warns nor raises under ``strict``. A weakly active row (on its bound with a zero
    multiplier) takes the free piece's derivative and is counted in
    ``FoldInfo.extra["weakly_active"]`` (see :mod:`fold_plugins.projections`).

    ``precondition`` (default on, for the ``gmres``, ``bicgstab`` and ``auto`` backward):
    the Krylov solve is preconditioned with :func:`fold_plugins.preconditioners.admm_qp`, the
    exact inverse from the step's own matrices (built when backward first runs), so it takes
    one or two VJPs instead of ``0.5–1 × (n + 2m)``; the tolerance and the verdict are
    unchanged (the residual judged is the unpreconditioned one).

    Returns:
        ``x (B, n)``, or the folded state ``(x, z, y)`` with ``return_state``. With
        ``return_info``, a flat triple ``(x, FoldInfo, QPInfo)`` (``x`` being the state
        tuple when ``return_state``); the FoldInfo's backward fields fill in when backward
        runs.
    """
    opts = dict(admm_options or {})
    fwd = {"strict": strict, **opts}
    (x, z, y), info = solve_qp_admm(P, q, A, l, u, warm_start=warm_start, **fwd)
    lc, uc = l.clamp(-INF, INF), u.clamp(-INF, INF)
    step = admm_qp(rho=info.rho, sigma=opts.get("sigma", 1e-6), alpha=opts.get("alpha", 1.6),
                   rho_eq_scale=opts.get("rho_eq_scale", 1e3))
    finfo = FoldInfo()
    finfo.forward_iterations = info.iterations
    finfo.forward_residual = torch.maximum(info.primal_residual, info.dual_residual)
    finfo.forward_converged = info.converged
    sopts = None
    if precondition and backward in ("gmres", "bicgstab", "auto"):
        sopts = {"preconditioner": lazy(
            admm_qp_preconditioner, (x, z, y), P, q, A, lc, uc, rho=info.rho,
            sigma=opts.get("sigma", 1e-6), alpha=opts.get("alpha", 1.6),
            rho_eq_scale=opts.get("rho_eq_scale", 1e3))}
    state = fold(step, (x, z, y), P, q, A, lc, uc, solver=backward, tol=backward_tol,
                 strict=strict, info=finfo, solver_options=sopts)
    out = state if return_state else state[0]
    return (out, finfo, info) if return_info else out
