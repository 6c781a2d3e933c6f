"""Sequential quadratic programming: the update step :func:`sqp` (QP subproblem solved by ADMM
and itself folded) and the forward driver :func:`solve_sqp`.

Problem (per instance, nonconvex allowed)::

    min_x f(x, θ)   s.t.  g(x, θ) ≤ 0  (p rows),   h(x, θ) = 0  (m rows)

``f(x, *params) -> (B,)``, ``g(x, *params) -> (B, p)``, ``h(x, *params) -> (B, m)`` with
``x (B, n)``; rows of the batch must not interact. Lagrangian
``L = f + λᵀg + νᵀh`` (``λ ≥ 0``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._batched import ShapeError
from .._errors import FoldError, report_unconverged
from ..fold import fold
from ._common import autograd_jacobian
from .quadprog import INF, admm_qp, solve_qp_admm

__all__ = ["sqp", "solve_sqp", "SQPInfo", "sqp_kkt_residual"]

Fn = Callable[..., Tensor]


def _eval(f: Fn, g: Fn | None, h: Fn | None, x: Tensor, params: tuple, create_graph: bool):
    """f, ∇f, g, J_g, h, J_h at x (graph kept when ``create_graph``)."""
    B, n = x.shape
    with torch.enable_grad():
        xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        fx = f(xg, *params)
        if not isinstance(fx, Tensor) or fx.shape != (B,):
            raise ShapeError(f"sqp: f returned {tuple(fx.shape) if isinstance(fx, Tensor) else fx}"
                             f", expected ({B},) (one value per instance).")
        (gf,) = torch.autograd.grad(fx.sum(), xg, create_graph=create_graph,
                                    retain_graph=True)
        outs = []
        for name, fn in (("g", g), ("h", h)):
            if fn is None:
                outs += [x.new_zeros(B, 0), x.new_zeros(B, 0, n)]
                continue
            v = fn(xg, *params)
            if not isinstance(v, Tensor) or v.dim() != 2 or v.shape[0] != B:
                raise ShapeError(f"sqp: {name} returned "
                                 f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
                                 f", expected ({B}, k).")
            outs += [v, autograd_jacobian(v, xg, create_graph=create_graph)]
    res = (fx, gf, *outs)
    if not create_graph:
        res = tuple(t.detach() for t in res)
    return res


def _lagrangian_hessian(f: Fn, g: Fn | None, h: Fn | None, x: Tensor, lam: Tensor, nu: Tensor,
                        params: tuple) -> Tensor:
    """Detached ``(B, n, n)`` ``∇²ₓₓ(f + λᵀg + νᵀh)``."""
    pd = tuple(p.detach() if isinstance(p, Tensor) else p for p in params)
    lam, nu = lam.detach(), nu.detach()

    def lag(xx: Tensor) -> Tensor:
        val = f(xx, *pd)
        if g is not None and lam.shape[1]:
            val = val + (lam * g(xx, *pd)).sum(1)
        if h is not None and nu.shape[1]:
            val = val + (nu * h(xx, *pd)).sum(1)
        return val
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (gl,) = torch.autograd.grad(lag(xg).sum(), xg, create_graph=True)
        H = autograd_jacobian(gl, xg, create_graph=False)
    return (0.5 * (H + H.transpose(1, 2))).detach()


def _convexify(H: Tensor, hessian: str | Callable, min_eig: float) -> Tensor:
    if hessian == "exact":
        return H
    ev = torch.linalg.eigvalsh(H)
    scale = ev.abs().amax(dim=1).clamp_min(1.0)
    floor = min_eig * scale
    shift = (floor - ev[:, 0]).clamp_min(0)
    return H + shift.view(-1, 1, 1) * torch.eye(H.shape[1], dtype=H.dtype, device=H.device)


def sqp(f: Fn, g: Fn | None = None, h: Fn | None = None, *, hessian: str | Callable = "auto",
        min_eig: float = 1e-8, qp_options: dict[str, Any] | None = None,
        qp_backward: str | Callable = "gmres", qp_backward_tol: float = 1e-12,
        strict: bool = False, subproblem: str = "admm") -> Callable[..., tuple]:
    """One full SQP (Newton–KKT) step ``(x, λ, ν) ↦ (x + d, λ_QP, ν_QP)`` where ``d``, ``λ_QP``,
    ``ν_QP`` solve the QP subproblem::

        min_d ½ dᵀHd + ∇f(x)ᵀd   s.t.  g(x) + J_g(x) d ≤ 0,   h(x) + J_h(x) d = 0

    Fixed points are exactly the KKT points: ``d = 0`` solves the QP iff
    ``∇f + J_gᵀλ + J_hᵀν = 0``, ``g ≤ 0``, ``λ ≥ 0``, ``λᵀg = 0``, ``h = 0``.

    ``H`` is the Lagrangian Hessian ``∇²ₓₓL(x, λ, ν)`` (``hessian="exact"``), shifted to
    ``λ_min(H) ≥ min_eig·max(1, ‖H‖)`` where it is not (``"auto"``, default: nonconvex f), or
    ``hessian(x, λ, ν, *params) -> (B, n, n)``. ``H`` is used as a constant (no graph): it only
    multiplies ``d = 0`` at the fixed point, so the folded gradient stays exact. With the exact
    Hessian at a nondegenerate KKT point (LICQ, strict complementarity, second-order
    sufficiency) ``Φ = 0`` (Newton on the KKT system); with a shifted ``H`` the fixed point is
    the same and ``ρ(Φ) < 1`` near a strict local minimum.

    The QP subproblem is solved by :func:`~fold_plugins.steps.solve_qp_admm` (no grad) and
    then folded with :func:`~fold_plugins.steps.admm_qp` (``fp.fold`` nested inside the step),
    so the step is differentiable w.r.t. ``x, λ, ν`` and every param — no ADMM unrolling.

    Args:
        f, g, h: see the module docstring (``g``/``h`` may be ``None``).
        qp_options: keywords for ``solve_qp_admm`` (e.g. ``{"tol": 1e-12}``); its ``sigma``,
            ``alpha`` and ``rho_eq_scale`` also configure the folded inner ``admm_qp`` step.
        qp_backward, qp_backward_tol: solver (name or callable) and tolerance of the inner
            (QP) folded backward.
        strict: raise :class:`FoldError` instead of warning when the inner QP's forward
            (unless ``qp_options`` sets its own ``strict``) or its folded backward does not
            converge.
        subproblem: ``"admm"`` (default): the QP above, solved by ADMM and folded.
            ``"active_set"``: the same QP restricted to the active set ``𝒜`` read off the
            state as the rows with ``λ_i > −g_i`` (the interior-point rule: of the
            complementary pair ``λ_i·(−g_i) ≈ 0`` the larger one is nonzero), i.e. the
            equality-constrained QP ``H d + J_𝒜ᵀλ_𝒜 + J_hᵀν = −∇f``, ``g_𝒜 + J_𝒜 d = 0``,
            ``h + J_h d = 0``, ``λ_{∖𝒜} = 0``, solved by one batched linear solve and
            differentiated by plain autograd. Near a nondegenerate KKT point (strict
            complementarity) the QP's active set is exactly ``𝒜``, so both give the same step,
            fixed point and derivative; the active-set step is much cheaper to differentiate
            (no nested ADMM fold). Use it when the state comes from an accurate primal-dual
            solver (interior point, Ipopt, Clarabel); it is not a globalised forward step.

    Returns:
        ``step(state, *params)`` with ``state = (x (B, n), λ (B, p), ν (B, m))`` (``p`` or ``m``
        may be 0); params are passed to ``f``, ``g``, ``h`` unchanged (shared or batched is up
        to those functions).
    """
    if not callable(f):
        raise FoldError(f"sqp: f must be callable f(x, *params) -> (B,), got {type(f).__name__}.")
    if not (hessian in ("auto", "exact") or callable(hessian)):
        raise FoldError(f"sqp: hessian must be 'auto', 'exact' or a callable, got {hessian!r}.")
    if subproblem not in ("admm", "active_set"):
        raise FoldError(f"sqp: subproblem must be 'admm' or 'active_set', got {subproblem!r}.")
    qopts = {"tol": 1e-13, "maxiter": 50_000}
    qopts.update(qp_options or {})
    qfwd: dict[str, Any] = {"strict": strict, **qopts}

    def step(state: tuple[Tensor, Tensor, Tensor], *params: Any) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise FoldError("sqp: the state must be a tuple (x (B, n), λ (B, p), ν (B, m)).")
        x, lam, nu = state
        B, n = x.shape
        outer = torch.is_grad_enabled()
        fx, gf, gv, Jg, hv, Jh = _eval(f, g, h, x, params, outer)
        p, m = gv.shape[1], hv.shape[1]
        if lam.shape != (B, p) or nu.shape != (B, m):
            raise ShapeError(f"sqp: λ has shape {tuple(lam.shape)} and ν {tuple(nu.shape)}; with "
                             f"g giving {p} and h giving {m} rows they must be ({B}, {p}) and "
                             f"({B}, {m}).")
        if callable(hessian):
            H = hessian(x.detach(), lam.detach(), nu.detach(),
                        *[t.detach() if isinstance(t, Tensor) else t for t in params]).detach()
        else:
            H = _convexify(_lagrangian_hessian(f, g, h, x, lam, nu, params), hessian, min_eig)
        if subproblem == "active_set":
            return _active_set_step(x, lam, gf, gv, Jg, hv, Jh, H)
        Aq = torch.cat([Jg, Jh], dim=1)
        lq = torch.cat([torch.full_like(gv, -INF), -hv], dim=1)
        uq = torch.cat([-gv, -hv], dim=1)
        with torch.no_grad():
            warm = (x.new_zeros(B, n), torch.minimum(torch.maximum(x.new_zeros(B, p + m),
                                                                   lq.detach()), uq.detach()),
                    torch.cat([lam, nu], dim=1).detach())
            (d0, z0, y0), info = solve_qp_admm(H, gf.detach(), Aq.detach(), lq.detach(),
                                               uq.detach(), warm_start=warm, **qfwd)
        if outer and any(t.requires_grad for t in (gf, Aq, lq, uq)):
            qstep = admm_qp(rho=info.rho, sigma=qopts.get("sigma", 1e-6),
                            alpha=qopts.get("alpha", 1.6),
                            rho_eq_scale=qopts.get("rho_eq_scale", 1e3))
            d, _, yq = fold(qstep, (d0, z0, y0), H, gf, Aq, lq, uq, solver=qp_backward,
                            tol=qp_backward_tol, strict=strict)
        else:
            d, yq = d0, y0
        return x + d, yq[:, :p], yq[:, p:]
    return step


def _active_set_step(x: Tensor, lam: Tensor, gf: Tensor, gv: Tensor, Jg: Tensor, hv: Tensor,
                     Jh: Tensor, H: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The SQP step with the QP restricted to the active set (see :func:`sqp`): one batched
    solve of ``[[H, J_𝒜ᵀ, J_hᵀ], [J_𝒜, −I_{∖𝒜}, 0], [J_h, 0, 0]] (d, λ, ν) = −(∇f, g_𝒜, h)``
    where inactive rows read ``−λ_i = 0``."""
    B, n = x.shape
    p, m = gv.shape[1], hv.shape[1]
    with torch.no_grad():
        a = (lam > -gv).to(x.dtype)
    K = x.new_zeros(B, n + p + m, n + p + m)
    K[:, :n, :n] = H
    K[:, :n, n:n + p] = (a.unsqueeze(1) * Jg.transpose(1, 2))
    K[:, n:n + p, :n] = a.unsqueeze(2) * Jg
    K[:, n:n + p, n:n + p] = torch.diag_embed(a - 1)
    K[:, :n, n + p:] = Jh.transpose(1, 2)
    K[:, n + p:, :n] = Jh
    rhs = -torch.cat([gf, a * gv, hv], dim=1)
    sol = torch.linalg.solve(K, rhs.unsqueeze(-1)).squeeze(-1)
    return x + sol[:, :n], sol[:, n:n + p], sol[:, n + p:]


@dataclass
class SQPInfo:
    """Per-instance outcome of :func:`solve_sqp`.

    Attributes:
        iterations: ``(B,)``; kkt_residual: ``(B,)`` max of stationarity, feasibility,
        complementarity and dual-sign violations (∞-norms); converged: ``(B,)`` bool.
    """

    iterations: Tensor
    kkt_residual: Tensor
    converged: Tensor


def sqp_kkt_residual(f: Fn, g: Fn | None, h: Fn | None, x: Tensor, lam: Tensor, nu: Tensor,
                     *params: Any) -> Tensor:
    """``(B,)`` KKT residual of ``(x, λ, ν)``: max of ``‖∇L‖∞``, ``‖max(g,0)‖∞``, ``‖h‖∞``,
    ``‖λ ⊙ g‖∞`` and ``‖min(λ,0)‖∞``."""
    _, gf, gv, Jg, hv, Jh = _eval(f, g, h, x, params, False)
    stat = gf + (lam.unsqueeze(1) @ Jg).squeeze(1) + (nu.unsqueeze(1) @ Jh).squeeze(1)
    parts = [stat.abs().amax(1)]
    if gv.shape[1]:
        parts += [gv.clamp_min(0).amax(1), (lam * gv).abs().amax(1), (-lam).clamp_min(0).amax(1)]
    if hv.shape[1]:
        parts.append(hv.abs().amax(1))
    return torch.stack(parts).amax(0)


def solve_sqp(f: Fn, g: Fn | None, h: Fn | None, x0: Tensor, *params: Any,
              lam0: Tensor | None = None, nu0: Tensor | None = None, tol: float = 1e-10,
              maxiter: int = 200, hessian: str | Callable = "auto", min_eig: float = 1e-8,
              qp_options: dict[str, Any] | None = None, warn: bool = True,
              strict: bool = False) -> tuple[tuple[Tensor, Tensor, Tensor], SQPInfo]:
    """Forward SQP with an ℓ1-merit Armijo line search (no grad).

    Each iteration solves the QP of :func:`sqp`, then backtracks on
    ``φ(x) = f + μ(‖h‖₁ + ‖max(g,0)‖₁)`` with ``μ > ‖(λ_QP, ν_QP)‖∞``; full steps are taken once
    the KKT residual is below ``1e-6`` (local quadratic convergence with the exact Hessian).
    Multipliers take the QP's. Infeasible QP subproblems raise
    :class:`~fold_plugins.steps.QPInfeasibleError`.

    Returns:
        ``((x, λ, ν), SQPInfo)``; stops per instance when the KKT residual
        (:func:`sqp_kkt_residual`) is ≤ ``tol``. Unconverged instances warn
        :class:`FoldConvergenceWarning` when ``warn``; ``strict`` raises :class:`FoldError`
        instead (also for the inner QP solves).
    """
    if not isinstance(x0, Tensor) or x0.dim() != 2:
        raise ShapeError(f"solve_sqp: x0 must be (B, n), got "
                         f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}.")
    pd = tuple(p.detach() if isinstance(p, Tensor) else p for p in params)
    x = x0.detach().clone()
    B = x.shape[0]
    with torch.no_grad():
        _, _, gv, _, hv, _ = _eval(f, g, h, x, pd, False)
    p, m = gv.shape[1], hv.shape[1]
    lam = x.new_zeros(B, p) if lam0 is None else lam0.detach().clone()
    nu = x.new_zeros(B, m) if nu0 is None else nu0.detach().clone()
    step = sqp(f, g, h, hessian=hessian, min_eig=min_eig, qp_options=qp_options, strict=strict)
    its = torch.zeros(B, dtype=torch.int64, device=x.device)
    done = torch.zeros(B, dtype=torch.bool, device=x.device)
    mu = x.new_ones(B)
    res = torch.full((B,), torch.inf, dtype=x.dtype, device=x.device)

    def merit(xx: Tensor, mu: Tensor) -> Tensor:
        val = f(xx, *pd)
        if g is not None and p:
            val = val + mu * g(xx, *pd).clamp_min(0).sum(1)
        if h is not None and m:
            val = val + mu * h(xx, *pd).abs().sum(1)
        return val

    with torch.no_grad():
        for _ in range(maxiter):
            res = torch.where(done, res, sqp_kkt_residual(f, g, h, x, lam, nu, *pd))
            done |= res <= tol
            if bool(done.all()):
                break
            xn, lamn, nun = step((x, lam, nu), *pd)
            d = xn - x
            mult = torch.cat([lamn, nun], 1).abs().amax(1) if p + m else x.new_zeros(B)
            mu = torch.maximum(mu, 1.5 * mult + 1e-3)
            _, gf, gv, _, hv, _ = _eval(f, g, h, x, pd, False)
            viol = (gv.clamp_min(0).sum(1) if p else 0) + (hv.abs().sum(1) if m else 0)
            slope = (gf * d).sum(1) - mu * viol
            phi0 = merit(x, mu)
            t = torch.ones(B, dtype=x.dtype, device=x.device)
            full = res <= 1e-6
            for _ls in range(40):
                ok = full | (merit(x + t.view(B, 1) * d, mu) <= phi0 + 1e-4 * t * slope.clamp_max(0)
                             + 1e-15 * phi0.abs())
                if bool(ok.all()):
                    break
                t = torch.where(ok, t, 0.5 * t)
            keep = done.view(B, 1)
            x = torch.where(keep, x, x + t.view(B, 1) * d)
            lam = torch.where(keep, lam, lamn)
            nu = torch.where(keep, nu, nun)
            its = torch.where(done, its, its + 1)
        res = torch.where(done, res, sqp_kkt_residual(f, g, h, x, lam, nu, *pd))
        done |= res <= tol
    if (warn or strict) and not bool(done.all()):
        report_unconverged(~done, res, f"solve_sqp (KKT tol {tol:.1e}, maxiter {maxiter}; "
                           "error = KKT residual)", "raise maxiter or start closer", strict)
    return (x, lam, nu), SQPInfo(its, res, done)
