"""Quadratic programs the timing/convergence suites share, with closed-form gradients.

    box QP:      min_x ½xᵀPx + qᵀx   s.t. 0 ≤ x ≤ 1
    simplex QP:  min_x ½xᵀPx + qᵀx   s.t. x ≥ 0, 1ᵀx = 1

``P = MᵀM/n + μ·I`` (``M`` Gaussian; μ = 0.1 gives κ(P) ≈ 40) is shared by the batch and
``q`` (B, n) is the parameter. The update step is projected gradient
``U(x, q) = Π(x − α(Px + q))`` with ``α = 1/λ_max(P)``.

Closed-form vector-Jacobian products (the independent truth the suites measure against),
for a loss with ``∂L/∂x* = g``:

* box:     ``∂L/∂q = −v``, ``v_F = P_FF⁻¹ g_F``, ``v = 0`` off the free set ``F``;
* simplex: ``∂L/∂q_S = −w`` with ``[P_SS 1; 1ᵀ 0][w; μ] = [g_S; 0]`` on the support ``S``.

(Both follow from differentiating the KKT conditions on the active set; strict
complementarity is checked by :func:`check_nondegenerate`.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import Config

__all__ = ["QP", "make_qp", "project_box", "project_simplex", "solve_qp", "exact_solution",
           "vjp_truth", "check_nondegenerate", "unroll", "rel_err", "max_rel_err",
           "timed_cvxpylayer_grad"]


def project_box(u: Tensor) -> Tensor:
    """Euclidean projection onto ``[0, 1]^n`` (gradient 1 inside, 0 outside)."""
    return torch.clamp(u, 0.0, 1.0)


def project_simplex(u: Tensor) -> Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based).

    ``x = max(u − τ, 0)`` with ``τ = (Σ_{j≤k} s_j − 1)/k``, ``s`` sorted descending and
    ``k`` the number of positive entries; autograd through sort/gather gives the Jacobian
    ``diag(m) − m mᵀ/|S|`` on the support ``S`` (``m`` its indicator).
    """
    n = u.shape[-1]
    s, _ = torch.sort(u, dim=-1, descending=True)
    cs = s.cumsum(dim=-1) - 1
    k = torch.arange(1, n + 1, dtype=u.dtype, device=u.device)
    count = (s - cs / k > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = cs.gather(-1, count - 1) / count.to(u.dtype)
    return torch.clamp(u - tau, min=0.0)


@dataclass
class QP:
    """A batch of QPs sharing ``P``; ``q`` is the (B, n) parameter.

    Attributes:
        kind: ``"box"`` or ``"simplex"``.
        P: (n, n) symmetric positive definite.
        q: (B, n).
        alpha: projected-gradient step size ``1/λ_max(P)``.
    """

    kind: str
    P: Tensor
    q: Tensor
    alpha: float

    @property
    def n(self) -> int:
        return self.P.shape[0]

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    def project(self, u: Tensor) -> Tensor:
        return project_box(u) if self.kind == "box" else project_simplex(u)

    def step(self, x: Tensor, q: Tensor) -> Tensor:
        """One projected-gradient step ``Π(x − α(Px + q))`` (batched rows)."""
        return self.project(x - self.alpha * (x @ self.P + q))

    def x0(self) -> Tensor:
        """The cold start a user's loop would use: 0 (box) or the uniform point (simplex)."""
        x = self.q.new_zeros(self.q.shape)
        return x if self.kind == "box" else x + 1.0 / self.n

    def objective(self, x: Tensor, q: Tensor | None = None) -> Tensor:
        q = self.q if q is None else q
        return 0.5 * ((x @ self.P) * x).sum(-1) + (q * x).sum(-1)


def make_qp(kind: str, n: int, batch: int, cfg: Config, seed: int = 0, mu: float = 0.1,
            q_scale: float | None = None) -> QP:
    """Random box/simplex QP, drawn on CPU from ``cfg.seed + seed`` and moved to the run's
    device/dtype (same instance on every device).

    Args:
        mu: ridge added to ``MᵀM/n`` (sets the conditioning: κ ≈ (4 + μ)/μ).
        q_scale: std of ``q`` (default: 1 for box, so some coordinates sit on each bound;
            1 for simplex, giving a support of a fraction of the coordinates).
    """
    if kind not in ("box", "simplex"):
        raise ValueError(f"kind must be 'box' or 'simplex', got {kind!r}.")
    gen = cfg.generator(1000 * seed + 17 * n + batch)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    P = M.T @ M / n + mu * torch.eye(n, dtype=torch.float64)
    P = 0.5 * (P + P.T)
    L = float(torch.linalg.eigvalsh(P).max())
    scale = 1.0 if q_scale is None else q_scale
    q = scale * torch.randn(batch, n, generator=gen, dtype=torch.float64)
    if kind == "box":
        # centre so that the unconstrained minimiser straddles the box: bounds hit on both sides
        q = q - 0.5 * P.sum(dim=1)
    return QP(kind, P.to(cfg.device, cfg.dtype), q.to(cfg.device, cfg.dtype), 1.0 / L)


@torch.no_grad()
def solve_qp(qp: QP, q: Tensor | None = None, tol: float = 1e-13, maxiter: int = 20000,
             check_every: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Accelerated projected gradient (FISTA, gradient-restart), no autograd graph.

    Stops per instance when ``‖U(x) − x‖ / (1 + ‖x‖) ≤ tol`` (``U`` the plain step).

    Returns:
        ``(x, iterations (B,), residual (B,))``.
    """
    q = qp.q if q is None else q.detach()
    x = qp.project(qp.x0())
    y = x.clone()
    t = q.new_ones(q.shape[0], 1)
    B = q.shape[0]
    iters = torch.zeros(B, dtype=torch.int64, device=q.device)
    res = torch.full((B,), math.inf, dtype=q.dtype, device=q.device)
    active = torch.ones(B, dtype=torch.bool, device=q.device)
    for k in range(1, maxiter + 1):
        x_new = qp.step(y, q)
        restart = ((y - x_new) * (x_new - x)).sum(-1, keepdim=True) > 0
        t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
        y_new = x_new + ((t - 1) / t_new) * (x_new - x)
        y_new = torch.where(restart, x_new, y_new)
        t_new = torch.where(restart, torch.ones_like(t_new), t_new)
        a = active[:, None]
        x, y, t = torch.where(a, x_new, x), torch.where(a, y_new, y), torch.where(a, t_new, t)
        iters = torch.where(active, torch.full_like(iters, k), iters)
        if k % check_every == 0 or k == maxiter:
            r = (qp.step(x, q) - x).norm(dim=-1) / (1 + x.norm(dim=-1))
            res = torch.where(active, r, res)
            active = active & (res > tol)
            if not bool(active.any()):
                break
    return x, iters, res


def _free_mask(qp: QP, x: Tensor, eps: float = 1e-9) -> Tensor:
    if qp.kind == "box":
        return (x > eps) & (x < 1 - eps)
    return x > eps


@torch.no_grad()
def exact_solution(qp: QP, x: Tensor, q: Tensor | None = None) -> Tensor:
    """Solve the KKT system on the active set identified from an accurate ``x`` (polish)."""
    q = qp.q if q is None else q
    f = _free_mask(qp, x).to(x.dtype)
    B, n = x.shape
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    out = []
    for b in range(B):  # per instance: each has its own active set
        fb = f[b]
        if qp.kind == "box":
            xa = torch.where(fb > 0, torch.zeros_like(x[b]), torch.round(x[b]))
            M = qp.P * fb[:, None] * fb[None, :] + eye * (1 - fb)[:, None]
            rhs = -(q[b] + qp.P @ xa) * fb
            out.append(xa + torch.linalg.solve(M, rhs) * fb)
        else:
            K = x.new_zeros(n + 1, n + 1)
            K[:n, :n] = qp.P * fb[:, None] * fb[None, :] + eye * (1 - fb)[:, None]
            K[:n, n] = fb
            K[n, :n] = fb
            rhs = torch.cat([-q[b] * fb, x.new_ones(1)])
            out.append(torch.linalg.solve(K, rhs)[:n] * fb)
    return torch.stack(out)


@torch.no_grad()
def vjp_truth(qp: QP, x_star: Tensor, g: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """Closed-form ``∂L/∂q`` (B, n) for cotangent ``g = ∂L/∂x*`` (module docstring)."""
    f = _free_mask(qp, x_star).to(x_star.dtype)
    B, n = x_star.shape
    eye = torch.eye(n, dtype=x_star.dtype, device=x_star.device)
    size = n + (qp.kind == "simplex")
    step = max(1, chunk_elements // (size * size))
    out = []
    for s in range(0, B, step):
        fb = f[s:s + step]
        gb = g[s:s + step]
        Mf = qp.P[None] * fb[:, :, None] * fb[:, None, :] + eye[None] * (1 - fb)[:, :, None]
        if qp.kind == "box":
            v = torch.linalg.solve(Mf, (gb * fb)[..., None])[..., 0] * fb
        else:
            K = x_star.new_zeros(fb.shape[0], n + 1, n + 1)
            K[:, :n, :n] = Mf
            K[:, :n, n] = fb
            K[:, n, :n] = fb
            rhs = torch.cat([gb * fb, gb.new_zeros(fb.shape[0], 1)], dim=1)
            v = torch.linalg.solve(K, rhs[..., None])[..., 0][:, :n] * fb
        out.append(-v)
    return torch.cat(out)


@torch.no_grad()
def check_nondegenerate(qp: QP, x_star: Tensor, q: Tensor | None = None) -> float:
    """Smallest |multiplier| over the active bounds, relative to ‖∇f‖ (0 ⇒ degenerate).

    For the box, the multiplier of an active bound is ``|∇f_i|``; for the simplex it is
    ``∇f_i + ν`` with ``ν = −mean(∇f_S)``.
    """
    q = qp.q if q is None else q
    grad = x_star @ qp.P + q
    f = _free_mask(qp, x_star)
    if qp.kind == "box":
        mult = grad.abs()
    else:
        nu = -(grad * f).sum(-1, keepdim=True) / f.sum(-1, keepdim=True).clamp(min=1)
        mult = (grad + nu).abs()
    mult = torch.where(f, torch.full_like(mult, math.inf), mult)
    scale = grad.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    val = (mult / scale).min()
    return float(val) if math.isfinite(float(val)) else math.inf


def unroll(step: Callable[..., Tensor], x0: Tensor, *params: Any, n_iter: int,
           keep: set[int] | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """``n_iter`` steps of ``step`` with the autograd graph kept (plain unrolling).

    Uses ``fold_plugins.adapters.unrolled.unroll`` when that module is importable (the project's
    reference), otherwise the same loop inline. ``keep``: iteration counts whose iterates
    are also returned (for error-vs-K curves; computed inline).

    Returns:
        ``(x_K, {k: x_k for k in keep})``.
    """
    if not keep:
        try:
            from fold_plugins.adapters.unrolled import unroll as _unroll
        except ImportError:
            _unroll = None
        if _unroll is not None:
            return _unroll(step, x0, *params, n_iter=n_iter), {}
    x = x0
    kept: dict[int, Tensor] = {}
    if keep and 0 in keep:
        kept[0] = x
    for k in range(1, n_iter + 1):
        x = step(x, *params)
        if keep and k in keep:
            kept[k] = x
    return x, kept


def rel_err(a: Tensor, b: Tensor) -> Tensor:
    """Per-instance relative error ``‖a − b‖ / ‖b‖`` over all but dim 0."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-300)


def max_rel_err(a: Tensor, b: Tensor) -> float:
    """The worst instance's relative error."""
    return float(rel_err(a.detach(), b.detach()).max())


def timed_cvxpylayer_grad(layer: Any, q: torch.Tensor, w: torch.Tensor, solver_args: dict,
                          sw: Any) -> torch.Tensor:
    """Forward and backward of a one-parameter ``CvxpyLayer`` with the loss ``⟨w, x*⟩``, timed
    on ``sw`` (laps ``"forward"``, ``"backward"``); returns ``q.grad``. cvxpylayers computes in
    float64 on the CPU: ``q`` goes there and the solution comes back to ``q``'s device/dtype."""
    sw.start()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation")
        (xl,) = layer(q.to("cpu", torch.float64), solver_args=solver_args)
    xl = xl.to(q.device, q.dtype)
    sw.lap("forward")
    (xl * w).sum().backward()
    sw.lap("backward")
    return q.grad
