"""Every derivative PyTorch offers through ``fp.fold``: double backward, Hessians and HVPs,
forward mode (``forward_ad``, ``autograd.functional.jvp``) — each against unrolling the same
step to convergence (float64) — and the modes that raise (third order, ``torch.func``)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad as fwAD

import fold_plugins as fp

DT = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------- three problems

def tanh_problem():
    """x = tanh(0.5 x + θ): a contraction (ρ(Φ) ≤ 0.5)."""
    theta = torch.tensor([[0.3, -0.7], [1.1, 0.2]], dtype=DT)

    def step(x, th):
        return torch.tanh(0.5 * x + th)

    return step, theta, 200, 2


def logistic_problem():
    """Gradient descent on ridge logistic regression ½θ‖x‖² + Σ log(1 + e^{−y aᵀx})."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 30, 4, generator=g, dtype=DT)
    y = torch.sign(torch.randn(2, 30, generator=g, dtype=DT))
    theta = torch.tensor([[2.0], [3.0]], dtype=DT)

    def grad_f(x, th):
        z = y * torch.einsum("bmn,bn->bm", A, x)
        return th * x - torch.einsum("bmn,bm->bn", A, y * torch.sigmoid(-z))

    def step(x, th):
        return x - 0.05 * grad_f(x, th)

    return step, theta, 400, 4


def box_qp_problem():
    """Projected gradient on ½xᵀPx + qᵀx over [0, 1]ⁿ, strictly complementary solution."""
    g = torch.Generator().manual_seed(2)
    M = torch.randn(12, 6, generator=g, dtype=DT)
    P = M.T @ M / 12 + 0.5 * torch.eye(6, dtype=DT)
    L = float(torch.linalg.eigvalsh(P).max())
    q = torch.tensor([[-0.4, 0.9, -2.5, 0.1, -0.2, 1.5]], dtype=DT)

    def step(x, q_):
        return torch.clamp(x - (x @ P + q_ ** 3) / L, 0.0, 1.0)

    return step, q, 600, 6


PROBLEMS = {"tanh": tanh_problem, "logistic": logistic_problem, "box_qp": box_qp_problem}


def _unrolled(step, K, n):
    def f(th):
        x = torch.zeros(th.shape[0], n, dtype=DT)
        for _ in range(K):
            x = step(x, th)
        return x
    return f


def _folded(step, K, n):
    unrolled = _unrolled(step, K, n)

    def f(th):
        with torch.no_grad():
            xs = unrolled(th)
        return fp.fold(step, xs, th, tol=1e-13)
    return f


def _loss(x):
    return (x ** 3).sum() + (x[:, :1] * x).sum()


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_double_backward_hessian_and_hvp_match_unrolling(name):
    step, theta, K, n = PROBLEMS[name]()
    folded, unrolled = _folded(step, K, n), _unrolled(step, K, n)

    # grad of grad
    th = theta.clone().requires_grad_(True)
    g, = torch.autograd.grad(_loss(folded(th)), th, create_graph=True)
    h, = torch.autograd.grad((g * torch.linspace(1, 2, g.numel(), dtype=DT).view_as(g)).sum(), th)
    th2 = theta.clone().requires_grad_(True)
    g2, = torch.autograd.grad(_loss(unrolled(th2)), th2, create_graph=True)
    h2, = torch.autograd.grad((g2 * torch.linspace(1, 2, g2.numel(), dtype=DT).view_as(g2)).sum(),
                              th2)
    assert _rel(g.detach(), g2.detach()) < 1e-9
    assert _rel(h, h2) < 1e-8

    # full Hessian and a Hessian-vector product through torch.autograd.functional
    H = torch.autograd.functional.hessian(lambda t: _loss(folded(t)), theta)
    H2 = torch.autograd.functional.hessian(lambda t: _loss(unrolled(t)), theta)
    assert _rel(H, H2) < 1e-8
    v = torch.ones_like(theta)
    _, hv = torch.autograd.functional.hvp(lambda t: _loss(folded(t)), theta, v)
    _, hv2 = torch.autograd.functional.hvp(lambda t: _loss(unrolled(t)), theta, v)
    assert _rel(hv, hv2) < 1e-8


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_forward_mode_matches_unrolling(name):
    step, theta, K, n = PROBLEMS[name]()
    folded, unrolled = _folded(step, K, n), _unrolled(step, K, n)
    t = torch.linspace(-1, 1, theta.numel(), dtype=DT).view_as(theta)
    _, truth = torch.autograd.functional.jvp(unrolled, theta, t)
    _, by_functional = torch.autograd.functional.jvp(folded, theta, t)  # double-VJP trick
    with fwAD.dual_level():
        out = folded(fwAD.make_dual(theta, t))
        by_forward_ad = fwAD.unpack_dual(out).tangent
    assert by_forward_ad is not None
    assert _rel(by_functional, truth) < 1e-8
    assert _rel(by_forward_ad, truth) < 1e-8


def test_double_backward_reaches_module_parameters_and_closure_tensors():
    # the step captures an nn.Linear (leaf parameters) and a non-leaf tensor c = 2·z
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3, dtype=DT)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    z = torch.tensor([[0.5, -0.2, 0.1]], dtype=DT, requires_grad=True)

    def run(fold: bool):
        c = 2 * z

        def step(x):
            return torch.tanh(lin(x) + c)
        x = torch.zeros(1, 3, dtype=DT)
        if fold:
            with torch.no_grad():
                for _ in range(200):
                    x = step(x)
            x = fp.fold(step, x, tol=1e-13)
        else:
            for _ in range(200):
                x = step(x)
        loss = (x ** 2).sum()
        gw, gz = torch.autograd.grad(loss, (lin.weight, z), create_graph=True)
        second = torch.autograd.grad(gw.sum() + (gz ** 2).sum(), (lin.weight, lin.bias, z))
        return [gw.detach(), gz.detach(), *second]

    for a, b in zip(run(True), run(False)):
        assert _rel(a, b) < 1e-8


def test_step_without_recorder_finds_leaves_and_refuses_only_what_it_cannot_name():
    """``record_captured = False``: module parameters (leaves) are found by the graph walk and
    a non-leaf passed as a param is named, so double backward and forward mode stay exact; a
    captured non-leaf nobody named keeps exact first-order gradients and forward mode, and
    double backward refuses instead of dropping its terms."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 3, dtype=DT)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    z0 = torch.tensor([[0.5, -0.2, 0.1]], dtype=DT)

    class Step:
        record_captured = False

        def __init__(self, c, explicit):
            self.c, self.explicit = c, explicit

        def __call__(self, x, *params):
            return torch.tanh(lin(x) + (params[0] if self.explicit else self.c))

    def solve(z, fold, explicit, create_graph):
        c = 2 * z
        step = Step(c, explicit)
        args = (c,) if explicit else ()
        x = torch.zeros(1, 3, dtype=DT)
        if fold:
            with torch.no_grad():
                for _ in range(200):
                    x = step(x, *args)
            x = fp.fold(step, x, *args, tol=1e-13)
        else:
            for _ in range(200):
                x = step(x, *args)
        loss = (x ** 2).sum()
        gw, gz = torch.autograd.grad(loss, (lin.weight, z), create_graph=create_graph)
        return x, gw, gz

    def second(z, fold, explicit):
        _, gw, gz = solve(z, fold, explicit, True)
        return [gw.detach(), gz.detach(),
                *torch.autograd.grad(gw.sum() + (gz ** 2).sum(), (lin.weight, lin.bias, z))]

    truth = second(z0.clone().requires_grad_(True), False, True)
    for a, b in zip(second(z0.clone().requires_grad_(True), True, True), truth):
        assert _rel(a, b) < 1e-8
    _, gw, gz = solve(z0.clone().requires_grad_(True), True, False, False)
    assert _rel(gw, truth[0]) < 1e-9 and _rel(gz, truth[1]) < 1e-9
    with pytest.raises(fp.FoldError, match="double backward through fp.fold needs every"):
        second(z0.clone().requires_grad_(True), True, False)
    t = torch.tensor([[1.0, -0.5, 0.25]], dtype=DT)
    _, want = torch.autograd.functional.jvp(
        lambda z: solve(z, False, False, True)[0], z0.clone().requires_grad_(True), t)
    with torch.no_grad(), fwAD.dual_level():
        xs = torch.zeros(1, 3, dtype=DT)
        c = 2 * fwAD.make_dual(z0, t)
        for _ in range(200):
            xs = torch.tanh(lin(xs) + fwAD.unpack_dual(c).primal)
        with torch.enable_grad():
            got = fwAD.unpack_dual(fp.fold(Step(c, False), xs, tol=1e-13)).tangent
        # and under no_grad with the dual as an explicit param (fold needs no grad mode)
        got_nograd = fwAD.unpack_dual(fp.fold(Step(None, True), xs, c, tol=1e-13)).tangent
    assert got is not None and _rel(got, want) < 1e-8
    assert got_nograd is not None and _rel(got_nograd, want) < 1e-8


def test_third_order_raises_and_second_order_with_create_graph_is_still_exact():
    step, theta, K, n = tanh_problem()
    folded, unrolled = _folded(step, K, n), _unrolled(step, K, n)
    th = theta.clone().requires_grad_(True)
    g, = torch.autograd.grad(_loss(folded(th)), th, create_graph=True)
    h, = torch.autograd.grad(g.sum(), th, create_graph=True)
    th2 = theta.clone().requires_grad_(True)
    g2, = torch.autograd.grad(_loss(unrolled(th2)), th2, create_graph=True)
    h2, = torch.autograd.grad(g2.sum(), th2)
    assert _rel(h.detach(), h2) < 1e-8
    with pytest.raises(fp.FoldError, match="third and higher derivatives"):
        torch.autograd.grad(h.sum(), th)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp", "vmap"])
def test_torch_func_transforms_raise_with_the_alternative(transform):
    step, theta, K, n = tanh_problem()
    folded = _folded(step, K, n)
    f = {"grad": lambda: torch.func.grad(lambda t: _loss(folded(t)))(theta),
         "jacrev": lambda: torch.func.jacrev(folded)(theta),
         "jvp": lambda: torch.func.jvp(folded, (theta,), (torch.ones_like(theta),)),
         "vmap": lambda: torch.func.vmap(folded)(theta[:, None])}[transform]
    with pytest.raises(fp.FoldError, match="torch.autograd.forward_ad"):
        f()


def test_coupled_batch_is_refused_and_batched_false_is_exact():
    # 0.5·x + 0.3·mean_b(x) + c couples the instances: per-instance solves would be wrong
    c = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], dtype=DT)

    def step(x, c_):
        return 0.5 * x + 0.3 * x.mean(0, keepdim=True) + c_

    def solve(c_):
        x = torch.zeros_like(c_)
        for _ in range(300):
            x = step(x, c_)
        return x

    for solver in ("dense", "auto", "gmres", "bicgstab", "fixed_point"):
        cc = c.clone().requires_grad_(True)
        x = fp.fold(step, solve(c).detach(), cc, solver=solver)
        with pytest.raises(fp.FoldError, match="batched=False"):
            (x ** 2).sum().backward()
    cc = c.clone().requires_grad_(True)
    (fp.fold(step, solve(c).detach(), cc, batched=False, solver="dense") ** 2).sum().backward()
    c2 = c.clone().requires_grad_(True)
    (solve(c2) ** 2).sum().backward()
    assert _rel(cc.grad, c2.grad) < 1e-10


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the graph break
def test_torch_compile_runs_fold_with_graph_breaks_and_same_gradient():
    # dynamo cannot trace fold's data-dependent checks: it breaks the graph there and runs
    # fold eagerly (backend "eager" keeps the test fast; the semantics are dynamo's)
    step, theta, K, n = tanh_problem()
    folded = _folded(step, K, n)
    th = theta.clone().requires_grad_(True)
    torch.compile(lambda t: _loss(folded(t)), backend="eager")(th).backward()
    th2 = theta.clone().requires_grad_(True)
    _loss(folded(th2)).backward()
    assert _rel(th.grad, th2.grad) < 1e-14
