"""What a step reads: the tensors it captures, checked while :func:`fold` takes its one step.

``fold(step, x_star, *params)`` promises gradients for every tensor the step touches, also
those it captures (closure tensors, ``nn.Module`` parameters). First-order gradients reach them
through the step's own graph. Double backward needs them as explicit inputs of the folded op
(the second-order terms ``∂²⟨v, U⟩/∂x∂θ`` are taken w.r.t. them), so while the step runs once
under :class:`StepRecorder` every tensor that an op reads, that requires grad and that was not
made inside the step, is recorded. The same pass refuses in-place updates of the state or of a
captured tensor (they would corrupt the graph the backward walks).

:func:`reach` then walks the step's graph from its output back to those inputs to tell which of
them the output really depends on (a tensor used only through ``.detach()`` or numpy does not)
and whether some dependency was missed (then double backward refuses rather than lies).

A step object with ``record_captured = False`` runs without the recorder (its cost is a
Python call per op: ≈ 15 % of a small Theseus step): the walk then collects the leaves it
meets, and autograd's sequence numbers tell a node made before the step (a captured non-leaf
tensor: first order stays exact, higher order refuses) from one made inside it. The step
must then pass its non-leaf inputs explicitly as ``params``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._errors import FoldError

__all__ = ["StepRecorder", "Reach", "reach", "sequence_mark", "is_functorch_tensor",
           "functorch_active"]

_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                    "__ifloordiv__", "__ipow__", "__imatmul__", "__iand__", "__ior__",
                    "__ixor__", "__ilshift__", "__irshift__", "__imod__"}


def _tensors(obj: Any, out: list[Tensor]) -> list[Tensor]:
    """The tensors in ``obj`` (nested tuples/lists/dicts), in order (a lean tree_flatten)."""
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _is_inplace(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


def is_functorch_tensor(t: Any) -> bool:
    """Whether ``t`` is wrapped by a ``torch.func`` transform (grad, jvp, vmap, …)."""
    return isinstance(t, Tensor) and bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def functorch_active() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform."""
    return torch._C._functorch.maybe_current_level() is not None


class StepRecorder(TorchFunctionMode):
    """Records the grad-requiring tensors a step reads that it did not make itself.

    Args:
        state: the state tensors passed to the step (never recorded; in-place use refused).
        explicit: the explicit ``params`` (recorded like captured tensors, named apart).
    """

    def __init__(self, state: Sequence[Tensor], explicit: Sequence[Any]):
        super().__init__()
        self._state = {id(t) for t in state}
        self._explicit = {id(p) for p in explicit if isinstance(p, Tensor)}
        self._made: set[int] = set()
        self.captured: dict[int, Tensor] = {}
        #: the floating tensors it reads that need no grad and that it did not make (closure
        #: constants, buffers): kept by reference, checked only when the step's output is
        #: NaN/Inf, to name the culprit (:meth:`fold_plugins._linearize.Linearization`)
        self.constants: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _tensors(args, [])
        if kwargs:
            _tensors(kwargs, flat)
        if flat and _is_inplace(func):
            target = id(flat[0])
            if target in self._state or target in self._explicit or (
                    target not in self._made and flat[0].requires_grad):
                what = "the state x" if target in self._state else "a tensor it did not create"
                raise FoldError(
                    f"step modifies {what} in place ({getattr(func, '__name__', func)}): the "
                    "folded backward differentiates the step at x_star and needs its inputs "
                    "unchanged. Write the step out of place (e.g. x.clamp(0, 1) instead of "
                    "x.clamp_(0, 1), torch.where instead of item assignment), or clone first.")
        out = func(*args, **kwargs)
        made = _tensors(out, [])
        if not made:  # metadata reads (.shape, .dim(), .item()) create no dependency
            return out
        for t in flat:
            if is_functorch_tensor(t):  # made by a transform the step itself runs
                continue
            key = id(t)
            if key in self._made or key in self._state:
                continue
            if t.requires_grad:
                if key not in self.captured:
                    self.captured[key] = t
            elif key not in self._explicit and key not in self.constants \
                    and t.is_floating_point():
                self.constants[key] = t
        for t in made:
            self._made.add(id(t))
        return out


class Reach:
    """Which inputs the step's output depends on through its graph.

    Attributes:
        reached: ids of the recorded inputs met while walking back from the output.
        unknown: a grad-requiring leaf was met that is neither the state nor a recorded
            input (the recorder missed a dependency: e.g. a custom C++ op); without a
            recorder (``since``): a node made before the step ran, i.e. a captured non-leaf
            tensor that nobody named.
        leaves: without a recorder, the grad-requiring leaves met (captured parameters).
    """

    def __init__(self, reached: set[int], unknown: bool, leaves: list[Tensor] | None = None):
        self.reached = reached
        self.unknown = unknown
        self.leaves = leaves or []


def sequence_mark(t: Tensor) -> int:
    """The autograd sequence number the next recorded op will get (nodes are numbered in the
    order they are made, per thread), from one throw-away view of the grad-requiring ``t``."""
    with torch.enable_grad():  # fold may run under no_grad with forward-mode AD active
        node = t.view_as(t).grad_fn
        if node is None:
            raise FoldError("internal: sequence_mark needs a tensor that requires grad.")
        return node._sequence_nr() + 1


def reach(outputs: Iterable[Tensor], state: Sequence[Tensor], inputs: Sequence[Tensor],
          since: int | None = None) -> Reach:
    """Walk the graph of ``outputs`` back to ``inputs`` (stopping there) and the state leaves.

    ``since`` (a :func:`sequence_mark` taken before the step ran) is the walk without a
    :class:`StepRecorder`: grad-requiring leaves it meets are collected as inputs
    (:attr:`Reach.leaves`), and a node older than the mark that is not an input's is a
    captured non-leaf tensor that cannot be named (:attr:`Reach.unknown`)."""
    leaf_ids = {id(t) for t in inputs if t.grad_fn is None}
    fn_ids: dict[int, list[int]] = {}
    for t in inputs:
        if t.grad_fn is not None:  # several inputs may share a node (outputs of torch.split)
            fn_ids.setdefault(id(t.grad_fn), []).append(id(t))
    state_ids = {id(t) for t in state}
    reached: set[int] = set()
    unknown = False
    leaves: list[Tensor] = []
    seen: set[int] = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in fn_ids:
            reached.update(fn_ids[id(node)])
            continue
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: a leaf that requires grad
            if id(var) in leaf_ids:
                reached.add(id(var))
            elif id(var) in state_ids:
                pass
            elif since is not None:
                leaves.append(var)
                reached.add(id(var))
            else:
                unknown = True
            continue
        if since is not None and node._sequence_nr() < since:
            unknown = True  # made before the step: a captured non-leaf tensor
            continue
        stack.extend(nf for nf, _ in node.next_functions if nf is not None)
    return Reach(reached, unknown, leaves)
