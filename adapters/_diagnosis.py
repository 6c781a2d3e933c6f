"""What unrolling a step costs at its solution: :class:`UnrollingDiagnosis`, the report of
:meth:`fold_plugins.adapters.unrolled.FoldedLoop.diagnose`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fold_plugins import diagnostics as fpd
from fold_plugins.internal import instance_list

__all__ = ["UnrollingDiagnosis"]


@dataclass
class UnrollingDiagnosis:
    """What unrolling ``step`` costs at its solution, per instance (:meth:`FoldedLoop.diagnose`).

    Attributes:
        spectral_radius: ``(B,)`` ``ρ(Φ)``, ``Φ = ∂U/∂x (x*)``: the per-iteration error ratio of
            an unrolled backward.
        fixed_point_residual: ``(B,)`` ``‖U(x*) − x*‖ / (1 + ‖x*‖)``.
        unroll_iterations: ``{accuracy: (B,)}`` smallest ``K`` with ``ρ^K ≤ accuracy``
            (``inf`` where ``ρ ≥ 1``: unrolling never converges there).
        n_iter, predicted_unroll_error: the caller's current unroll length and ``ρ^n_iter``.
        backward_solver, backward_iterations, backward_residual: a folded solve of
            ``(I − Φ)ᵀ v = g`` for a random ``g`` at this module's ``tol``, per instance.
        forward_iterations, forward_converged: from the forward that found ``x*`` (if run here).
        state_size: ``n``, the state's size per instance (GMRES needs ≤ ``rank(Φ)+1 ≤ n+1``).
        unit_eigenvalues: ``(B,)`` number of eigenvalues of ``Φ`` at 1: a gauge (the fixed
            point is not isolated; ``dx*/dθ`` is undefined), reported as such, not as
            "unrolling never converges".
        rho_without_unit: ``(B,)`` largest ``|λ|`` over the other eigenvalues: the rate at
            which unrolling converges for a loss the gauge does not move.
        backward_not_isolated: ``(B,)`` bool, the backward solver flagged ``I − Φ`` singular.
        weakly_active: ``(B,)`` weakly active constraints the step's projections reported at
            ``x*`` (see :mod:`fold_plugins.projections`), ``None`` when the step has none.
    """

    spectral_radius: Tensor
    fixed_point_residual: Tensor
    unroll_iterations: dict[float, Tensor]
    state_size: int
    n_iter: int | None = None
    predicted_unroll_error: Tensor | None = None
    backward_solver: str = ""
    backward_tol: float = 0.0
    backward_iterations: Tensor | None = None
    backward_residual: Tensor | None = None
    forward_iterations: Tensor | None = None
    forward_converged: Tensor | None = None
    unit_eigenvalues: Tensor | None = None
    rho_without_unit: Tensor | None = None
    backward_not_isolated: Tensor | None = None
    weakly_active: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        rho = self.spectral_radius.detach().cpu()
        lines = [f"instances: {rho.numel()}, state size n = {self.state_size}",
                 ("fixed-point residual ‖U(x*)−x*‖/(1+‖x*‖): max "
                  f"{float(self.fixed_point_residual.max()):.2e}"),
                 f"spectral radius ρ(Φ): min {float(rho.min()):.4f}, max {float(rho.max()):.4f}"]
        if self.forward_iterations is not None:
            lines.append(f"forward iterations: max {int(self.forward_iterations.max())}")
        if self.weakly_active is not None and bool((self.weakly_active > 0).any()):
            wa = self.weakly_active.detach().cpu()
            lines.append(f"weakly active constraints: {int(wa.sum())} in instance(s) "
                         f"{instance_list(wa > 0)} (on a bound with a zero multiplier: the "
                         "derivative is one-sided there; the free piece's is used)")
        if self.unit_eigenvalues is not None and self.rho_without_unit is not None:
            lines += fpd.gauge_lines(self.unit_eigenvalues, self.rho_without_unit,
                                     tuple(self.unroll_iterations))
        gauge = (self.unit_eigenvalues.to(rho.device) > 0 if self.unit_eigenvalues is not None
                 else torch.zeros_like(rho, dtype=torch.bool))
        for acc, k in self.unroll_iterations.items():
            kmax = float(k.max())
            never = ("never in the gauge direction (ρ = 1 is the gauge's eigenvalue, above)"
                     if bool(gauge[k.cpu() == math.inf].all()) else "never (ρ ≥ 1)")
            lines.append(f"unrolled iterations for gradient error {acc:.0e}: "
                         + (never if math.isinf(kmax) else f"{int(kmax)}"))
        if self.n_iter is not None and self.predicted_unroll_error is not None:
            lines.append(f"your {self.n_iter}-step unroll: gradient error ≈ ρ^K up to "
                         f"{float(self.predicted_unroll_error.max()):.1e}")
            if bool(gauge.any()) and self.rho_without_unit is not None:
                rest = float(self.rho_without_unit.cpu()[gauge].max()) ** self.n_iter
                lines.append(f"  (instances with a gauge: ρ'^K = {rest:.1e} for a loss the "
                             "gauge does not move; the gradient in the gauge direction is "
                             "undefined)")
        if self.backward_iterations is not None and self.backward_residual is not None:
            lines.append(f"folded backward ({self.backward_solver}, tol {self.backward_tol:.0e}): "
                         f"max {int(self.backward_iterations.max())} iterations, residual "
                         f"{float(self.backward_residual.max()):.1e}; memory: one step's graph")
            if self.backward_not_isolated is not None and bool(self.backward_not_isolated.any()):
                lines.append("  … and the solver found I − Φ singular for instance(s) "
                             f"{instance_list(self.backward_not_isolated)} (not isolated)")
        return "\n".join(lines)
