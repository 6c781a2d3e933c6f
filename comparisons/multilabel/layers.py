"""k-subset layers ``p(c) = argmax_{0 ≤ x ≤ 1, 1ᵀx = k} cᵀx + H(x)``.

Two entropies:

* binary, ``H(x) = −Σ x log x + (1 − x) log(1 − x)`` (LML, Amos, Xu & Kolter 2019): KKT gives
  ``x_i = σ(c_i + ν)`` with the scalar ``ν`` solving ``Σ σ(c_i + ν) = k``; Jacobian
  ``∂x/∂c = D − d dᵀ/1ᵀd``, ``d = x ⊙ (1 − x)`` (the closed-form backward);
* ``−Σ x log x`` (the authors' entropic k-subset): ``x_i = min(1, e^{c_i − 1 − ν})``; on the
  free set ``F = {x < 1}``, ``∂x_F/∂c_F = diag(x_F) − x_F x_Fᵀ/1ᵀx_F``, zero elsewhere.

Forward: bisection on ``ν`` (monotone), then one exact update on the final piece. The
**LML layers** use the closed-form backward; the **folded layers** attach ``fp.fold`` of one
projected-gradient step ``x ← Π_k(x + η(c − ∇(−H)(x)))`` (``Π_k`` = ``fp.projections.k_subset``)
and solve the backward with GMRES — nothing problem-specific in the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import fold_plugins as fp

__all__ = ["solve_binary", "solve_xlogx", "LML", "EntropicKSubset", "folded_layer",
           "cvxpylayers_layer", "BISECTION_ITERS"]

BISECTION_ITERS = 64


def _bisect(total: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, k: float,
            increasing: bool) -> Tensor:
    for _ in range(BISECTION_ITERS):
        mid = 0.5 * (lo + hi)
        above = total(mid) > k
        go_down = above if increasing else ~above
        hi = torch.where(go_down, mid, hi)
        lo = torch.where(go_down, lo, mid)
    return 0.5 * (lo + hi)


def solve_binary(c: Tensor, k: float) -> Tensor:
    """``σ(c + ν)`` with ``Σ σ(c + ν) = k`` (no graph)."""
    with torch.no_grad():
        n = c.shape[1]
        if not 0 < k < n:
            raise fp.FoldError(f"k must lie strictly between 0 and n={n}, got {k}.")
        lo = -c.amax(1, keepdim=True) - 50.0
        hi = -c.amin(1, keepdim=True) + 50.0
        nu = _bisect(lambda v: torch.sigmoid(c + v).sum(1, keepdim=True), lo, hi, k, True)
        x = torch.sigmoid(c + nu)
        d = (x * (1 - x)).sum(1, keepdim=True)
        nu = nu - (x.sum(1, keepdim=True) - k) / d.clamp_min(torch.finfo(c.dtype).tiny)
        return torch.sigmoid(c + nu)


def solve_xlogx(c: Tensor, k: float) -> Tensor:
    """``min(1, e^{c − 1 − ν})`` with total ``k`` (no graph)."""
    with torch.no_grad():
        n = c.shape[1]
        if not 0 < k < n:
            raise fp.FoldError(f"k must lie strictly between 0 and n={n}, got {k}.")
        lo = c.amin(1, keepdim=True) - 1.0
        hi = c.amax(1, keepdim=True) + float(torch.log(torch.tensor(float(n))))
        nu = _bisect(lambda v: torch.exp(c - 1 - v).clamp(max=1).sum(1, keepdim=True), lo, hi,
                     k, False)
        e = torch.exp(c - 1 - nu)
        U = e >= 1
        w = torch.where(U, torch.zeros_like(c), torch.exp(c - 1 - c.amax(1, keepdim=True)))
        rest = k - U.sum(1, keepdim=True).to(c.dtype)
        x = torch.where(U, torch.ones_like(c), rest * w / w.sum(1, keepdim=True))
        return x.clamp(max=1)


def _weighted_simplex_vjp(d: Tensor, g: Tensor) -> Tensor:
    """``(D − d dᵀ/1ᵀd) g`` with ``D = diag(d)``: the VJP shared by both closed forms."""
    return d * g - d * (d * g).sum(1, keepdim=True) / d.sum(1, keepdim=True)


class _ClosedFormKSubset(torch.autograd.Function):
    """A k-subset layer: ``solve(c, k)`` forward, ``(D − d dᵀ/1ᵀd) g`` backward with the
    subclass's weights ``d = weights(x)``."""

    solve: Callable[[Tensor, float], Tensor]
    weights: Callable[[Tensor], Tensor]

    @classmethod
    def forward(cls, c: Tensor, k: float) -> Tensor:  # type: ignore[override]
        return cls.solve(c, k)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(output)

    @classmethod
    def backward(cls, ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _weighted_simplex_vjp(cls.weights(x), g), None


class LML(_ClosedFormKSubset):
    """Binary-entropy k-subset layer (LML) with the closed-form backward, ``d = x(1 − x)``."""

    solve = staticmethod(solve_binary)
    weights = staticmethod(lambda x: x * (1 - x))


class EntropicKSubset(_ClosedFormKSubset):
    """``−x log x`` k-subset layer with its closed-form backward on the free set (``d = x``
    where ``x < 1``)."""

    solve = staticmethod(solve_xlogx)
    weights = staticmethod(lambda x: torch.where(x < 1, x, torch.zeros_like(x)))


def _entropy_grad(kind: str) -> Callable[[Tensor], Tensor]:
    """``∇(−H)(x)``: ``log(x/(1 − x))`` (binary) or ``log x + 1`` (xlogx)."""
    if kind == "binary":
        return lambda x: torch.log(x) - torch.log1p(-x)
    if kind == "xlogx":
        return lambda x: torch.log(x) + 1
    raise fp.FoldError(f"entropy must be 'binary' or 'xlogx', got {kind!r}.")


def folded_layer(kind: str, k: float, *, step_size: float = 1.0, tol: float = 1e-12,
                 solver: str = "gmres") -> Callable[[Tensor], Tensor]:
    """``c ↦ p(c)``: bisection forward, ``fp.fold`` of ``x ← Π_k(x + η(c − ∇(−H)(x)))``.

    Every ``η > 0`` has the same fixed point and the same folded gradient (only the backward
    system's conditioning changes).
    """
    dH = _entropy_grad(kind)
    solve = solve_binary if kind == "binary" else solve_xlogx

    def step(x: Tensor, c: Tensor) -> Tensor:
        return fp.projections.k_subset(x + step_size * (c - dH(x)), k)

    def layer(c: Tensor) -> Tensor:
        return fp.fold(step, solve(c.detach(), k), c, solver=solver, tol=tol)

    return layer


def cvxpylayers_layer(n: int, k: float) -> Callable[[Tensor], Tensor]:
    """The binary-entropy layer as a cvxpylayers ``CvxpyLayer`` (exponential cone, SCS via
    diffcp, tolerance 1e-8)."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    c = cp.Parameter(n)
    x = cp.Variable(n)
    prob = cp.Problem(cp.Maximize(c @ x + cp.sum(cp.entr(x)) + cp.sum(cp.entr(1 - x))),
                      [cp.sum(x) == k, x >= 0, x <= 1])
    lay = CvxpyLayer(prob, parameters=[c], variables=[x])

    def layer(cc: Tensor) -> Tensor:
        (out,) = lay(cc, solver_args={"eps": 1e-8})
        return out

    return layer
