"""Library of update steps ``U`` ("optimization mappings") for :func:`fold_plugins.fold`.

Each factory returns ``step(state, *params) -> state`` whose fixed points are exactly the
optimality (KKT) conditions of its problem class; run any forward solver (the ``solve_*``
drivers here, or cvxpy/OSQP/your own), then ``fp.fold(step, x_star, *params)``.

==================== ================================ ====================================
step                 problem                          state
==================== ================================ ====================================
gradient_descent     min f(x)                         x (B, n)
projected_gradient   min_{x∈C} f(x)                   x (B, n)
proximal_gradient    min f(x) + g(x) (prox of g)      x (B, n)
mirror_descent       min_{x∈simplex} f(x)             x (B, n), x > 0
newton               min f(x) (smooth)                x (B, n)
admm_qp              ½xᵀPx+qᵀx, l ≤ Ax ≤ u            (x (B, n), z (B, m), y (B, m))
sqp                  min f s.t. g ≤ 0, h = 0          (x (B, n), λ (B, p), ν (B, m))
fdpg_tv              ½‖x−y‖²+‖λ⊙Dx‖₁ (dual)           u (B, m); x = y − Dᵀu
==================== ================================ ====================================
"""

from __future__ import annotations

from .._batched import ShapeError
from .gradient import (
                       IterateInfo,
                       gradient_descent,
                       iterate,
                       minimize_newton,
                       mirror_descent,
                       newton,
                       projected_gradient,
                       quadratic_step_size,
)
from .nlp import SQPInfo, solve_sqp, sqp, sqp_kkt_residual
from .proximal import proximal_gradient
from .quadprog import INF, QPInfeasibleError, QPInfo, admm_qp, qp, qp_kkt_residual, solve_qp_admm
from .tv import TVInfo, difference_matrix, fdpg_tv, solve_tv, tv_denoise, tv_primal

__all__ = ["gradient_descent", "projected_gradient", "mirror_descent", "newton", "admm_qp", "sqp",
           "fdpg_tv", "iterate", "IterateInfo", "minimize_newton", "quadratic_step_size",
           "solve_qp_admm", "qp", "QPInfo", "QPInfeasibleError", "qp_kkt_residual", "INF",
           "solve_sqp", "SQPInfo", "sqp_kkt_residual", "solve_tv", "tv_denoise", "tv_primal",
           "difference_matrix", "TVInfo", "ShapeError", "proximal_gradient"]
