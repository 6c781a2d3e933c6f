"""Suite 3 — backward time and peak memory against problem size and batch on a box QP.

Problem: ``min ½xᵀPx + qᵀx, 0 ≤ x ≤ 1`` (``comparisons.problems``; κ(P) ≈ 40), parameter
``q`` (B, n), loss ``⟨g, x*⟩`` with a fixed random ``g``; gradient error is the worst
instance's relative error against the closed-form active-set gradient.

Methods (each measured on the same instances in the same run):

* **folded gmres / dense / fixed_point / auto** — forward: FISTA to a fixed-point residual of
  1e-10 under ``torch.no_grad()``, then ``fp.fold(pgd_step, x*, q, solver=...)``; backward:
  the folded solve (tolerance 1e-10). ``auto`` picks dense or GMRES from its cost model
  (measured on its first call for the step, cached; the untimed check call is that first call).
* **unrolled K=100 / K=500** — ``K`` projected-gradient steps from 0 with the autograd graph
  (``fold_plugins.adapters.unrolled.unroll``), backward through all of them.
* **cvxpylayers** — ``CvxpyLayer`` (diffcp backend, SCS with its default tolerances, one job),
  the QP written as ``½‖Lᵀx‖² + qᵀx`` with ``P = LLᵀ``; in ``--full`` also with SCS at
  ``eps_abs = eps_rel = 1e-9`` (tolerances comparable to the folded forward's) and with
  Clarabel. SCS's defaults are far looser than the folded methods' 1e-10: compare each time
  ratio with the same method's gradient error.

Baseline of every ratio: **folded gmres** on the same (n, B).

**VJP floor**: ``#VJPs × (median time of one VJP of the step at x*)``, the least a backward
made of that many sequential operator applications can cost; the VJP is timed through the
entry point the backward solvers call (``v ↦ v − Φᵀv``, one engine call and one subtraction),
back to back. ``backward ÷ floor`` is what the Krylov method adds (orthogonalisation,
bookkeeping, the final verdict) and the rest of the backward (the batch-independence probe,
the parameter VJP).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fold_plugins as fp

from ..config import Config
from ..measure import MemoryStats, Stopwatch, Timing, measure_memory, time_phases, vjp_time
from ..problems import (
    QP,
    exact_solution,
    make_qp,
    max_rel_err,
    solve_qp,
    timed_cvxpylayer_grad,
    unroll,
    vjp_truth,
)
from ..progress import bar
from ..report import SuiteResult, fmt_bytes, fmt_err, fmt_ms, fmt_ratio, save_figure, table
from ._scaling_targets import floor_markdown

TITLE = "3. Scaling: backward time and peak memory vs size and batch"
INTRO = ("Measures what the gradients cost: time and memory of the folded backward against "
         "unrolling and cvxpylayers as the problem and the batch grow, each time quoted with "
         "that method's gradient error.")
BASELINE = "folded gmres"
FORWARD_TOL = 1e-10


@dataclass
class Point:
    """Measurements of one method at one (n, B)."""

    timing: Timing | None = None
    memory: MemoryStats | None = None
    error: float = math.nan
    iterations: int | None = None
    skipped: str = ""
    failed: str = ""
    backward_converged: bool | None = None  # folded: FoldInfo.backward_converged all true
    matvecs: int | None = None  # folded: FoldInfo.backward_matvecs (VJPs of the step)
    solver_ran: str = ""  # folded: FoldInfo.backward_solver ("auto (dense)" …)


@dataclass
class Method:
    """A way of differentiating the QP: ``prepare(qp)`` → ``call(q, g, sw) -> (grad, iters,
    backward converged or None)``."""

    name: str
    prepare: Callable[[QP, Config], Callable]
    over_budget: list[tuple[int, int]] = field(default_factory=list)


def _folded(solver: str) -> Callable:
    def prepare(qp: QP, cfg: Config) -> Callable:
        def call(q: torch.Tensor, g: torch.Tensor, sw: Stopwatch):
            sw.start()
            xs, _, _ = solve_qp(qp, q, tol=FORWARD_TOL)
            x, info = fp.fold(qp.step, xs, q, solver=solver, tol=1e-10, return_info=True)
            sw.lap("forward")
            (x * g).sum().backward()
            sw.lap("backward")
            conv = info.backward_converged
            return (q.grad, int(info.backward_iterations.max()),
                    None if conv is None else bool(conv.all()),
                    {"matvecs": info.backward_matvecs, "solver": info.backward_solver})
        return call
    return prepare


def _unrolled(K: int) -> Callable:
    def prepare(qp: QP, cfg: Config) -> Callable:
        def call(q: torch.Tensor, g: torch.Tensor, sw: Stopwatch):
            sw.start()
            x, _ = unroll(qp.step, qp.x0(), q, n_iter=K)
            sw.lap("forward")
            (x * g).sum().backward()
            sw.lap("backward")
            return q.grad, K, None
        return call
    return prepare


#: SCS settings of the tight cvxpylayers column (``--full``)
SCS_TIGHT = {"eps_abs": 1e-9, "eps_rel": 1e-9}


def _cvxpylayers(solve_method: str, solver_args: dict | None = None) -> Callable:
    def prepare(qp: QP, cfg: Config) -> Callable:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        n = qp.n
        P = qp.P.detach().cpu().double().numpy()
        L = torch.linalg.cholesky(qp.P.detach().cpu().double()).numpy()
        x = cp.Variable(n)
        qpar = cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ x) + qpar @ x),
                          [x >= 0, x <= 1])
        del P
        layer = CvxpyLayer(prob, parameters=[qpar], variables=[x])
        args = {"n_jobs_forward": 1, "n_jobs_backward": 1, "solve_method": solve_method,
                **(solver_args or {})}

        def call(q: torch.Tensor, g: torch.Tensor, sw: Stopwatch):
            return timed_cvxpylayer_grad(layer, q, g, args, sw), None, None
        return call
    return prepare


def _methods(cfg: Config) -> list[Method]:
    ms = [Method("folded gmres", _folded("gmres")), Method("folded dense", _folded("dense")),
          Method("folded fixed_point", _folded("fixed_point")),
          Method("folded auto", _folded("auto")),
          Method("unrolled K=100", _unrolled(100)), Method("unrolled K=500", _unrolled(500)),
          Method("cvxpylayers (SCS)", _cvxpylayers("SCS"))]
    if cfg.mode == "full":
        ms.append(Method("cvxpylayers (SCS, eps 1e-9)", _cvxpylayers("SCS", SCS_TIGHT)))
        ms.append(Method("cvxpylayers (Clarabel)", _cvxpylayers("Clarabel")))
    return ms


def _grid(cfg: Config) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(size sweep at fixed batch, batch sweep at fixed size)."""
    ns = cfg.pick(tiny=[20, 40], quick=[50, 100, 200, 400], full=[50, 100, 200, 500, 1000])
    b0 = cfg.pick(tiny=2, quick=8, full=16)
    bs = cfg.pick(tiny=[1, 4], quick=[1, 8, 64], full=[1, 4, 16, 64, 128])
    n0 = cfg.pick(tiny=20, quick=100, full=200)
    return [(n, b0) for n in ns], [(n0, b) for b in bs]


def _measure(method: Method, call: Callable, qp: QP, g: torch.Tensor, truth: torch.Tensor,
             cfg: Config, budget: float) -> Point:
    pt = Point()

    def once(sw: Stopwatch):
        q = qp.q.detach().clone().requires_grad_(True)
        return call(q, g, sw)

    sw = Stopwatch(cfg.device)
    t0 = time.perf_counter()
    out = once(sw)  # untimed check call, also the warm-up
    first = time.perf_counter() - t0
    grad, iters, converged = out[:3]
    pt.error = max_rel_err(grad, truth)
    pt.iterations = iters
    pt.backward_converged = converged
    if len(out) > 3:
        pt.matvecs, pt.solver_ran = out[3]["matvecs"], out[3]["solver"]
    # slow points get fewer repeats (their spread is small relative to their time): full
    # repeats up to 2 s a call, 3 up to the budget, 1 beyond it (larger sizes then skipped)
    repeats = cfg.repeats if first <= 2.0 else (min(3, cfg.repeats) if first <= budget else 1)
    pt.timing = time_phases(lambda s: once(s), cfg.device, repeats=repeats,
                            warmup=max(0, cfg.warmup - 1))
    if repeats < cfg.repeats:
        pt.timing.note = f"median of {repeats} (first call {first:.1f} s)"
    if first > budget:
        pt.timing.note = f"one timed call (first call {first:.1f} s > budget {budget:.0f} s)"
        method.over_budget.append((qp.n, qp.batch))
    pt.memory = measure_memory(lambda: once(Stopwatch(cfg.device)), cfg.device)
    return pt


def _skip(method: Method, n: int, b: int) -> bool:
    return any(n >= n0 and b >= b0 for n0, b0 in method.over_budget)


def run(cfg: Config) -> SuiteResult:
    """Measure every method on the size sweep and the batch sweep; tables, plot, headline."""
    size_sweep, batch_sweep = _grid(cfg)
    points = list(dict.fromkeys(size_sweep + batch_sweep))  # each sweep in increasing size
    budget = cfg.pick(tiny=20.0, quick=20.0, full=120.0)
    methods = _methods(cfg)
    results: dict[tuple[int, int], dict[str, Point]] = {}
    errors: list[str] = []
    work = [(p, m) for p in points for m in methods]
    cache: dict[tuple[int, int], tuple] = {}
    vjp_s: dict[tuple[int, int], float] = {}  # one VJP of the step, per point
    for (n, b), m in bar(work, cfg, "scaling"):
        if (n, b) not in cache:
            cache.clear()
            qp = make_qp("box", n, b, cfg, seed=11)
            xs, _, _ = solve_qp(qp, tol=1e-13)
            xs = exact_solution(qp, xs)
            g = cfg.randn(b, n, gen=cfg.generator(3 + n + b))
            cache[(n, b)] = (qp, g, vjp_truth(qp, xs, g))
            vjp_s[(n, b)] = vjp_time(qp.step, xs, qp.q.detach().clone().requires_grad_(True),
                                     device=cfg.device)
        qp, g, truth = cache[(n, b)]
        row = results.setdefault((n, b), {})
        if _skip(m, n, b):
            row[m.name] = Point(skipped="skipped: a smaller size exceeded the time budget")
            continue
        try:
            call = m.prepare(qp, cfg)
            row[m.name] = _measure(m, call, qp, g, truth, cfg, budget)
        except Exception as e:  # noqa: BLE001 - one method failing must not stop the suite
            msg = f"{m.name} at n={n}, B={b}: {type(e).__name__}: {e}"
            row[m.name] = Point(failed=msg)
            errors.append(msg)
    res = SuiteResult("scaling", TITLE, errors=errors)
    res.data = _data(results, methods)
    res.data["vjp_seconds"] = {f"n={n},B={b}": t for (n, b), t in vjp_s.items()}
    # each part guarded: a failure is recorded and the measured numbers are still written
    parts = (("markdown", lambda: setattr(res, "markdown", _markdown(results, methods, points)
                                          + floor_markdown(results, vjp_s, points, res.data,
                                                           _cell_missing))),
             ("general QP", lambda: _general_qp_section(res, cfg)),
             ("plot", lambda: res.figures.append(_plot(results, methods, size_sweep,
                                                       batch_sweep, cfg))),
             ("headline", lambda: setattr(res, "headline", _headline(results, methods,
                                                                     points))))
    for what, make in parts:
        try:
            make()
        except Exception as e:  # noqa: BLE001 - the measurements are kept in res.data
            res.errors.append(f"scaling {what} could not be written: {type(e).__name__}: {e}")
    return res


def _data(results: dict, methods: list[Method]) -> dict:
    out = {}
    for (n, b), row in results.items():
        for name, p in row.items():
            out[f"n={n},B={b},{name}"] = {
                "n": n, "B": b, "method": name, "error": p.error, "iterations": p.iterations,
                "forward_s": p.timing.median("forward") if p.timing else None,
                "backward_s": p.timing.median("backward") if p.timing else None,
                "total_s": p.timing.median("total") if p.timing else None,
                "repeats": p.timing.repeats if p.timing else 0,
                "torch_peak": p.memory.torch_peak if p.memory else None,
                "host_peak": p.memory.host_peak if p.memory else None,
                "saved": p.memory.saved if p.memory else None,
                "rss_peak_delta": p.memory.rss_peak_delta if p.memory else None,
                "plotted_peak": p.memory.peak if p.memory else None,
                "backward_converged": p.backward_converged, "matvecs": p.matvecs,
                "solver_ran": p.solver_ran,
                "skipped": p.skipped, "failed": p.failed}
    return out


def _ratio(row: dict[str, Point], name: str, phase: str) -> float | None:
    base, p = row.get(BASELINE), row.get(name)
    if not (base and p and base.timing and p.timing):
        return None
    return p.timing.median(phase) / base.timing.median(phase)


def _flag(p: Point | None) -> str:
    """`` ✗`` when a folded backward solve did not converge on every instance."""
    return " ✗" if p is not None and p.backward_converged is False else ""


def _cell_missing(p: Point | None) -> str | None:
    if p is None:
        return "—"
    if p.skipped:
        return "skipped"
    if p.failed:
        return "failed"
    return None


def _markdown(results: dict, methods: list[Method], points: list[tuple[int, int]]) -> str:
    names = [m.name for m in methods]
    others = [n for n in names if n != BASELINE]
    md = [__doc__.split("\n\n", 1)[1].strip(), ""]
    for phase, label in (("backward", "Backward time"), ("total", "Forward + backward time")):
        rows = []
        for n, b in points:
            row = results[(n, b)]
            base = row.get(BASELINE)
            cells = [n, b, (fmt_ms(base.timing.median(phase)) + _flag(base))
                     if base and base.timing else "—"]
            for name in others:
                miss = _cell_missing(row.get(name))
                cells.append(miss or fmt_ratio(_ratio(row, name, phase)) + _flag(row.get(name)))
            rows.append(cells)
        md += [f"**{label}**: {BASELINE} in ms, every other method as a ratio to it "
               "(> 1 = slower than folded gmres).", "",
               table(["n", "B", f"{BASELINE} ms"] + [f"{o} ÷ base" for o in others], rows)]
    rows = []
    for n, b in points:
        row = results[(n, b)]
        cells = [n, b]
        for name in names:
            p = row.get(name)
            miss = _cell_missing(p)
            if miss:
                cells.append(miss)
            else:
                it = f" ({p.iterations} it)" if p.iterations is not None and \
                    name.startswith("folded") and name != "folded dense" else ""
                cells.append(fmt_err(p.error) + it + _flag(p))
        rows.append(cells)
    md += ["**Gradient error** (worst instance, relative, vs the closed-form gradient; "
           "backward iterations in parentheses):", "", table(["n", "B"] + names, rows)]
    rows = []
    for n, b in points:
        row = results[(n, b)]
        cells = [n, b]
        for name in names:
            p = row.get(name)
            miss = _cell_missing(p)
            cells.append(miss or f"{fmt_bytes(p.memory.tracked)} / {fmt_bytes(p.memory.saved)}"
                         f" / {fmt_bytes(p.memory.rss_peak_delta)}")
        rows.append(cells)
    md += ["**Peak memory** of one forward + backward: tracked (torch + tracemalloc) / saved "
           "for backward / RSS Δ (see Memory in the header). The plot shows max(tracked, "
           "RSS Δ) per method and point: tracked misses the C/C++ allocations of SCS and "
           "diffcp, RSS Δ misses memory the allocator reuses.", "",
           table(["n", "B"] + names, rows)]
    notes = [f"- {name} at n={n}, B={b}: {p.timing.note}" for (n, b), row in results.items()
             for name, p in row.items() if p.timing and p.timing.note]
    reps = {p.timing.repeats for row in results.values() for p in row.values() if p.timing}
    md.append(f"Timed repeats per cell: {sorted(reps)} (median reported).")
    unconverged = [f"{name} at n={n}, B={b}" for (n, b), row in results.items()
                   for name, p in row.items() if p.backward_converged is False]
    md += ["", "✗ marks a folded method whose backward solve did not reach its tolerance on "
           "every instance (`FoldInfo.backward_converged`): "
           + (", ".join(unconverged) if unconverged else "none in this run") + "."]
    if notes:
        md += ["", "Notes:"] + notes
    return "\n".join(md)


def _plot(results: dict, methods: list[Method], size_sweep: list, batch_sweep: list,
          cfg: Config):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, (sweep, xlabel, xi) in enumerate(((size_sweep, "problem size n", 0),
                                              (batch_sweep, "batch B", 1))):
        fixed = f"B = {sweep[0][1]}" if xi == 0 else f"n = {sweep[0][0]}"
        for i, m in enumerate(methods):
            xs, ts, mem = [], [], []
            for n, b in sweep:
                p = results.get((n, b), {}).get(m.name)
                if p is None or p.timing is None:
                    continue
                xs.append((n, b)[xi])
                ts.append(p.timing.median("backward") * 1e3)
                peak = p.memory.peak if p.memory else None
                mem.append(peak / 1e6 if peak else math.nan)
            style = dict(marker="o", ms=4, color=f"C{i}",
                         ls="-" if m.name.startswith("folded") else "--")
            if xs:
                axes[0, col].loglog(xs, ts, label=m.name, **style)
                axes[1, col].loglog(xs, mem, label=m.name, **style)
        axes[0, col].set_title(f"backward time vs {xlabel} ({fixed})")
        axes[0, col].set_ylabel("backward time, ms (median)")
        axes[1, col].set_title(f"peak memory vs {xlabel} ({fixed})")
        axes[1, col].set_ylabel("peak memory, MB: max(tracked, RSS Δ)")
        for r in range(2):
            axes[r, col].set_xlabel(xlabel)
            axes[r, col].grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, cfg, "scaling", "Box QP: backward time and peak memory against n "
                       "and batch; memory is max(tracked = torch + tracemalloc, RSS Δ) per "
                       "method and point (tracked misses SCS/diffcp's C/C++ allocations); "
                       "folded solid, references dashed.")


def _headline(results: dict, methods: list[Method], points: list[tuple[int, int]]) -> list[str]:
    # the largest point where the baseline and cvxpylayers were both measured
    for n, b in sorted(points, key=lambda p: -p[0] * p[1]):
        row = results[(n, b)]
        base = row.get(BASELINE)
        if not (base and base.timing):
            continue
        parts = []
        for name in ("cvxpylayers (SCS)", "cvxpylayers (SCS, eps 1e-9)", "unrolled K=500"):
            r = _ratio(row, name, "total")
            if r is not None:
                parts.append(f"{name} {fmt_ratio(r)} at gradient error "
                             f"{fmt_err(row[name].error)}{_flag(row[name])}")
        if parts:
            return [f"n={n}, B={b}: forward+backward time ÷ folded gmres: "
                    + ", ".join(parts) + f"; vs folded gmres at gradient error "
                    f"{fmt_err(base.error)}{_flag(base)}"]
    return []


def _general_qp_section(res: SuiteResult, cfg: Config) -> None:
    """The preconditioned ADMM-QP backward (``comparisons.suites._general_qp``)."""
    from . import _general_qp

    md, data = _general_qp.run(cfg)
    res.markdown += "\n\n" + md
    res.data["general_qp"] = data
