"""Section of the scaling suite: the ADMM-QP backward on general QPs, preconditioned or not,
against cvxpylayers.

Problem: ``min ½xᵀPx + qᵀx  s.t.  Gx ≤ h (m = n/2 rows), Ex = e (p = n/4 rows)`` with ``P``,
``G``, ``h``, ``E``, ``e`` shared and ``q`` (B, n) the parameter; loss ``⟨w, x*⟩``. Truth:
the KKT gradient on the active set (equalities and the inequalities with a multiplier
> 1e-9): ``∂L/∂q = −[K⁻¹(w, 0)]_x``, ``K = [[P, A_actᵀ], [A_act, 0]]``, solved per instance
with ``torch.linalg.solve`` in float64.

Methods: ``fp.steps.qp`` (OSQP-style ADMM forward to 1e-10, folded ADMM-QP backward at
tolerance 1e-12) with the default preconditioner (``fp.preconditioners.admm_qp``) and with
``precondition=False``; ``CvxpyLayer`` (SCS, default tolerances, one job) on the same problem.
The state of the folded step is ``n_z = n + 2(m + p)``.
"""

from __future__ import annotations

import math

import torch

from fold_plugins.steps import INF, qp, solve_qp_admm

from ..config import Config
from ..measure import Stopwatch, time_phases
from ..problems import max_rel_err, timed_cvxpylayer_grad
from ..report import fmt_err, fmt_ms, table

#: speed targets: VJPs ≤ n_z/4 (preconditioned), backward ≥ 15× faster than
#: cvxpylayers' at n = 100, B = 16, gradient error ≤ 1e-8
VJP_FRACTION, CVX_SPEEDUP, MAX_ERR = 0.25, 15.0, 1e-8


def make_general_qp(n: int, B: int, cfg: Config, seed: int = 0) -> dict:
    """Random strictly convex QP with ``n/2`` inequalities and ``n/4`` equalities."""
    g = cfg.generator(7000 + n + seed)
    m, p = n // 2, n // 4
    f64 = torch.float64
    M = torch.randn(n, n, generator=g, dtype=f64)
    P = M @ M.T / n + 0.1 * torch.eye(n, dtype=f64)
    G = torch.randn(m, n, generator=g, dtype=f64)
    h = torch.rand(m, generator=g, dtype=f64)
    E = torch.randn(p, n, generator=g, dtype=f64)
    e = 0.1 * torch.randn(p, generator=g, dtype=f64)
    q = torch.randn(B, n, generator=g, dtype=f64)
    w = torch.randn(B, n, generator=g, dtype=f64)
    dev, dt = cfg.device, cfg.dtype
    out = {"P": P, "G": G, "h": h, "E": E, "e": e, "q": q, "w": w,
           "A": torch.cat([G, E]), "l": torch.cat([torch.full_like(h, -INF), e]),
           "u": torch.cat([h, e])}
    return {k: v.to(dev, dt) for k, v in out.items()}


def kkt_truth(d: dict, y: torch.Tensor) -> torch.Tensor:
    """``∂⟨w, x*⟩/∂q`` from the active set's KKT system (see the module docstring)."""
    P, A, w = d["P"], d["A"], d["w"]
    n, p = P.shape[0], d["E"].shape[0]
    m = d["G"].shape[0]
    out = []
    for b in range(w.shape[0]):
        act = torch.cat([y[b, :m].abs() > 1e-9, torch.ones(p, dtype=torch.bool,
                                                            device=y.device)])
        Aa = A[act]
        k = Aa.shape[0]
        K = torch.zeros(n + k, n + k, dtype=P.dtype, device=P.device)
        K[:n, :n], K[:n, n:], K[n:, :n] = P, Aa.T, Aa
        rhs = torch.cat([w[b], w.new_zeros(k)])
        out.append(-torch.linalg.solve(K, rhs)[:n])
    return torch.stack(out)


def _folded(d: dict, precondition: bool):
    def call(sw: Stopwatch):
        q = d["q"].clone().requires_grad_(True)
        sw.start()
        x, finfo, qinfo = qp(d["P"], q, d["A"], d["l"], d["u"], return_info=True,
                             precondition=precondition, admm_options={"tol": 1e-10})
        sw.lap("forward")
        (x * d["w"]).sum().backward()
        sw.lap("backward")
        return q.grad, finfo.backward_matvecs, bool(finfo.backward_converged.all())
    return call


def _cvxpylayers(d: dict):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    n = d["P"].shape[0]
    L = torch.linalg.cholesky(d["P"].cpu().double()).numpy()
    x = cp.Variable(n)
    qpar = cp.Parameter(n)
    G, h, E, e = (d[k].cpu().double().numpy() for k in ("G", "h", "E", "e"))
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ x) + qpar @ x),
                      [G @ x <= h, E @ x == e])
    layer = CvxpyLayer(prob, parameters=[qpar], variables=[x])
    args = {"n_jobs_forward": 1, "n_jobs_backward": 1, "solve_method": "SCS"}

    def call(sw: Stopwatch):
        q = d["q"].clone().requires_grad_(True)
        return timed_cvxpylayer_grad(layer, q, d["w"], args, sw), None, None
    return call


def run(cfg: Config) -> tuple[str, dict]:
    """Measure each method at each size; the markdown section and its data (with the
    targets' status)."""
    sizes = cfg.pick(tiny=[(20, 2)], quick=[(100, 16), (200, 16)], full=[(100, 16), (200, 16)])
    repeats = cfg.pick(tiny=1, quick=3, full=5)
    rows, data, status = [], {}, []
    for n, B in sizes:
        d = make_general_qp(n, B, cfg)
        (_, _, y), _ = solve_qp_admm(
            d["P"], d["q"], d["A"], d["l"], d["u"], tol=1e-12)
        truth = kkt_truth(d, y)
        n_z = n + 2 * d["A"].shape[0]
        pts = {}
        methods = [("folded ADMM-QP, preconditioned gmres", _folded(d, True)),
                   ("folded ADMM-QP, gmres", _folded(d, False))]
        if n == 100:
            methods.append(("cvxpylayers (SCS)", None))
        for name, call in methods:
            try:
                call = call if call is not None else _cvxpylayers(d)
                grad, vjps, conv = call(Stopwatch(cfg.device))
                timing = time_phases(call, cfg.device, repeats=repeats, warmup=0)
                pts[name] = {"backward_s": timing.median("backward"),
                             "forward_s": timing.median("forward"),
                             "vjps": vjps, "error": max_rel_err(grad, truth), "converged": conv}
            except Exception as exc:  # noqa: BLE001 - one method failing must not stop the rest
                pts[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        data[f"n={n},B={B}"] = {"n_z": n_z, **pts}
        base = pts.get("folded ADMM-QP, preconditioned gmres", {})
        for name, p in pts.items():
            if "failed" in p:
                rows.append([n, B, n_z, name, "failed", "—", "—", "—", p["failed"][:80]])
                continue
            ratio = (p["backward_s"] / base["backward_s"]) if "backward_s" in base else math.nan
            rows.append([n, B, n_z, name, fmt_ms(p["forward_s"]), fmt_ms(p["backward_s"]),
                         f"{ratio:.1f}×", "—" if p["vjps"] is None else p["vjps"],
                         fmt_err(p["error"]) + ("" if p["converged"] in (None, True) else " ✗")])
        if "vjps" in base:
            met = base["vjps"] <= VJP_FRACTION * n_z and base["error"] <= MAX_ERR
            status.append(f"- ≤ n_z/4 VJPs with the preconditioner at n={n} (n_z = {n_z}) and "
                          f"gradient error ≤ {MAX_ERR:.0e}: {'met' if met else 'not met'} "
                          f"({base['vjps']} VJPs = {base['vjps'] / n_z:.3f}·n_z, error "
                          f"{fmt_err(base['error'])})")
        cvx = pts.get("cvxpylayers (SCS)", {})
        if "backward_s" in cvx and "backward_s" in base:
            r = cvx["backward_s"] / base["backward_s"]
            status.append(f"- backward ≥ {CVX_SPEEDUP:.0f}× faster than cvxpylayers' at n={n}, "
                          f"B={B}: {'met' if r >= CVX_SPEEDUP else 'not met'} ({r:.1f}×; "
                          f"cvxpylayers' gradient error {fmt_err(cvx['error'])})")
            data[f"n={n},B={B}"]["cvx_backward_speedup"] = r
    md = ["### General QP: preconditioned ADMM-QP backward", "",
          __doc__.split("\n\n", 1)[1].strip(), "",
          table(["n", "B", "n_z", "method", "forward ms", "backward ms",
                 "backward ÷ preconditioned", "#VJPs", "gradient error"], rows)]
    if status:
        md += ["", "Targets (this run):"] + status
    data["status"] = status
    return "\n".join(md), data
