"""The "free at the kink" derivative convention of clips and projections.

A clip ``min(max(v, lo), hi)`` has no derivative at ``v = lo`` or ``v = hi``; the library picks
the free piece inside a band ``δ = √eps · scale`` around the kink (:func:`kink_band`), keeps
the exact value (:func:`value_of`) and counts the weakly active entries for
:class:`fold_plugins.FoldInfo` (:func:`note_weakly_active`). Bottom floor: imports only
:mod:`fold_plugins._record`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _record

__all__ = ["ABSENT_BOUND", "clip_free", "kink_band", "note_weakly_active", "value_of"]


#: A bound whose magnitude reaches this is treated as absent (``INF = 1e20`` in the QP steps).
ABSENT_BOUND = 1e19


def kink_band(v: Tensor, *refs: Tensor | None) -> Tensor:
    """Half-width of the "weakly active" band around a kink, ``√eps · scale`` (no grad).

    ``scale`` is, per row (all leading dims, the set on the last dim), the largest magnitude
    of ``v`` and of the finite reference values ``refs`` (bounds, radius, threshold): the
    problem's own scale, so the band is far above round-off (``√eps ≈ 1.5e-8`` relative in
    float64, ``3.5e-4`` in float32) yet far below any meaningful distance. Shape: ``v``'s
    shape with a trailing 1 (broadcastable against ``v``).
    """
    with torch.no_grad():
        vv = v.detach()
        scale = vv.abs().amax(dim=-1, keepdim=True) if vv.dim() else vv.abs()
        for r in refs:
            if r is None:
                continue
            rr = r.detach().abs()
            rr = torch.where(rr < ABSENT_BOUND, rr, torch.zeros_like(rr))
            rr = torch.broadcast_to(rr, vv.shape) if rr.dim() <= vv.dim() else rr
            rmax = rr.amax(dim=-1, keepdim=True) if rr.dim() else rr
            scale = torch.maximum(scale, rmax)
        tiny = torch.finfo(vv.dtype).tiny
        return math.sqrt(torch.finfo(vv.dtype).eps) * scale.clamp_min(tiny)


def note_weakly_active(weak: Tensor) -> None:
    """Report a ``(B,)`` count of weakly active constraints (``weak``: bool, batch on dim 0)
    to an open :func:`fold_plugins._record.collect` block — only while autograd records (the
    one differentiable step that :func:`fold_plugins.fold` takes), never in forward loops."""
    if weak.dim() == 0 or not _record.active() or not torch.is_grad_enabled():
        return
    _record.note("weakly_active", weak.reshape(weak.shape[0], -1).sum(dim=1))


def value_of(smooth: Tensor, exact: Tensor) -> Tensor:
    """``exact``'s value, bit for bit, with ``smooth``'s derivative:
    ``exact + (smooth − smooth.detach())`` (the bracket is exactly 0 in floating point).

    Used where the "free" convention extends a piece by the weakly active band: the two
    differ by at most the band (``√eps``-relative), and the value must not."""
    return exact.detach() + (smooth - smooth.detach())


def clip_free(v: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """``min(max(v, lo), hi)`` with the "free at the kink" derivative (the weakly-active
    convention of :mod:`fold_plugins.projections`): ``∂/∂v = 1`` on ``lo − δ ≤ v ≤ hi + δ``,
    ``∂/∂lo = 1`` where ``v < lo − δ``, ``∂/∂hi = 1`` where ``v > hi + δ``, with the band
    ``δ = √eps · scale`` (:func:`kink_band`); ``None`` means no bound. The value is the exact
    clip. Entries with ``|v − bound| ≤ δ`` are weakly active and are counted
    (:func:`note_weakly_active`). An equality row (``lo = hi``) is always active (derivative
    to the bound), without a band. The one implementation of this rule (projections.box, the
    ADMM and TV steps use it)."""
    if lo is None and hi is None:
        return v
    if not torch.is_grad_enabled():  # no derivative to choose, nothing to report: plain clip
        out = v if lo is None else torch.where(v < lo, lo, v)
        return out if hi is None else torch.where(v > hi, hi, out)
    delta = kink_band(v, lo, hi)
    with torch.no_grad():
        vd = v.detach()
        # an equality row (lo = hi) is always active: no kink to choose, no band, not counted
        eq = (lo.detach() == hi.detach()) if lo is not None and hi is not None else None
        if eq is not None:
            delta = torch.where(eq, torch.zeros_like(delta), delta)
        lo_act = None if lo is None else vd < lo.detach() - delta
        hi_act = None
        if hi is not None:
            hi_act = vd > hi.detach() + delta
            if eq is not None:
                hi_act = hi_act | (eq & (vd >= hi.detach()))
        weak = torch.zeros_like(vd, dtype=torch.bool)
        if lo is not None:
            weak = weak | (((vd - lo.detach()).abs() <= delta) & (lo.detach().abs() < ABSENT_BOUND))
        if hi is not None:
            weak = weak | (((vd - hi.detach()).abs() <= delta) & (hi.detach().abs() < ABSENT_BOUND))
        if eq is not None:
            weak = weak & ~eq
    out = v
    if lo is not None and lo_act is not None:
        out = torch.where(lo_act, lo, out)
    if hi is not None and hi_act is not None:
        out = torch.where(hi_act, hi, out)
    if bool(weak.any()):
        exact = vd
        if lo is not None:
            exact = torch.maximum(exact, lo.detach())
        if hi is not None:
            exact = torch.minimum(exact, hi.detach())
        out = value_of(out, exact)
        note_weakly_active(weak)
    elif _record.active() and torch.is_grad_enabled() and weak.dim():
        note_weakly_active(weak)
    return out
