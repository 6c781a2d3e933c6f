"""Suite 4 — Theseus backward modes against the folded layer on nonlinear least squares.

Problems (float64, Gauss-Newton forward run to machine precision, per-instance data, batch B):

* **zero-residual exp fit** — ``y = exp(a·x) + b`` at 20 points, data exact: every correct
  method agrees (``JᵀJ`` is the full Hessian at a zero residual);
* **noisy exp fit** — the same with noise σ = 0.3: the full Hessian has ``Σ rᵢ∇²rᵢ ≠ 0``;
* **noisy SE2 registration** — a pose ``T ∈ SE2`` with ``T·pᵢ ≈ qᵢ`` for 8 points, targets
  with noise σ = 0.3.

The loss is a fixed random linear function of the solution; the gradient is taken with respect
to the data (``y`` or the targets ``q``). Truth: central finite differences of the same
Gauss-Newton solve (step 1e-6, all perturbations solved as one batch). Methods: ``th.TheseusLayer``
with ``backward_mode`` ``unroll``, ``implicit``, ``truncated`` (5 iterations) and ``dlm``;
``adapters.theseus.FoldedTheseusLayer`` with its default step (Gauss-Newton, GMRES backward)
and with ``step="newton"``. Baseline of the time ratios: Theseus ``implicit``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config
from ..measure import Stopwatch, time_phases
from ..progress import bar
from ..report import SuiteResult, fmt_err, fmt_ms, fmt_ratio, save_figure, table

TITLE = "4. Theseus: backward modes vs the folded layer"
BASELINE = "theseus implicit"
FD_STEP = 1e-6
EXP_N = 20
REG_N = 8
# Theseus stops on the decrease of the objective, which near a non-zero-residual optimum is
# quadratic in the step: a 1e-15 tolerance stops at ‖δx‖ ≈ 1e-8. Both solves therefore run a
# fixed number of Gauss-Newton iterations (tolerances 0), enough for machine precision here.
METHOD_OPT = {"max_iterations": 25, "step_size": 1.0, "abs_err_tolerance": 0.0,
              "rel_err_tolerance": 0.0}
FD_OPT = {**METHOD_OPT, "max_iterations": 100}


def _theseus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Couldn't import skparse.cholmod" notice
        import theseus as th
    return th


@dataclass
class Problem:
    """A Theseus problem: ``make()`` → a fresh optimizer; data tensor ``wrt`` (B, m)."""

    name: str
    make: Callable[..., object]  # make(**optimizer_settings) -> a fresh GaussNewton
    wrt_name: str
    wrt: torch.Tensor
    init: Callable[[int], dict]
    loss: Callable[[dict], torch.Tensor]  # per-instance loss of the solution values
    tangent_dim: int


def _exp_problem(cfg: Config, B: int, noise: float, name: str) -> Problem:
    th = _theseus()
    dt = cfg.dtype
    gen = cfg.generator(31 if noise == 0 else 32)
    x = torch.linspace(0.0, 1.0, EXP_N, dtype=torch.float64)[None]
    a_true = 1.0 + 0.5 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    y = torch.exp(a_true * x) + 0.5 + noise * torch.randn(B, EXP_N, generator=gen,
                                                          dtype=torch.float64)
    w = torch.randn(1, 2, generator=gen, dtype=torch.float64).to(cfg.device, dt)
    xd = x.to(cfg.device, dt)

    def make(**settings):
        a, b = th.Vector(1, name="a", dtype=dt), th.Vector(1, name="b", dtype=dt)
        X = th.Variable(xd.clone(), name="x")
        Y = th.Variable(torch.zeros(1, EXP_N, dtype=dt, device=cfg.device), name="y")

        def err(optim_vars, aux_vars):
            a, b = optim_vars
            xv, yv = aux_vars
            return torch.exp(a.tensor * xv.tensor) + b.tensor - yv.tensor

        cf = th.AutoDiffCostFunction([a, b], err, EXP_N, aux_vars=[X, Y], name="fit",
                                     cost_weight=th.ScaleCostWeight(
                                         torch.ones(1, 1, dtype=dt, device=cfg.device)))
        obj = th.Objective(dtype=dt)
        obj.add(cf)
        return th.GaussNewton(obj, **{**METHOD_OPT, **settings})

    def init(n: int) -> dict:
        return {"a": torch.ones(n, 1, dtype=dt, device=cfg.device),
                "b": torch.zeros(n, 1, dtype=dt, device=cfg.device)}

    def loss(values: dict) -> torch.Tensor:
        return (torch.cat([values["a"], values["b"]], dim=1) * w).sum(1)

    return Problem(name, make, "y", y.to(cfg.device, dt), init, loss, 2)


def _se2_problem(cfg: Config, B: int, noise: float) -> Problem:
    th = _theseus()
    dt = cfg.dtype
    gen = cfg.generator(33)
    P = torch.randn(1, REG_N, 2, generator=gen, dtype=torch.float64)
    tangent = torch.tensor([[0.3, -0.2, 0.4]], dtype=torch.float64) \
        + 0.2 * torch.randn(B, 3, generator=gen, dtype=torch.float64)
    T = th.SE2.exp_map(tangent).tensor  # (B, 4): x, y, cos, sin

    def transform(Tt: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        c, s = Tt[:, 2:3], Tt[:, 3:4]
        return torch.stack([c * pts[..., 0] - s * pts[..., 1] + Tt[:, 0:1],
                            s * pts[..., 0] + c * pts[..., 1] + Tt[:, 1:2]], dim=-1)

    q = transform(T, P.expand(B, -1, -1)) + noise * torch.randn(B, REG_N, 2, generator=gen,
                                                               dtype=torch.float64)
    q = q.reshape(B, 2 * REG_N)
    w = torch.randn(1, 4, generator=gen, dtype=torch.float64).to(cfg.device, dt)
    Pd = P.reshape(1, -1).to(cfg.device, dt)

    def make(**settings):
        pose = th.SE2(name="pose", dtype=dt)
        Pv = th.Variable(Pd.clone(), name="p")
        Qv = th.Variable(torch.zeros(1, 2 * REG_N, dtype=dt, device=cfg.device), name="q")

        def err(optim_vars, aux_vars):
            Tt = optim_vars[0].tensor
            pts = aux_vars[0].tensor.reshape(-1, REG_N, 2)
            return transform(Tt, pts).reshape(Tt.shape[0], -1) - aux_vars[1].tensor

        cf = th.AutoDiffCostFunction([pose], err, 2 * REG_N, aux_vars=[Pv, Qv], name="reg",
                                     cost_weight=th.ScaleCostWeight(
                                         torch.ones(1, 1, dtype=dt, device=cfg.device)))
        obj = th.Objective(dtype=dt)
        obj.add(cf)
        return th.GaussNewton(obj, **{**METHOD_OPT, **settings})

    identity = th.SE2(dtype=dt).tensor.to(cfg.device)

    def init(n: int) -> dict:
        return {"pose": identity.expand(n, -1).clone()}

    def loss(values: dict) -> torch.Tensor:
        return (values["pose"] * w).sum(1)

    return Problem("noisy SE2 registration (σ=0.3)", make, "q", q.to(cfg.device, dt), init,
                   loss, 3)


def _solve_loss(prob: Problem, layer, data: torch.Tensor) -> torch.Tensor:
    values, _ = layer({prob.wrt_name: data, **prob.init(data.shape[0])})
    return prob.loss(values)


def _fd_grad(prob: Problem) -> torch.Tensor:
    """Central differences of the per-instance loss w.r.t. every data entry (one batched solve)."""
    th = _theseus()
    y = prob.wrt
    layer = th.TheseusLayer(prob.make(**FD_OPT)).to(y.device)
    B, m = y.shape
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    h = FD_STEP * (1 + y.abs())  # (B, m)
    plus = y[:, None, :] + h[:, :, None] * eye[None]  # (B, m, m): row j perturbs entry j
    minus = y[:, None, :] - h[:, :, None] * eye[None]
    data = torch.cat([plus.reshape(B * m, m), minus.reshape(B * m, m)])
    with torch.no_grad():
        f = _solve_loss(prob, layer, data)
    fp_, fm = f[: B * m].reshape(B, m), f[B * m:].reshape(B, m)
    return (fp_ - fm) / (2 * h)


def _methods(th) -> dict[str, tuple[Callable, dict]]:
    """name → (layer factory from an optimizer, optimizer_kwargs)."""
    from adapters.theseus import FoldedTheseusLayer

    return {
        "theseus unroll": (th.TheseusLayer, {"backward_mode": "unroll"}),
        "theseus implicit": (th.TheseusLayer, {"backward_mode": "implicit"}),
        "theseus truncated (5)": (th.TheseusLayer, {"backward_mode": "truncated",
                                                    "backward_num_iterations": 5}),
        "theseus dlm": (th.TheseusLayer, {"backward_mode": "dlm"}),
        "folded (GN step, gmres)": (lambda opt: FoldedTheseusLayer(opt), {}),
        "folded (newton step)": (lambda opt: FoldedTheseusLayer(opt, step="newton"), {}),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-300)).max())


def run(cfg: Config) -> SuiteResult:
    """Gradient error vs finite differences and forward/backward times for each method."""
    th = _theseus()
    B = cfg.pick(tiny=2, quick=8, full=16)
    problems = [_exp_problem(cfg, B, 0.0, "zero-residual exp fit"),
                _exp_problem(cfg, B, 0.3, "noisy exp fit (σ=0.3)"),
                _se2_problem(cfg, B, 0.3)]
    res = SuiteResult("theseus", TITLE)
    try:
        methods = _methods(th)
    except ImportError as e:
        res.errors.append(f"adapters.theseus.FoldedTheseusLayer is not importable: {e}")
        methods = {k: v for k, v in _methods_theseus_only(th).items()}
    table_rows: dict[str, dict[str, dict]] = {}
    work = [(p, name) for p in problems for name in methods]
    fd_cache: dict[str, torch.Tensor] = {}
    for prob, name in bar(work, cfg, "theseus"):
        if prob.name not in fd_cache:
            fd_cache[prob.name] = _fd_grad(prob)
        fd = fd_cache[prob.name]
        factory, kwargs = methods[name]
        entry: dict = {}
        try:
            layer = factory(prob.make()).to(cfg.device)

            def once(sw: Stopwatch, layer=layer, kwargs=kwargs, prob=prob) -> torch.Tensor:
                y = prob.wrt.detach().clone().requires_grad_(True)
                sw.start()
                values, _ = layer({prob.wrt_name: y, **prob.init(y.shape[0])},
                                  optimizer_kwargs=dict(kwargs))
                loss = prob.loss(values).sum()
                sw.lap("forward")
                loss.backward()
                sw.lap("backward")
                return y.grad

            grad = once(Stopwatch(cfg.device))
            entry["error"] = _rel(grad, fd)
            timing = time_phases(lambda sw: once(sw), cfg.device, repeats=cfg.repeats,
                                 warmup=cfg.warmup)
            entry["forward_s"] = timing.median("forward")
            entry["backward_s"] = timing.median("backward")
            entry["total_s"] = timing.median("total")
            info = getattr(layer, "last_info", None)
            if info is not None and info.backward_iterations is not None:
                entry["backward_iterations"] = int(info.backward_iterations.max())
        except Exception as e:  # noqa: BLE001 - one method failing must not stop the suite
            entry["failed"] = f"{type(e).__name__}: {e}"
            res.errors.append(f"{name} on {prob.name}: {entry['failed']}")
        table_rows.setdefault(prob.name, {})[name] = entry
    res.data = {"batch": B, "results": table_rows,
                "fd_step": FD_STEP, "optimizer": METHOD_OPT,
                "fd_optimizer": FD_OPT}
    res.markdown = _markdown(table_rows, list(methods), B, problems)
    res.figures.append(_plot(table_rows, list(methods), cfg))
    noisy = table_rows.get("noisy exp fit (σ=0.3)", {})
    imp, fold = noisy.get(BASELINE, {}), noisy.get("folded (GN step, gmres)", {})
    if "error" in imp and "error" in fold:
        res.headline.append(
            f"noisy exp fit: gradient error Theseus implicit {fmt_err(imp['error'])} vs folded "
            f"{fmt_err(fold['error'])}; folded backward "
            f"{fmt_ratio(fold['backward_s'] / imp['backward_s'])} implicit's time")
    return res


def _methods_theseus_only(th) -> dict[str, tuple[Callable, dict]]:
    return {
        "theseus unroll": (th.TheseusLayer, {"backward_mode": "unroll"}),
        "theseus implicit": (th.TheseusLayer, {"backward_mode": "implicit"}),
        "theseus truncated (5)": (th.TheseusLayer, {"backward_mode": "truncated",
                                                    "backward_num_iterations": 5}),
        "theseus dlm": (th.TheseusLayer, {"backward_mode": "dlm"}),
    }


def _markdown(rows: dict, names: list[str], B: int, problems: list[Problem]) -> str:
    md = [__doc__.split("\n\n", 1)[1].strip(), "",
          f"Batch B = {B} instances per problem (per-instance data); error = worst instance's "
          "relative error of ∂loss/∂data against finite differences.", ""]
    for prob in problems:
        r = rows.get(prob.name, {})
        base = r.get(BASELINE, {})
        out = []
        for name in names:
            e = r.get(name, {})
            if "failed" in e:
                out.append((name, "failed: " + e["failed"][:120], "", "", "", ""))
                continue
            if "error" not in e:
                continue
            ratio = (e["backward_s"] / base["backward_s"]) if "backward_s" in base else None
            its = e.get("backward_iterations")
            out.append((name, fmt_err(e["error"]), fmt_ms(e["forward_s"]),
                        fmt_ms(e["backward_s"]), fmt_ratio(ratio),
                        "" if its is None else str(its)))
        md += [f"**{prob.name}** (tangent dimension {prob.tangent_dim}, gradient w.r.t. "
               f"`{prob.wrt_name}` {tuple(prob.wrt.shape)})", "",
               table(["method", "gradient error vs FD", "forward ms", "backward ms",
                      f"backward ÷ {BASELINE}", "folded backward iterations"], out)]
    md.append(f"Every method's forward runs {METHOD_OPT['max_iterations']} Gauss-Newton "
              "iterations with Theseus's tolerances set to 0 (its objective-decrease test "
              "would stop at ‖δx‖ ≈ 1e-8 on non-zero residuals); the finite differences use "
              f"{FD_OPT['max_iterations']} (central, step 1e-6·(1+|data|), float64) and are "
              "accurate to about 1e-9: errors below that are at the truth's floor.")
    return "\n".join(md)


def _plot(rows: dict, names: list[str], cfg: Config):
    import matplotlib.pyplot as plt

    probs = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        errs = [max(rows[p].get(name, {}).get("error", math.nan), 1e-16) for p in probs]
        bwd = [rows[p].get(name, {}).get("backward_s", math.nan) * 1e3 for p in probs]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(probs))]
        axes[0].bar(xs, errs, width, label=name, color=f"C{i}")
        axes[1].bar(xs, bwd, width, label=name, color=f"C{i}")
    for ax, lab in ((axes[0], "gradient error vs FD (relative)"), (axes[1], "backward ms")):
        ax.set_yscale("log")
        ax.set_xticks(range(len(probs)))
        ax.set_xticklabels(probs, fontsize=8)
        ax.set_ylabel(lab)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].axhline(1e-9, color="k", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, cfg, "theseus", "Theseus modes vs FoldedTheseusLayer: gradient "
                       "error against finite differences (dotted: FD accuracy) and backward "
                       "time.")
