"""Nonconvex decision-focused learning: DC3's nonconvex QP with a predicted sine coefficient.

Setup: ``y*(p) = argmin ½yᵀQy + pᵀsin(y) s.t. Ay = b, Gy ≤ h`` with DC3's recipe
(``Q = diag(U[0,1])``, ``A, G ~ N(0,1)``, ``h = Σ_j|(GA⁺)_ij|``, ``b ~ U[0,1]``, fixed);
per sample the true ``p ~ U[0,1]^n`` and features ``z = φ(p)`` from a fixed random ReLU
network (2 hidden layers of 50). An MLP z → 128 → n predicts p̂ (Adam lr 1e-3, batch 32).
Forward: Ipopt (CasADi) from ``y₀ = A⁺b``, tolerance 1e-12. Decision-focused methods
minimise ``f(y*(p̂), p)`` through:

* **folded SQP** — one SQP step (``fp.steps.sqp``, active-set QP subproblem) at Ipopt's
  primal-dual point, folded (GMRES);
* **folded PGD** — one projected-gradient step (α = 0.1) whose polytope projection
  (``fp.projections.polytope``) is itself a folded ADMM solve; the outer step folded (GMRES);
* **two-stage (MSE)** — p̂ fitted to p by least squares.

cvxpylayers cannot take part: cvxpy has no sine atom and rejects nonconvex objectives (its
messages are quoted below). Metric: relative regret ``|f(y*(p̂), p) − f(y*(p), p)| /
|f(y*(p), p)|`` on the test set, mean and 90th percentile.
"""

from __future__ import annotations

import statistics

import torch

from ..config import Config
from ..experiments.generators import nonconvex_qp_data
from ..experiments.nonconvex import NonconvexLayer, cvxpy_verdict
from ..experiments.training import Run, mean_std, mlp, plot_curves, summary_rows, train
from ..progress import bar
from ..report import SuiteResult, table

TITLE = "7. Nonconvex decision-focused learning (DC3 nonconvex QP, Ipopt forward)"
#: printed by ``--paper-scale`` before it starts
PAPER_EXPECTED = ("≈ 1 day on 2 cores "
                  "(8,334 instances × 30 epochs × 3 seeds, one Ipopt solve per sample per epoch; "
                  "folded PGD ≈ 4× folded SQP)")


def sizes(cfg: Config) -> dict:
    """Sizes per mode (``paper``: 10,000 instances, 30 epochs, 3 seeds)."""
    return {
        "tiny": {"n": 8, "m": 4, "N": 24, "n_test": 12, "epochs": 2, "seeds": 2, "batch": 8,
                 "pgd_seeds": 1, "pgd_epochs": 1},
        "quick": {"n": 50, "m": 25, "N": 160, "n_test": 80, "epochs": 3, "seeds": 2,
                  "batch": 32, "pgd_seeds": 1, "pgd_epochs": 1, "pgd_N": 64},
        "full": {"n": 100, "m": 50, "N": 1000, "n_test": 200, "epochs": 2, "seeds": 2,
                 "batch": 32, "pgd_seeds": 1, "pgd_epochs": 1, "pgd_N": 256},
        "paper": {"n": 100, "m": 50, "N": 8334, "n_test": 833, "epochs": 30, "seeds": 3,
                  "batch": 32, "pgd_seeds": 3, "pgd_epochs": 30},
    }[cfg.mode]


def _run_one(cfg: Config, sz: dict, layer: NonconvexLayer, data: dict, method: str, seed: int,
             epochs: int, n_train: int | None = None) -> Run:
    """Train one method; ``n_train`` < N trains on the first ``n_train`` samples only and
    scales the measured epoch time to the full N (recorded in ``extra``)."""
    n = sz["n"]
    model = mlp([n, 128, n], False, seed, cfg.dtype, cfg.device)
    z, p = data["z"], data["p"]

    def loss_fn(idx):
        p_hat = model(z[idx])
        if method == "two-stage (MSE)":
            return ((p_hat - p[idx]) ** 2).mean()
        fwd = layer.folded_sqp if method == "folded SQP" else layer.folded_pgd
        return layer.f(fwd(p_hat), p[idx]).mean()

    rr: list[torch.Tensor] = []

    def evaluate():
        y_hat, _, _ = layer.solve(model(data["z_test"]))
        r = layer.relative_regret(y_hat, data["y_test"], data["p_test"])
        rr.append(r)
        return float(r.mean())

    N = z.shape[0] if n_train is None else min(n_train, z.shape[0])
    run = train(list(model.parameters()), loss_fn, evaluate, N, epochs, sz["batch"],
                1e-3, seed, modules=[model], device=cfg.device)
    if N < z.shape[0]:
        run.extra["timed_samples"] = N
        run.epoch_s = [t * z.shape[0] / N for t in run.epoch_s]
    run.extra["p90"] = [float(torch.quantile(r, 0.9)) for r in rr]
    return run


def grad_check(layer: NonconvexLayer, p: torch.Tensor, h: float = 1e-6) -> dict:
    """Directional derivative of ``Σ w·y*(p)`` (random w, v): folded SQP and folded PGD vs
    central differences of the Ipopt solution."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(*p.shape, generator=g, dtype=torch.float64).to(p)
    v = torch.randn(*p.shape, generator=g, dtype=torch.float64).to(p)
    fd = float(((layer.solve(p + h * v)[0] - layer.solve(p - h * v)[0]) * w).sum() / (2 * h))
    out = {"fd": fd}
    for name, fn in (("folded SQP", layer.folded_sqp), ("folded PGD", layer.folded_pgd)):
        pp = p.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad((fn(pp) * w).sum(), pp)
        out[name] = abs(float((gr * v).sum()) - fd) / max(abs(fd), 1e-12)
    return out


def run(cfg: Config) -> SuiteResult:
    """Train each method per seed; relative regret (mean, p90) curves, times, verdict."""
    sz = sizes(cfg)
    res = SuiteResult("nonconvex", TITLE)
    runs: dict[str, list[Run]] = {}
    checks = {}
    failures = 0
    for seed in bar(range(sz["seeds"]), cfg, "nonconvex seeds"):
        prob = nonconvex_qp_data(sz["N"] + sz["n_test"], sz["n"], sz["m"], sz["m"],
                                 seed=17 + seed)
        layer = NonconvexLayer(prob)
        N = sz["N"]
        z, p = prob.z.to(cfg.device, cfg.dtype), prob.p.to(cfg.device, cfg.dtype)
        data = {"z": z[:N], "p": p[:N], "z_test": z[N:], "p_test": p[N:]}
        data["y_test"], _, _ = layer.solve(data["p_test"])
        if seed == 0:
            checks = grad_check(layer, data["p"][:4] + 0.05)
        for method in ("folded SQP", "folded PGD", "two-stage (MSE)"):
            pgd = method == "folded PGD"
            if pgd and seed >= sz["pgd_seeds"]:
                continue
            try:
                runs.setdefault(method, []).append(_run_one(
                    cfg, sz, layer, data, method, seed,
                    sz["pgd_epochs"] if pgd else sz["epochs"],
                    sz.get("pgd_N") if pgd else None))
            except Exception as e:  # noqa: BLE001
                res.errors.append(f"seed {seed}, {method}: {type(e).__name__}: {e}")
        failures += layer.ipopt_failures
    verdict_cvx = cvxpy_verdict()
    res.data = {"sizes": sz, "runs": {m: [vars(r) for r in rs] for m, rs in runs.items()},
                "grad_check": checks, "cvxpylayers": verdict_cvx, "ipopt_failures": failures}
    res.figures.append(plot_curves({"relative test regret (mean)": runs}, cfg, "nonconvex",
                                   "relative regret",
                                   "Nonconvex DFL: mean relative test regret per epoch (mean ± "
                                   "std over seeds)."))
    res.markdown, res.headline = _markdown(sz, runs, checks, verdict_cvx, failures)
    return res


def _markdown(sz, runs, checks, verdict_cvx, failures) -> tuple[str, list[str]]:
    rows = summary_rows(runs, "folded SQP")
    p90 = {m: mean_std([r.extra["p90"][-1] for r in rs]) for m, rs in runs.items()}
    eps = {m: len(rs[0].epoch_s) for m, rs in runs.items()}
    rows = [(r[0], eps[r[0]], r[1], f"{p90[r[0]][0]:.4g} ± {p90[r[0]][1]:.2g}", *r[2:])
            for r in rows]
    md = [__doc__.split("\n\n", 1)[1].strip(), "",
          f"This run: n = {sz['n']} variables, {sz['m']} equalities, {sz['m']} inequalities, "
          f"{sz['N']} train / {sz['n_test']} test, {sz['seeds']} seeds; folded PGD on "
          f"{sz['pgd_seeds']} seed(s) for {sz['pgd_epochs']} epoch(s)"
          + (f" over the first {sz['pgd_N']} samples (its s / epoch scaled to {sz['N']})"
             if sz.get("pgd_N") else "")
          + " — its gradient equals folded SQP's (see the check), its time per epoch is the "
          f"point. Ipopt runs that did "
          f"not report success: {failures}.", "",
          table(["method", "epochs", "relative regret, mean (± std over seeds)",
                 "90th percentile", "seeds", "s / epoch", "÷ folded SQP"], rows)]
    if checks:
        md.append("Gradient check (directional derivative of Σ w·y* on 4 samples vs central "
                  "differences of Ipopt's solution): " + ", ".join(
                      f"{k} {v:.1e}" for k, v in checks.items() if k != "fd") + ".")
        md.append("")
    md.append(f"cvxpylayers' verdict: {verdict_cvx}")
    md.append("")
    f_m, _ = mean_std([r.metric[-1] for r in runs.get("folded SQP", [])])
    t_m, _ = mean_std([r.metric[-1] for r in runs.get("two-stage (MSE)", [])])
    f90, t90 = p90.get("folded SQP", (float("nan"),))[0], \
        p90.get("two-stage (MSE)", (float("nan"),))[0]
    tp = statistics.median(runs["folded PGD"][0].epoch_s) if "folded PGD" in runs else None
    ts = statistics.median([t for r in runs.get("folded SQP", []) for t in r.epoch_s]) \
        if "folded SQP" in runs else None
    md.append(f"**Verdict.** Folded SQP relative regret {f_m:.4g} (p90 {f90:.4g}) vs two-stage "
              f"{t_m:.4g} (p90 {t90:.4g}): "
              f"{'below' if f_m < t_m else 'NOT below'} on the mean, "
              f"{'below' if f90 < t90 else 'NOT below'} on the 90th percentile"
              + (f"; folded PGD costs {tp / ts:.3g}× folded SQP per epoch (its nested "
                 "projection backward)" if tp and ts else "") + ".")
    head = [f"relative regret folded SQP {f_m:.4g} (p90 {f90:.4g}) vs two-stage {t_m:.4g} "
            f"(p90 {t90:.4g}); cvxpylayers: refuses the problem"]
    return "\n".join(md), head
