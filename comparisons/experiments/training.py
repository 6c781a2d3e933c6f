"""The seeded minibatch training loop, the mean ± std summary and the learning-curve plot that
every learning suite shares (same data, seeds, predictor and minibatch order per method)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import Config
from ..report import Figure, save_figure

__all__ = ["Run", "mlp", "train", "mean_std", "summary_rows", "plot_curves"]

#: markers cycled over methods so that overlapping curves stay visible
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


@dataclass
class Run:
    """One method trained with one seed: test metric before training and after each epoch,
    seconds per epoch (training only) and any note (e.g. unconverged solves)."""

    metric: list[float] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def mlp(sizes: list[int], batch_norm: bool, seed: int, dtype: torch.dtype,
        device: torch.device) -> torch.nn.Sequential:
    """ReLU MLP (BatchNorm after each hidden linear layer when ``batch_norm``), initialised
    from ``seed`` so every method starts from the same weights."""
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            if batch_norm:
                mods.append(torch.nn.BatchNorm1d(sizes[i + 1]))
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods).to(device, dtype)


def train(params: list[Tensor] | Callable[[], list[Tensor]], loss_fn: Callable[[Tensor], Tensor],
          evaluate: Callable[[], float], n_train: int, epochs: int, batch: int, lr: float,
          seed: int, modules: list[torch.nn.Module] = (), device: torch.device | None = None,
          on_epoch: Callable[[int], None] | None = None) -> Run:
    """Adam on ``loss_fn(idx)`` over shuffled minibatches (order from ``seed``: the same for
    every method); ``evaluate()`` (modules in eval mode, no grad) before training and after
    each epoch."""
    ps = params() if callable(params) else params
    opt = torch.optim.Adam(ps, lr=lr)
    run = Run()

    def ev() -> float:
        for m in modules:
            m.eval()
        with torch.no_grad():
            v = float(evaluate())
        for m in modules:
            m.train()
        return v

    run.metric.append(ev())
    g = torch.Generator().manual_seed(10_000 + seed)
    for ep in range(epochs):
        perm = torch.randperm(n_train, generator=g)
        t0 = time.perf_counter()
        for s in range(0, n_train, batch):
            idx = perm[s:s + batch]
            if idx.numel() < 2 and modules:  # BatchNorm needs two samples
                continue
            loss = loss_fn(idx.to(device) if device is not None else idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        run.epoch_s.append(time.perf_counter() - t0)
        run.metric.append(ev())
        if on_epoch is not None:
            on_epoch(ep)
    return run


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; std 0 for one value."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def fmt_pm(m: float, s: float, digits: int = 4) -> str:
    """``m ± s`` with a fixed number of significant digits."""
    if math.isnan(m):
        return "—"
    return f"{m:.{digits}g} ± {s:.2g}"


def summary_rows(runs: dict[str, list[Run]], base: str | None, digits: int = 4) -> list[tuple]:
    """Rows (method, final metric mean ± std, best, median s/epoch, ÷ base) per method."""
    rows = []
    base_t = (statistics.median([t for r in runs[base] for t in r.epoch_s])
              if base in runs and runs[base][0].epoch_s else math.nan)
    for name, rs in runs.items():
        m, s = mean_std([r.metric[-1] for r in rs])
        ts = [t for r in rs for t in r.epoch_s]
        t = statistics.median(ts) if ts else math.nan
        rows.append((name, fmt_pm(m, s, digits), len(rs),
                     "—" if math.isnan(t) else f"{t:.3g}",
                     "—" if math.isnan(t) or math.isnan(base_t) else f"{t / base_t:.3g}×"))
    return rows


def plot_curves(panels: dict[str, dict[str, list[Run]]], cfg: Config, name: str, ylabel: str,
                caption: str, log_y: bool = False) -> Figure:
    """One panel per key of ``panels``: mean metric per epoch (± std band) of every method,
    each with its own marker and line style."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for i, (meth, rs) in enumerate(runs.items()):
            L = min(len(r.metric) for r in rs)
            arr = torch.tensor([r.metric[:L] for r in rs], dtype=torch.float64)
            mu = arr.mean(0)
            sd = arr.std(0, unbiased=False) if arr.shape[0] > 1 else torch.zeros_like(mu)
            ep = list(range(L))
            ax.plot(ep, mu.tolist(), marker=MARKERS[i % len(MARKERS)], ms=5, mfc="none",
                    ls=("-", "--", ":", "-.")[i % 4], color=f"C{i}", label=meth)
            ax.fill_between(ep, (mu - sd).tolist(), (mu + sd).tolist(), color=f"C{i}",
                            alpha=0.12)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, cfg, name, caption)
