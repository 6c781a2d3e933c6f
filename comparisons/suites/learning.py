"""Suite 5 — decision-focused learning: a Markowitz portfolio with returns predicted from features.

Each sample has features ``z ∈ R^p`` and asset returns ``r = μ(z) + ε`` with ``μ`` a
degree-4 polynomial of a linear map of ``z`` (so a linear predictor is misspecified). A
linear model predicts ``μ̂ = Wz + b``; the decision is the mean–variance portfolio

    x*(μ̂) = argmin_{x ≥ 0, 1ᵀx = 1}  −μ̂ᵀx + (γ/2) xᵀΣx

and training minimises the realised objective ``f(x*(μ̂), r) = −rᵀx* + (γ/2) x*ᵀΣx*``
through the optimisation layer. Test regret is ``Σ f(x*(μ̂), μ) − f(x*(μ), μ)`` over the
test set, divided by ``Σ |f(x*(μ), μ)|`` (true expected returns ``μ``).

Layers compared (same data, initial weights, minibatch order and Adam settings):

* **folded** — FISTA forward (fixed-point residual 1e-10) + ``fp.fold`` of one projected-
  gradient step on the simplex, GMRES backward;
* **cvxpylayers** — ``CvxpyLayer`` of the same problem (diffcp/SCS defaults, one job; SCS's
  default tolerances are far looser than the folded forward's 1e-10, so each time ratio is
  quoted with the layer's measured gradient error); with ``--full`` also
  **cvxpylayers (SCS, eps 1e-9)** (``eps_abs = eps_rel = 1e-9``) when the default run's
  training time leaves room for it;
* **two-stage (MSE)** — the same model fitted to ``r`` by least squares, no layer (context).

Test decisions of every model are computed with the same accurate FISTA solver.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings

import torch

import fold_plugins as fp

from ..config import Config
from ..problems import QP, exact_solution, solve_qp, vjp_truth
from ..progress import bar
from ..report import SuiteResult, fmt_err, fmt_ms, fmt_ratio, save_figure, table

TITLE = "5. Decision-focused learning: Markowitz portfolio"
#: SCS settings of the tight cvxpylayers run (``--full``)
SCS_TIGHT = {"eps_abs": 1e-9, "eps_rel": 1e-9}
#: the tight run is made only when the default cvxpylayers training took at most this long
TIGHT_BUDGET_S = 600.0
TIGHT = "cvxpylayers (SCS, eps 1e-9)"


def _data(cfg: Config, n: int, p: int, N: int, seed: int):
    """Features, true expected returns and noisy realised returns."""
    gen = cfg.generator(seed)
    Bm = torch.bernoulli(torch.full((n, p), 0.5, dtype=torch.float64), generator=gen)

    def mu_of(z: torch.Tensor) -> torch.Tensor:
        base = ((z @ Bm.T) / math.sqrt(p) + 3.0) ** 4 / 3.5 ** 4
        return 0.05 * base

    z = torch.randn(N, p, generator=gen, dtype=torch.float64)
    mu = mu_of(z)
    r = mu + 0.02 * torch.randn(N, n, generator=gen, dtype=torch.float64)
    return (z.to(cfg.device, cfg.dtype), mu.to(cfg.device, cfg.dtype),
            r.to(cfg.device, cfg.dtype))


def _risk(cfg: Config, n: int, seed: int) -> torch.Tensor:
    gen = cfg.generator(seed)
    F = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    Sigma = 0.01 * (F @ F.T / 4 + torch.diag(0.5 + torch.rand(n, generator=gen,
                                                                dtype=torch.float64)))
    return Sigma.to(cfg.device, cfg.dtype)


class Portfolio:
    """The decision problem as a simplex QP: ``P = γΣ``, ``q = −μ̂``."""

    def __init__(self, Sigma: torch.Tensor, gamma: float):
        self.Sigma = Sigma
        self.gamma = gamma
        P = gamma * Sigma
        L = float(torch.linalg.eigvalsh(P).max())
        self.qp = QP("simplex", P, Sigma.new_zeros(1, Sigma.shape[0]), 1.0 / L)
        # FoldInfo of every folded call since the last reset (backward fields filled later)
        self.infos: list[fp.FoldInfo] = []

    def unconverged_backwards(self) -> tuple[int, int]:
        """(folded backward solves that did not converge on every instance, solves run)."""
        ran = [i for i in self.infos if i.backward_converged is not None]
        return sum(not bool(i.backward_converged.all()) for i in ran), len(ran)

    def solve(self, mu_hat: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
        x, _, _ = solve_qp(self.qp, -mu_hat.detach(), tol=tol)
        return x

    def folded(self, mu_hat: torch.Tensor) -> torch.Tensor:
        xs = self.solve(mu_hat)
        x, info = fp.fold(self.qp.step, xs, -mu_hat, solver="gmres", tol=1e-10,
                          return_info=True)
        self.infos.append(info)
        return x

    def objective(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``−rᵀx + (γ/2)xᵀΣx`` per row."""
        return -(r * x).sum(-1) + 0.5 * self.gamma * ((x @ self.Sigma) * x).sum(-1)


def _cvxpy_layer(port: Portfolio, solver_args: dict | None = None):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    n = port.Sigma.shape[0]
    L = torch.linalg.cholesky(port.Sigma.detach().cpu().double()).numpy()
    x = cp.Variable(n)
    mu = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(-mu @ x + 0.5 * port.gamma * cp.sum_squares(L.T @ x)),
                      [x >= 0, cp.sum(x) == 1])
    layer = CvxpyLayer(prob, parameters=[mu], variables=[x])
    args = {"n_jobs_forward": 1, "n_jobs_backward": 1, **(solver_args or {})}

    def call(mu_hat: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"__array__ implementation")
            (xl,) = layer(mu_hat.to("cpu", torch.float64), solver_args=args)
        return xl.to(mu_hat.device, mu_hat.dtype)
    return call


def _regret(port: Portfolio, model: torch.nn.Module, z: torch.Tensor, mu: torch.Tensor,
            x_opt: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = port.solve(model(z))
        f_hat = port.objective(x_hat, mu)
        f_opt = port.objective(x_opt, mu)
        return float((f_hat - f_opt).sum() / f_opt.abs().sum())


def _model(cfg: Config, p: int, n: int, r_mean: torch.Tensor) -> torch.nn.Module:
    """Linear predictor started near the data scale: small random weights, bias = mean return."""
    model = torch.nn.Linear(p, n).to(cfg.device, cfg.dtype)
    with torch.no_grad():
        model.weight.copy_(0.01 * cfg.randn(n, p, gen=cfg.generator(5)))
        model.bias.copy_(r_mean)
    return model


def _train(kind: str, cfg: Config, port: Portfolio, layer, data: dict, epochs: int,
           batch: int, lr: float) -> dict:
    z, r = data["z_train"], data["r_train"]
    model = _model(cfg, z.shape[1], r.shape[1], r.mean(0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    regret = [_regret(port, model, data["z_test"], data["mu_test"], data["x_opt_test"])]
    times, losses = [], []
    N = z.shape[0]
    for ep in bar(range(epochs), cfg, f"learning {kind}"):
        perm = torch.randperm(N, generator=cfg.generator(100 + ep)).to(z.device)
        t0 = time.perf_counter()
        tot = 0.0
        for s in range(0, N, batch):
            idx = perm[s:s + batch]
            mu_hat = model(z[idx])
            if kind == "two-stage (MSE)":
                loss = ((mu_hat - r[idx]) ** 2).mean()
            else:
                x = layer(mu_hat)
                loss = port.objective(x, r[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * idx.numel()
        if cfg.device.type == "cuda":
            torch.cuda.synchronize(cfg.device)
        times.append(time.perf_counter() - t0)
        losses.append(tot / N)
        regret.append(_regret(port, model, data["z_test"], data["mu_test"], data["x_opt_test"]))
    return {"regret": regret, "epoch_s": times, "loss": losses}


def _grad_check(cfg: Config, port: Portfolio, cvx, data: dict, batch: int,
                others: dict | None = None) -> dict:
    """∂loss/∂μ̂ on one minibatch at the initial model: folded, cvxpylayers (and ``others``:
    name → layer) vs the closed form; ``folded_backward_converged`` from its FoldInfo."""
    model = _model(cfg, data["z_train"].shape[1], data["r_train"].shape[1],
                   data["r_train"].mean(0))
    z, r = data["z_train"][:batch], data["r_train"][:batch]
    mu_hat = model(z).detach().requires_grad_(True)
    xs = exact_solution(port.qp, port.solve(mu_hat, tol=1e-13), -mu_hat.detach())
    # loss = mean_b f(x_b, r_b): ∂/∂x = (−r + γΣx)/B; then x*(q) with q = −μ̂
    g = (-r + port.gamma * xs @ port.Sigma) / z.shape[0]
    truth = -vjp_truth(port.qp, xs, g)
    out = {}
    port.infos.clear()
    layers = {"folded": port.folded, "cvxpylayers": cvx, **(others or {})}
    for name, layer in layers.items():
        if layer is None:
            continue
        x = layer(mu_hat)
        (gr,) = torch.autograd.grad(port.objective(x, r).mean(), mu_hat)
        # one relative error over the minibatch: at a vertex solution the true gradient is 0
        out[name] = float((gr - truth).norm() / truth.norm().clamp(min=1e-300))
    bad, ran = port.unconverged_backwards()
    out["folded_backward_converged"] = bool(ran > 0 and bad == 0)
    port.infos.clear()
    out["support"] = float((xs > 1e-9).sum(-1).to(torch.float64).mean())
    return out


def run(cfg: Config) -> SuiteResult:
    """Train with each layer, record regret per epoch and time per epoch."""
    n = cfg.pick(tiny=8, quick=20, full=50)
    p = 5
    N = cfg.pick(tiny=48, quick=256, full=1024)
    epochs = cfg.pick(tiny=2, quick=6, full=20)
    batch = cfg.pick(tiny=16, quick=32, full=32)
    gamma = 5.0
    lr = 0.003
    z, mu, r = _data(cfg, n, p, 2 * N, seed=21)
    port = Portfolio(_risk(cfg, n, seed=22), gamma)
    data = {"z_train": z[:N], "r_train": r[:N], "z_test": z[N:], "mu_test": mu[N:]}
    data["x_opt_test"] = port.solve(data["mu_test"])
    res = SuiteResult("learning", TITLE)
    cvx = tight = None
    try:
        cvx = _cvxpy_layer(port)
        if cfg.mode == "full":
            tight = _cvxpy_layer(port, SCS_TIGHT)
    except Exception as e:  # noqa: BLE001 - cvxpylayers missing/broken: folded still runs
        res.errors.append(f"cvxpylayers layer could not be built: {type(e).__name__}: {e}")
    runs: dict[str, dict] = {}
    notes: list[str] = []
    for kind, layer in (("folded", port.folded), ("cvxpylayers", cvx), (TIGHT, tight),
                        ("two-stage (MSE)", None)):
        if kind.startswith("cvxpylayers") and layer is None:
            continue
        if kind == TIGHT:
            spent = sum(runs.get("cvxpylayers", {}).get("epoch_s", [math.inf]))
            if spent > TIGHT_BUDGET_S:
                tight = None
                notes.append(f"{TIGHT} not run: the default cvxpylayers training took "
                             f"{spent:.0f} s > {TIGHT_BUDGET_S:.0f} s.")
                continue
        try:
            port.infos.clear()
            runs[kind] = _train(kind, cfg, port, layer, data, epochs, batch, lr)
            if kind == "folded":
                bad, ran = port.unconverged_backwards()
                runs[kind]["backward_unconverged"] = bad
                runs[kind]["backward_solves"] = ran
            port.infos.clear()
        except Exception as e:  # noqa: BLE001
            res.errors.append(f"training with {kind} failed: {type(e).__name__}: {e}")
    check: dict = {}
    if cvx is not None:
        try:
            check = _grad_check(cfg, port, cvx, data, batch,
                                others={TIGHT: tight} if tight is not None else None)
        except Exception as e:  # noqa: BLE001 - the training results are still written
            res.errors.append(f"gradient check failed: {type(e).__name__}: {e}")
    res.data = {"runs": runs, "grad_check": check, "n": n, "p": p, "N": N, "epochs": epochs,
                "batch": batch, "gamma": gamma, "lr": lr}
    try:
        if runs:
            res.figures.append(_plot(runs, cfg))
        res.markdown, res.headline = _markdown(runs, check, notes, n, p, N, batch, epochs,
                                               lr, gamma)
    except Exception as e:  # noqa: BLE001 - the measurements are kept in res.data
        res.errors.append(f"learning report could not be written: {type(e).__name__}: {e}")
    return res


def _markdown(runs: dict, check: dict, notes: list[str], n: int, p: int, N: int, batch: int,
              epochs: int, lr: float, gamma: float) -> tuple[str, list[str]]:
    """The section's text and headline from the measured runs and gradient check."""
    rows = []
    base = runs.get("folded")
    base_t = statistics.median(base["epoch_s"]) if base else math.nan
    bad = base.get("backward_unconverged", 0) if base else 0
    flag = {"folded": " ✗" if bad or check.get("folded_backward_converged") is False else ""}
    for kind, rr in runs.items():
        t = statistics.median(rr["epoch_s"])
        err = check.get(kind)
        rows.append((kind, fmt_ms(t) + flag.get(kind, ""),
                     fmt_ratio(t / base_t) if base else "—",
                     "—" if err is None else fmt_err(err) + flag.get(kind, ""),
                     f"{rr['regret'][0]:.4f}", f"{rr['regret'][-1]:.4f}",
                     f"{min(rr['regret']):.4f}"))
    md = [__doc__.split("\n\n", 1)[1].strip(), "",
          f"n = {n} assets, p = {p} features, {N} training and {N} test samples, minibatch "
          f"{batch}, {epochs} epochs, Adam lr {lr}, γ = {gamma}.", "",
          table(["layer", "time / epoch (ms, median)", "÷ folded",
                 "gradient error at start (vs KKT)", "test regret at start",
                 "after last epoch", "best"], rows)]
    if check:
        errs = ", ".join(f"{k} {fmt_err(v)}" for k, v in check.items()
                         if k not in ("support", "folded_backward_converged"))
        md.append(f"Gradient ∂loss/∂μ̂ on one minibatch at the initial weights against the "
                  f"closed-form KKT gradient (mean support {check['support']:.1f} assets): "
                  f"{errs} (relative, Frobenius norm over the minibatch).")
    if base and "backward_solves" in base:
        md.append("")
        md.append(f"Folded backward solves during training: {base['backward_solves']}, of "
                  f"which {bad} did not converge on every instance"
                  + (" (✗ in the table)." if bad else "."))
    md += [""] + notes if notes else []
    headline = []
    if base:
        parts = []
        for kind in ("cvxpylayers", TIGHT):
            if kind in runs:
                t = statistics.median(runs[kind]["epoch_s"])
                err = check.get(kind)
                parts.append(f"{kind} {fmt_ratio(t / base_t)}"
                             + ("" if err is None else f" at gradient error {fmt_err(err)}"))
        if parts:
            f_err = check.get("folded")
            regrets = ", ".join(f"{k} {runs[k]['regret'][-1]:.4f}"
                                for k in ("folded", "cvxpylayers", TIGHT) if k in runs)
            headline.append(
                "time per epoch ÷ folded: " + ", ".join(parts)
                + ("" if f_err is None else f" vs folded at {fmt_err(f_err)}{flag['folded']}")
                + f"; final test regret {regrets}")
    return "\n".join(md), headline


def _plot(runs: dict, cfg: Config):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (kind, rr) in enumerate(runs.items()):
        ep = list(range(len(rr["regret"])))
        axes[0].plot(ep, rr["regret"], "o-", ms=3, color=f"C{i}", label=kind)
        cum = [0.0]
        for t in rr["epoch_s"]:
            cum.append(cum[-1] + t)
        axes[1].plot(cum[1:], rr["regret"][1:], "o-", ms=3, color=f"C{i}", label=kind)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("normalised test regret")
    axes[0].set_title("test regret per epoch")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("cumulative training time, s")
    axes[1].set_title("test regret vs training time")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, cfg, "learning", "Markowitz decision-focused learning: test regret "
                       "per epoch and against training time.")
