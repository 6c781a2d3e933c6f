"""The AC-OPF as torch functions and its SQP update step for ``fp.fold``.

The step ``U(y, λ, ν; c, pd, qd)`` solves the SQP subproblem of the NLP
``min f(y) s.t. g(y) ≤ 0, h(y) = 0`` (:mod:`.network`) at ``(y, λ, ν)``::

    min_d ½ dᵀH d + ∇f(y)ᵀd   s.t.   g_A(y) + J_A(y) d = 0,   h(y) + J_h(y) d = 0

on the active set ``A`` of the solution (rows with ``λ > 0``; off ``A`` the new multipliers are
0) by one KKT solve, and returns ``(y + α d, λ + α(λ_QP − λ), ν + α(ν_QP − ν))``. ``H`` is the
Lagrangian Hessian ``∇²L`` plus ``reg·I``, used as a constant (it multiplies ``d = 0`` at the
fixed point). At a nondegenerate KKT point the QP's active set is ``A``, so this is the SQP
step; every KKT point (with that active set) is a fixed point. With ``α = 1, reg = 0`` it is
Newton's method on the KKT system (``Φ = ∂U/∂z = 0``); the authors' configuration is
``α = 0.01, reg = 1`` (then ``Φ ≠ 0`` and a truncated backward is biased).

``fp.steps.sqp(f, g, h, subproblem="active_set")`` is the library's version of the full step
(α = 1, its own Hessian handling, Jacobians differentiated inside the step); this module keeps
its own so that the authors' damped configuration (α = 0.01, ``H + I``) can be reproduced and
compared with their one-iteration truncation. ``tests/test_acopf.py`` checks that both give the
finite-difference gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.func import hessian, jacrev, vmap

from .network import OBJ_SCALE, Network, TorchOps

__all__ = ["ACOPFFunctions", "make_step", "kkt_matrix", "kkt_map", "kkt_residual", "polish",
           "active_set", "identify_and_polish", "truncated_solver"]

_OPS = TorchOps()


class ACOPFFunctions:
    """``f(y, c)`` (B,), ``g(y)`` (B, p), ``h(y, pd, qd)`` (B, m) of a network in torch.

    ``pd``, ``qd`` are per-bus per-unit loads ``(B, nbus)``; ``c`` the costs ``(B, 3·ngen)``.
    """

    def __init__(self, net: Network) -> None:
        self.net = net

    def f(self, y: Tensor, c: Tensor) -> Tensor:
        return OBJ_SCALE * self.net.generation_cost(y, c, _OPS).sum(1)

    def g(self, y: Tensor) -> Tensor:
        return self.net.inequalities(y, _OPS)

    def h(self, y: Tensor, pd: Tensor, qd: Tensor) -> Tensor:
        return self.net.equalities(y, pd, qd, _OPS)

    # one instance (unbatched) versions for torch.func
    def _lag1(self, y: Tensor, lam: Tensor, nu: Tensor, c: Tensor, pd: Tensor,
              qd: Tensor) -> Tensor:
        y1 = y.unsqueeze(0)
        return (self.f(y1, c.unsqueeze(0))[0] + (lam * self.g(y1)[0]).sum()
                + (nu * self.h(y1, pd.unsqueeze(0), qd.unsqueeze(0))[0]).sum())

    def _gh1(self, y: Tensor, pd: Tensor, qd: Tensor) -> tuple[Tensor, Tensor]:
        y1 = y.unsqueeze(0)
        return self.g(y1)[0], self.h(y1, pd.unsqueeze(0), qd.unsqueeze(0))[0]

    def grad_f(self, y: Tensor, c: Tensor) -> Tensor:
        """``∇f`` (B, n), differentiable in ``y`` and ``c`` (closed form of the cost)."""
        sl = self.net.slices()["pg"]
        ng, S = self.net.ngen, self.net.base_mva
        pg = S * y[:, sl]
        gpg = OBJ_SCALE * S * (2 * c[:, :ng] * pg + c[:, ng:2 * ng])
        out = y.new_zeros(y.shape[0], y.shape[1]).to(gpg.dtype)
        return torch.cat([out[:, :sl.start], gpg, out[:, sl.stop:]], dim=1)

    def jacobians(self, y: Tensor, pd: Tensor, qd: Tensor) -> tuple[Tensor, Tensor]:
        """``J_g`` (B, p, n), ``J_h`` (B, m, n); differentiable in ``y``, ``pd``, ``qd``."""
        return vmap(jacrev(self._gh1))(y, pd, qd)

    def lagrangian_hessian(self, y: Tensor, lam: Tensor, nu: Tensor, c: Tensor, pd: Tensor,
                           qd: Tensor) -> Tensor:
        """``∇²ₓₓL`` (B, n, n), detached."""
        args = [t.detach() for t in (y, lam, nu, c, pd, qd)]
        return vmap(hessian(self._lag1))(*args).detach()


def active_set(fns: ACOPFFunctions, y: np.ndarray | Tensor,
               lam: np.ndarray | Tensor, ratio: float = 1.0) -> Tensor:
    """``(B, p)`` bool: inequality rows whose multiplier exceeds ``ratio`` times their slack,
    ``λ_i > −ratio·g_i(y)`` (complementarity-based identification from an interior-point
    solution)."""
    y = torch.as_tensor(y, dtype=torch.float64)
    lam = torch.as_tensor(lam, dtype=torch.float64)
    y, lam = (y, lam) if y.dim() == 2 else (y.unsqueeze(0), lam.unsqueeze(0))
    with torch.no_grad():
        return lam > -ratio * fns.g(y)


def kkt_matrix(fns: ACOPFFunctions, y: Tensor, lam: Tensor, nu: Tensor, c: Tensor, pd: Tensor,
               qd: Tensor, active: Tensor, reg: float = 0.0) -> Tensor:
    """``(B, N, N)`` KKT matrix of the active-set QP, ``N = n + p + m`` (detached)::

        [ H + reg·I   J_gᵀ diag(a)   J_hᵀ ]
        [ diag(a) J_g  diag(1 − a)     0  ]      a = active rows (1) / others (0)
        [ J_h            0             0  ]
    """
    with torch.no_grad():
        H = fns.lagrangian_hessian(y, lam, nu, c, pd, qd)
        B, n = y.shape
        if reg:
            H = H + reg * torch.eye(n, dtype=y.dtype, device=y.device)
        Jg, Jh = (J.detach() for J in fns.jacobians(y.detach(), pd.detach(), qd.detach()))
        p, m = Jg.shape[1], Jh.shape[1]
        a = active.to(device=y.device, dtype=y.dtype)
        return torch.cat([
            torch.cat([H, (Jg * a.unsqueeze(2)).transpose(1, 2), Jh.transpose(1, 2)], 2),
            torch.cat([Jg * a.unsqueeze(2), torch.diag_embed(1 - a), y.new_zeros(B, p, m)], 2),
            torch.cat([Jh, y.new_zeros(B, m, p), y.new_zeros(B, m, m)], 2)], 1)


def kkt_map(fns: ACOPFFunctions, active: Tensor, y: Tensor, lam: Tensor, nu: Tensor, c: Tensor,
            pd: Tensor, qd: Tensor) -> Tensor:
    """``F(z) = (∇L(y, a⊙λ, ν), a⊙g(y) + (1 − a)⊙λ, h(y))`` (B, N): zero exactly at the KKT
    points with active set ``a``; differentiable in every argument (plain autograd)."""
    a = active.to(device=y.device, dtype=y.dtype)
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        yg = y if y.requires_grad else y.detach().requires_grad_(True)
        gv, hv = fns.g(yg), fns.h(yg, pd, qd)
        lag = fns.f(yg, c) + (a * lam * gv).sum(1) + (nu * hv).sum(1)
        (gl,) = torch.autograd.grad(lag.sum(), yg, create_graph=outer)
    F = torch.cat([gl, a * gv + (1 - a) * lam, hv], 1)
    return F if outer else F.detach()


def make_step(fns: ACOPFFunctions, active: Tensor, K: Tensor, *,
              alpha: float = 1.0) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The SQP step of the module docstring, ``step((y, λ, ν), c, pd, qd)``.

    In the QP's KKT form the step is ``z ← z − α K⁻¹F(z)`` (:func:`kkt_map`), ``K``
    (:func:`kkt_matrix`) evaluated at the solution and held fixed: at a fixed point
    (``F = 0``) its value and its derivatives in ``z`` and the parameters are those of the SQP
    step with ``K`` re-evaluated at ``z`` (the difference multiplies ``F = 0``), and no
    Jacobian or Hessian has to be differentiated.

    Args:
        fns: the network's functions.
        active: ``(B, p)`` bool active set (:func:`active_set` at the forward solution).
        K: ``(B, N, N)`` from :func:`kkt_matrix` (``reg`` there: the authors used 1).
        alpha: step length (1: full step; the authors used 0.01).
    """
    lu = torch.linalg.lu_factor(K)

    def step(state: tuple[Tensor, Tensor, Tensor], c: Tensor, pd: Tensor,
             qd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        y, lam, nu = state
        n, p = y.shape[1], lam.shape[1]
        F = kkt_map(fns, active, y, lam, nu, c, pd, qd)
        dz = torch.linalg.lu_solve(*lu, F.unsqueeze(2)).squeeze(2)
        return (y - alpha * dz[:, :n], lam - alpha * dz[:, n:n + p],
                nu - alpha * dz[:, n + p:])

    return step


def kkt_residual(fns: ACOPFFunctions, y: Tensor, lam: Tensor, nu: Tensor, c: Tensor,
                 pd: Tensor, qd: Tensor) -> Tensor:
    """``(B,)`` max of ‖∇L‖∞, ‖max(g, 0)‖∞, ‖h‖∞, ‖λ ⊙ g‖∞, ‖min(λ, 0)‖∞."""
    with torch.no_grad():
        Jg, Jh = fns.jacobians(y, pd, qd)
        gv, hv = fns.g(y), fns.h(y, pd, qd)
        stat = fns.grad_f(y, c) + (lam.unsqueeze(1) @ Jg).squeeze(1) \
            + (nu.unsqueeze(1) @ Jh).squeeze(1)
        parts = [stat.abs().amax(1), gv.clamp_min(0).amax(1), hv.abs().amax(1),
                 (lam * gv).abs().amax(1), (-lam).clamp_min(0).amax(1)]
        return torch.stack(parts).amax(0)


def polish(fns: ACOPFFunctions, y: Tensor, lam: Tensor, nu: Tensor, c: Tensor, pd: Tensor,
           qd: Tensor, active: Tensor, tol: float = 1e-12,
           maxiter: int = 5) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Newton steps on the KKT system of ``active`` (full SQP steps, exact Hessian) from an
    Ipopt solution until the KKT residual is ≤ ``tol``; returns the state and the residual."""
    with torch.no_grad():
        for _ in range(maxiter):
            res = kkt_residual(fns, y, lam, nu, c, pd, qd)
            if bool((res <= tol).all()):
                break
            step = make_step(fns, active, kkt_matrix(fns, y, lam, nu, c, pd, qd, active))
            y, lam, nu = step((y, lam, nu), c, pd, qd)
        res = kkt_residual(fns, y, lam, nu, c, pd, qd)
    return (y, lam, nu), res


def truncated_solver(k: int = 1) -> Callable[..., tuple[Tensor, object]]:
    """Backward "solver" of the original code's ``FoldOptLayer(n_iter=k, 'FPI')``: ``v = Φᵀg``,
    then ``k`` times ``v ← Φᵀv + g`` (a truncated Neumann series), for ``fp.fold(solver=…)``.

    ``matvec(v) = v − Φᵀv`` is what fold hands a solver, so ``Φᵀv = v − matvec(v)``. The
    truncation is biased by design: its ``converged`` flag is honest (residual ≤ tol), so fold
    warns; callers comparing it on purpose filter that warning.
    """
    from fold_plugins.solvers import SolveInfo

    def solve(matvec: Callable[[Tensor], Tensor], b: Tensor, *, x0: Tensor | None = None,
              tol: float = 1e-10, maxiter: int | None = None, **_: object):
        v = b - matvec(b)
        for _i in range(k):
            v = v - matvec(v) + b
        r = b - matvec(v)
        res = r.norm(dim=1) / b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        B = b.shape[0]
        info = SolveInfo(torch.full((B,), k, dtype=torch.int64, device=b.device), res,
                         res <= tol, k + 2,
                         solver=f"truncated LFPI ({k})")
        return v, info

    return solve


def identify_and_polish(fns: ACOPFFunctions, y: Tensor, lam: Tensor, nu: Tensor, c: Tensor,
                        pd: Tensor, qd: Tensor, tol: float = 1e-11
                        ) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor]:
    """Active set and polished KKT point of one interior-point solution (B = 1): tries
    ``λ > −r·g`` for ``r = 1, 1e-3, 1e3`` and keeps the first whose polished point has KKT
    residual ≤ ``tol`` (which includes ``λ ≥ 0`` and ``g ≤ 0``): near-degenerate rows
    (``λ`` and slack both small) are resolved by the KKT conditions themselves.

    Returns:
        ``((y, λ, ν), active, residual)``; the residual is above ``tol`` if no candidate fits.
    """
    best = None
    for r in (1.0, 1e-3, 1e3):
        A = active_set(fns, y, lam, r)
        if best is not None and torch.equal(A, best[1]):
            continue
        z, res = polish(fns, y, lam, nu, c, pd, qd, A, tol=tol, maxiter=6)
        if best is None or float(res.max()) < float(best[2].max()):
            best = (z, A, res)
        if float(res.max()) <= tol:
            break
    assert best is not None
    return best
