"""The Theseus suite's problems (exp fits, SE2 registration, Point2 trilateration), their
finite-difference truth and the optimizer settings every method shares (suite 4,
:mod:`comparisons.suites.theseus`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config

FD_STEP = 1e-6
#: second finite-difference step: the two FD gradients' difference estimates the truth's error
#: (truncation grows as h², roundoff as 1/h: the difference bounds the worse of the two)
FD_STEP_CHECK = 1e-5
EXP_N = 20
REG_N = 8
#: beacons of the trilateration problem and the noise on their distances
TRI_BEACONS = 6
TRI_NOISE = 0.2
# Theseus stops on the decrease of the objective, which near a non-zero-residual optimum is
# quadratic in the step: a 1e-15 tolerance stops at ‖δx‖ ≈ 1e-8. Both solves therefore run a
# fixed number of Gauss-Newton iterations (tolerances 0), enough for machine precision here.
METHOD_OPT = {"max_iterations": 25, "step_size": 1.0, "abs_err_tolerance": 0.0,
              "rel_err_tolerance": 0.0}
FD_OPT = {**METHOD_OPT, "max_iterations": 100}
# Pose graph: Gauss-Newton from dead reckoning reaches its floor in 4-5 iterations (measured),
# so every method runs 10; the truth's solve runs 30 and is then polished by a Newton step.
POSE_OPT = {**METHOD_OPT, "max_iterations": 10}
POSE_TRUTH_OPT = {**METHOD_OPT, "max_iterations": 30}
POSE_NOISE = (0.1, 0.1, 0.05)  # tangent noise of each measurement: x, y, angle
POSE_NAME = "noisy SE2 pose graph (loop)"
# directional central differences that check the pose graph's IFT truth: directions per
# instance and step (a unit direction; 1e-3 balances the solve's ~1e-10 roundoff and h²)
PG_FD_DIRECTIONS = 4
PG_FD_STEP = 1e-3
#: the IFT truth fails its check (an error of the suite) above this directional FD error
PG_FD_GATE = 1e-5


def _theseus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Couldn't import skparse.cholmod" notice
        import theseus as th
    return th


@dataclass
class Problem:
    """A Theseus problem: ``make()`` → a fresh optimizer; data tensor ``wrt`` (B, m).

    ``to_inputs(data)`` maps a data tensor to the layer's ``input_tensors`` minus the initial
    values (default ``{wrt_name: data}``); ``init(n)`` gives initial values for ``n`` instances,
    or ``init_from(data)`` when they depend on the data (dead reckoning). ``truth(problem)``
    returns the exact gradient and its check figures (``None``: :func:`_fd_grad`, central
    differences of every data entry).
    """

    name: str
    make: Callable[..., object]  # make(**optimizer_settings) -> a fresh GaussNewton
    wrt_name: str
    wrt: torch.Tensor
    init: Callable[[int], dict]
    loss: Callable[[dict], torch.Tensor]  # per-instance loss of the solution values
    tangent_dim: int
    to_inputs: Callable[[torch.Tensor], dict] | None = None
    init_from: Callable[[torch.Tensor], dict] | None = None
    truth: Callable[[Problem], tuple[torch.Tensor, dict]] | None = None  # None: _fd_grad
    iterations: int = METHOD_OPT["max_iterations"]
    repeats: int | None = None  # timed repeats (None: the run's setting)

    def inputs(self, data: torch.Tensor) -> dict:
        """``input_tensors`` for a batch of data (one instance per row)."""
        aux = self.to_inputs(data) if self.to_inputs is not None else {self.wrt_name: data}
        init = self.init_from(data.detach()) if self.init_from is not None \
            else self.init(data.shape[0])
        return {**aux, **init}


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


def _trilateration_problem(cfg: Config, B: int) -> Problem:
    """A Point2 ``p`` from noisy distances ``d`` to :data:`TRI_BEACONS` beacons on a circle of
    radius 3 (shared): residuals ``‖p − aⱼ‖ − dⱼ``, gradient w.r.t. ``d``."""
    th = _theseus()
    dt = cfg.dtype
    gen = cfg.generator(36)
    ang = torch.arange(TRI_BEACONS, dtype=torch.float64) * (2 * math.pi / TRI_BEACONS)
    beacons = 3.0 * torch.stack([ang.cos(), ang.sin()], dim=1)  # (m, 2)
    p_true = 2 * torch.rand(B, 2, generator=gen, dtype=torch.float64) - 1
    d = (p_true[:, None] - beacons[None]).norm(dim=2) \
        + TRI_NOISE * torch.randn(B, TRI_BEACONS, generator=gen, dtype=torch.float64)
    w = torch.randn(1, 2, generator=gen, dtype=torch.float64).to(cfg.device, dt)
    beacons_d = beacons.reshape(1, -1).to(cfg.device, dt)

    def make(**settings):
        point = th.Point2(name="p", dtype=dt)
        A = th.Variable(beacons_d.clone(), name="beacons")
        D = th.Variable(torch.zeros(1, TRI_BEACONS, dtype=dt, device=cfg.device), name="d")

        def err(optim_vars, aux_vars):
            p = optim_vars[0].tensor
            a = aux_vars[0].tensor.reshape(-1, TRI_BEACONS, 2)
            return (p[:, None] - a).norm(dim=2) - aux_vars[1].tensor

        cf = th.AutoDiffCostFunction([point], err, TRI_BEACONS, aux_vars=[A, D], name="ranges",
                                     cost_weight=th.ScaleCostWeight(
                                         torch.ones(1, 1, dtype=dt, device=cfg.device)))
        obj = th.Objective(dtype=dt)
        obj.add(cf)
        return th.GaussNewton(obj, **{**METHOD_OPT, **settings})

    def init(n: int) -> dict:  # off the beacons' centre, where every ‖p − aⱼ‖ is equal
        return {"p": torch.full((n, 2), 0.1, dtype=dt, device=cfg.device)}

    def loss(values: dict) -> torch.Tensor:
        return (values["p"] * w).sum(1)

    return Problem(f"noisy Point2 trilateration (σ={TRI_NOISE:g})", make, "d",
                   d.to(cfg.device, dt), init, loss, 2)


def _solve_loss(prob: Problem, layer, data: torch.Tensor) -> torch.Tensor:
    values, _ = layer(prob.inputs(data))
    return prob.loss(values)


def _fd_grad(prob: Problem, step: float = FD_STEP) -> torch.Tensor:
    """Central differences (step ``step·(1+|data|)``) of the per-instance loss w.r.t. every
    data entry (one batched solve)."""
    th = _theseus()
    y = prob.wrt
    layer = th.TheseusLayer(prob.make(**FD_OPT)).to(y.device)
    B, m = y.shape
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    h = step * (1 + y.abs())  # (B, m)
    plus = y[:, None, :] + h[:, :, None] * eye[None]  # (B, m, m): row j perturbs entry j
    minus = y[:, None, :] - h[:, :, None] * eye[None]
    data = torch.cat([plus.reshape(B * m, m), minus.reshape(B * m, m)])
    with torch.no_grad():
        f = _solve_loss(prob, layer, data)
    fp_, fm = f[: B * m].reshape(B, m), f[B * m:].reshape(B, m)
    return (fp_ - fm) / (2 * h)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-300)).max())
