"""FoldedLoop, folded, unroll, truncated: the paper's claims about unrolling, checked in float64
against closed forms (active-set / implicit-function-theorem gradients of a box QP) and
central finite differences."""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import fold_plugins as fp
from fold_plugins.adapters.unrolled import FoldedLoop, UnrollingDiagnosis, folded, truncated, unroll
from fold_plugins.fold import linearize

DT = torch.float64
N = 30


# ----------------------------------------------------------------------------- the box QP
#   min ½ xᵀPx + qᵀx  s.t. 0 ≤ x ≤ 1,   P = MᵀM/(2n) + 0.1·I,  M (2n × n)
#   projected-gradient step U(x) = clamp(x − (Px + q)/L, 0, 1),  L = λ_max(P)

@functools.cache
def qp_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(2 * N, N, generator=g, dtype=DT)
    P = M.T @ M / (2 * N) + 0.1 * torch.eye(N, dtype=DT)
    q = torch.randn(N, generator=g, dtype=DT)
    L = float(torch.linalg.eigvalsh(P).max())
    return P, q, L


def pg_step(x, q, P):
    """One projected-gradient step, batched: x, q of shape (B, n)."""
    _, _, L = qp_data()
    return torch.clamp(x - (x @ P.T + q) / L, 0.0, 1.0)  # rows: x − (Px + q)/L


def active_set_solution(P, q, margin=1e-3):
    """Exact x* of the box QP for one q (n,): projected gradient identifies the active set,
    then the free block is solved in closed form; KKT is asserted with strict complementarity.

    Returns x*, the free mask F."""
    L = float(torch.linalg.eigvalsh(P).max())
    x = torch.full_like(q, 0.5)
    for _ in range(3000):
        x = torch.clamp(x - (P @ x + q) / L, 0.0, 1.0)
    lo, hi = x <= 1e-9, x >= 1 - 1e-9
    F = ~(lo | hi)
    xs = torch.where(hi, torch.ones_like(x), torch.zeros_like(x))
    xs[F] = torch.linalg.solve(P[F][:, F], -(q[F] + P[F][:, ~F] @ xs[~F]))
    grad = P @ xs + q
    assert float(grad[F].abs().max()) < 1e-12
    assert bool((grad[lo] > margin).all()) and bool((grad[hi] < -margin).all())
    assert bool((xs[F] > margin).all()) and bool((xs[F] < 1 - margin).all())
    return xs, F


def ift_grads(P, xs, F, w):
    """Closed-form gradients of ℓ = wᵀx* w.r.t. q and P (active set fixed):
    x_F = −P_FF⁻¹(q_F + P_FA x_A)  ⇒  ∂ℓ/∂q = −E_F P_FF⁻¹ w_F,  ∂ℓ/∂P = −(E_F P_FF⁻¹ w_F) x*ᵀ."""
    u = torch.zeros_like(xs)
    u[F] = torch.linalg.solve(P[F][:, F], w[F])
    return -u, -torch.outer(u, xs)


def qp_problem(seed: int = 0):
    P, q, L = qp_data(seed)
    xs, F = active_set_solution(P, q)
    w = torch.randn(N, generator=torch.Generator().manual_seed(100 + seed), dtype=DT)
    gq, gP = ift_grads(P, xs, F, w)
    return P, q, L, xs, F, w, gq, gP


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- unrolling claims

def test_box_qp_has_active_bounds_on_both_sides():
    P, q, _L, xs, F, *_ = qp_problem()
    assert int(F.sum()) == 12 and int((xs == 0).sum()) == 12 and int((xs == 1).sum()) == 6
    # Φ = diag(1_F)(I − P/L) has rank |F| (measured from VJPs, independent of the closed form)
    lin = linearize(pg_step, xs[None], q[None], P)
    Phi_T = torch.stack([lin.vjp(e[None])[0] for e in torch.eye(N, dtype=DT)])
    assert int(torch.linalg.matrix_rank(Phi_T)) == int(F.sum())


@pytest.mark.parametrize("K", [1, 2, 3, 7, 25])
def test_warm_started_unroll_is_fixed_point_iteration(K):
    """K unrolled steps from x* give Ψᵀ Σ_{i<K}(Φᵀ)^i g = Ψᵀ v_K, v_K the K-th LFPI iterate."""
    P, q, _L, xs, _F, w, *_ = qp_problem()
    qb = q[None].clone().requires_grad_(True)
    Pl = P.clone().requires_grad_(True)
    xK = unroll(pg_step, xs[None], qb, Pl, n_iter=K)
    assert float((xK.detach() - xs).abs().max()) < 1e-14  # the iterates stay at x*
    gq_unroll, gP_unroll = torch.autograd.grad((xK * w).sum(), (qb, Pl))

    # (a) fp.solvers.fixed_point run for exactly K iterations, then Ψᵀ v_K by one step's VJP
    lin = linearize(pg_step, xs[None], qb, Pl)
    v, sinfo = fp.solvers.fixed_point(lambda u: u - lin.vjp(u), w[None], tol=0.0, maxiter=K)
    assert int(sinfo.iterations) == K and not bool(sinfo.converged)
    gq_fp, gP_fp = torch.autograd.grad(lin.out_parts[0], (qb, Pl), v)
    assert float((gq_unroll - gq_fp).abs().max()) < 1e-12
    assert float((gP_unroll - gP_fp).abs().max()) < 1e-12

    # (b) the same through FoldedLoop with backward="fixed_point", maxiter=K, tol=0
    loop = FoldedLoop(pg_step, solver=lambda q_, P_: xs[None].clone(), backward="fixed_point",
                      tol=0.0, maxiter=K)
    qb2 = q[None].clone().requires_grad_(True)
    with pytest.warns(fp.FoldConvergenceWarning, match="did not converge"):
        (loop(qb2, P) * w).sum().backward()
    assert int(loop.last_info.backward_iterations) == K
    assert float((qb2.grad - gq_unroll).abs().max()) < 1e-12


def _unrolled_errors(K_max):
    """Relative forward and gradient errors of cold-start unrolling for K = 0..K_max."""
    P, q, _L, xs, _F, w, gq, _ = qp_problem()
    x0 = torch.full((1, N), 0.5, dtype=DT)
    fwd, grad = [1.0], [1.0]
    for K in range(1, K_max + 1):
        qb = q[None].clone().requires_grad_(True)
        xK = unroll(pg_step, x0, qb, P, n_iter=K)
        (gK,) = torch.autograd.grad((xK * w).sum(), qb)
        fwd.append(rel(xK[0].detach(), xs))
        grad.append(rel(gK[0], gq))
    return fwd, grad


def test_unrolled_gradient_error_rate_is_spectral_radius_and_lags_forward():
    P, q, L, xs, F, *_ = qp_problem()
    rho_closed = 1 - float(torch.linalg.eigvalsh(P[F][:, F]).min()) / L
    rho_arn = float(fp.diagnostics.spectral_radius(pg_step, xs[None], q[None], P))
    rho_pow = float(fp.diagnostics.spectral_radius(pg_step, xs[None], q[None], P,
                                                   method="power"))
    assert abs(rho_arn - rho_closed) < 1e-10
    assert abs(rho_pow - rho_closed) < 1e-5

    fwd, grad = _unrolled_errors(125)
    K1, K2 = 60, 110  # inside the linear regime, above round-off (errors 8e-7 … 2e-11)
    ratio = (grad[K2] / grad[K1]) ** (1 / (K2 - K1))
    assert abs(ratio / rho_arn - 1) < 0.05
    assert abs(ratio / rho_closed - 1) < 1e-3  # measured: 1.9e-4
    # the gradient error lags the forward error: each accuracy is reached later
    for eps in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10):
        k_fwd = next(k for k, e in enumerate(fwd) if e <= eps)
        k_grad = next(k for k, e in enumerate(grad) if e <= eps)
        assert k_grad > k_fwd, (eps, k_fwd, k_grad)
    assert all(g > f for f, g in zip(fwd[1:], grad[1:]))


def test_folded_gmres_needs_at_most_rank_plus_one_iterations():
    """Batch of 3 box QPs with different active sets: per instance ≤ |F|+1 GMRES iterations,
    residual ≤ 1e-10, and the gradients (q and P) equal the active-set closed form."""
    P, q, _L = qp_data()
    qs = torch.stack([q, 0.5 * q, q + 0.3])
    sols = [active_set_solution(P, qi) for qi in qs]
    w = torch.randn(3, N, generator=torch.Generator().manual_seed(7), dtype=DT)
    qb = qs.clone().requires_grad_(True)
    Pl = P.clone().requires_grad_(True)
    loop = FoldedLoop(pg_step, x0=torch.full((3, N), 0.5, dtype=DT))
    x = loop(qb, Pl)
    (x * w).sum().backward()
    info = loop.last_info
    n_free = torch.tensor([int(F.sum()) for _, F in sols])
    assert bool((info.backward_iterations.cpu() <= n_free + 1).all()), (
        info.backward_iterations, n_free)
    assert float(info.backward_residual.max()) <= 1e-10
    assert bool(info.converged.all())
    gP_total = torch.zeros_like(P)
    for b, (xs, F) in enumerate(sols):
        assert float((x[b].detach() - xs).abs().max()) < 1e-9
        gq, gP = ift_grads(P, xs, F, w[b])
        assert rel(qb.grad[b], gq) < 1e-9
        gP_total += gP
    assert rel(Pl.grad, gP_total) < 1e-9


@pytest.mark.parametrize("backward", ["gmres", "fixed_point"])
def test_folded_gradient_independent_of_alpha_while_rate_worsens(backward):
    """U_α(x) = x + α·(PG(x) − x): same fixed point, Φ_α = I − α(I − Φ₁), so
    (I − Φ_α)⁻¹Ψ_α = (I − Φ₁)⁻¹Ψ₁ for every α, while ρ(Φ_α) = 1 − α(1 − ρ₁) → 1 as α → 0."""
    P, q, L, xs, F, w, gq, _ = qp_problem()
    rho1 = 1 - float(torch.linalg.eigvalsh(P[F][:, F]).min()) / L
    alphas = [1.0, 0.5, 0.1, 0.01, 0.001] if backward == "gmres" else [1.0, 0.5, 0.2]
    grads, rhos, iters = [], [], []
    for a in alphas:
        def step(x, q_, a=a):
            return x + a * (pg_step(x, q_, P) - x)
        loop = FoldedLoop(step, solver=lambda q_: xs[None].clone(), backward=backward,
                          maxiter=5000, strict=True)
        qb = q[None].clone().requires_grad_(True)
        (loop(qb) * w).sum().backward()
        grads.append(qb.grad[0])
        iters.append(int(loop.last_info.backward_iterations))
        rhos.append(float(fp.diagnostics.spectral_radius(step, xs[None], q[None])))
        assert abs(rhos[-1] - (1 - a * (1 - rho1))) < 1e-9
    # GMRES at tol 1e-10 is exact to ~1e-15 here; LFPI stops at residual 1e-10, i.e. a
    # gradient error up to 1e-10/(1 − ρ)
    tol = 1e-10 if backward == "gmres" else 1e-8
    for gr in grads:
        assert rel(gr, gq) < tol
        assert float((gr - grads[0]).abs().max()) < tol
    assert all(r2 > r1 for r1, r2 in itertools.pairwise(rhos))
    if backward == "gmres":
        # I − Φ_αᵀ = α(I − Φ₁ᵀ): the same Krylov spaces, the same iteration count
        assert len(set(iters)) == 1 and iters[0] <= int(F.sum()) + 1
    else:
        # LFPI needs ≈ log(tol)/log ρ iterations: it grows like 1/α
        assert all(i2 > i1 for i1, i2 in itertools.pairwise(iters))
        for it, r in zip(iters, rhos):
            predicted = fp.diagnostics.unroll_iterations_needed(r, 1e-10)
            assert 0.8 <= it / predicted <= 1.2, (it, predicted)


def test_backward_graph_does_not_grow_with_maxiter(graph_nodes):
    P, q, _L, xs, _F, *_ = qp_problem()
    qb = q[None].clone().requires_grad_(True)
    x0 = torch.full((1, N), 0.5, dtype=DT)
    # one differentiable step at x* (x* a leaf requiring grad, as inside fold): 7 nodes
    one_step = graph_nodes(pg_step(xs[None].clone().requires_grad_(True), qb, P))
    counts, iters = [], []
    for maxiter in (5, 50, 500):
        loop = FoldedLoop(pg_step, maxiter=maxiter, forward_tol=0.0, x0=x0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fp.FoldConvergenceWarning)
            x = loop(qb, P)
        counts.append(graph_nodes(x))
        iters.append(int(loop.last_info.forward_iterations))
    assert iters[0] == 5 and iters[1] == 50 and iters[2] > 50
    # one step's graph plus the folded node, whatever the number of forward iterations
    assert counts == [one_step + 1] * 3
    # whereas unrolling keeps every step: exactly one step's nodes per iteration
    un = [graph_nodes(unroll(pg_step, x0, qb, P, n_iter=k)) for k in (5, 50)]
    per_step = (un[1] - un[0]) / 45
    assert per_step == one_step - 2  # less the two leaves' AccumulateGrad (x*, q)


def test_tuple_state_admm_loop():
    """ADMM for min ½xᵀPx + qᵀx, lo ≤ x ≤ hi, state (x, z, y) (scaled dual), written inline.
    At the fixed point x = z and y = −(Px + q)/ρ, so with J = ∂x*/∂q = −E_F P_FF⁻¹E_Fᵀ:
    ∂(gᵀx + hᵀz + wᵀy)/∂q = J(g + h − Pw/ρ) − w/ρ."""
    n, B, rho_admm = 8, 2, 1.0
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(n, n, generator=gen, dtype=DT)
    P = M.T @ M / n + 0.2 * torch.eye(n, dtype=DT)
    Kinv = torch.linalg.inv(P + rho_admm * torch.eye(n, dtype=DT))
    lo, hi = -0.5, 0.5
    q = 0.8 * torch.randn(B, n, generator=gen, dtype=DT)

    def admm_step(state, q):
        x, z, y = state
        x = (rho_admm * (z - y) - q) @ Kinv
        z_new = torch.clamp(x + y, lo, hi)
        y = y + x - z_new
        return x, z_new, y

    zeros = torch.zeros(B, n, dtype=DT)
    loop = FoldedLoop(admm_step, x0=(zeros, zeros, zeros), maxiter=5000, strict=True)
    qb = q.clone().requires_grad_(True)
    x, z, y = loop(qb)
    cg, ch, cw = (torch.randn(B, n, generator=gen, dtype=DT) for _ in range(3))
    ((x * cg).sum() + (z * ch).sum() + (y * cw).sum()).backward()
    info = loop.last_info
    assert bool(info.forward_converged.all()) and bool(info.backward_converged.all())
    for b in range(B):
        # closed form on the box [lo, hi]: shift to [0, 1] is not needed, solve directly
        xb = x[b].detach()
        at = (xb <= lo + 1e-9) | (xb >= hi - 1e-9)
        Fm = ~at
        assert 0 < int(Fm.sum()) < n  # both free and bound variables
        grad_f = P @ xb + q[b]
        assert float(grad_f[Fm].abs().max()) < 1e-9
        assert float((z[b].detach() - xb).abs().max()) < 1e-9
        assert float((y[b].detach() + grad_f / rho_admm).abs().max()) < 1e-9
        J = torch.zeros(n, n, dtype=DT)
        J[Fm.nonzero()[:, 0][:, None], Fm.nonzero()[:, 0]] = -torch.linalg.inv(P[Fm][:, Fm])
        expected = J @ (cg[b] + ch[b] - P @ cw[b] / rho_admm) - cw[b] / rho_admm
        assert rel(qb.grad[b], expected) < 1e-8
    # the dense backward agrees with GMRES
    loop_d = FoldedLoop(admm_step, x0=(zeros, zeros, zeros), maxiter=5000, backward="dense")
    qd = q.clone().requires_grad_(True)
    xd, zd, yd = loop_d(qd)
    ((xd * cg).sum() + (zd * ch).sum() + (yd * cw).sum()).backward()
    assert float((qd.grad - qb.grad).abs().max()) < 1e-9


def test_tuple_state_central_finite_differences():
    """Same ADMM loop, gradient against central differences of the whole forward solve."""
    n = 5
    gen = torch.Generator().manual_seed(11)
    M = torch.randn(n, n, generator=gen, dtype=DT)
    P = M.T @ M / n + 0.3 * torch.eye(n, dtype=DT)
    Kinv = torch.linalg.inv(P + torch.eye(n, dtype=DT))

    def admm_step(state, q):
        x, z, y = state
        x = (z - y - q) @ Kinv
        z_new = torch.clamp(x + y, -0.4, 0.4)
        return x, z_new, y + x - z_new

    zeros = torch.zeros(1, n, dtype=DT)
    loop = FoldedLoop(admm_step, x0=(zeros, zeros, zeros), maxiter=20000, forward_tol=1e-15)
    q = 0.7 * torch.randn(1, n, generator=gen, dtype=DT)
    c = torch.randn(3, 1, n, generator=gen, dtype=DT)

    def loss(qq):
        return sum((s * ci).sum() for s, ci in zip(loop(qq), c))

    qb = q.clone().requires_grad_(True)
    loss(qb).backward()
    h = 1e-6
    fd = torch.zeros_like(q)
    with torch.no_grad():
        for i in range(n):
            e = torch.zeros_like(q)
            e[0, i] = h
            fd[0, i] = (loss(q + e) - loss(q - e)) / (2 * h)
    assert float((qb.grad - fd).abs().max()) < 1e-7


# ----------------------------------------------------------------------------- behaviour

def test_errors_name_the_problem():
    P, q, _L, _xs, _F, *_ = qp_problem()
    x0 = torch.full((1, N), 0.5, dtype=DT)
    with pytest.raises(fp.FoldError, match=r"shape \(1, 29\).*\(1, 30\)"):
        FoldedLoop(lambda x, q_: x[:, :-1], x0=x0)(q[None])
    with pytest.raises(fp.FoldError, match="tuple"):
        FoldedLoop(lambda x, q_: (x, x), x0=x0)(q[None])
    with pytest.raises(fp.FoldError, match="initial state"):
        FoldedLoop(pg_step)(q[None], P)
    with pytest.raises(fp.FoldError, match="batched=False"):
        FoldedLoop(pg_step, x0=torch.zeros(N, dtype=DT))(q[None], P)
    with pytest.raises(fp.FoldError, match="k .* must be ≤ n_iter"):
        truncated(pg_step, x0, q[None], P, n_iter=3, k=4)
    with pytest.raises(fp.FoldError, match="n_iter must be an int"):
        unroll(pg_step, x0, q[None], P, n_iter=-1)
    with pytest.raises(fp.FoldError, match="forward_maxiter"):
        FoldedLoop(pg_step, forward_maxiter=0)
    with pytest.raises(fp.FoldError, match="solver"):
        FoldedLoop(pg_step, backward="nope")


def _scaled_batch():
    """Three copies of the QP; instance 1's step size is 10× smaller (ρ ≈ 0.98)."""
    P, q, L, xs, _F, w, gq, _ = qp_problem()
    scale = torch.tensor([[1.0], [0.1], [1.0]], dtype=DT)

    def step(x, q_):
        return torch.clamp(x - scale * (x @ P + q_) / L, 0.0, 1.0)

    return step, P, q, xs, w, gq


def test_nonconvergent_forward_warns_naming_the_instance_and_strict_raises():
    step, _P, q, _xs, w, gq = _scaled_batch()
    x0 = torch.full((3, N), 0.5, dtype=DT)
    qb = q.expand(3, N).clone().requires_grad_(True)
    loop = FoldedLoop(step, maxiter=300, x0=x0)
    with pytest.warns(fp.FoldConvergenceWarning, match=r"instance\(s\) \[1\] of 3"):
        x = loop(qb)
    info = loop.last_info
    assert info.forward_converged.tolist() == [True, False, True]
    assert int(info.forward_iterations[1]) == 300 and int(info.forward_iterations[0]) < 300
    assert float(info.forward_residual[1]) > 1e-10 >= float(info.forward_residual[0])
    (x * w).sum().backward()
    for b in (0, 2):  # the converged instances are unaffected
        assert rel(qb.grad[b], gq) < 1e-9
    with pytest.raises(fp.FoldError, match=r"instance\(s\) \[1\]"):
        FoldedLoop(step, maxiter=300, x0=x0, strict=True)(q.expand(3, N))


def test_converged_instances_stop_changing():
    """Instance 0 of the batch ends exactly where a run of instance 0 alone ends."""
    step, P, q, xs, _w, _gq = _scaled_batch()
    x0 = torch.full((3, N), 0.5, dtype=DT)
    loop = FoldedLoop(step, maxiter=5000, x0=x0)
    x = loop(q.expand(3, N))
    its = loop.last_info.forward_iterations
    assert int(its[1]) > 5 * int(its[0])  # instance 0 froze while instance 1 went on
    L = qp_data()[2]
    alone = FoldedLoop(pg_step, maxiter=5000, x0=x0[:1])
    xa = alone(q[None], P)
    assert int(alone.last_info.forward_iterations[0]) == int(its[0])
    x, xa = x.detach(), xa.detach()
    assert float((xa[0] - x[0]).abs().max()) < 1e-14
    # instance 1 stopped after r = ‖U(x) − x‖ ≤ 1e-10(1 + ‖x‖); its step contracts with
    # c = 1 − 0.1·λ_min(P)/L, so ‖U(x) − x*‖ ≤ c·r/(1 − c)
    c = 1 - 0.1 * float(torch.linalg.eigvalsh(P).min()) / L
    bound = c * 1e-10 * (1 + float(x[1].norm()) + 1e-9) / (1 - c)
    assert float((x[1] - xs).norm()) <= bound


def test_folded_loop_and_steps_iterate_share_one_forward_iteration():
    """FoldedLoop's built-in forward and fp.steps.iterate are the same iteration
    (fold_plugins._state): bit-identical iterates, iteration counts and residuals, per-instance
    freezing included; both reach the active-set solution."""
    step, P, q, xs, _w, _gq = _scaled_batch()
    x0 = torch.full((3, N), 0.5, dtype=DT)
    loop = FoldedLoop(step, maxiter=5000, x0=x0)
    with torch.no_grad():
        x_loop = loop(q.expand(3, N))
    info = loop.last_info
    x_it, it = fp.steps.iterate(step, x0, q.expand(3, N), tol=1e-10, maxiter=5000, strict=True)
    assert torch.equal(x_loop, x_it)
    assert torch.equal(info.forward_iterations, it.iterations)
    assert torch.equal(info.forward_residual, it.residual)
    assert int(it.iterations[1]) > 5 * int(it.iterations[0])  # instance 0 froze early
    # the residual both report is the one fold() measures: ‖U(x) − x‖/(1 + ‖x‖)
    d = step(x_it, q.expand(3, N)) - x_it
    r = d.norm(dim=1) / (1 + x_it.norm(dim=1))
    assert float((r - fp.diagnostics.fixed_point_residual(step, x_it, q.expand(3, N))).abs().max()
                 ) < 1e-18
    # stopped at r ≤ 1e-10(1 + ‖x‖): error ≤ c·r/(1 − c), c ≈ 0.98 for instance 1 (measured 1.1e-8)
    assert float((x_it[[0, 2]] - xs).abs().max()) < 1e-9
    assert float((x_it[1] - xs).abs().max()) < 1e-7


def test_nonfinite_step_is_reported_and_not_kept():
    P, q, _L, _xs, *_ = qp_problem()

    def step(x, q_):
        out = pg_step(x, q_, P)
        return torch.cat([out[:1], out[1:] * float("inf")])

    loop = FoldedLoop(step, x0=torch.full((2, N), 0.5, dtype=DT))
    with pytest.warns(fp.FoldConvergenceWarning, match=r"NaN/Inf for instance\(s\) \[1\]"):
        x = loop(q.expand(2, N)).detach()
    assert bool(torch.isfinite(x).all())
    assert float((x[1] - 0.5).abs().max()) == 0.0  # kept at its last finite iterate
    assert loop.last_info.forward_converged.tolist() == [True, False]


def test_warm_start_reduces_forward_iterations():
    P, q, _L, _xs, _F, w, *_ = qp_problem()
    x0 = torch.full((1, N), 0.5, dtype=DT)
    loop = FoldedLoop(pg_step, x0=x0, warm_start=True)
    loop(q[None], P)
    cold = int(loop.last_info.forward_iterations)
    dq = 1e-3 * torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=DT)
    q2 = (q + dq)[None].clone().requires_grad_(True)
    x2 = loop(q2, P)
    warm = int(loop.last_info.forward_iterations)
    assert loop.last_info.extra["warm_started"]
    assert warm < cold  # measured: 90 → 56
    xs2, F2 = active_set_solution(P, q + dq)
    assert float((x2[0].detach() - xs2).abs().max()) < 1e-9
    (x2 * w).sum().backward()
    assert rel(q2.grad[0], ift_grads(P, xs2, F2, w)[0]) < 1e-9
    # a different batch size does not match the stored state: cold start from x0
    loop(q.expand(2, N), P, x0=x0.expand(2, N))
    assert not loop.last_info.extra["warm_started"]
    assert int(loop.last_info.forward_iterations.max()) == cold
    loop.reset()
    loop(q[None], P)
    assert int(loop.last_info.forward_iterations) == cold


def test_x0_callable_and_unbatched_state():
    P, q, _L, _xs, _F, w, gq, _ = qp_problem()

    def step(x, q_):
        return pg_step(x[None], q_[None], P)[0]

    loop = FoldedLoop(step, batched=False, x0=lambda q_: torch.full_like(q_, 0.5))
    qb = q.clone().requires_grad_(True)
    x = loop(qb)
    assert x.shape == (N,)
    (x * w).sum().backward()
    assert rel(qb.grad, gq) < 1e-9
    assert loop.last_info.batch_size == 1


def _numpy_box_qp(P: np.ndarray, q: np.ndarray) -> np.ndarray:
    """A forward 'solver' outside torch: projected gradient + active-set polish, in numpy."""
    L = np.linalg.eigvalsh(P).max()
    x = np.full_like(q, 0.5)
    for _ in range(400):  # identifies the active set (ρ ≈ 0.8 here); the polish is exact
        x = np.clip(x - (P @ x + q) / L, 0.0, 1.0)
    F = (x > 1e-9) & (x < 1 - 1e-9)
    x = np.where(x >= 1 - 1e-9, 1.0, 0.0)
    x[F] = np.linalg.solve(P[np.ix_(F, F)], -(q[F] + P[np.ix_(F, ~F)] @ x[~F]))
    return x


def test_folded_decorator_matches_finite_differences():
    P, q, _L, _xs, _F, w, *_ = qp_problem()
    Pn = P.numpy()

    @folded(lambda x, q_: pg_step(x, q_, P), backward="gmres")
    def my_solver(q_):
        """Box QP via numpy."""
        return torch.from_numpy(np.stack([_numpy_box_qp(Pn, qi) for qi in q_.numpy()]))

    assert my_solver.__name__ == "my_solver" and isinstance(my_solver, FoldedLoop)
    qs = torch.stack([q, q - 0.2])
    qb = qs.clone().requires_grad_(True)
    (my_solver(qb) * w).sum().backward()
    assert my_solver.last_info.forward_residual.max() < 1e-14
    h = 1e-6
    fd = torch.zeros_like(qs)
    for b in range(2):
        for i in range(N):
            e = np.zeros(N)
            e[i] = h
            qi = qs[b].numpy()
            fd[b, i] = float(w.numpy() @ (_numpy_box_qp(Pn, qi + e) - _numpy_box_qp(Pn, qi - e))
                             / (2 * h))
    assert float((qb.grad - fd).abs().max()) < 1e-7


def test_solver_receives_x0_when_it_accepts_one():
    P, q, _L, xs, *_ = qp_problem()
    seen = []

    def solver(q_, x0=None):
        seen.append(None if x0 is None else x0.clone())
        x = torch.full_like(q_, 0.5) if x0 is None else x0
        for _ in range(3000):
            x = pg_step(x, q_, P)
        return x

    loop = FoldedLoop(lambda x, q_: pg_step(x, q_, P), solver=solver, warm_start=True)
    loop(q[None])
    loop(q[None])
    assert seen[0] is None and float((seen[1][0] - xs).abs().max()) < 1e-12


def test_truncated_full_equals_unroll_and_partial_equals_k_fixed_point_steps():
    P, q, _L, xs, _F, w, *_ = qp_problem()
    x0 = torch.full((1, N), 0.5, dtype=DT)
    qa = q[None].clone().requires_grad_(True)
    qb = q[None].clone().requires_grad_(True)
    xa = unroll(pg_step, x0, qa, P, n_iter=40)
    xb = truncated(pg_step, x0, qb, P, n_iter=40, k=40)
    assert torch.equal(xa, xb)
    (ga,) = torch.autograd.grad((xa * w).sum(), qa)
    (gb,) = torch.autograd.grad((xb * w).sum(), qb)
    assert torch.equal(ga, gb)
    # from a converged prefix (200 no-grad steps ≈ x*), k graph steps = k LFPI iterations
    k = 6
    qc = q[None].clone().requires_grad_(True)
    xc = truncated(pg_step, x0, qc, P, n_iter=200, k=k)
    (gc,) = torch.autograd.grad((xc * w).sum(), qc)
    lin = linearize(pg_step, xs[None], qc, P)
    v, _ = fp.solvers.fixed_point(lambda u: u - lin.vjp(u), w[None], tol=0.0, maxiter=k)
    (g_fp,) = torch.autograd.grad(lin.out_parts[0], qc, v)
    assert float((gc - g_fp).abs().max()) < 1e-12


def test_diagnose_predicts_unrolled_accuracy():
    """ρ from diagnose equals the closed form; the K it prescribes for accuracy ε gives a
    warm-started unrolled gradient (measured) within ε; GMRES needs ≤ |F|+1 iterations."""
    P, q, L, xs, F, w, gq, _ = qp_problem()
    loop = FoldedLoop(pg_step, x0=torch.full((1, N), 0.5, dtype=DT))
    rep = loop.diagnose(q[None], P, n_iter=100, accuracies=(1e-4, 1e-8))
    assert isinstance(rep, UnrollingDiagnosis)
    rho_closed = 1 - float(torch.linalg.eigvalsh(P[F][:, F]).min()) / L
    rho = float(rep.spectral_radius)
    assert abs(rho - rho_closed) < 1e-10
    assert float(rep.fixed_point_residual) < 1e-9
    assert abs(float(rep.predicted_unroll_error) - rho_closed ** 100) < 1e-12
    assert int(rep.backward_iterations) <= int(F.sum()) + 1
    for acc in (1e-4, 1e-8):
        K = int(rep.unroll_iterations[acc])
        assert K == math.ceil(math.log(acc) / math.log(rho_closed))  # 44 and 88 here
        qb = q[None].clone().requires_grad_(True)
        (g,) = torch.autograd.grad((unroll(pg_step, xs[None], qb, P, n_iter=K) * w).sum(), qb)
        assert rel(g[0], gq) <= acc
    text = str(rep)
    assert f"{rho_closed:.4f}" in text and "never" not in text


def test_x0_is_a_buffer_that_follows_to_and_state_dict():
    """Issue 9 item 11: x0 used to stay float64 after .to(float32) ("mixed dtypes")."""
    A = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)

    def step(x, t):
        return x @ A.to(x.dtype).T + t

    loop = FoldedLoop(step, x0=torch.zeros(3, 2, dtype=torch.float64), tol=1e-6)
    assert list(loop.state_dict()) == ["x0"]
    loop = loop.to(torch.float32)
    assert loop.x0.dtype == torch.float32
    t = torch.ones(3, 2, requires_grad=True)
    x = loop(t)
    x.sum().backward()
    # closed form: x* = (I − A)⁻¹ t, ∂Σx*/∂t = (I − A)⁻ᵀ 1
    I2 = torch.eye(2, dtype=torch.float64)
    truth = torch.linalg.solve((I2 - A).T, torch.ones(2, dtype=torch.float64))
    assert x.dtype == torch.float32 and t.grad.dtype == torch.float32
    assert torch.allclose(t.grad.double(), truth.expand(3, 2), atol=1e-5)
    # state_dict round trip (a tuple state: one buffer per part)
    pair = FoldedLoop(lambda s, t: (0.5 * s[0] + t, 0.2 * s[1] + t),
                      x0=(torch.zeros(3, 2), torch.ones(3, 2)))
    assert sorted(pair.state_dict()) == ["x0_0", "x0_1"]
    other = FoldedLoop(lambda s, t: (0.5 * s[0] + t, 0.2 * s[1] + t),
                       x0=(torch.full((3, 2), 7.0), torch.full((3, 2), 7.0)))
    other.load_state_dict(pair.state_dict())
    assert torch.equal(other.x0_1, torch.ones(3, 2)) and torch.equal(other.x0_0, torch.zeros(3, 2))


def test_diagnose_reports_weakly_active_constraints():
    """x* = clip(c, 0, 1): the entries of c exactly on a bound are weakly active (zero
    multiplier of ½‖x − c‖²), counted by construction."""
    import fold_plugins as fp

    c = torch.tensor([[0.0, 0.3, 1.0, 1.7], [0.5, -0.2, 1.0, 0.2]], dtype=torch.float64)
    loop = FoldedLoop(lambda x, c: fp.projections.box(x - 0.5 * (x - c), 0.0, 1.0),
                      x0=torch.zeros(2, 4, dtype=torch.float64), tol=1e-12)
    d = loop.diagnose(c)
    assert d.weakly_active.tolist() == [2, 1]
    assert "weakly active constraints: 3" in str(d)
