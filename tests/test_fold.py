"""fp.fold against closed forms, the implicit function theorem and finite differences (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fold_plugins as fp

DT = torch.float64
SOLVERS = ["fixed_point", "gmres", "bicgstab", "dense", "auto"]


# ----------------------------------------------------------------------------- problems

def linear_problem(B=3, n=6, p=4, rho=0.8, seed=0):
    """x = A x + Bm θ per instance, ρ(A) = rho."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, n, generator=g, dtype=DT)
    A = rho * A / torch.linalg.eigvals(A).abs().max(dim=1).values[:, None, None]
    Bm = torch.randn(B, n, p, generator=g, dtype=DT)
    theta = torch.randn(B, p, generator=g, dtype=DT)

    def step(x, th):
        return torch.einsum("bij,bj->bi", A, x) + torch.einsum("bij,bj->bi", Bm, th)

    def solve(th):
        return torch.linalg.solve(torch.eye(n, dtype=DT) - A, torch.einsum("bij,bj->bi", Bm, th))

    def grad_truth(gout):
        v = torch.linalg.solve((torch.eye(n, dtype=DT) - A).transpose(1, 2), gout)
        return torch.einsum("bij,bi->bj", Bm, v)

    return step, solve, grad_truth, theta


def logistic_problem(B=2, m=40, n=5, seed=0):
    """Ridge logistic regression f(x, θ) = Σ log(1+exp(−y aᵀx)) + ½ Σ_j θ_j x_j² (θ > 0)."""
    g = torch.Generator().manual_seed(seed)
    Adata = torch.randn(B, m, n, generator=g, dtype=DT)
    y = torch.sign(torch.randn(B, m, generator=g, dtype=DT))
    theta = 0.5 + torch.rand(B, n, generator=g, dtype=DT)

    def f(x, th):
        z = y * torch.einsum("bmn,bn->bm", Adata, x)
        return torch.nn.functional.softplus(-z).sum(1) + 0.5 * (th * x * x).sum(1)

    def grad_f(x, th):
        with torch.enable_grad():
            xx = x if x.requires_grad else x.detach().requires_grad_(True)
            return torch.autograd.grad(f(xx, th).sum(), xx, create_graph=True)[0]

    def hess(x, th):
        """Closed form: Aᵀ diag(σ(z)(1−σ(z))) A + diag(θ), z = y·Ax (y² = 1)."""
        s = torch.sigmoid(y * torch.einsum("bmn,bn->bm", Adata, x))
        w = s * (1 - s)
        return torch.einsum("bmi,bm,bmj->bij", Adata, w, Adata) + torch.diag_embed(th)

    L = float(0.25 * torch.linalg.matrix_norm(Adata, 2).max() ** 2 + theta.max() + 1.0)
    alpha = 1.0 / L

    def step(x, th):
        return x - alpha * grad_f(x, th)

    def solve(th):
        """Newton to machine precision (the blackbox forward)."""
        th = th.detach()
        x = torch.zeros(B, n, dtype=DT)
        for _ in range(50):
            gr = grad_f(x.requires_grad_(True), th).detach()
            H = hess(x.detach(), th)
            x = (x.detach() - torch.linalg.solve(H, gr)).detach()
            if gr.abs().max() < 1e-15:
                break
        return x

    return step, solve, f, hess, theta


def central_fd(fn, theta, gout, h=1e-6):
    """∂⟨gout, fn(θ)⟩/∂θ by central differences, one coordinate at a time."""
    out = torch.zeros_like(theta)
    flat = out.view(-1)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta).view(-1)
        e[i] = h
        e = e.view_as(theta)
        flat[i] = ((gout * fn(theta + e)).sum() - (gout * fn(theta - e)).sum()) / (2 * h)
    return out


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("solver", SOLVERS)
def test_linear_fixed_point_all_solvers(solver):
    step, solve, truth, theta = linear_problem()
    theta.requires_grad_(True)
    xs = solve(theta.detach())
    x, info = fp.fold(step, xs, theta, solver=solver, tol=1e-12, return_info=True)
    assert torch.equal(x, xs)
    gout = torch.randn_like(xs)
    (g,) = torch.autograd.grad(x, theta, gout)
    err = ((g - truth(gout)).norm() / truth(gout).norm()).item()
    assert err < 1e-10, err
    assert info.backward_ran and bool(info.backward_converged.all())
    assert info.backward_solver == (solver if solver != "auto" else "auto (dense)")
    assert info.backward_residual.shape == (3,)


def test_logistic_regression_vs_ift_and_finite_differences():
    step, solve, f, hess, theta = logistic_problem()
    xs = solve(theta)
    th = theta.clone().requires_grad_(True)
    x = fp.fold(step, xs, th, solver="gmres", tol=1e-12)
    gout = torch.randn_like(xs, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(x, th, gout)
    # implicit function theorem with the full Hessian: dx/dθ = −H⁻¹ ∂θ∇f, ∂θ∇f = diag(x)
    H = hess(xs, theta)
    v = torch.linalg.solve(H, gout)
    g_ift = -v * xs
    assert ((g - g_ift).norm() / g_ift.norm()) < 1e-9
    g_fd = central_fd(solve, theta, gout, h=1e-5)
    assert ((g - g_fd).norm() / g_fd.norm()) < 1e-7


def test_unrolling_converges_to_folded_at_rate_spectral_radius():
    step, solve, f, hess, theta = logistic_problem(B=1, seed=2)
    xs = solve(theta)
    th = theta.clone().requires_grad_(True)
    gout = torch.randn_like(xs, generator=torch.Generator().manual_seed(3))
    (g_fold,) = torch.autograd.grad(fp.fold(step, xs, th, solver="dense"), th, gout)
    rho = float(fp.diagnostics.spectral_radius(step, xs, theta)[0])
    errs = []
    for K in (30, 60):
        x = xs.clone()
        for _ in range(K):
            x = step(x, th)
        (g_un,) = torch.autograd.grad(x, th, gout)
        errs.append(float((g_un - g_fold).norm()))
    ratio = (errs[1] / errs[0]) ** (1 / 30)
    assert 0.5 < rho < 1
    assert abs(ratio - rho) / rho < 0.05, (ratio, rho)


@pytest.mark.parametrize("solver", ["dense", "gmres"])
def test_gradcheck(solver):
    step, solve, _, theta = linear_problem(B=2, n=4, p=3)
    th = theta.clone().requires_grad_(True)

    def fn(t):
        return fp.fold(step, solve(t.detach()), t, solver=solver, tol=1e-13)

    # the forward re-solves exactly, so finite differences see the true x*(θ)
    assert torch.autograd.gradcheck(fn, (th,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_captured_module_parameter_gets_gradient():
    torch.manual_seed(0)
    n = 5
    lin = nn.Linear(n, n).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)

    def step(x, c):
        return 0.5 * torch.tanh(lin(x)) + c

    c = torch.randn(2, n, dtype=DT)

    def solve(c_):
        x = torch.zeros(2, n, dtype=DT)
        with torch.no_grad():
            for _ in range(200):
                x = step(x, c_)
        return x

    xs = solve(c)
    x = fp.fold(step, xs, c)
    gout = torch.randn_like(xs)
    (gW,) = torch.autograd.grad(x, lin.weight, gout)
    W0 = lin.weight.detach().clone()

    def solve_W(W):
        with torch.no_grad():
            lin.weight.copy_(W)
            out = solve(c)
            lin.weight.copy_(W0)
        return out

    g_fd = central_fd(solve_W, W0, gout)
    assert ((gW - g_fd).norm() / g_fd.norm()) < 1e-7


def test_closure_tensor_and_explicit_param_both_get_gradients():
    step, solve, truth, theta = linear_problem(B=2)
    scale = torch.tensor(1.0, dtype=DT, requires_grad=True)

    def step2(x):
        return step(x, scale * theta)

    xs = solve(theta)
    x = fp.fold(step2, xs)
    gout = torch.ones_like(xs)
    (gs,) = torch.autograd.grad(x, scale, gout)
    # d/ds <g, x*(sθ)> at s=1 equals <∂/∂θ, θ>
    expected = (truth(gout) * theta).sum()
    assert abs(gs - expected) / abs(expected) < 1e-10


def test_tuple_state_matches_dense_closed_form():
    # state (x, y): x = 0.5 y + θ, y = 0.3 x − 0.2 y + 2θ  (coupled linear system)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 4, generator=g, dtype=DT, requires_grad=True)

    def step(s, th):
        x, y = s
        return 0.5 * y + th, 0.3 * x - 0.2 * y + 2 * th

    # solve 2x2 block system per coordinate: x = 0.5y + θ, 1.2y = 0.3x + 2θ
    th0 = theta.detach()
    y = (0.3 * th0 + 2 * th0) / (1.2 - 0.15)
    x = 0.5 * y + th0
    xo, yo = fp.fold(step, (x, y), theta, solver="gmres", tol=1e-13)
    assert torch.equal(xo, x) and torch.equal(yo, y)
    (gt,) = torch.autograd.grad(xo.sum() + 2 * yo.sum(), theta)
    dy = 2.3 / 1.05
    dx = 0.5 * dy + 1
    assert torch.allclose(gt, torch.full_like(gt, dx + 2 * dy), rtol=1e-11)


def test_unbatched_state():
    step_b, solve_b, truth_b, theta_b = linear_problem(B=1)
    theta = theta_b[0].clone().requires_grad_(True)

    def step(x, th):
        return step_b(x[None], th[None])[0]

    xs = solve_b(theta_b)[0]
    x, info = fp.fold(step, xs, theta, batched=False, return_info=True)
    gout = torch.randn_like(xs)
    (g,) = torch.autograd.grad(x, theta, gout)
    assert torch.allclose(g, truth_b(gout[None])[0], rtol=1e-10, atol=1e-12)
    assert info.batch_size == 1


def test_float32_in_float32_out():
    step, solve, truth, theta = linear_problem()
    A32 = theta.float().requires_grad_(True)

    def step32(x, th):
        return step(x.double(), th.double()).float()

    xs = solve(theta).float()
    x = fp.fold(step32, xs, A32, solver="gmres")
    assert x.dtype == torch.float32
    gout = torch.ones_like(xs)
    (g,) = torch.autograd.grad(x, A32, gout)
    assert g.dtype == torch.float32
    assert torch.allclose(g.double(), truth(gout.double()), rtol=1e-4, atol=1e-4)


def test_batch_with_one_ill_conditioned_instance_is_reported_alone():
    # 5 instances of symmetric Φ; instance 3 has ρ(Φ)=0.999 (slow), others 0.5
    n = 30
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(5, n, n, generator=g, dtype=DT))
    eig = torch.linspace(0, 0.5, n, dtype=DT).repeat(5, 1)
    eig[3] = torch.linspace(0, 0.999, n, dtype=DT)
    A = Q @ torch.diag_embed(eig) @ Q.transpose(1, 2)
    theta = torch.randn(5, n, generator=g, dtype=DT, requires_grad=True)

    def step(x, th):
        return torch.einsum("bij,bj->bi", A, x) + th

    xs = torch.linalg.solve(torch.eye(n, dtype=DT) - A, theta.detach())
    x, info = fp.fold(step, xs, theta, solver="fixed_point", maxiter=300, return_info=True)
    with pytest.warns(fp.FoldConvergenceWarning, match=r"instance\(s\) \[3\] of 5"):
        x.backward(torch.ones_like(xs))
    assert info.backward_converged.tolist() == [True, True, True, False, True]
    # GMRES converges everywhere, but instance 3 is visibly the slow one
    theta.grad = None
    x, info = fp.fold(step, xs, theta, solver="gmres", tol=1e-12, return_info=True)
    x.backward(torch.ones_like(xs))
    it = info.backward_iterations
    assert bool(info.backward_converged.all())
    assert int(it.argmax()) == 3 and int(it[3]) > int(it[[0, 1, 2, 4]].max())
    v_true = torch.linalg.solve(torch.eye(n, dtype=DT) - A, torch.ones_like(xs))
    assert torch.allclose(theta.grad, v_true, rtol=1e-9)


def test_backward_graph_does_not_grow_with_forward_iterations(graph_nodes):
    step, solve, _, theta = linear_problem(B=2)
    th = theta.clone().requires_grad_(True)

    counts = []
    for K in (5, 50):
        x = torch.zeros(2, 6, dtype=DT)
        for _ in range(K):  # a forward *with* graph: fold must not keep it
            x = step(x, th)
        counts.append(graph_nodes(fp.fold(step, x, th, fixed_point_tol=1.0)))
    assert counts[0] == counts[1]


def test_zero_cotangent_needs_no_solve():
    step, solve, _, theta = linear_problem()
    th = theta.clone().requires_grad_(True)
    x, info = fp.fold(step, solve(theta), th, return_info=True)
    (g,) = torch.autograd.grad(x, th, torch.zeros_like(x))
    assert torch.all(g == 0)
    assert info.backward_matvecs == 0 and bool(info.backward_converged.all())


def test_nothing_to_differentiate_returns_value_without_graph():
    step, solve, _, theta = linear_problem()
    x = fp.fold(step, solve(theta), theta)  # theta does not require grad
    assert not x.requires_grad


def test_no_grad_returns_value_without_graph():
    step, solve, _, theta = linear_problem()
    th = theta.clone().requires_grad_(True)
    xs = solve(theta)
    with torch.no_grad():
        x = fp.fold(step, xs, th)
    assert torch.equal(x, xs) and not x.requires_grad


# ----------------------------------------------------------------------------- bad input

def test_nan_in_x_star_names_it():
    step, solve, _, theta = linear_problem()
    xs = solve(theta)
    xs[1, 2] = float("nan")
    with pytest.raises(fp.FoldError, match=r"x_star contains 1 NaN/Inf"):
        fp.fold(step, xs, theta)


def test_inf_in_param_names_it():
    step, solve, _, theta = linear_problem()
    xs = solve(theta)
    bad = theta.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(fp.FoldError, match=r"params\[0\] contains 1 NaN/Inf"):
        fp.fold(step, xs, bad)


def test_step_shape_mismatch_names_both_shapes():
    step, solve, _, theta = linear_problem()
    xs = solve(theta)
    with pytest.raises(fp.FoldError, match=r"shape \(3, 5\) but the state has shape \(3, 6\)"):
        fp.fold(lambda x, t: step(x, t)[:, :5], xs, theta)


def test_mixed_dtypes_rejected():
    step, solve, _, theta = linear_problem()
    xs = solve(theta)
    with pytest.raises(fp.FoldError, match=r"mixed dtypes.*params\[0\] is torch.float32"):
        fp.fold(step, xs, theta.float())
    with pytest.raises(fp.FoldError, match="mixed dtypes in the state"):
        fp.fold(lambda s, t: s, (xs, xs.float()), theta)


def test_one_dim_state_with_batched_default_is_rejected_with_fix():
    with pytest.raises(fp.FoldError, match="batched=False"):
        fp.fold(lambda x: 0.5 * x, torch.zeros(4, dtype=DT))


def test_fixed_point_divergence_warns_with_remedy_and_strict_raises():
    step, solve, truth, theta = linear_problem(rho=1.3, seed=4)
    th = theta.clone().requires_grad_(True)
    xs = solve(theta)
    x = fp.fold(step, xs, th, solver="fixed_point")
    with pytest.warns(fp.FoldConvergenceWarning, match=r"use solver='gmres'"):
        x.sum().backward()
    x = fp.fold(step, xs, th, solver="fixed_point", strict=True)
    with pytest.raises(fp.FoldError, match="did not converge"):
        x.sum().backward()
    # the remedy works: GMRES gets the exact gradient although ρ(Φ) > 1
    th.grad = None
    x = fp.fold(step, xs, th, solver="gmres", strict=True)
    gout = torch.ones_like(xs)
    x.backward(gout)
    assert torch.allclose(th.grad, truth(gout), rtol=1e-10, atol=1e-12)


def test_nan_cotangent_skips_solve_for_that_instance_and_says_so():
    step, solve, truth, theta = linear_problem()
    th = theta.clone().requires_grad_(True)
    x = fp.fold(step, solve(theta), th)
    gout = torch.ones_like(x)
    gout[1, 0] = float("nan")
    with pytest.warns(fp.FoldConvergenceWarning, match=r"incoming gradient.*\[1\] of 3"):
        (g,) = torch.autograd.grad(x, th, gout)
    assert torch.isnan(g[1]).all()
    ok = torch.ones_like(gout)
    assert torch.allclose(g[[0, 2]], truth(ok)[[0, 2]], rtol=1e-10)


def test_bad_tol_maxiter_solver_rejected_at_call():
    step, solve, _, theta = linear_problem()
    xs = solve(theta)
    with pytest.raises(fp.FoldError, match=r"tol must be a finite number ≥ 0, got -1"):
        fp.fold(step, xs, theta, tol=-1)
    with pytest.raises(fp.FoldError, match="maxiter must be a positive int"):
        fp.fold(step, xs, theta, maxiter=0)
    with pytest.raises(fp.FoldError, match="solver must be one of"):
        fp.fold(step, xs, theta, solver="cg")


def test_not_a_fixed_point_warns_and_strict_raises():
    step, solve, _, theta = linear_problem()
    xs = solve(theta) + 1e-3
    match = r"not a fixed point.*instance\(s\) \[0, 1, 2\]"
    with pytest.warns(fp.FoldConvergenceWarning, match=match):
        fp.fold(step, xs, theta)
    with pytest.raises(fp.FoldError, match="not a fixed point"):
        fp.fold(step, xs, theta, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.fold(step, solve(theta), theta)  # a true fixed point: silent


def test_step_returning_wrong_structure():
    step, solve, _, theta = linear_problem()
    xs = solve(theta)
    with pytest.raises(fp.FoldError, match="tuple of 2 tensors"):
        fp.fold(lambda s, t: s[0], (xs, xs), theta)
    with pytest.raises(fp.FoldError, match="step must be callable"):
        fp.fold("not a step", xs, theta)


def test_stagnating_backward_warns_with_the_round_off_remedy():
    # a step whose Jacobian is only accurate to ~1e-7 (noise in every evaluation): the folded
    # GMRES cannot reach 1e-12, stops on stagnation and says why
    step, solve, truth, theta = linear_problem(B=2, n=20)
    th = theta.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(0)

    class NoisyVJP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, gout):
            # per-instance noise: instances stay independent (fold checks that)
            scale = 1e-7 * gout.norm(dim=-1, keepdim=True)
            return gout + scale * torch.randn(gout.shape, generator=g, dtype=DT)

    def noisy_step(x, t):
        return step(NoisyVJP.apply(x), t)

    xs = solve(theta)
    x, info = fp.fold(noisy_step, xs, th, tol=1e-12, return_info=True)
    with pytest.warns(fp.FoldConvergenceWarning, match="stagnated"):
        x.backward(torch.ones_like(xs))
    assert int(info.backward_iterations.max()) < 200
    rel = (th.grad - truth(torch.ones_like(xs))).norm() / truth(torch.ones_like(xs)).norm()
    assert rel < 1e-5


def test_user_solver_callable_with_minimal_info():
    # a user's own solver: the protocol needs only iterations/residual/converged in its info
    from types import SimpleNamespace

    step, solve, truth, theta = linear_problem(B=2)
    th = theta.clone().requires_grad_(True)

    def lu_solver(matvec, b, *, x0=None, tol=1e-10, maxiter=None):
        n = b.shape[1]
        cols = torch.stack([matvec(torch.eye(n, dtype=b.dtype)[j].expand_as(b))
                            for j in range(n)], dim=2)
        x = torch.linalg.solve(cols, b)
        res = (b - torch.einsum("bij,bj->bi", cols, x)).norm(dim=1) / b.norm(dim=1)
        return x, SimpleNamespace(iterations=torch.full((b.shape[0],), n), residual=res,
                                  converged=res <= tol)

    x, info = fp.fold(step, solve(theta), th, solver=lu_solver, return_info=True)
    gout = torch.randn_like(x)
    (g,) = torch.autograd.grad(x, th, gout)
    assert torch.allclose(g, truth(gout), rtol=1e-10, atol=1e-12)
    assert info.backward_solver == "lu_solver" and bool(info.backward_converged.all())


def test_step_that_vouches_for_batch_independence_skips_the_probe_and_stays_exact():
    """``batch_independent = True`` on the step object: no probe VJP (one VJP fewer per
    backward), same exact gradient; a mixing step without the attribute still raises."""
    step, solve, truth, theta = linear_problem(seed=7)

    class Counted:
        def __init__(self, vouch):
            self.batch_independent = vouch
            self.vjps = 0

        def __call__(self, x, th):
            out = step(x, th)
            out.register_hook(lambda g: setattr(self, "vjps", self.vjps + 1))
            return out

    xs = solve(theta)
    gout = torch.randn(xs.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    counts = {}
    for vouch in (False, True):
        th = theta.clone().requires_grad_(True)
        s = Counted(vouch)
        x, info = fp.fold(s, xs, th, solver="gmres", return_info=True)
        x.backward(gout)
        assert (th.grad - truth(gout)).norm() / truth(gout).norm() < 1e-10
        counts[vouch] = s.vjps - info.backward_matvecs  # probe + the final Ψᵀv
    assert counts == {False: 2, True: 1}

    def mixing(x, th):
        return step(x, th) + 0.1 * x.mean(0, keepdim=True)

    th = theta.clone().requires_grad_(True)
    x = fp.fold(mixing, xs, th, fixed_point_tol=float("inf"))  # x* is not its fixed point:
    # irrelevant here, the probe runs before any solve
    with pytest.raises(fp.FoldError, match="mixes batch instances"):
        x.sum().backward()
