"""Errors and warnings raised by fold_plugins, and the one way non-convergence is reported."""

from __future__ import annotations

import warnings


class FoldError(RuntimeError):
    """Bad input to a folded op, or a failure that ``strict=True`` refuses to let pass."""


class FoldConvergenceWarning(RuntimeWarning):
    """A forward or backward solve did not reach its tolerance; the gradient may be inexact."""


class ForwardConvergenceWarning(FoldConvergenceWarning):
    """An adapter's forward solve stopped before a fixed point for some instances (said on
    every such call, naming them): their gradient is the wrapped layer's own backward of the
    iterations that ran, or a biased fold; ``strict=True`` raises instead."""


def instance_list(mask, limit: int = 20) -> str:
    """``"[0, 3] of 5"`` for a ``(B,)`` bool mask (the first ``limit`` indices, then ``…``)."""
    flat = mask.detach().reshape(-1).cpu()
    idx = flat.nonzero().flatten().tolist()
    more = " …" if len(idx) > limit else ""
    return f"{idx[:limit]}{more} of {flat.numel()}"


def report_unconverged(mask, residual, what: str, remedy: str, strict: bool = False,
                       stacklevel: int = 3,
                       category: type[FoldConvergenceWarning] = FoldConvergenceWarning) -> None:
    """Warn (``FoldConvergenceWarning``) or raise (``FoldError`` when ``strict``) naming the
    instances where ``mask`` is true, their worst ``residual`` and a remedy. No-op if none.

    Args:
        mask: ``(B,)`` bool, true where the instance did not converge.
        residual: ``(B,)`` error measure per instance (or a scalar).
        what: what did not converge, e.g. ``"ADMM forward"``.
        category: the warning class (:class:`ForwardConvergenceWarning` for a forward).
    """
    if not bool(mask.any()):
        return
    res = residual.detach()
    worst = float(res.reshape(-1)[mask.reshape(-1)].max()) if res.numel() == mask.numel() \
        else float(res.max())
    msg = (f"{what} did not converge for instance(s) {instance_list(mask)} (error up to "
           f"{worst:.2e}). Remedy: {remedy}.")
    if strict:
        raise FoldError(msg)
    warnings.warn(msg, category, stacklevel=stacklevel)
