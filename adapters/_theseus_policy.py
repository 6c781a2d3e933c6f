"""What :class:`FoldedTheseusLayer` does per instance after Theseus's forward, and what it says.

Private to :mod:`fold_plugins.adapters.theseus`. Each instance of a batch is one of:

* **converged** — Theseus's own status is ``CONVERGED`` (its ``abs_err_tolerance`` /
  ``rel_err_tolerance`` test on the objective), or the Gauss-Newton step at the returned
  point is below ``fixed_point_tol`` (``‖M⁻¹g‖/(1+‖x*‖)``, a fixed point to working precision
  that Theseus's error-change test missed, e.g. in float32): folded, exact;
* **unconverged** — neither: the forward stopped early (``MAX_ITERATIONS``, often on purpose,
  with a few inner iterations that learn through the initial values) or failed (``FAIL``).
  The ``unconverged`` policy decides: ``"unroll"`` (default) differentiates what the forward
  computed — Theseus's own unrolled backward for those instances, obtained by re-running the
  forward with autograd — ``"fold"`` folds them anyway (a biased gradient, warned once), and
  ``"raise"`` raises :class:`fp.FoldError`;
* **excluded** — NaN/Inf solution or data, or a singular ``M`` at x*: exactly zero gradient.

Every kind of message is issued at most once per layer (:class:`Notes`); the number of
instances of each kind seen so far is in ``last_info.extra["counts"]``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

import fold_plugins as fp

__all__ = ["UNCONVERGED_POLICIES", "Notes", "check_policy", "status_mask", "splice"]

#: accepted values of ``FoldedTheseusLayer(unconverged=...)``.
UNCONVERGED_POLICIES = ("unroll", "fold", "raise")


def check_policy(policy: Any) -> str:
    """``policy`` if it is one of :data:`UNCONVERGED_POLICIES`, else a :class:`fp.FoldError`."""
    if not isinstance(policy, str) or policy not in UNCONVERGED_POLICIES:
        raise fp.FoldError(f"unconverged must be one of {UNCONVERGED_POLICIES}, got "
                           f"{policy!r}. 'unroll' (default) differentiates what a truncated "
                           "forward computed, 'fold' folds it anyway, 'raise' refuses it.")
    return policy


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
    """Messages issued once per layer and kind, with running instance counts per kind."""

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


def _user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` called from :meth:`Notes.once` that names the
    first frame outside torch, fold_plugins and its adapters."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)),
            os.path.dirname(fp.__file__))
    frame, level = sys._getframe(2), 3  # the caller of once() is level 2 for warn
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level

