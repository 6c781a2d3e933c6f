"""FoldedTheseusLayer: a drop-in for ``th.TheseusLayer`` with the exact implicit gradient.

Switching an existing Theseus model is one line::

    layer = th.TheseusLayer(optimizer)            # before
    layer = FoldedTheseusLayer(optimizer)         # after (also accepts the TheseusLayer itself)
    values, info = layer(input_tensors, optimizer_kwargs)   # same call, same (dict, info)

The forward is Theseus's own, with the caller's ``backward_mode`` (so the values are
``th.TheseusLayer``'s bit for bit), run without an autograd graph for ``unroll`` (Theseus's
default). Afterwards the objective's optimisation variables hold the returned, differentiable
values, as ``th.TheseusLayer`` leaves them. For every instance whose forward converged
(module :mod:`.policy`: Theseus's status, or a fixed point to working precision) the
backward folds one
update step ``U`` at the solution, written in the tangent coordinates ``ξ`` of the
optimisation variables (``x = x* ⊕ ξ`` with each variable's own ``retract``):

    U(ξ) = ξ − M⁻¹ g(x* ⊕ ξ, θ),    g = Jᵀr  (Theseus's ``Atb`` is ``−g``)

    gauss_newton:          M = JᵀJ at x*                 (Theseus's linearization ``AtA``)
    levenberg_marquardt:   M = JᵀJ + λD at x*, λ fixed   (D = I, or diag(JᵀJ) when ellipsoidal)
    newton:                M = H = ∂g/∂ξ at x*           (the full Hessian of ½‖r‖², by autograd)

``J`` and ``r`` are Theseus's own weighted Jacobians and errors in tangent coordinates. With a
dense linear solver ``M`` is factored once (Cholesky, or LU for ``LUDenseSolver``) and every
backward VJP reuses the factor; other linear solvers (e.g. ``CholmodSparseSolver``) are
called as Theseus calls them, ``linearize(_detach_hessian=True)`` then ``solve()``.

``M`` is held constant (it multiplies ``g(x*) = 0``, so its derivative does not enter), and
the folded op solves ``(I − Φ)ᵀ v = ∂L/∂ξ`` with ``I − Φ = M⁻¹H`` at x*. Its result is the
implicit-function-theorem gradient ``dξ*/dθ = −H⁻¹ ∂g/∂θ`` with the *full* Hessian
``H = JᵀJ + Σᵢ rᵢ∇²rᵢ``; Theseus's ``implicit`` mode uses ``JᵀJ`` in its place. For
``newton`` ``Φ = 0`` by construction, so the default ``backward="auto"`` skips the solve
(``v = ∂L/∂ξ``) and the backward is one VJP of the step into the inputs — Theseus
``implicit``'s one backward, with the full Hessian. ``H`` is built in the forward from
colour-compressed VJPs run as one vmapped backward, which also checks that no instance reads
another's state.

Which step by default (``step="auto"``): ``newton`` with a dense linear solver when that
compressed Hessian needs at most :data:`NEWTON_MAX_ROWS` VJP rows (small problems, and
sparse ones whose cost functions touch few variables: the 90-dimensional SE2 pose graph needs
9); otherwise the optimizer's own matrix (``gauss_newton`` for ``GaussNewton``/``Dogleg``,
``levenberg_marquardt`` for ``LevenbergMarquardt``, also for every sparse linear solver)
with a Krylov backward.

Gradients reach every tensor the step touches: tensors in ``input_tensors`` (auxiliary
variables, targets, data, cost-weight variables), cost-weight tensors held by the objective,
and ``nn.Module`` parameters used inside ``AutoDiffCostFunction`` closures. The initial values
of the optimisation variables get an exact zero gradient where the forward converged. Where it
did not (a truncated inner loop, ``MAX_ITERATIONS``), the default ``unconverged="unroll"``
gives those instances Theseus's own backward of what was computed (non-zero for the initial
values), exactly as ``th.TheseusLayer``; ``"fold"`` and ``"raise"`` are the alternatives.

Conditioning is judged on the factor of ``M`` (no eigen- or singular-value decomposition): the
reciprocal condition number ``rcond₁ = 1 / (‖M‖₁ ‖M⁻¹‖₁)`` with ``‖M⁻¹‖₁`` estimated from
three solves with the saved factor (Hager's 1-norm estimator with Higham's extra vector, the
method of LAPACK's ``xPOCON``/``xGECON``; the estimate never exceeds ``‖M⁻¹‖₁``). Per instance:
the factorisation fails, or ``rcond₁ ≤ eps`` of the dtype → singular; ``eps < rcond₁ ≤ n·eps``
→ a :class:`fp.FoldConvergenceWarning` that the gradient has few correct digits.

Per-instance failures do not spoil the batch. An instance whose Theseus solution (or whose
per-instance input data) is NaN/Inf, or whose ``M`` is singular, is *excluded*: its step is
replaced by the constant ``U = 0`` (so ``Φ = 0``, ``∂U/∂θ = 0``) evaluated on a copy of a
good instance's data, so it contributes **exactly zero** to every gradient — its own inputs
and shared parameters alike — while the other instances keep their exact gradients. It is
flagged (``FoldInfo.forward_converged`` False, ``info.extra["excluded"]``) and named in a
warning (a :class:`fp.FoldError` with ``strict=True``, or when no instance is left).

Without a gradient to compute (under ``torch.no_grad()``, or when no input, cost weight or
closure parameter requires grad) the layer is Theseus's forward only: no linearisation or
factorisation at x*, and forward convergence is Theseus's own per-instance status
(``FoldInfo.forward_converged``); only failures (status FAIL, non-finite solution) warn then.

The modules, each importing only those below it:

    layer      FoldedTheseusLayer: parse the call, solve with Theseus, fold, classify
    policy     InstancePolicy: what each instance gets after the forward, and the messages
    step       TangentStep (the folded update in tangent space), FlooredSolver
    setup      import_theseus, step names and what "auto" resolves to, the per-call parse
    geometry   TangentGeometry: the optimisation variables' tangent layout
"""

from __future__ import annotations

from .layer import FoldedTheseusLayer
from .setup import FOLD_KWARGS, NEWTON_MAX_ROWS, STEPS

__all__ = ["FoldedTheseusLayer", "STEPS", "FOLD_KWARGS", "NEWTON_MAX_ROWS"]
