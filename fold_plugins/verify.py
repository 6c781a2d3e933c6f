"""Gradient verification: finite differences, comparison against any reference, reports.

A gradient check here compares vector-Jacobian products (VJPs): for random cotangents
``u`` drawn once per direction,

    a = (∂f/∂θ)ᵀ u      (autograd through ``fn``)
    b = (∂r/∂θ)ᵀ u      (``reference``: another differentiable function, or central
                          finite differences of ``θ ↦ ⟨u, f(θ)⟩`` in float64)

and reports, per input ``θ_i``, the relative error ``‖a − b‖ / max(‖b‖, tiny)``, the cosine
``⟨a, b⟩ / (‖a‖‖b‖)`` and the largest absolute entry of ``a − b`` (worst over directions).

    from fold_plugins.verify import assert_gradients_close
    report = assert_gradients_close(folded_fn, "finite_differences", (q, A, b), rtol=1e-6)
    print(report)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from . import _record

__all__ = ["finite_difference_vjp", "compare_gradients", "assert_gradients_close",
           "GradientReport", "InputComparison", "FINITE_DIFFERENCES", "reference_name"]

FINITE_DIFFERENCES = "finite_differences"
_TINY = 1e-30


# ----------------------------------------------------------------------------- helpers

def _as_input_tuple(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise TypeError(f"inputs must be a Tensor or a tuple/list of arguments for fn, got "
                    f"{type(inputs).__name__}; wrap a single argument as (x,).")


def _as_outputs(out: Any, what: str) -> tuple[Tensor, ...]:
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and len(out) > 0 and all(isinstance(o, Tensor) for o in out):
        return tuple(out)
    raise TypeError(f"{what} must return a Tensor or a non-empty tuple of Tensors, got "
                    f"{type(out).__name__}"
                    + (f" of {[type(o).__name__ for o in out]}"
                       if isinstance(out, (tuple, list)) else "") + ".")


def _is_diff(t: Any) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())


def _resolve_wrt(wrt: Sequence[int] | None, inputs: tuple[Any, ...]) -> list[int]:
    if wrt is None:
        return [i for i, t in enumerate(inputs) if _is_diff(t)]
    out = []
    for i in wrt:
        if not isinstance(i, int) or not -len(inputs) <= i < len(inputs):
            raise ValueError(f"wrt contains {i!r}, but there are {len(inputs)} inputs; give "
                             "indices 0..len(inputs)-1.")
        i = i % len(inputs)
        if not _is_diff(inputs[i]):
            raise TypeError(f"wrt selects inputs[{i}], which is "
                            f"{type(inputs[i]).__name__}"
                            + (f" of dtype {inputs[i].dtype}" if isinstance(inputs[i], Tensor)
                               else "") + "; only floating-point tensors can be differentiated.")
        out.append(i)
    return out


def _check_cotangent(cot: tuple[Tensor, ...], outs: tuple[Tensor, ...], what: str) -> None:
    if len(cot) != len(outs):
        raise ValueError(f"cotangent has {len(cot)} tensor(s) but {what} returns {len(outs)}; "
                         "give one cotangent per output.")
    for k, (c, o) in enumerate(zip(cot, outs)):
        if c.shape != o.shape:
            raise ValueError(f"cotangent[{k}] has shape {tuple(c.shape)} but output {k} of "
                             f"{what} has shape {tuple(o.shape)}; they must match.")


def _pairing(outs: tuple[Tensor, ...], cot: tuple[Tensor, ...]) -> Tensor:
    """``Σ_k ⟨cot_k, out_k⟩`` in float64."""
    total: Tensor | None = None
    for o, c in zip(outs, cot):
        term = (o.to(torch.float64) * c.to(device=o.device, dtype=torch.float64)).sum()
        total = term if total is None else total + term.to(total.device)
    return total if total is not None else torch.zeros((), dtype=torch.float64)


# ----------------------------------------------------------------------------- finite differences

def finite_difference_vjp(fn: Callable[..., Any], inputs: Any, cotangent: Tensor | Sequence[Tensor],
                          eps: float = 1e-6, wrt: Sequence[int] | None = None,
                          ) -> tuple[Tensor | None, ...]:
    """Central-difference VJP ``∂/∂θ_i ⟨u, fn(θ)⟩``, computed in float64.

    Every floating-point input is cast to float64 before ``fn`` is called, and for each entry
    ``j`` of each differentiated input

        g_j = (φ(θ + h_j e_j) − φ(θ − h_j e_j)) / (2 h_j),   φ(θ) = Σ_k ⟨u_k, fn(θ)_k⟩,
        h_j = eps · max(1, |θ_j|),

    so truncation error is ``O(h²)`` and round-off ``O(ε_machine · |φ| / h)``. Costs two
    calls of ``fn`` per entry.

    Args:
        fn: ``fn(*inputs) -> Tensor`` or a tuple of Tensors; called under ``torch.no_grad``.
        inputs: one Tensor or a tuple of arguments (non-tensors pass through unchanged).
        cotangent: ``u``, a Tensor (single output) or one Tensor per output, shaped like them.
        eps: relative step ``h_j / max(1, |θ_j|)``.
        wrt: indices of the inputs to differentiate (default: every floating-point tensor).

    Returns:
        One entry per input: the gradient (float64, on the input's device) or ``None`` for
        inputs not differentiated.
    """
    args = _as_input_tuple(inputs)
    idx = _resolve_wrt(wrt, args)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}.")
    args64 = tuple(a.detach().to(torch.float64).clone() if _is_diff(a) else a for a in args)
    cot = _as_outputs(cotangent, "cotangent") if not isinstance(cotangent, Tensor) \
        else (cotangent,)
    cot = tuple(c.detach().to(torch.float64) for c in cot)

    def phi(call_args: tuple[Any, ...]) -> float:
        outs = _as_outputs(fn(*call_args), "fn")
        _check_cotangent(cot, outs, "fn")
        return float(_pairing(outs, cot))

    grads: list[Tensor | None] = [None] * len(args)
    with torch.no_grad():
        for i in idx:
            base = args64[i]
            flat = base.reshape(-1)
            g = torch.zeros_like(flat)
            for j in range(flat.numel()):
                xj = float(flat[j])
                h = eps * max(1.0, abs(xj))
                values = []
                for sign in (1.0, -1.0):
                    pert = flat.clone()
                    pert[j] = xj + sign * h
                    call = list(args64)
                    call[i] = pert.reshape(base.shape)
                    values.append(phi(tuple(call)))
                g[j] = (values[0] - values[1]) / (2.0 * h)
            grads[i] = g.reshape(base.shape)
    return tuple(grads)


# ----------------------------------------------------------------------------- report

@dataclass
class InputComparison:
    """One input's VJP agreement, worst over the random directions.

    Attributes:
        name: label of the input.
        shape: its shape.
        rel_error: ``max_d ‖a_d − b_d‖ / max(‖b_d‖, tiny)``.
        cosine: ``min_d ⟨a_d, b_d⟩ / (‖a_d‖‖b_d‖)`` (1 when both are zero, 0 when one is).
        max_abs_error: ``max_d max_j |a_d − b_d|_j``.
        ref_norm: ``max_d ‖b_d‖`` (scale of the reference gradient).
        abs_error: ``max_d ‖a_d − b_d‖``.
        rel_errors, abs_errors, ref_norms: per-direction ``‖a−b‖/‖b‖``, ``‖a−b‖``, ``‖b‖``.
    """

    name: str
    shape: tuple[int, ...]
    rel_error: float
    cosine: float
    max_abs_error: float
    ref_norm: float
    abs_error: float
    rel_errors: list[float] = field(default_factory=list)
    abs_errors: list[float] = field(default_factory=list)
    ref_norms: list[float] = field(default_factory=list)

    def passes(self, rtol: float, atol: float) -> bool:
        """``‖a − b‖ ≤ atol + rtol · ‖b‖`` in every direction."""
        return all(d <= atol + rtol * r or rel <= rtol
                   for d, r, rel in zip(self.abs_errors, self.ref_norms, self.rel_errors))


@dataclass
class GradientReport:
    """VJPs of ``fn`` (autograd) against a reference, per input, over random cotangents.

    Attributes:
        inputs: one :class:`InputComparison` per differentiated input.
        reference: what was compared against (``"finite_differences"`` or the callable's name).
        n_directions: number of random cotangents.
        value_error: relative difference ``‖fn(θ) − ref(θ)‖ / max(‖ref(θ)‖, tiny)`` of the
            outputs themselves (``None`` for finite differences, where they are the same).
        weakly_active: weakly active constraints the projections inside ``fn`` reported
            (summed over instances; see :mod:`fold_plugins.projections`): there the
            derivative is one-sided by convention and finite differences may disagree.
    """

    inputs: list[InputComparison]
    reference: str
    n_directions: int
    value_error: float | None = None
    weakly_active: int = 0

    @property
    def worst(self) -> float:
        """The largest relative error over all inputs and directions (0 when there are none)."""
        return max((c.rel_error for c in self.inputs), default=0.0)

    @property
    def worst_input(self) -> InputComparison | None:
        """The :class:`InputComparison` with the largest relative error."""
        return max(self.inputs, key=lambda c: c.rel_error, default=None)

    @property
    def min_cosine(self) -> float:
        return min((c.cosine for c in self.inputs), default=1.0)

    def __str__(self) -> str:
        head = (f"gradient check vs {self.reference}, {self.n_directions} random cotangent(s); "
                f"worst relative error {self.worst:.3e}")
        if self.value_error is not None:
            head += f"; outputs differ by {self.value_error:.3e} (relative)"
        if self.weakly_active:
            head += (f"\nnote: {self.weakly_active} weakly active constraint(s) at the solution "
                     "(on a bound with a zero multiplier): the derivative is not unique there; "
                     "fn uses the free piece's (fold_plugins.projections), and finite "
                     "differences straddle the kink, so a mismatch there is expected")
        cols = ("input", "shape", "rel. error", "cosine", "max |a-b|", "‖ref‖")
        rows = [(c.name, "x".join(map(str, c.shape)) or "scalar", f"{c.rel_error:.3e}",
                 f"{c.cosine:.12f}", f"{c.max_abs_error:.3e}", f"{c.ref_norm:.3e}")
                for c in self.inputs]
        widths = [max(len(r[k]) for r in [cols, *rows]) for k in range(len(cols))]
        line = "  ".join(h.ljust(w) for h, w in zip(cols, widths))
        out = [head, line, "-" * len(line)]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"GradientReport(reference={self.reference!r}, worst={self.worst:.3e}, "
                f"inputs={[c.name for c in self.inputs]})")


# ----------------------------------------------------------------------------- comparison

def _autograd_vjps(fn: Callable[..., Any], args: tuple[Any, ...], idx: list[int],
                   cotangents: list[tuple[Tensor, ...]] | Callable[..., list], what: str,
                   ) -> tuple[tuple[Tensor, ...], list[list[Tensor]], list[tuple[Tensor, ...]]]:
    """Outputs of ``fn`` and, per cotangent, the VJP w.r.t. ``args[i]`` for ``i in idx``.

    ``cotangents`` may be a function of the outputs (drawn after the one call of ``fn``).
    """
    leaves = list(args)
    for i in idx:
        leaves[i] = args[i].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        outs = _as_outputs(fn(*leaves), what)
    if callable(cotangents):
        cotangents = cotangents(outs)
    if cotangents and len(cotangents[0]) != len(outs):
        raise ValueError(f"{what} returns {len(outs)} output(s) but fn returns "
                         f"{len(cotangents[0])}; the two must return the same outputs.")
    for c in cotangents:
        _check_cotangent(c, outs, what)
    live = [k for k, o in enumerate(outs) if o.requires_grad]
    result = []
    for n, cot in enumerate(cotangents):
        if not live:
            result.append([torch.zeros_like(leaves[i]) for i in idx])
            continue
        grads = torch.autograd.grad([outs[k] for k in live], [leaves[i] for i in idx],
                                    [cot[k].to(dtype=outs[k].dtype, device=outs[k].device)
                                     for k in live],
                                    retain_graph=n < len(cotangents) - 1, allow_unused=True)
        result.append([torch.zeros_like(leaves[i]) if g is None else g.detach()
                       for i, g in zip(idx, grads)])
    return tuple(o.detach() for o in outs), result, cotangents


def _rel(diff_norm: float, ref_norm: float) -> float:
    if diff_norm == 0.0:
        return 0.0
    return diff_norm / max(ref_norm, _TINY)


def reference_name(reference: Any) -> str:
    """A readable name for a reference: its ``name`` attribute, else ``__name__``, else its
    type's name (a lambda is "<lambda>": pass ``name=`` to :func:`compare_gradients`)."""
    found = getattr(reference, "name", None)
    if not isinstance(found, str) or not found:
        found = getattr(reference, "__name__", None)
    return found if isinstance(found, str) and found else type(reference).__name__


def compare_gradients(fn: Callable[..., Any], reference: Callable[..., Any] | str, inputs: Any,
                      n_directions: int = 3, seed: int = 0, eps: float = 1e-6,
                      wrt: Sequence[int] | None = None, names: Sequence[str] | None = None,
                      name: str | None = None) -> GradientReport:
    """Compare VJPs of ``fn`` with those of ``reference`` over random cotangents.

    Args:
        fn: differentiable ``fn(*inputs) -> Tensor | tuple[Tensor, ...]`` (autograd is used).
        reference: another differentiable function with the same signature and outputs, or
            ``"finite_differences"`` (central differences of ``fn`` in float64, see
            :func:`finite_difference_vjp`).
        inputs: one Tensor or a tuple of arguments.
        n_directions: number of random cotangents ``u ~ N(0, I)`` (one per output tensor).
        seed: seed of the cotangents (a private generator; global RNG state is untouched).
        eps: finite-difference step (only for ``"finite_differences"``).
        wrt: indices of the inputs to compare (default: every floating-point tensor).
        names: labels of the inputs (default ``input[i]``).
        name: how the report names the reference (e.g. ``"cvxpylayers (SCS)"``); default: the
            reference's ``name`` attribute, else its ``__name__`` (see :func:`reference_name`).

    Returns:
        A :class:`GradientReport`.
    """
    args = _as_input_tuple(inputs)
    idx = _resolve_wrt(wrt, args)
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be a positive int, got {n_directions!r}.")
    if names is not None and len(names) != len(args):
        raise ValueError(f"names has {len(names)} entries but there are {len(args)} inputs.")
    is_fd = isinstance(reference, str)
    if is_fd and reference != FINITE_DIFFERENCES:
        raise ValueError(f"reference must be a callable or {FINITE_DIFFERENCES!r}, got "
                         f"{reference!r}.")
    if not is_fd and not callable(reference):
        raise TypeError(f"reference must be a callable or {FINITE_DIFFERENCES!r}, got "
                        f"{type(reference).__name__}.")

    def draw(outs: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return [tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64)
                      .to(device=o.device, dtype=o.dtype if o.is_floating_point()
                          else torch.float64) for o in outs)
                for _ in range(n_directions)]

    with _record.collect() as notes:  # projections report weakly active constraints here
        outs_a, vjps_a, cotangents = _autograd_vjps(fn, args, idx, draw, "fn")
    weak = sum(int(t.sum()) for t in notes.get("weakly_active", []) if isinstance(t, Tensor))

    value_error = None
    if is_fd:
        ref_name = FINITE_DIFFERENCES
        vjps_b: list[list[Tensor]] = []
        for cot in cotangents:
            g = finite_difference_vjp(fn, args, cot, eps=eps, wrt=idx)
            vjps_b.append([cast(Tensor, g[i]) for i in idx])  # idx: all computed
    else:
        ref_name = name or reference_name(reference)
        assert callable(reference)  # checked above: a callable or FINITE_DIFFERENCES
        outs_b, vjps_b, _ = _autograd_vjps(reference, args, idx, cotangents, "reference")
        num = math.sqrt(sum(float(((a.to(torch.float64) - b.to(device=a.device,
                                                                dtype=torch.float64)) ** 2).sum())
                            for a, b in zip(outs_a, outs_b)))
        den = math.sqrt(sum(float((b.to(torch.float64) ** 2).sum()) for b in outs_b))
        value_error = _rel(num, den)

    rows = []
    for pos, i in enumerate(idx):
        rels, coss, maxabs, refn, absn = [], [], [], [], []
        for d in range(n_directions):
            a = vjps_a[d][pos].to(torch.float64).reshape(-1)
            b = vjps_b[d][pos].to(device=a.device, dtype=torch.float64).reshape(-1)
            diff = a - b
            dn, bn, an = float(diff.norm()), float(b.norm()), float(a.norm())
            rels.append(_rel(dn, bn))
            if an == 0.0 and bn == 0.0:
                coss.append(1.0)
            elif an == 0.0 or bn == 0.0:
                coss.append(0.0)
            else:
                coss.append(float(a @ b) / (an * bn))
            maxabs.append(float(diff.abs().max()) if diff.numel() else 0.0)
            refn.append(bn)
            absn.append(dn)
        name = names[i] if names is not None else f"input[{i}]"
        rows.append(InputComparison(name=name, shape=tuple(args[i].shape), rel_error=max(rels),
                                    cosine=min(coss), max_abs_error=max(maxabs),
                                    ref_norm=max(refn), abs_error=max(absn), rel_errors=rels,
                                    abs_errors=absn, ref_norms=refn))
    return GradientReport(inputs=rows, reference=ref_name, n_directions=n_directions,
                          value_error=value_error, weakly_active=weak)


def assert_gradients_close(fn: Callable[..., Any], reference: Callable[..., Any] | str,
                           inputs: Any, rtol: float = 1e-5, atol: float = 0.0,
                           n_directions: int = 3, seed: int = 0, eps: float = 1e-6,
                           wrt: Sequence[int] | None = None, names: Sequence[str] | None = None,
                           value_rtol: float | None = None,
                           name: str | None = None) -> GradientReport:
    """Assert that ``fn``'s VJPs match ``reference``'s: ``‖a − b‖ ≤ atol + rtol‖b‖`` per input.

    Args:
        rtol, atol: tolerances on the per-input norms (every direction must pass).
        value_rtol: when given (and ``reference`` is a function), also require the outputs to
            agree: ``‖fn(θ) − ref(θ)‖ ≤ value_rtol · ‖ref(θ)‖``.
        Other arguments as in :func:`compare_gradients`.

    Returns:
        The :class:`GradientReport` (for logging the measured errors).

    Raises:
        AssertionError: with the report's table in the message.
    """
    report = compare_gradients(fn, reference, inputs, n_directions=n_directions, seed=seed,
                               eps=eps, wrt=wrt, names=names, name=name)
    bad = [c.name for c in report.inputs if not c.passes(rtol, atol)]
    msgs = []
    if bad:
        msgs.append(f"gradients differ beyond rtol={rtol:.1e}, atol={atol:.1e} for {bad}")
    if value_rtol is not None and report.value_error is not None \
            and report.value_error > value_rtol:
        msgs.append(f"outputs differ: relative {report.value_error:.3e} > value_rtol "
                    f"{value_rtol:.1e} (fn and reference do not solve the same problem?)")
    if msgs:
        raise AssertionError("; ".join(msgs) + "\n" + str(report))
    return report
