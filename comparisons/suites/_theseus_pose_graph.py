"""The Theseus suite's SE2 pose graph: the problem, and its exact gradient by the implicit
function theorem from residuals written here in plain torch (suite 4,
:mod:`comparisons.suites.theseus`)."""

from __future__ import annotations

import math

import torch

from ..config import Config
from ._theseus_problems import (
    PG_FD_DIRECTIONS,
    PG_FD_STEP,
    POSE_NAME,
    POSE_NOISE,
    POSE_OPT,
    POSE_TRUTH_OPT,
    Problem,
    _solve_loss,
    _theseus,
)


def _pose_graph_problem(cfg: Config, B: int, N: int) -> Problem:
    """SE2 poses round a circle, consecutive ``Between`` costs closing the loop, a prior on x₀.

    Instance ``b`` drives a circle of radius ``R_b ∈ [2.5, 3.5]`` in ``N`` equal steps (chord
    forward, turn ``2π/N``); measurement ``k`` is the true relative pose ``xₖ⁻¹xₖ₊₁`` (index
    mod N) perturbed by tangent noise :data:`POSE_NOISE`. The data tensor is the measurements'
    tangent coordinates ``μ`` (B, 3N); initial values are dead reckoning from ``μ₀…μ_{N−2}``.
    """
    th = _theseus()
    dt, dev = cfg.dtype, cfg.device
    gen = cfg.generator(34)
    radius = 2.5 + torch.rand(B, 1, generator=gen, dtype=torch.float64)
    turn = 2 * math.pi / N
    step = torch.cat([2 * radius * math.sin(turn / 2), torch.zeros_like(radius),
                      torch.full_like(radius, turn)], dim=1)  # x, y, θ of xₖ⁻¹xₖ₊₁
    mu_true = th.SE2(x_y_theta=step).log_map()  # (B, 3)
    sigma = torch.tensor(POSE_NOISE, dtype=torch.float64).repeat(N)
    mu = mu_true.repeat(1, N) + sigma * torch.randn(B, 3 * N, generator=gen,
                                                    dtype=torch.float64)
    w = torch.randn(1, N, 4, generator=gen, dtype=torch.float64).to(dev, dt)
    identity = th.SE2(dtype=dt).tensor.to(dev)

    def make(**settings):
        poses = [th.SE2(name=f"x{k}", dtype=dt) for k in range(N)]
        obj = th.Objective(dtype=dt)
        obj.add(th.Difference(poses[0], th.SE2(name="x0_prior", dtype=dt),
                              th.ScaleCostWeight(torch.ones(1, 1, dtype=dt, device=dev)),
                              name="prior"))
        for k in range(N):
            obj.add(th.Between(poses[k], poses[(k + 1) % N], th.SE2(name=f"m{k}", dtype=dt),
                               th.ScaleCostWeight(torch.ones(1, 1, dtype=dt, device=dev)),
                               name=f"between{k}"))
        return th.GaussNewton(obj, **{**POSE_OPT, **settings})

    def to_inputs(data: torch.Tensor) -> dict:
        return {f"m{k}": th.SE2.exp_map(data[:, 3 * k:3 * k + 3]).tensor for k in range(N)}

    def init_from(data: torch.Tensor) -> dict:
        with torch.no_grad():
            cur = th.SE2(tensor=identity.expand(data.shape[0], -1).clone())
            out = {"x0": cur.tensor}
            for k in range(1, N):
                cur = cur.compose(th.SE2.exp_map(data[:, 3 * (k - 1):3 * k]))
                out[f"x{k}"] = cur.tensor
        return out

    def init(n: int) -> dict:
        return {f"x{k}": identity.expand(n, -1).clone() for k in range(N)}

    def loss(values: dict) -> torch.Tensor:
        return (torch.stack([values[f"x{k}"] for k in range(N)], dim=1) * w).sum((1, 2))

    return Problem(POSE_NAME, make, "μ", mu.to(dev, dt), init, loss, 3 * N,
                   to_inputs=to_inputs, init_from=init_from, truth=_pose_graph_truth,
                   iterations=POSE_OPT["max_iterations"])



# ----------------------------------------------------------------- pose-graph truth (own SE2)
# Poses as (x, y, θ) with θ unwrapped; Theseus's conventions: tangent (uₓ, u_y, θ),
# retract x ⊕ ξ = x·exp(ξ), Between error log(m⁻¹·x_a⁻¹·x_b), Difference error log(target⁻¹·x).


def _rotate(theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], dim=-1)


def _se2_exp(u: torch.Tensor) -> torch.Tensor:
    """exp: tangent (…, 3) → pose (…, 3); translation ``V(θ)u``."""
    th_ = u[..., 2]
    small = th_.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(th_), th_)
    a = torch.where(small, 1 - th_ ** 2 / 6, torch.sin(safe) / safe)  # sin θ / θ
    b = torch.where(small, th_ / 2, (1 - torch.cos(safe)) / safe)  # (1 − cos θ) / θ
    x = a * u[..., 0] - b * u[..., 1]
    y = b * u[..., 0] + a * u[..., 1]
    return torch.stack([x, y, th_], dim=-1)


def _se2_log(p: torch.Tensor) -> torch.Tensor:
    """log: pose (…, 3) → tangent (…, 3), angle wrapped to (−π, π]; ``u = V(θ)⁻¹t``."""
    th_ = torch.atan2(torch.sin(p[..., 2]), torch.cos(p[..., 2]))
    small = th_.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(th_), th_)
    half_cot = torch.where(small, 1 - th_ ** 2 / 12,
                           0.5 * safe * (1 + torch.cos(safe)) / torch.sin(safe))
    ux = half_cot * p[..., 0] + 0.5 * th_ * p[..., 1]
    uy = half_cot * p[..., 1] - 0.5 * th_ * p[..., 0]
    return torch.stack([ux, uy, th_], dim=-1)


def _se2_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹·b`` for poses (…, 3)."""
    t = _rotate(-a[..., 2], b[..., :2] - a[..., :2])
    return torch.cat([t, (b[..., 2] - a[..., 2]).unsqueeze(-1)], dim=-1)


def _se2_compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·b`` for poses (…, 3)."""
    t = a[..., :2] + _rotate(a[..., 2], b[..., :2])
    return torch.cat([t, (a[..., 2] + b[..., 2]).unsqueeze(-1)], dim=-1)


def _pose_graph_residuals(poses: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """All residuals ``[log(x₀), log(mₖ⁻¹·xₖ⁻¹·xₖ₊₁) for k < N]`` flattened to (B, 3(N+1)),
    in the order the objective holds its cost functions. poses (B, N, 3); mu (B, 3N)."""
    B, N, _ = poses.shape
    m = _se2_exp(mu.reshape(B, N, 3))
    rel = _se2_between(poses, torch.roll(poses, -1, dims=1))  # xₖ⁻¹·xₖ₊₁ (k+1 mod N)
    r = torch.cat([_se2_log(poses[:, :1]), _se2_log(_se2_between(m, rel))], dim=1)
    return r.reshape(B, -1)


def _pose_graph_truth(prob: Problem, polish: int = 1) -> tuple[torch.Tensor, dict]:
    """Exact ``∂loss/∂μ`` on the pose graph by the implicit function theorem (full Hessian).

    With ``f(ξ, μ) = ½‖r(x* ⊕ ξ, μ)‖²`` (:func:`_pose_graph_residuals`, written here in plain
    torch and differentiated by autograd; Theseus supplies only the starting point x*) and
    ``∇_ξ f(0, μ) = 0`` at the optimum,

        dL/dμ = −(∂²f/∂ξ∂μ)ᵀ H⁻¹ ∂L/∂ξ,    H = ∂²f/∂ξ²          (all at ξ = 0)

    ``H`` and ``∂²f/∂ξ∂μ`` are read off one autograd pass per tangent coordinate (the instances
    are independent, so summing over the batch keeps them apart). x* is Theseus's
    Gauss-Newton solution refined by ``polish`` Newton steps ``ξ = −H⁻¹∇_ξ f``.

    Returns:
        ``(grad (B, 3N), stats)``: stationarity ``‖∇_ξ f‖`` (worst instance) before and after
        polishing, the smallest Hessian eigenvalue, and the largest difference between these
        residuals and Theseus's own cost-function errors at x* (conventions check).
    """
    th = _theseus()
    mu = prob.wrt.detach()
    B, N = mu.shape[0], prob.tangent_dim // 3
    opt = prob.make(max_iterations=POSE_TRUTH_OPT["max_iterations"])
    cfs = list(opt.objective.cost_functions.values())
    with torch.no_grad():
        values, info = th.TheseusLayer(opt).to(mu.device)(
            prob.inputs(mu), optimizer_kwargs={"track_err_history": True})
        theirs = [cf.weighted_jacobians_error() for cf in cfs]
        hist = info.err_history[:, :POSE_TRUTH_OPT["max_iterations"] + 1]  # (B, iters + 1)
        at_floor = hist <= hist[:, -1:] * (1 + 1e-9)
        # the first iteration from which every instance's objective stays at its floor
        settled = at_floor.flip(1).cumprod(1).flip(1).all(0)
    T = torch.stack([values[f"x{k}"] for k in range(N)], dim=1)  # (B, N, 4): x, y, cos, sin
    x = torch.cat([T[..., :2], torch.atan2(T[..., 3], T[..., 2]).unsqueeze(-1)], dim=-1)
    n = 3 * N
    # conventions check: residuals and their Jacobians against Theseus's own at its x*
    xi = mu.new_zeros(B, n, requires_grad=True)
    r = _pose_graph_residuals(_se2_compose(x, _se2_exp(xi.reshape(B, N, 3))), mu)
    J = torch.stack([torch.autograd.grad(r[:, i].sum(), xi, retain_graph=True)[0]
                     for i in range(r.shape[1])], dim=1)  # (B, 3(N+1), n)
    jac_diff, jac_angle, row = 0.0, math.nan, 0
    for cf, (jacs, err) in zip(cfs, theirs):
        for j, Jc in enumerate(jacs):
            k = int(cf.optim_var_at(j).name[1:])
            mine = J[:, row:row + err.shape[1], 3 * k:3 * k + 3]
            per_instance = (mine - Jc).abs().flatten(1).max(1).values  # (B,)
            b = int(per_instance.argmax())
            if float(per_instance[b]) > jac_diff:
                # the residual angle of that cost function and instance
                jac_diff, jac_angle = float(per_instance[b]), float(err[b, 2].abs())
        row += err.shape[1]
    stats: dict = {"iterations_to_floor": int(settled.to(torch.int64).argmax()),
                   "residual_vs_theseus": float(
        (r.detach() - torch.cat([e for _, e in theirs], dim=1)).abs().max()),
        "jacobian_vs_theseus": jac_diff, "jacobian_vs_theseus_angle": jac_angle}

    def derivatives(x: torch.Tensor, with_mu: bool):
        xi = mu.new_zeros(B, n, requires_grad=True)
        theta = mu.clone().requires_grad_(with_mu)
        poses = _se2_compose(x, _se2_exp(xi.reshape(B, N, 3)))
        f = 0.5 * _pose_graph_residuals(poses, theta).pow(2).sum(1)
        (g,) = torch.autograd.grad(f.sum(), xi, create_graph=True)
        H = mu.new_zeros(B, n, n)
        C = mu.new_zeros(B, n, mu.shape[1])
        wrt = [xi, theta] if with_mu else [xi]
        for j in range(n):
            rows = torch.autograd.grad(g[:, j].sum(), wrt, retain_graph=True)
            H[:, j] = rows[0]
            if with_mu:
                C[:, j] = rows[1]
        dL = None
        if with_mu:
            out = {f"x{k}": torch.stack([poses[:, k, 0], poses[:, k, 1], torch.cos(poses[:, k, 2]),
                                         torch.sin(poses[:, k, 2])], dim=1) for k in range(N)}
            (dL,) = torch.autograd.grad(prob.loss(out).sum(), xi)
        return g.detach(), H, C, dL

    for _ in range(polish):
        g, H, _, _ = derivatives(x, False)
        stats.setdefault("stationarity_before", float(g.norm(dim=1).max()))
        step = -torch.linalg.solve(H, g)
        x = _se2_compose(x, _se2_exp(step.reshape(B, N, 3))).detach()
    g, H, C, dL = derivatives(x, True)
    stats["stationarity_after"] = float(g.norm(dim=1).max())
    stats["hessian_min_eig"] = float(torch.linalg.eigvalsh(0.5 * (H + H.mT)).min())
    lam = torch.linalg.solve(H.mT, dL.unsqueeze(2))
    return -(C.mT @ lam).squeeze(2), stats


def _directional_fd(prob: Problem, grad: torch.Tensor) -> float:
    """Worst instance's relative error of ``⟨grad, d⟩`` against central differences of the
    loss along :data:`PG_FD_DIRECTIONS` random unit directions ``d`` of the data."""
    th = _theseus()
    y = prob.wrt.detach()
    B, m = y.shape
    K = PG_FD_DIRECTIONS
    gen = torch.Generator().manual_seed(35)
    d = torch.randn(B, K, m, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    d = d / d.norm(dim=2, keepdim=True)
    h = PG_FD_STEP
    data = torch.cat([(y[:, None] + h * d).reshape(B * K, m),
                      (y[:, None] - h * d).reshape(B * K, m)])
    layer = th.TheseusLayer(prob.make(max_iterations=POSE_TRUTH_OPT["max_iterations"]))
    with torch.no_grad():
        f = _solve_loss(prob, layer.to(y.device), data)
    fd = ((f[: B * K] - f[B * K:]) / (2 * h)).reshape(B, K)
    pred = torch.einsum("bkm,bm->bk", d, grad)
    return float(((pred - fd).norm(dim=1) / fd.norm(dim=1).clamp(min=1e-300)).max())
