"""cvxpylayers suite — ``CvxpyLayer`` with its default backend, with Clarabel, and with
``solver=FoldedSolver(...)``: forward, backward and forward + backward time, peak backward
memory and gradient error, on LP / QP / SOCP / exponential-cone layers.

Problems (parameter ``θ`` batched ``(B, ·)``, loss ``⟨g, x*⟩`` with a fixed random ``g``; the
constant data are drawn once per ``n``):

* **LP** — ``min cᵀx s.t. Ax ≤ b, x ≥ 0`` (``A > 0`` is ``n/2 × n``, ``c < 0``), ``θ = b``;
  truth: the vertex ``x = M⁻¹r`` on the active set (rows of ``A`` and bounds).
* **QP** — ``min ½xᵀPx + qᵀx s.t. 0 ≤ x ≤ 1`` (``κ(P) ≈ 40``), ``θ = q``; truth: the
  active-set closed form ``x_F = −P_FF⁻¹(q_F + P_FA x_A)``.
* **SOCP** — ``min qᵀx s.t. ‖Fx‖₂ ≤ 1``, ``θ = q``; truth ``x = −F⁻¹u, u = F⁻ᵀq/‖F⁻ᵀq‖``.
* **exp** — ``min −Σ entr(x) − qᵀx s.t. Σx = 1`` (``n`` exponential cones), ``θ = q``; truth
  ``x = softmax(q)``.

The truths are differentiated by autograd (float64); the gradient error is the worst
instance's ``‖∇ − ∇_truth‖ / ‖∇_truth‖``. Peak memory is that of the backward alone
(``torch.autograd.grad`` on a retained graph; ``comparisons.measure.measure_memory``).

Methods: **cvxpylayers** (diffcp + SCS, default tolerances), **cvxpylayers + Clarabel**
(diffcp with ``solve_method="Clarabel"``), **FoldedSolver** (Clarabel forward, GMRES folded
backward; ``precondition="auto"`` preconditions it on the LP and QP), **FoldedSolver, no
preconditioner** (the same with ``precondition=False``; LPs and QPs), **FoldedSolver torch**
(``forward="torch"``: batched ADMM; LPs and QPs). The folded methods' backward VJP count
(GMRES matrix-vector products) is reported next to their times.
Baseline of every ratio: cvxpylayers (the default) on the same problem, ``n`` and ``B``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import Config
from ..measure import Stopwatch, measure_memory, time_phases
from ..report import SuiteResult, fmt_bytes, fmt_err, fmt_ms, fmt_ratio, save_figure, table

TITLE = "10. cvxpylayers: FoldedSolver as CvxpyLayer's solver"
INTRO = ("Switches an existing CvxpyLayer to the folded backward with one keyword "
         "(solver=FoldedSolver()) and measures time, memory and gradient error against "
         "cvxpylayers' own backends on LP, QP, SOCP and exponential-cone layers.")
BASELINE = "cvxpylayers"
METHODS = ("cvxpylayers", "cvxpylayers + Clarabel", "FoldedSolver",
           "FoldedSolver, no preconditioner", "FoldedSolver torch")
#: methods run on LPs and QPs only (the torch forward; the unpreconditioned comparison, where
#: ``precondition="auto"`` is on)
POLYHEDRAL_ONLY = ("FoldedSolver, no preconditioner", "FoldedSolver torch")
KINDS = ("LP", "QP", "SOCP", "exp")


# ----------------------------------------------------------------------------- problems

def _build(kind: str, n: int, B: int, seed: int) -> tuple[Any, list, list, Tensor, Callable]:
    """``(problem, parameters, variables, θ (B, ·), truth(θ) -> x)`` for one layer type."""
    import cvxpy as cp

    g = torch.Generator().manual_seed(seed)
    F64 = torch.float64
    x = cp.Variable(n)
    if kind == "LP":
        m = max(n // 2, 1)
        A = 0.1 + torch.rand(m, n, generator=g, dtype=F64)
        c = -0.1 - torch.rand(n, generator=g, dtype=F64)
        b = cp.Parameter(m)
        prob = cp.Problem(cp.Minimize(c.numpy() @ x), [A.numpy() @ x <= b, x >= 0])
        theta = 1 + torch.rand(B, m, generator=g, dtype=F64)
        return prob, [b], [x], theta, _lp_truth(A, c)
    if kind == "QP":
        M = torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)
        P = M @ M.T + 0.1 * torch.eye(n, dtype=F64)
        P = P / torch.linalg.eigvalsh(P).max() * 4
        P = P + (4 / 40) * torch.eye(n, dtype=F64)
        q = cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(P.numpy())) + q @ x),
                          [x >= 0, x <= 1])
        theta = 2 * torch.randn(B, n, generator=g, dtype=F64)
        return prob, [q], [x], theta, _qp_truth(P)
    if kind == "SOCP":
        F = torch.eye(n, dtype=F64) + 0.5 * torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(n)
        q = cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(q @ x), [cp.norm(F.numpy() @ x, 2) <= 1])
        theta = torch.randn(B, n, generator=g, dtype=F64)

        def socp_truth(t: Tensor) -> Tensor:
            u = torch.linalg.solve(F.T, t.T).T
            u = u / u.norm(dim=1, keepdim=True)
            return -torch.linalg.solve(F, u.T).T

        return prob, [q], [x], theta, socp_truth
    q = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(-cp.sum(cp.entr(x)) - q @ x), [cp.sum(x) == 1])
    theta = torch.randn(B, n, generator=g, dtype=F64)
    return prob, [q], [x], theta, lambda t: torch.softmax(t, dim=1)


def _lp_truth(A: Tensor, c: Tensor) -> Callable[[Tensor], Tensor]:
    """Vertex of ``Ax ≤ b, x ≥ 0`` as a differentiable function of ``b`` on the active set
    read from a tight Clarabel solve (``x = M⁻¹r``, rows of ``[A; −I]`` that are tight)."""
    import cvxpy as cp

    m, n = A.shape

    def fn(b: Tensor) -> Tensor:
        out = []
        for i in range(b.shape[0]):
            xv = cp.Variable(n)
            cp.Problem(cp.Minimize(c.numpy() @ xv), [A.numpy() @ xv <= b[i].detach().numpy(),
                                            xv >= 0]).solve(solver="CLARABEL")
            xs = torch.as_tensor(xv.value)
            act_a = ((A @ xs - b[i].detach()).abs() < 1e-7).nonzero().flatten()
            free = (xs > 1e-7).nonzero().flatten()
            # the tight rows of A, restricted to the non-zero coordinates, fix x_free
            Mf = A[act_a][:, free]
            xf = torch.linalg.lstsq(Mf, b[i][act_a].unsqueeze(-1)).solution.squeeze(-1)
            out.append(b.new_zeros(n).index_put((free,), xf))
        return torch.stack(out)

    return fn


def _qp_truth(P: Tensor) -> Callable[[Tensor], Tensor]:
    """Box-QP solution on the active set found by projected Newton (exact, differentiable)."""

    def fn(q: Tensor) -> Tensor:
        with torch.no_grad():
            x = torch.zeros_like(q)
            step = 1 / torch.linalg.eigvalsh(P).max()
            for _ in range(20000):  # projected gradient to the active set
                x1 = (x - step * (x @ P + q)).clamp(0, 1)
                if float((x1 - x).abs().max()) < 1e-14:
                    break
                x = x1
        out = []
        for i in range(q.shape[0]):
            at_lo, at_hi = x[i] <= 1e-9, x[i] >= 1 - 1e-9
            F = (~(at_lo | at_hi)).nonzero().flatten()
            Aidx = (at_lo | at_hi).nonzero().flatten()
            xA = at_hi[Aidx].to(q.dtype)
            xF = -torch.linalg.solve(P[F][:, F], q[i][F] + P[F][:, Aidx] @ xA)
            out.append(q.new_zeros(q.shape[1]).index_put((Aidx,), xA).index_put((F,), xF))
        return torch.stack(out)

    return fn


# ----------------------------------------------------------------------------- methods

def _layer(method: str, prob: Any, params: list, variables: list
           ) -> tuple[Callable[[Tensor], Tensor], Any]:
    """``(call(θ) -> x, the FoldedSolver or None)`` for one method."""
    from cvxpylayers.torch import CvxpyLayer

    from fold_plugins.adapters.cvxpylayers import FoldedSolver

    if method == "cvxpylayers":
        lay = CvxpyLayer(prob, params, variables)
        args: dict = {"n_jobs_forward": 1, "n_jobs_backward": 1}
    elif method == "cvxpylayers + Clarabel":
        lay = CvxpyLayer(prob, params, variables)
        args = {"solve_method": "Clarabel", "n_jobs_forward": 1, "n_jobs_backward": 1}
    elif method == "FoldedSolver":
        lay = CvxpyLayer(prob, params, variables, solver=FoldedSolver())
        args = {}
    elif method == "FoldedSolver, no preconditioner":
        lay = CvxpyLayer(prob, params, variables, solver=FoldedSolver(precondition=False))
        args = {}
    else:
        lay = CvxpyLayer(prob, params, variables, solver=FoldedSolver(forward="torch"))
        args = {}

    def call(theta: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=r"Solved/Inaccurate")
            return lay(theta, solver_args=args)[0]

    return call, lay.ctx.solver if method.startswith("FoldedSolver") else None


def _measure(method: str, kind: str, n: int, B: int, cfg: Config, truth_grad: Tensor,
             built: tuple) -> dict[str, Any]:
    prob, params, variables, theta, _ = built
    call, solver = _layer(method, prob, params, variables)
    gvec = torch.randn(B, n, generator=torch.Generator().manual_seed(cfg.seed + 7),
                       dtype=theta.dtype)
    grads: list[Tensor] = []

    def once(sw: Stopwatch) -> None:
        th = theta.clone().requires_grad_(True)
        sw.start()
        x = call(th)
        sw.lap("forward")
        (gr,) = torch.autograd.grad((x * gvec).sum(), th)
        sw.lap("backward")
        grads.append(gr)

    repeats = cfg.pick(tiny=cfg.repeats, quick=min(cfg.repeats, 2), full=cfg.repeats)
    timing = time_phases(once, torch.device("cpu"), repeats, warmup=cfg.warmup,
                         budget_s=cfg.pick(tiny=5.0, quick=20.0, full=60.0))
    vjps = None if solver is None else int(solver.last_info.backward_matvecs)
    err = float(((grads[-1] - truth_grad).norm(dim=1)
                 / truth_grad.norm(dim=1).clamp(min=1e-300)).max())
    th = theta.clone().requires_grad_(True)
    x = call(th)
    loss = (x * gvec).sum()
    mem = measure_memory(lambda: torch.autograd.grad(loss, th, retain_graph=True),
                         torch.device("cpu"))
    return {"forward": timing.median("forward"), "backward": timing.median("backward"),
            "total": timing.median("total"), "error": err, "memory": mem.peak,
            "repeats": timing.repeats, "note": timing.note, "vjps": vjps}


def _grid(cfg: Config) -> list[tuple[str, int, int]]:
    if cfg.mode == "tiny":
        return [("QP", 20, 2), ("SOCP", 10, 2)]
    if cfg.mode == "quick":
        # (QP n=200 B=64 and n=500 take minutes of cvxpylayers + Clarabel here: --full)
        return [("QP", 200, 16), ("SOCP", 200, 16), ("LP", 50, 16), ("exp", 20, 16)]
    return [(k, n, B) for k in KINDS for n in (50, 200, 500) for B in (1, 16, 64)]


def run(cfg: Config) -> SuiteResult:
    res = SuiteResult("cvxpylayers", TITLE)
    rows, data = [], {}
    for kind, n, B in _grid(cfg):
        key = f"{kind} n={n} B={B}"
        try:
            built = _build(kind, n, B, cfg.seed + n)
            th = built[3].clone().requires_grad_(True)
            gvec = torch.randn(B, n, generator=torch.Generator().manual_seed(cfg.seed + 7),
                               dtype=th.dtype)
            (truth,) = torch.autograd.grad((built[4](th) * gvec).sum(), th)
        except Exception as e:  # noqa: BLE001 - a failed point is reported, not fatal
            res.errors.append(f"{key}: building the problem or its truth failed: {e}")
            continue
        point: dict[str, Any] = {}
        for method in METHODS:
            if method in POLYHEDRAL_ONLY and kind not in ("LP", "QP"):
                continue
            try:
                point[method] = _measure(method, kind, n, B, cfg, truth, built)
            except Exception as e:  # noqa: BLE001
                point[method] = {"failed": f"{type(e).__name__}: {e}"[:200]}
        data[key] = point
        base = point.get(BASELINE, {})
        for method, r in point.items():
            if "failed" in r:
                rows.append([key, method, "failed: " + r["failed"], "", "", "", "", "", ""])
                continue
            ratio = (lambda ph: fmt_ratio(base.get(ph, math.nan) / r[ph])  # noqa: E731
                     if "failed" not in base else "—")
            rows.append([key, method, fmt_ms(r["forward"]), fmt_ms(r["backward"]),
                         "—" if r.get("vjps") is None else str(r["vjps"]),
                         fmt_ms(r["total"]), f"{ratio('backward')} / {ratio('total')}",
                         fmt_err(r["error"]), fmt_bytes(r["memory"])])
    res.data = {"points": data}
    for key, point in data.items():  # one headline per problem: FoldedSolver vs the default
        base, ours = point.get(BASELINE, {}), point.get("FoldedSolver", {})
        if "backward" in base and "backward" in ours:
            bwd = fmt_ratio(base["backward"] / ours["backward"])
            res.headline.append(
                f"{key}: cvxpylayers ÷ FoldedSolver backward {bwd} ({ours.get('vjps')} VJPs), "
                f"forward+backward {fmt_ratio(base['total'] / ours['total'])}; gradient error "
                f"{fmt_err(ours['error'])} (cvxpylayers {fmt_err(base['error'])})")
    res.markdown = (
        "Times are medians (ms, one thread); ratios are cvxpylayers (default) ÷ method, for the "
        "backward and for forward + backward; gradient error is the worst instance's relative "
        "error against the closed-form truth; memory is the backward's peak; bwd VJPs: the "
        "folded backward's vector-Jacobian products of the step (GMRES matrix-vector products, "
        "including its residual checks).\n\n"
        + table(["problem", "method", "forward", "backward", "bwd VJPs", "fwd+bwd",
                 "speed-up bwd / fwd+bwd", "grad error", "peak bwd memory"], rows)
        + "\n" + _targets(data))
    try:
        res.figures.append(_plot(data, cfg))
    except Exception as e:  # noqa: BLE001
        res.errors.append(f"plot failed: {e}")
    return res


def _targets(data: dict) -> str:
    """The issue's targets, met or not, from the measured ratios."""
    lines = ["Targets (measured in this run):\n"]

    def ratio(key: str, method: str, phase: str) -> tuple[float, float] | None:
        p = data.get(key, {})
        a, b = p.get(BASELINE, {}), p.get(method, {})
        if phase not in a or phase not in b:
            return None
        return a[phase] / b[phase], b["error"]

    for key in ("QP n=200 B=16", "SOCP n=200 B=16"):
        r = ratio(key, "FoldedSolver", "backward")
        if r:
            ok = r[0] >= 10 and r[1] <= 1e-8
            lines.append(f"- backward ≥10× faster at {key}, error ≤1e-8: {fmt_ratio(r[0])}, "
                         f"error {fmt_err(r[1])} — {'met' if ok else 'not met'}\n")
    for key, method, phase, what, bound in (
            ("QP n=200 B=64", "FoldedSolver torch", "total",
             "forward+backward (forward='torch') ≥20× faster", 20),
            ("QP n=500 B=16", "FoldedSolver", "memory", "peak backward memory ≥50× below", 50)):
        r = ratio(key, method, phase)
        verdict = (f"{fmt_ratio(r[0])} — {'met' if r[0] >= bound else 'not met'}" if r
                   else "not measured in this mode (`--full` runs it)")
        lines.append(f"- {what} at {key}: {verdict}\n")
    return "".join(lines) if len(lines) > 1 else ""


def _plot(data: dict, cfg: Config) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(data)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        for ax, phase in zip(axes, ("backward", "total")):
            vals = [data[k].get(method, {}).get(phase, math.nan) * 1e3 for k in keys]
            ax.bar(np.arange(len(keys)) + j * width, vals, width, label=method)
    for ax, name in zip(axes, ("backward", "forward + backward")):
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title(name)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
        ax.set_xticklabels(keys, rotation=45, ha="right", fontsize=7)
    axes[0].legend(fontsize=7)
    return save_figure(fig, cfg, "cvxpylayers_times",
                       "CvxpyLayer backends vs FoldedSolver: backward and forward + backward "
                       "time per problem (log scale).")
