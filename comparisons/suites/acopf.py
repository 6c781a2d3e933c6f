"""Suite — AC optimal power flow (pglib_opf_case57_ieee): learning generator costs from
temperatures, Ipopt forward, folded SQP backward (the journal version's experiment).

Instances follow the authors' ``bids-opf.jl`` recipe (:mod:`comparisons.acopf.instances`):
features ``(T, T′)``, costs scaled by ``1 + |T′ − T|/100``, loads raised at random; ground
truth by Ipopt (casadi) on the exact polar-form AC-OPF of the PGLib case (its published
optimum 37,589 $/h is reproduced in the tests). An MLP 2→32→32→32→32→21 predicts the 21
cost coefficients (c₂, c₁, c₀ of 7 units); Adam, batch 1, same initial weights per method.

* **folded SQP (GMRES)** — Ipopt solves the AC-OPF with the predicted costs; ``fp.fold`` of one
  SQP step (the authors' α = 0.01, Lagrangian Hessian + I) at that point, backward by GMRES to
  1e-10; loss = relative regret of the decision under the true costs;
* **one-iteration truncation** — the same layer with the original code's backward
  (``FoldOptLayer(n_iter=1, 'FPI')``: ``v = Φᵀg``, then ``v ← Φᵀv + g`` once);
* **two-stage (MSE)** — the MLP fitted to the true coefficients (normalised per kind), no layer.

Metrics on held-out instances: relative regret (%) of Ipopt's decision under the predicted
costs, its equality / inequality violation (p.u.), the cost-coefficient error ‖ĉ − c‖₁/‖c‖₁,
training time per epoch.
"""

from __future__ import annotations

import math
import statistics

import torch

from ..config import Config
from ..progress import bar
from ..report import SuiteResult, fmt_err, save_figure, table

TITLE = "8. AC optimal power flow (pglib case57): folded SQP vs two-stage"


def _sizes(cfg: Config) -> tuple[int, int, int]:
    """(instances, training instances, epochs); ``--paper-scale`` (if the runner has it): the
    authors' 64 instances and 25 epochs."""
    if cfg.mode == "paper":
        return 64, 53, 25
    return cfg.pick(tiny=(6, 4, 1), quick=(20, 14, 2), full=(64, 53, 5))


def run(cfg: Config) -> SuiteResult:
    """Train the three methods and check the layer's gradient against finite differences."""
    from ..acopf.learning import METHODS, CostMLP, build, grad_check, train

    res = SuiteResult("acopf", TITLE)
    n, n_train, epochs = _sizes(cfg)
    lr = 1e-2
    try:
        setup = build(n, n_train, seed=cfg.seed)
    except ImportError as e:
        res.errors.append(f"AC-OPF data/solver missing: {e}")
        return res
    runs: dict[str, dict] = {}
    for method in METHODS:
        try:
            runs[method] = train(setup, method, epochs, lr, cfg.seed,
                                 progress=lambda it, desc: bar(it, cfg, desc))
        except Exception as e:  # noqa: BLE001 - the other methods still run
            res.errors.append(f"training with {method} failed: {type(e).__name__}: {e}")
    checks: dict[str, dict] = {}
    i0 = int(setup.train[0])
    with torch.no_grad():
        c_init = CostMLP(setup.scale, cfg.seed)(setup.x(i0))
    c_smooth = setup.c(i0).clone()
    c_smooth[0, :setup.net.ngen] = 1e-2 * (setup.c(i0)[0, setup.net.ngen:2 * setup.net.ngen] > 0)
    for name, c in (("untrained model's ĉ", c_init), ("true c₁ with ĉ₂ = 0.01", c_smooth)):
        try:
            checks[name] = grad_check(setup, i0, c, seed=cfg.seed)
        except Exception as e:  # noqa: BLE001
            res.errors.append(f"gradient check at {name} failed: {type(e).__name__}: {e}")
    res.data = {"runs": runs, "grad_check": checks, "instances": n, "train": n_train,
                "test": n - n_train, "epochs": epochs, "lr": lr,
                "base_cost": setup.data.base_cost.tolist()}
    try:
        if runs:
            res.figures.append(_plot(runs, cfg))
        res.markdown, res.headline = _markdown(runs, checks, n, n_train, epochs, lr)
    except Exception as e:  # noqa: BLE001 - the numbers are kept in res.data
        res.errors.append(f"AC-OPF report could not be written: {type(e).__name__}: {e}")
    return res


def _markdown(runs: dict, checks: dict, n: int, n_train: int, epochs: int,
              lr: float) -> tuple[str, list[str]]:
    rows = []
    for m, r in runs.items():
        first, last = r["test"][0], r["test"][-1]
        t = statistics.median(r["epoch_s"]) if r["epoch_s"] else math.nan
        flag = " ✗" if r.get("backward_unconverged") else ""
        rows.append([m + flag, f"{first['regret_pct']:.3f} → **{last['regret_pct']:.3f}**",
                     fmt_err(last["eq_viol"]), fmt_err(last["ineq_viol"]),
                     f"{first['cost_err_pct']:.1f} → {last['cost_err_pct']:.1f}", f"{t:.2f}",
                     r.get("skipped", 0)])
    md = [f"{n} instances ({n_train} train / {n - n_train} test), {epochs} epochs, Adam lr "
          f"{lr:g}, batch 1, one torch thread.", "",
          table(["method", "test regret % (start → end)", "eq. viol. (p.u.)",
                 "ineq. viol. (p.u.)", "‖ĉ−c‖₁/‖c‖₁ % (start → end)", "s / epoch",
                 "skipped"], rows)]
    if checks:
        crow = [[k, f"{v['fd']:.3e}", f"{v['folded_value']:.3e}", fmt_err(v["folded"]),
                 f"{v['truncated_value']:.3e}", fmt_err(v["truncated"])]
                for k, v in checks.items()]
        md += ["Gradient of the decision's true cost along a random direction, against central "
               "differences of the Ipopt solution map (each solve polished to KKT residual "
               "1e-11):", "",
               table(["at", "finite differences", "folded", "rel. error", "truncated (1 it.)",
                      "rel. error"], crow)]
    headline, verdict = [], []
    f, ts = runs.get("folded SQP (GMRES)"), runs.get("two-stage (MSE)")
    if f and ts:
        rf, rt = f["test"][-1]["regret_pct"], ts["test"][-1]["regret_pct"]
        met = rf < rt
        verdict.append(f"Target *folded regret below two-stage*: **{'met' if met else 'not met'}"
                       f"** ({rf:.3f} % vs {rt:.3f} %).")
        headline.append(f"regret: folded {rf:.3f} %, two-stage {rt:.3f} %")
    smooth = checks.get("true c₁ with ĉ₂ = 0.01")
    if smooth:
        verdict.append(f"Folded gradient vs finite differences: {fmt_err(smooth['folded'])} "
                       f"relative (one-iteration truncation: {fmt_err(smooth['truncated'])}).")
        headline.append(f"grad err folded {fmt_err(smooth['folded'])}, truncated "
                        f"{fmt_err(smooth['truncated'])}")
    init = checks.get("untrained model's ĉ")
    if init:
        verdict.append(
            f"Why regret training barely moves: at the untrained model's ĉ the derivative of "
            f"the decision's cost is {init['fd']:.1e} (finite differences; folded "
            f"{init['folded_value']:.1e}). With (near-)linear costs three of the four producing "
            "units sit at a limit and the fourth is fixed by the power balance, so the "
            "dispatch — and the regret — is locally constant in ĉ; the exact gradient is ~0 "
            "except where two or more units are interior. Every instance's costs are one "
            "common multiple of the dataset's, so the regret only depends on the predicted "
            "merit order, which the two-stage fit learns directly.")
    return "\n".join(md + [""] + verdict) + "\n", headline


def _plot(runs: dict, cfg: Config):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for j, (m, r) in enumerate(runs.items()):
        style = {"marker": "os^"[j % 3], "markersize": 8 - 2 * j,
                 "linestyle": ("-", "--", ":")[j % 3]}
        reg = [max(t["regret_pct"], 1e-6) for t in r["test"]]
        ax[0].plot(range(len(reg)), reg, label=m, **style)
        ax[1].plot(range(len(r["test"])), [t["cost_err_pct"] for t in r["test"]], label=m,
                   **style)
    ax[0].set(xlabel="epoch", ylabel="test regret (%)", yscale="log",
              title="AC-OPF case57: test regret")
    ax[1].set(xlabel="epoch", ylabel="‖ĉ−c‖₁/‖c‖₁ (%)", title="cost-coefficient error")
    ax[0].legend(fontsize=8)
    return save_figure(fig, cfg, "acopf_learning", "AC-OPF case57: test regret and "
                       "cost-coefficient error per epoch (epoch 0 = initial weights).")
