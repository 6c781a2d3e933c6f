"""TV denoising layers with a learned difference operator ``D`` (the TV suite's methods).

``x*(y; D) = argmin_x ½‖x − y‖² + λ‖Dx‖₁``; dual ``min_{|u| ≤ λ} ½‖y − Dᵀu‖²``,
``x = y − Dᵀu`` (``fp.steps.fdpg_tv``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

import fold_plugins as fp

__all__ = ["folded_tv", "unrolled_tv", "cvxpy_tv_layer", "tv_loss"]


def folded_tv(y: Tensor, lam: float, D: Tensor, tol: float = 1e-10) -> Tensor:
    """FDPG forward (restarted FISTA on the dual + active-set polish) to ``tol``, the dual step
    folded (GMRES backward)."""
    return fp.steps.tv_denoise(y, lam, D, backward="gmres", backward_tol=1e-10, tol=tol)


def unrolled_tv(y: Tensor, lam: float, D: Tensor, K: int) -> Tensor:
    """K iterations of FDPG (FISTA on the dual, Beck–Teboulle momentum, no restart) from
    ``u = 0``, differentiated by autograd through every iteration."""
    step = fp.steps.fdpg_tv()
    B, m = y.shape[0], D.shape[-2]
    u = w = y.new_zeros(B, m)
    t = 1.0
    for _ in range(K):
        un = step(w, y, lam, D)
        tn = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        w = un + ((t - 1) / tn) * (un - u)
        u, t = un, tn
    return fp.steps.tv_primal(u, y, D)


def cvxpy_tv_layer(n: int, m: int, lam: float) -> Callable[[Tensor, Tensor], Tensor]:
    """cvxpylayers' layer of the same problem with parameters ``y`` (batched) and ``D``
    (shared), diffcp backward, default solver."""
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    x = cp.Variable(n)
    y = cp.Parameter(n)
    D = cp.Parameter((m, n))
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - y) + lam * cp.norm1(D @ x)))
    layer = CvxpyLayer(prob, parameters=[y, D], variables=[x])

    def call(yb: Tensor, Db: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"__array__ implementation")
            (xl,) = layer(yb.to("cpu", torch.float64), Db.to("cpu", torch.float64))
        return xl.to(yb.device, yb.dtype)
    return call


def tv_loss(x: Tensor, clean: Tensor, D: Tensor, penalty: float) -> Tensor:
    """OptNet's training loss: ``mean (x − clean)² + penalty·‖D‖₁`` (entrywise ℓ1)."""
    return ((x - clean) ** 2).mean() + penalty * D.abs().sum()
