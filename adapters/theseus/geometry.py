"""Where the optimisation variables live: tangent layout, retraction and the values handed back.

Private to :mod:`fold_plugins.adapters.theseus`. :class:`TangentGeometry` knows the variables
in Theseus's ordering (their tangent offsets ``ξ``, the retraction ``x* ⊕ ξ`` per variable
type, the distance-2 colouring that compresses the Hessian), reads the solution off the
objective, puts the objective back as Theseus left it, and builds the returned values (``x*``
bit for bit, carrying the derivative of ``x* ⊕ ξ``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TangentGeometry"]


class TangentGeometry:
    """Layout of the optimisation variables in Theseus's ordering: tangent offsets, retraction.

    Args:
        optimizer: a Theseus ``NonlinearLeastSquares`` optimizer (its linearization's
            ordering, dimensions and column starts define ``ξ``).
    """

    def __init__(self, optimizer: Any):
        self.objective = optimizer.objective
        lin = optimizer.linear_solver.linearization
        self.ordering = list(lin.ordering)
        self.dofs = [int(d) for d in lin.var_dims]
        self.starts = [int(s) for s in lin.var_start_cols]
        self.index = {v.name: k for k, v in enumerate(self.ordering)}
        # variables of one type are retracted together: (template container, their indices)
        groups: dict[tuple[type, int], list[int]] = {}
        for k, v in enumerate(self.ordering):
            groups.setdefault((type(v), self.dofs[k]), []).append(k)
        self.groups = [(self.ordering[ks[0]].copy(new_name=f"{self.ordering[ks[0]].name}"
                                                  "__fold"), ks) for ks in groups.values()]
        self.coloring: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.objective.device

    @property
    def dtype(self) -> torch.dtype:
        return self.objective.dtype

    @property
    def n(self) -> int:
        return sum(self.dofs)

    def retract_all(self, x_star: list[Tensor], xi: Tensor) -> list[Tensor]:
        """``x* ⊕ ξ`` for every variable, one ``retract`` per variable type."""
        out: list[Tensor] = [xi] * len(x_star)
        B = xi.shape[0]
        for tmpl, ks in self.groups:
            xs = torch.cat([x_star[k] for k in ks]) if len(ks) > 1 else x_star[ks[0]]
            ds = [xi[:, self.starts[k]:self.starts[k] + self.dofs[k]] for k in ks]
            tmpl.update(xs)
            ys = tmpl.retract(torch.cat(ds) if len(ds) > 1 else ds[0]).tensor
            for k, y in zip(ks, ys.split(B)):
                out[k] = y
        for tmpl, ks in self.groups:
            tmpl.update(x_star[ks[0]].detach())  # hold no graph
        return out

    def hessian_compression(self) -> tuple[Tensor, Tensor, Tensor]:
        """How to read the Hessian ``H = ∂g/∂ξ`` off a few VJPs (cached per device).

        Distance-2 colouring of the variables (two variables that share a cost function, or a
        neighbour, get different colours): row ``j`` of every variable of one colour can be
        seeded together, since their non-zero columns never overlap. Returns ``seeds``
        (``(R, n)`` 0/1 cotangent patterns, one per colour and dof), ``row_of`` (``(n,)``:
        the seed whose VJP holds row ``i`` of ``H``) and ``mask`` (``(n, n)``: the columns
        row ``i`` may have, those of the variables sharing a cost function with its own), so
        ``H = (VJP(seeds)[row_of] · mask)`` per instance.
        """
        if self.coloring is not None and self.coloring[0].device == self.device \
                and self.coloring[0].dtype == self.dtype:
            return self.coloring
        V = len(self.ordering)
        nbrs: list[set[int]] = [{k} for k in range(V)]
        for cf in self.objective.cost_functions.values():
            ks = [self.index[v.name] for v in cf.optim_vars]
            for a in ks:
                nbrs[a].update(ks)
        color = [-1] * V
        colors: list[list[int]] = []
        for a in sorted(range(V), key=lambda k: -len(nbrs[k])):
            near = set().union(*(nbrs[b] for b in nbrs[a]))  # within distance 2
            used = {color[b] for b in near if color[b] >= 0}
            c = next(i for i in range(len(colors) + 1) if i not in used)
            if c == len(colors):
                colors.append([])
            colors[c].append(a)
            color[a] = c
        n = sum(self.dofs)
        seeds: list[Tensor] = []
        row_of = [0] * n
        mask = torch.zeros(n, n, dtype=self.dtype)
        for members in colors:
            for j in range(max(self.dofs[a] for a in members)):
                seed = torch.zeros(n, dtype=self.dtype)
                for a in members:
                    if j < self.dofs[a]:
                        seed[self.starts[a] + j] = 1
                        row_of[self.starts[a] + j] = len(seeds)
                seeds.append(seed)
        for a in range(V):
            rows = slice(self.starts[a], self.starts[a] + self.dofs[a])
            for b in nbrs[a]:
                mask[rows, self.starts[b]:self.starts[b] + self.dofs[b]] = 1
        dev = self.device
        self.coloring = (torch.stack(seeds).to(dev), torch.tensor(row_of, device=dev),
                         mask.to(dev))
        return self.coloring

    def set_vars(self, tensors: list[Tensor]) -> None:
        """Point the optimisation variables at ``tensors`` (Theseus's ordering)."""
        for var, t in zip(self.ordering, tensors):
            var.update(t)

    def solution(self) -> list[Tensor]:
        """The optimisation variables' tensors after the solve, ``(B, ...)`` each (may hold
        NaN rows: those instances are excluded, see the module docstring)."""
        B = self.objective.batch_size
        out = []
        for var in self.ordering:
            t = var.tensor.detach()
            if t.shape[0] != B:
                t = t.expand(B, *t.shape[1:])
            out.append(t.clone())
        return out

    def nonfinite_inputs(self, input_tensors: dict[str, Tensor], B: int) -> Tensor:
        """``(B,)`` bool: instances whose per-instance auxiliary inputs hold NaN/Inf."""
        bad = torch.zeros(B, dtype=torch.bool, device=self.device)
        aux = self.objective.aux_vars
        for k, t in input_tensors.items():
            if k in aux and isinstance(t, Tensor) and t.is_floating_point() \
                    and t.ndim >= 1 and t.shape[0] == B:
                bad |= ~torch.isfinite(t.detach().reshape(B, -1)).all(dim=1).to(bad.device)
        return bad

    def restore(self, x_star: list[Tensor], input_tensors: dict[str, Tensor]) -> None:
        """The objective as Theseus left it: at x* with no graph, the auxiliary variables
        holding the given inputs."""
        aux = {k: v for k, v in input_tensors.items() if k in self.objective.aux_vars}
        if aux:
            self.objective.update(aux, _update_vectorization=False)
        self.set_vars([x.detach() for x in x_star])

    def outputs(self, x_used: list[Tensor], x_star: list[Tensor], xi: Tensor | None,
                 input_tensors: dict[str, Tensor],
                 excluded: Tensor | None = None) -> dict[str, Tensor]:
        """The values ``x*`` (bit for bit) with the derivative of ``x_used ⊕ ξ`` attached
        (none for the ``excluded`` instances)."""
        by_name: dict[str, Tensor] = {}
        retracted = self.retract_all(x_used, xi) if xi is not None and xi.requires_grad \
            else None
        for k, (var, x) in enumerate(zip(self.ordering, x_star)):
            if retracted is not None:
                r = retracted[k]
                d = r - r.detach()
                if excluded is not None and bool(excluded.any()):
                    # excluded instances: no derivative at all (so a NaN x* sends no NaN back)
                    d = torch.where(excluded.reshape(-1, *([1] * (d.ndim - 1))),
                                    torch.zeros_like(d), d)
                out = x + d  # value x* bit for bit, derivative of x* ⊕ ξ
            else:
                out = x.clone()
            init = input_tensors.get(var.name)
            if isinstance(init, Tensor) and init.requires_grad and torch.is_grad_enabled():
                out = out + (init - init.detach()) * 0  # a converged x* does not depend on it
            by_name[var.name] = out
        return {name: by_name[name] for name in self.objective.optim_vars}
