"""Learning the generator costs of the AC-OPF from temperatures: data split, the cost MLP, the
decision layer (Ipopt forward, folded SQP backward) and the training / evaluation loops."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

import fold_plugins as fp

from ..experiments.training import mlp as shared_mlp
from .case import parse_matpower, pglib_path
from .instances import ACOPFData, generate
from .ipopt import IpoptACOPF
from .network import Network, TorchOps
from .step import ACOPFFunctions, identify_and_polish, kkt_matrix, make_step, truncated_solver

__all__ = ["Setup", "CostMLP", "build", "train", "evaluate", "grad_check", "METHODS"]

CASE = "pglib_opf_case57_ieee"
#: the authors' step configuration: step length α and Hessian shift (H + reg·I)
ALPHA, REG = 0.01, 1.0
#: method name → backward of the decision layer (None: two-stage, no layer)
METHODS = {"folded SQP (GMRES)": "gmres", "one-iteration truncation": "truncated",
           "two-stage (MSE)": None}
_OPS = TorchOps()


@dataclass
class Setup:
    """Network, solvers and the instances (features scaled by 1/100)."""

    net: Network
    fns: ACOPFFunctions
    ipopt: IpoptACOPF
    data: ACOPFData
    train: np.ndarray
    test: np.ndarray
    scale: Tensor = field(default_factory=lambda: torch.ones(21, dtype=torch.float64))

    def x(self, i: int) -> Tensor:
        return torch.as_tensor(self.data.feat[i] / 100.0).unsqueeze(0)

    def c(self, i: int) -> Tensor:
        return torch.as_tensor(self.data.cost[i]).unsqueeze(0)


def build(n: int, n_train: int, seed: int = 0, tol: float = 1e-8) -> Setup:
    """``n`` instances (Ipopt ground truth), the first ``n_train`` for training."""
    net = Network.from_case(parse_matpower(pglib_path(CASE)))
    ipopt = IpoptACOPF(net, tol=tol)
    data = generate(net, n, seed, ipopt)
    ng = net.ngen
    # typical magnitudes: c₂ (none in the case: 1e-2 $/MW²h), c₁ (mean of the case's), c₀ ($/h)
    scale = torch.cat([torch.full((ng,), 1e-2), torch.full((ng,), float(
        net.cost[1][net.cost[1] > 0].mean())), torch.full((ng,), 1.0)]).double()
    idx = np.arange(n)
    return Setup(net, ACOPFFunctions(net), ipopt, data, idx[:n_train], idx[n_train:], scale)


class CostMLP(nn.Module):
    """2→32→32→32→32→21, ReLU hidden layers, weights from ``seed``; output
    ``scale ⊙ softplus(·)`` (positive costs; the authors' output ReLU can return all-zero costs,
    for which the dispatch is not unique)."""

    def __init__(self, scale: Tensor, seed: int) -> None:
        super().__init__()
        self.body = shared_mlp([2, 32, 32, 32, 32, 21], False, seed, torch.float64,
                               torch.device("cpu"))
        self.register_buffer("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * nn.functional.softplus(self.body(x))


def _tensors(*arrays: np.ndarray) -> tuple[Tensor, ...]:
    """Each array as a (1, k) float64 tensor."""
    return tuple(torch.as_tensor(a).unsqueeze(0) for a in arrays)


def true_cost(setup: Setup, y: Tensor, i: int) -> Tensor:
    """The instance's true generation cost ($/h) of dispatch ``y`` (B, n)."""
    return setup.net.generation_cost(y, setup.c(i), _OPS).sum(1)


def decision(setup: Setup, c_hat: Tensor, i: int, backward: str | None) -> Tensor:
    """``y*(ĉ)`` (1, n) by Ipopt; with ``backward`` it is differentiable in ``ĉ`` by ``fp.fold``
    of the SQP step (α = 0.01, ``H + I``): ``"gmres"`` (the full folded solve) or
    ``"truncated"`` (the original code's one LFPI iteration). Ipopt's point is polished by
    Newton steps on the KKT system of its active set (:func:`identify_and_polish`) to a
    residual ≤ 1e-11."""
    d = setup.data
    sol = setup.ipopt.solve(c_hat.detach().numpy().ravel(), d.pd[i], d.qd[i], y0=d.y[i])
    if not sol.success:
        raise RuntimeError(f"Ipopt failed on instance {i} with predicted costs: {sol.status}")
    y, lam, nu = _tensors(sol.y, sol.lam, sol.nu)
    if backward is None or not c_hat.requires_grad:
        return y
    pd, qd = _tensors(d.pd[i], d.qd[i])
    (y, lam, nu), A, res = identify_and_polish(setup.fns, y, lam, nu, c_hat.detach(), pd, qd)
    if float(res.max()) > 1e-9:
        raise RuntimeError(f"instance {i}: KKT residual {float(res.max()):.1e} after polishing "
                           "(active set not identified)")
    K = kkt_matrix(setup.fns, y, lam, nu, c_hat.detach(), pd, qd, A, reg=REG)
    step = make_step(setup.fns, A, K, alpha=ALPHA)
    solver = truncated_solver(1) if backward == "truncated" else "gmres"
    ys, _, _ = fp.fold(step, (y, lam, nu), c_hat, pd, qd, solver=solver, tol=1e-10)
    return ys


def evaluate(setup: Setup, model: nn.Module, idx: np.ndarray) -> dict[str, float]:
    """Mean relative regret (%), max equality / inequality violation (p.u.) of the decisions,
    and mean relative cost-coefficient error ‖ĉ − c‖₁/‖c‖₁ (%) over ``idx``."""
    reg, eq, ineq, cerr = [], [], [], []
    d = setup.data
    with torch.no_grad():
        for i in idx:
            c_hat = model(setup.x(i))
            y = decision(setup, c_hat, i, None)
            pd, qd = _tensors(d.pd[i], d.qd[i])
            reg.append(100 * (float(true_cost(setup, y, i)) - d.obj[i]) / d.obj[i])
            eq.append(float(setup.fns.h(y, pd, qd).abs().max()))
            ineq.append(float(setup.fns.g(y).clamp_min(0).max()))
            c = setup.c(i)
            cerr.append(100 * float((c_hat - c).abs().sum() / c.abs().sum()))
    return {"regret_pct": float(np.mean(reg)), "eq_viol": float(np.max(eq)),
            "ineq_viol": float(np.max(ineq)), "cost_err_pct": float(np.mean(cerr))}


def train(setup: Setup, method: str, epochs: int, lr: float, seed: int,
          progress=lambda it, desc: it) -> dict:
    """Train a fresh :class:`CostMLP` (same initial weights for every method: ``seed``) with
    Adam, batch 1; regret through the layer, or MSE on ``c/scale`` for the two-stage method.

    Returns:
        per-epoch ``test`` metrics (index 0: before training), ``epoch_s`` (training time per
        epoch), ``train_regret_pct`` per epoch, ``backward_unconverged`` (folded solves whose
        GMRES did not reach its tolerance).
    """
    backward = METHODS[method]
    model = CostMLP(setup.scale, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    out: dict = {"test": [evaluate(setup, model, setup.test)], "epoch_s": [],
                 "train_regret_pct": [], "backward_unconverged": 0, "skipped": 0}
    order = np.random.default_rng(seed).permutation
    for _ in progress(range(epochs), method):
        t0, regs = time.perf_counter(), []
        for i in setup.train[order(len(setup.train))]:
            c_hat = model(setup.x(i))
            if backward is None:
                loss = ((c_hat - setup.c(i)) / setup.scale).pow(2).mean()
            else:
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", fp.FoldConvergenceWarning)
                        y = decision(setup, c_hat, i, backward)
                        obj = float(setup.data.obj[i])
                        loss = (true_cost(setup, y, i) - obj).sum() / obj
                        regs.append(100 * float(loss))
                        opt.zero_grad()
                        loss.backward()
                    bad = [str(w.message) for w in caught
                           if issubclass(w.category, fp.FoldConvergenceWarning)]
                    if backward == "gmres" and bad:
                        out["backward_unconverged"] += 1
                        out.setdefault("warnings", []).append(bad[0])
                except RuntimeError:
                    out["skipped"] += 1
                    continue
                opt.step()
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
        out["epoch_s"].append(time.perf_counter() - t0)
        out["train_regret_pct"].append(float(np.mean(regs)) if regs else float("nan"))
        out["test"].append(evaluate(setup, model, setup.test))
    return out


def grad_check(setup: Setup, i: int, c: Tensor, seed: int = 0,
               eps: float = 1e-5) -> dict[str, float]:
    """Directional derivative of the true cost of ``y*(ĉ)`` at ``ĉ = c`` (1, 21): central
    differences of the Ipopt solution map (each solve polished to KKT 1e-11) against the folded
    and the truncated backward; relative errors (absolute values kept: where the map is locally
    constant the derivative is ~0 and only the absolute numbers mean anything)."""
    d, fns = setup.data, setup.fns
    pd, qd = _tensors(d.pd[i], d.qd[i])
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, c.shape[1], generator=gen, dtype=torch.float64) * c

    def value(cc: Tensor) -> float:
        s = setup.ipopt.solve(cc.numpy().ravel(), d.pd[i], d.qd[i], y0=d.y[i])
        y, lam, nu = _tensors(s.y, s.lam, s.nu)
        (y, lam, nu), _, _ = identify_and_polish(fns, y, lam, nu, cc, pd, qd)
        return float(true_cost(setup, y, i))

    fd = (value(c + eps * u) - value(c - eps * u)) / (2 * eps)
    out = {"fd": fd}
    for name, backward in (("folded", "gmres"), ("truncated", "truncated")):
        cc = c.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fp.FoldConvergenceWarning)
            y = decision(setup, cc, i, backward)
            (g,) = torch.autograd.grad(true_cost(setup, y, i).sum(), cc)
        out[name + "_value"] = float((g * u).sum())
        out[name] = abs(out[name + "_value"] - fd) / max(abs(fd), 1e-300)
    return out
