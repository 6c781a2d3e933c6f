"""What :class:`FoldedTheseusLayer` does per instance after Theseus's forward, and what it says.

Private to :mod:`fold_plugins.adapters.theseus`: :class:`InstancePolicy`, which owns the
layer's messages (:class:`Notes`). Each instance of a batch is one of:

* **converged** — Theseus's own status is ``CONVERGED`` (its ``abs_err_tolerance`` /
  ``rel_err_tolerance`` test on the objective), or the Gauss-Newton step at the returned
  point is below ``fixed_point_tol`` (``‖M⁻¹g‖/(1+‖x*‖)``, a fixed point to working precision
  that Theseus's error-change test missed, e.g. in float32): folded, exact;
* **unconverged** — neither: the forward stopped early (``MAX_ITERATIONS``, often on purpose,
  with a few inner iterations that learn through the initial values) or failed (``FAIL``).
  The ``unconverged`` policy decides: ``"unroll"`` (default) differentiates what the forward
  computed — Theseus's own backward for those instances (its ``backward_mode``, default
  ``unroll``), obtained by re-running the same forward with autograd — ``"fold"`` folds
  them anyway (a biased gradient), and ``"raise"`` raises
  :class:`fp.FoldError`;
* **excluded** — NaN/Inf solution or data, or a singular ``M`` at x*: exactly zero gradient.

A forward that did not converge, a failed or non-finite instance, a singular system: said on
every call where it happens, naming the instances (:class:`fp.ForwardConvergenceWarning` or
:class:`fp.FoldConvergenceWarning`; ``strict=True`` raises under every ``unconverged`` policy).
Notes about the setup (a backward mode folding replaces, the linear solver's precision, the
initial values' zero gradient) are said once per layer (:class:`Notes`). The number of
instances of each kind seen so far is in ``last_info.extra["counts"]``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from types import FrameType
from typing import Any

import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins.internal import instance_list, report_unconverged

from .geometry import TangentGeometry
from .setup import Call, import_theseus
from .step import TangentStep

__all__ = ["InstancePolicy", "Notes", "splice", "status_mask"]


def status_mask(th_info: Any, B: int, device: torch.device, status: Any) -> Tensor:
    """``(B,)`` bool: instances whose Theseus status is ``status``."""
    mask = torch.as_tensor([s == status for s in th_info.status], dtype=torch.bool,
                           device=device).reshape(-1)
    if mask.numel() != B:
        mask = mask.expand(B) if mask.numel() == 1 else mask[:B]
    return mask


def splice(mask: Tensor, where_true: Tensor, where_false: Tensor) -> Tensor:
    """Row-wise ``where_true`` for the ``(B,)`` ``mask``, ``where_false`` elsewhere (autograd
    sends nothing to the branch not taken)."""
    B = where_false.shape[0]
    if where_true.shape[0] != B:
        where_true = where_true.expand(B, *where_true.shape[1:])
    m = mask.to(where_false.device).reshape(B, *([1] * (where_false.ndim - 1)))
    return torch.where(m, where_true, where_false)


class Notes:
    """A layer's messages: setup notes once per layer and kind (:meth:`once`), verdicts on
    every call (:meth:`warn`); running instance counts per kind."""

    def __init__(self) -> None:
        self.issued: set[str] = set()
        self.counts: dict[str, int] = {}

    def count(self, kind: str, mask: Tensor) -> int:
        """Add the instances of ``mask`` to the running count of ``kind``; return how many."""
        k = int(mask.sum())
        if k:
            self.counts[kind] = self.counts.get(kind, 0) + k
        return k

    def once(self, kind: str, message: str, category: type[Warning] = UserWarning,
             stacklevel: int | None = None) -> None:
        """Warn ``message`` unless this layer already issued a message of this ``kind``
        (attributed to the user's call: the first frame outside torch and fold_plugins)."""
        if kind in self.issued:
            return
        self.issued.add(kind)
        warnings.warn(message + " (Said once per layer; counts in last_info.extra['counts'].)",
                      category, stacklevel=stacklevel or _user_stacklevel())

    def warn(self, message: str, category: type[Warning]) -> None:
        """Warn ``message`` on this call (a verdict about these instances, not the setup)."""
        warnings.warn(message, category, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` called from :meth:`Notes.once` that names the
    first frame outside torch, fold_plugins and its adapters."""
    skip = tuple(os.path.dirname(f) + os.sep for m in (torch, fp, sys.modules[__name__])
                 if (f := m.__file__) is not None)
    frame: FrameType | None = sys._getframe(2)
    level = 2  # frame k up from here is stacklevel k in once()
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


class InstancePolicy:
    """The per-instance verdicts of one :class:`FoldedTheseusLayer` and their messages.

    Holds the wrapped ``th.TheseusLayer`` (to re-run its forward with autograd for the
    ``"unroll"`` policy), the variables' :class:`TangentGeometry` and the layer's
    :class:`Notes`; every method returns what the layer reports (``FoldInfo``, values) rather
    than writing to the layer.
    """

    def __init__(self, th_layer: Any, geo: TangentGeometry | None):
        self.th_layer = th_layer
        self.geo = geo
        self.notes = Notes()

    @property
    def name(self) -> str:
        return f"FoldedTheseusLayer ({type(self.th_layer.optimizer).__name__})"

    # ------------------------------------------------------------------ the unconverged ones
    def apply(self, call: Call, unconverged: Tensor, failed: Tensor, rel: Tensor,
              values: dict[str, Tensor], computed: dict[str, Tensor] | None, strict: bool
              ) -> tuple[dict[str, Tensor], Tensor]:
        """Apply ``call.policy`` to the ``unconverged`` instances (module docstring); return
        the values and the ``(B,)`` mask of instances that got Theseus's own backward.
        ``rel``: each instance's step length; ``failed``: Theseus status FAIL;
        ``computed``: the forward's outputs when it already ran with Theseus's graph
        (implicit/truncated/dlm), else ``None`` (the forward is re-run with autograd)."""
        name = self.name
        max_it = int(self.th_layer.optimizer.params.max_iterations)
        which = (f"instance(s) {instance_list(unconverged)} (step length ‖M⁻¹g‖/(1+‖x*‖) up "
                 f"to {float(rel[unconverged].max()):.1e}, Theseus status not CONVERGED)")
        if bool((failed & unconverged).any()):
            remedy = ("Theseus's linear solve failed (status FAIL) for "
                      f"{instance_list(failed & unconverged)}: with a Cholesky solver one "
                      "instance with NaN/Inf data fails the whole batch and leaves the others "
                      "where the failure happened; fix or drop that instance, or use "
                      "LUDenseSolver, which keeps the NaN in its own instance")
        else:
            remedy = (f"raise max_iterations (now {max_it}) or loosen the optimizer's "
                      "abs_err_tolerance/rel_err_tolerance if the minimiser is what you want "
                      "to differentiate")
        if call.policy == "raise" or strict:
            why = "unconverged='raise'" if call.policy == "raise" else \
                f"strict=True (unconverged={call.policy!r})"
            raise fp.FoldError(f"{name}: the forward did not converge for {which} and "
                               f"{why}. Remedy: {remedy}; or pass unconverged='unroll' "
                               "(without strict) to differentiate the truncated forward.")
        reason = ""
        if call.policy == "unroll":
            if computed is not None:
                B = unconverged.numel()
                unrolled: dict[str, Tensor] | None = {
                    k: t if t.shape[0] == B else t.expand(B, *t.shape[1:])
                    for k, t in computed.items()}
            else:
                unrolled, reason = self.unroll(call)
            if unrolled is not None:
                how = "unroll" if call.mode is None else call.mode.name.lower()
                self.notes.warn(
                    f"{name}: the forward did not converge for {which}; as with "
                    f"th.TheseusLayer, their gradient is Theseus's own ({how}) backward of the "
                    "iterations that ran, the converged instances are folded (exact). "
                    "unconverged='fold' or 'raise' (or strict=True) change this",
                    fp.ForwardConvergenceWarning)
                values = {k: splice(unconverged, unrolled[k], v) for k, v in values.items()}
                return values, unconverged
        msg = (f"{name}: the forward did not converge for {which}; their gradients are folded "
               f"at the point where the forward stopped and are biased{reason}. Remedy: "
               f"{remedy}.")
        self.notes.warn(msg, fp.ForwardConvergenceWarning)
        return values, torch.zeros_like(unconverged)

    def unroll(self, call: Call) -> tuple[dict[str, Tensor] | None, str]:
        """Re-run Theseus's forward from the same start with autograd and the caller's
        ``backward_mode`` (Theseus's default ``unroll``): the variables' tensors (the same
        values as the first run, with Theseus's own graph), or ``None`` and why not."""
        # the first run's info is the one returned; Theseus cannot track history under grad
        run_kwargs = {k: v for k, v in call.kwargs.items()
                      if k not in ("track_err_history", "track_state_history")}
        objective = self.th_layer.objective
        objective.update({k: t for k, t in call.init.items() if k not in call.input_tensors})
        B = objective.batch_size
        try:
            with torch.enable_grad():
                self.th_layer(call.input_tensors, optimizer_kwargs=run_kwargs)
        except RuntimeError as exc:
            first = str(exc).split(". ")[0]
            return None, f" (Theseus's unrolled re-run failed: {first})"
        assert self.geo is not None
        out = {}
        for var in self.geo.ordering:
            t = var.tensor
            out[var.name] = t if t.shape[0] == B else t.expand(B, *t.shape[1:])
        return out, ""

    # ------------------------------------------------------------------ other paths
    def theseus_backward(self, call: Call) -> tuple[dict[str, Tensor], Any, fp.FoldInfo]:
        """Optimizers without a least-squares step (DCEM): ``th.TheseusLayer`` as it is."""
        th = import_theseus()
        layer, mode = self.th_layer, call.mode
        self.notes.once("theseus_backward", (
            f"FoldedTheseusLayer: {type(layer.optimizer).__name__} has no least-squares step to "
            f"fold, so it runs with Theseus's own backward (backward_mode="
            f"{mode.name.lower()}), exactly as th.TheseusLayer"))
        values, th_info = layer(call.input_tensors, optimizer_kwargs=call.kwargs)
        B = layer.objective.batch_size
        info = fp.FoldInfo(batch_size=B)
        info.forward_converged = status_mask(th_info, B, layer.device,
                                             th.NonlinearOptimizerStatus.CONVERGED)
        info.extra.update(backward=f"theseus {mode.name.lower()}", theseus_status=th_info.status,
                          counts=dict(self.notes.counts))
        th_info.fold_info = info
        return values, th_info, info

    def inference(self, x_star: list[Tensor], th_info: Any, info: fp.FoldInfo,
                  converged: Tensor, bad: Tensor, strict: bool) -> dict[str, Tensor]:
        """No gradient wanted: Theseus's forward only, its status as the convergence verdict;
        only failures (FAIL, non-finite solution) are reported, not MAX_ITERATIONS, which
        fixed-iteration models hit on purpose. Returns the values."""
        assert self.geo is not None
        B = converged.numel()
        info.forward_residual = torch.full((B,), math.nan, dtype=x_star[0].dtype,
                                           device=x_star[0].device)
        info.forward_converged = converged
        info.extra["forward_check"] = "theseus_status"
        notes = self.notes
        notes.count("failed", bad)
        info.extra["counts"] = dict(notes.counts)
        th_info.fold_info = info
        if bool(bad.any()):
            last_err = th_info.last_err.detach().to(device=x_star[0].device).reshape(-1)
            report_unconverged(
                bad, last_err if last_err.numel() == B else last_err.expand(B),
                f"{self.name} forward (no gradient requested; error = final objective value)",
                "an instance with status FAIL hit an error in Theseus's linear solve (singular "
                "system or NaN data): check its data", strict, stacklevel=4,
                category=fp.ForwardConvergenceWarning)
        return self.geo.outputs(x_star, x_star, None, {})

    # ------------------------------------------------------------------ notes
    def note_backward_mode(self, call: Call) -> None:
        """One note when ``backward_mode`` asks for something other than what folding does."""
        th = import_theseus()
        if not call.explicit_mode or call.mode == th.BackwardMode.IMPLICIT:
            return  # implicit is what folding replaces; the default says nothing
        what = "used only for the instances whose forward did not converge"
        self.notes.once("backward_mode", (
            f"FoldedTheseusLayer: backward_mode={call.mode.name.lower()!r} is {what}; "
            "converged instances get the folded (exact implicit) gradient. Use "
            "th.TheseusLayer to run Theseus's backward modes everywhere"))

    def note_solve_floor(self, step: TangentStep, dtype: torch.dtype) -> None:
        """Say once when the linear solver's own precision limits the gradient's digits."""
        if step.tol_floor > math.sqrt(torch.finfo(dtype).eps):
            self.notes.once("linear_solver_precision", (
                f"{self.name}: {type(self.th_layer.optimizer.linear_solver).__name__} solves "
                f"only to a relative residual of about {step.tol_floor / 10:.1e} (e.g. CHOLMOD "
                f"rounds through float32), so the backward stops at {step.tol_floor:.1e} and "
                "the gradient keeps about that many digits; a dense solver "
                "(CholeskyDenseSolver) gives the full precision"))

    def report_excluded(self, nonfinite: Tensor, step: TangentStep, strict: bool,
                        dtype: torch.dtype) -> None:
        """Warn once per kind (raise when ``strict``) naming excluded and ill-conditioned
        instances."""
        name, notes = self.name, self.notes
        B = nonfinite.numel()
        msgs = []
        if bool(nonfinite.any()):
            msgs.append(("nonfinite", (
                f"{name}: the Theseus solution or the per-instance input data is NaN/Inf for "
                f"instance(s) {instance_list(nonfinite)}; those instances are excluded (zero "
                "gradient); the others are judged on their own (converged ones keep exact "
                "gradients). Remedy: check their data and initial values")))
        if bool(step.singular.any()):
            rc = step.rcond[step.singular] if step.rcond is not None else None
            worst = f"; estimated rcond₁ up to {float(rc.max()):.1e}" if rc is not None and \
                bool(torch.isfinite(rc).all()) and float(rc.max()) > 0 else ""
            msgs.append(("singular", (
                f"{name}: {step.matrix_name()} at x* is singular for instance(s) "
                f"{instance_list(step.singular)} (factorisation failed or reciprocal "
                f"condition ≤ eps{worst}); dx*/dθ is not defined there, so those instances "
                f"are excluded (zero gradient); the other {B - int(step.excluded.sum())} are "
                f"unaffected. Remedy: {step.remedy()}")))
        for _, msg in msgs:
            if strict:
                raise fp.FoldError(msg + ".")
            notes.warn(msg + ".", fp.FoldConvergenceWarning)
        if bool(step.illcond.any()):
            assert step.rcond is not None  # illcond is set together with rcond
            eps = torch.finfo(dtype).eps
            rc_min = float(step.rcond[step.illcond].min())
            notes.once("ill_conditioned", (
                f"{name}: {step.matrix_name()} at x* is ill-conditioned for instance(s) "
                f"{instance_list(step.illcond)} (estimated reciprocal condition number "
                f"rcond₁ down to {rc_min:.1e} ≤ n·eps = {step.geo.n * eps:.1e}, {dtype}): "
                f"the gradient of these instances keeps about "
                f"{max(0.0, math.log10(rc_min / eps)):.0f} correct digits. Remedy: use float64, "
                "or rescale the problem (cost weights, units)"), fp.FoldConvergenceWarning)
