"""Forward solvers of the canonical cone program (1) of :mod:`.program`.

- :func:`solve_clarabel`: Clarabel per instance (CPU, float64, tight tolerances, duals).
- :func:`solve_torch_qp`: a batched torch ADMM with polishing
  (:func:`fold_plugins.steps.quadprog.solve_qp_admm`) for LPs and QPs (zero and nonnegative
  cones), on the inputs' device and dtype.

Both return ``(x (B, n), s (B, m), y (B, m), iterations (B,), converged (B,))`` and raise
:class:`fold_plugins.FoldError` naming the instances that are infeasible or unbounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from fold_plugins import FoldError
from fold_plugins import cones as K

from .program import ConeData, ConeProgram

__all__ = ["CLARABEL_SETTINGS", "ConeProgramSolveError", "solve_clarabel", "solve_torch_qp"]


def _solver_error_base() -> type:
    try:  # diffcp comes with cvxpylayers; its SolverError is what the default layer raises
        from diffcp import SolverError
    except ImportError:  # pragma: no cover - depends on the environment
        return Exception
    return SolverError


class ConeProgramSolveError(FoldError, _solver_error_base()):  # type: ignore[misc]
    """An instance has no solution (infeasible or unbounded): a :class:`FoldError` that is also
    ``diffcp.SolverError``, so code written for cvxpylayers' default backend catches it."""

#: Clarabel settings of the default forward: far tighter than its 1e-8 defaults, so that the
#: fixed-point residual of the folded step is at round-off level.
CLARABEL_SETTINGS: dict[str, Any] = {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11,
                                     "tol_feas": 1e-11, "tol_ktratio": 1e-9, "max_iter": 400,
                                     "verbose": False}


#: cvxpylayers/diffcp ``solver_args`` names → Clarabel settings (so a layer's existing
#: ``solver_args`` keep their meaning); diffcp-only keys are accepted and have no effect.
_ALIASES = {"max_iters": ("max_iter",), "eps": ("tol_gap_abs", "tol_gap_rel", "tol_feas"),
            "eps_abs": ("tol_gap_abs", "tol_feas"), "eps_rel": ("tol_gap_rel",),
            "tol": ("tol_gap_abs", "tol_gap_rel", "tol_feas")}
_DIFFCP_ONLY = {"solve_method", "mode", "n_jobs_forward", "n_jobs_backward",
                "acceleration_lookback", "eps_infeas", "normalize", "use_indirect", "scale"}
#: statuses with no solution (an error); every other non-"Solved" status returns the last
#: iterate flagged as unconverged
_NO_SOLUTION = ("PrimalInfeasible", "DualInfeasible", "AlmostPrimalInfeasible",
                "AlmostDualInfeasible")


def clarabel_settings(options: dict[str, Any]) -> Any:
    """A ``clarabel.DefaultSettings`` from :data:`CLARABEL_SETTINGS` and ``options``."""
    import clarabel

    st = clarabel.DefaultSettings()
    opts = dict(CLARABEL_SETTINGS)
    for k, v in options.items():
        if k in _DIFFCP_ONLY:
            continue
        for name in _ALIASES.get(k, (k,)):
            opts[name] = v
    for k, v in opts.items():
        if not hasattr(st, k):
            raise FoldError(f"FoldedSolver: unknown Clarabel setting {k!r} in solver_args / "
                            f"forward_options; valid: {sorted(a for a in dir(st) if a[0] != '_')}"
                            f" (and the aliases {sorted(_ALIASES)}).")
        setattr(st, k, v)
    return st


def _psd_perm(k: int) -> np.ndarray:
    """Clarabel's PSD entry order (upper triangle, column-major) as indices into SCS's
    (lower triangle, column-major): Clarabel entry ``(i, j), i ≤ j`` is SCS entry ``(j, i)``."""
    scs = {}
    t = 0
    for j in range(k):
        for i in range(j, k):
            scs[(i, j)] = t
            t += 1
    return np.array([scs[(j, i)] for j in range(k) for i in range(j + 1)])


def _clarabel_layout(prog: ConeProgram) -> tuple[list[Any], np.ndarray]:
    """Clarabel cone list and the row permutation from SCS's order to Clarabel's."""
    import clarabel

    d = prog.dims
    cones: list[Any] = []
    perm = [np.arange(d.zero + d.nonneg)]
    if d.zero:
        cones.append(clarabel.ZeroConeT(d.zero))
    if d.nonneg:
        cones.append(clarabel.NonnegativeConeT(d.nonneg))
    o = d.zero + d.nonneg
    for q in d.soc:
        cones.append(clarabel.SecondOrderConeT(q))
        perm.append(np.arange(o, o + q))
        o += q
    for k in d.psd:
        cones.append(clarabel.PSDTriangleConeT(k))
        perm.append(o + _psd_perm(k))
        o += k * (k + 1) // 2
    for _ in range(d.exp):
        cones.append(clarabel.ExponentialConeT())
    perm.append(np.arange(o, o + 3 * d.exp))
    return cones, np.concatenate(perm).astype(np.int64)


def solve_clarabel(prog: ConeProgram, data: ConeData, settings: dict[str, Any] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Solve every instance of (1) with Clarabel (``min ½xᵀPx + cᵀx, −Gx + s = h, s ∈ K``)."""
    try:
        import clarabel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"FoldedSolver's default forward needs clarabel ({e}); install it "
                          "with: pip install 'fold-plugins[cvx]', or use forward='torch'.") from e
    cones, perm = _clarabel_layout(prog)
    st = clarabel_settings(settings or {})
    B = data.c.shape[0]
    dt, dev = data.c.dtype, data.c.device

    def host(t: Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64).numpy()

    Pv = None if data.P is None else host(data.P)
    c, Gv, h = host(data.c), host(data.G), host(data.h)
    Gr, Gc = prog.G_rows.numpy(), prog.G_cols.numpy()
    xs, ss, ys, its, ok = [], [], [], [], []
    failed: dict[str, list[int]] = {}
    n, m = prog.n, prog.m
    for i in range(B):
        G = sp.csc_matrix((Gv[i], (Gr, Gc)), shape=(m, n))
        Ad = (-G)[perm].tocsc()
        if Pv is None:
            Pm = sp.csc_matrix((n, n))
        else:
            Pr, Pc = prog.P_index()
            Pf = sp.csc_matrix((Pv[i], (Pr.numpy(), Pc.numpy())), shape=(n, n))
            Pm = sp.triu(0.5 * (Pf + Pf.T)).tocsc()
        sol = clarabel.DefaultSolver(Pm, c[i], Ad, h[i][perm], cones, st).solve()
        status = str(sol.status)
        if status in _NO_SOLUTION or not np.isfinite(np.asarray(sol.x)).all():
            failed.setdefault(status, []).append(i)
            continue
        s_c, z_c = np.empty(m), np.empty(m)
        s_c[perm], z_c[perm] = np.asarray(sol.s), np.asarray(sol.z)
        xs.append(np.asarray(sol.x))
        ss.append(s_c)
        ys.append(z_c)
        its.append(sol.iterations)
        ok.append(status == "Solved")
    if failed:
        desc = "; ".join(f"{k}: {v}" for k, v in failed.items())
        raise ConeProgramSolveError(
            f"FoldedSolver: Clarabel could not solve instance(s) of the batch of {B} ({desc}). "
            "Infeasible or unbounded instances have no solution to differentiate; check those "
            "parameter values.")

    def t(a: list) -> Tensor:
        return torch.as_tensor(np.stack(a), dtype=dt, device=dev)

    return (t(xs), t(ss), t(ys), torch.as_tensor(its, device=dev),
            torch.as_tensor(ok, dtype=torch.bool, device=dev))


def solve_torch_qp(prog: ConeProgram, data: ConeData, options: dict[str, Any] | None = None,
                   strict: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batched torch ADMM (OSQP-style, polished) for LP/QP instances of (1)."""
    from fold_plugins.steps.quadprog import INF, QPInfeasibleError, solve_qp_admm

    d = prog.dims
    if d.soc or d.psd or d.exp:
        raise FoldError("FoldedSolver(forward='torch') solves LPs and QPs (equality and "
                        f"inequality constraints) only; this problem has cones {d}. Use "
                        "forward='clarabel' (the default) for second-order, exponential or "
                        "PSD constraints.")
    with torch.no_grad():
        Pv, c, Gv, h = data.P, data.c, data.G, data.h
        B = c.shape[0]
        Pd = prog.dense_P(Pv, B, c)
        Gd = prog.dense_G(Gv)
        lo = -h
        up = torch.where(torch.arange(prog.m, device=c.device) < d.zero, -h,
                         torch.full_like(h, INF))
        opts: dict[str, Any] = {"tol": 1e-10 if c.dtype == torch.float64 else 1e-5,
                                "maxiter": 20_000}
        opts.update(options or {})
        try:
            (x, _, ya), info = solve_qp_admm(Pd, c, Gd, lo, up, strict=strict, **opts)
        except QPInfeasibleError as e:
            raise ConeProgramSolveError(f"FoldedSolver(forward='torch'): {e}") from e
        s = K.product(prog.G(Gv, x) + h, d)
        y = K.product(-ya, d, dual=True)
    return x, s, y, info.iterations, info.converged
