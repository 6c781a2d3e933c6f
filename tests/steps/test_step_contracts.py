"""What every step module promises alike: one way of reporting forward non-convergence, the
batched autograd helpers, shape errors that name the argument, dtype kept."""

from __future__ import annotations

import warnings

import pytest
import torch
from step_checks import DT, _dc3, _general_qp, _logreg, leaves, rel

import fold_plugins as fp
from fold_plugins import steps as S


def test_forward_drivers_report_unconverged_instances_and_strict_raises():
    """Every forward driver reports non-convergence the one way (fp._errors.report_unconverged):
    a FoldConvergenceWarning naming the instances and the worst error, or FoldError when
    strict; the reported error is the driver's own measure (checked against its info)."""
    P, q, A, l, u = _general_qp(B=2)
    y = torch.cumsum(torch.randn(2, 12, dtype=DT), 1)
    f, g, he, params = _dc3()
    cases = {
        "solve_qp_admm": lambda **kw: S.solve_qp_admm(P, q, A, l, u, maxiter=5, polish=False, **kw),
        "solve_tv": lambda **kw: S.solve_tv(y, 0.5, maxiter=3, polish=False, **kw),
        "solve_sqp": lambda **kw: S.solve_sqp(
            f, g, he, torch.zeros(2, 8, dtype=DT), *params, maxiter=1, **kw
        ),
        "minimize_newton": lambda **kw: S.minimize_newton(
            _logreg,
            torch.zeros(2, 3, dtype=DT),
            torch.randn(2, 10, 3, dtype=DT),
            torch.sign(torch.randn(2, 10, dtype=DT)),
            torch.tensor(0.1, dtype=DT),
            maxiter=1,
            **kw,
        ),
    }
    for name, run in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, info = run()
        msgs = [str(c.message) for c in caught if c.category is fp.FoldConvergenceWarning]
        assert len(msgs) == 1 and msgs[0].startswith(name), (name, msgs)
        assert "did not converge for instance(s) [0, 1] of 2" in msgs[0], msgs[0]
        if name == "solve_qp_admm":
            err = torch.maximum(info.primal_residual, info.dual_residual)
        elif name == "solve_sqp":
            err = info.kkt_residual
        else:
            err = info.residual
        assert f"(error up to {float(err.max()):.2e})" in msgs[0], (msgs[0], err)
        with pytest.raises(fp.FoldError, match=rf"^{name} .*\[0, 1\] of 2"):
            run(strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(warn=False)  # silenced on request (strict still raises)


def test_autograd_jacobian_batched_matches_closed_form_and_falls_back():
    """(B, k, n) Jacobian in one batched backward pass; exact against the closed form, with a
    differentiable result under create_graph; ops without a batching rule fall back to one
    pass per output row with the same values."""
    from fold_plugins.steps._common import autograd_jacobian

    B, k, n = 3, 4, 5
    M = torch.randn(B, k, n, dtype=DT)
    x = torch.randn(B, n, dtype=DT, requires_grad=True)
    z = (M @ x.unsqueeze(-1)).squeeze(-1)
    J = autograd_jacobian(torch.sin(z), x, create_graph=True)
    J_true = torch.cos(z).unsqueeze(-1) * M
    assert J.shape == (B, k, n)
    assert float((J.detach() - J_true.detach()).abs().max()) < 1e-15
    # second order through J: ∂/∂x Σ J = −Σ_i sin(z_i) M_i (M_i ᵀ1)
    (h,) = torch.autograd.grad(J.sum(), x)
    h_true = -(torch.sin(z).unsqueeze(-1) * M * M.sum(-1, keepdim=True)).sum(1)
    assert float((h - h_true.detach()).abs().max()) < 1e-13
    calls = []

    class NoBatchingRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t**3

        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            calls.append(1)
            if float(grad.abs().sum()) < 0:  # data-dependent Python: cannot run under vmap
                raise AssertionError
            return 3 * t**2 * grad

    xd = x.detach().requires_grad_(True)
    Jf = autograd_jacobian(NoBatchingRule.apply(xd[:, :k]), xd, create_graph=False)
    Jf_true = torch.cat(
        [torch.diag_embed(3 * xd.detach()[:, :k] ** 2), torch.zeros(B, k, n - k, dtype=DT)], dim=2
    )
    assert torch.equal(Jf, Jf_true)
    assert len(calls) == 1 + k  # the failed batched attempt, then one pass per row
    calls.clear()

    class WithRule(NoBatchingRule):
        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            calls.append(1)
            return 3 * t**2 * grad

    Jb = autograd_jacobian(WithRule.apply(xd[:, :k]), xd, create_graph=False)
    assert torch.equal(Jb, Jf_true) and len(calls) == 1  # one batched pass
    assert autograd_jacobian(xd[:, :0], xd, create_graph=False).shape == (B, 0, n)


def test_wrong_shapes_rejected_with_shapes_named():
    P, q, A, l, u = _general_qp(B=2, n=8)
    with pytest.raises(S.ShapeError, match=r"P has shape \(7, 7\).*\(8, 8\)"):
        S.solve_qp_admm(torch.eye(7, dtype=DT), q, A, l, u)
    state = (torch.zeros(2, 8, dtype=DT), torch.zeros(2, 8, dtype=DT), torch.zeros(2, 8, dtype=DT))
    with pytest.raises(S.ShapeError, match=r"q has shape \(3, 8\).*\(2, 8\)"):
        S.admm_qp()(state, P, torch.zeros(3, 8, dtype=DT), A, l, u)
    with pytest.raises(S.ShapeError, match=r"A has shape \(8, 5\)"):
        S.admm_qp()(state, P, q, A[:, :5], l, u)
    with pytest.raises(S.ShapeError, match=r"D has shape \(4, 6\), expected \(9, 10\)"):
        S.fdpg_tv()(
            torch.zeros(2, 9, dtype=DT),
            torch.zeros(2, 10, dtype=DT),
            0.1,
            torch.zeros(4, 6, dtype=DT),
        )
    with pytest.raises(S.ShapeError, match=r"step_size has shape \(5,\)"):
        S.gradient_descent(lambda x: x, torch.ones(5, dtype=DT))(torch.zeros(2, 3, dtype=DT))
    with pytest.raises(S.ShapeError, match=r"state must be a \(B, n\) tensor, got \(3,\)"):
        S.mirror_descent(lambda x: x)(torch.ones(3, dtype=DT))
    f, g, he, params = _dc3()
    st = (torch.zeros(2, 8, dtype=DT), torch.zeros(2, 5, dtype=DT), torch.zeros(2, 3, dtype=DT))
    with pytest.raises(S.ShapeError, match=r"λ has shape \(2, 5\).*\(2, 3\)"):
        S.sqp(f, g, he)(st, *params)


def test_steps_keep_dtype_float32_and_match_float64():
    """float32 in, float32 out — and the float32 values and folded gradients agree with the
    float64 solve to float32 accuracy (measured: QP x 1.1e-7, ∂/∂(P, q, A) 3.9e-5, 3.0e-5,
    8.6e-5; mirror descent x 9.0e-8 and ∂/∂c 1.9e-7 vs the closed form 2·softmax)."""
    P, q, A, l, u = _general_qp(B=2)
    w = torch.randn(2, 8, dtype=DT)

    def solve(dt, tol, backward_tol):
        Pl, ql, Al = leaves(P.to(dt), q.to(dt), A.to(dt))
        x, finfo, qinfo = S.qp(
            Pl,
            ql,
            Al,
            l.to(dt),
            u.to(dt),
            return_info=True,
            admm_options={"tol": tol},
            backward_tol=backward_tol,
            strict=True,
        )
        return x, torch.autograd.grad((x * w.to(dt)).sum(), [Pl, ql, Al]), qinfo

    # float32: the backward residual's own round-off floor is ~1e-5 here (measured 6e-6 to
    # 3e-5 depending on the cotangent), so 1e-4 is the honest tolerance to ask for
    x32, g32, info32 = solve(torch.float32, 1e-6, 1e-4)
    x64, g64, _ = solve(DT, 1e-12, 1e-12)
    assert x32.dtype == torch.float32 and all(t.dtype == torch.float32 for t in g32)
    assert all(st == "solved" for st in info32.status)
    err_x = rel(x32.double(), x64)
    err_g = [rel(a.double(), b) for a, b in zip(g32, g64)]
    print(
        f"[measured] float32 QP vs float64: x {err_x:.1e}, grads (P, q, A) "
        + ", ".join(f"{e:.1e}" for e in err_g)
    )
    assert err_x < 1e-5, err_x
    assert max(err_g) < 1e-3, err_g
    # entropic mirror descent in float32: x* = 2·softmax(−c/ε)
    B, n, eps = 3, 6, 0.3
    c = torch.randn(B, n, dtype=DT)
    step = S.mirror_descent(
        lambda x, c: c + eps * (1 + torch.log(x)), step_size=1 / eps, radius=2.0
    )
    c32 = c.float().requires_grad_(True)
    xs, info = S.iterate(step, torch.full((B, n), 2 / n), c32, tol=1e-6, maxiter=200, strict=True)
    wm = torch.randn(B, n, dtype=DT)
    (gc,) = torch.autograd.grad((fp.fold(step, xs, c32, strict=True) * wm.float()).sum(), c32)
    ct = c.clone().requires_grad_(True)
    closed = 2 * torch.softmax(-ct / eps, 1)
    (gref,) = torch.autograd.grad((closed * wm).sum(), ct)
    assert xs.dtype == torch.float32 and gc.dtype == torch.float32
    err_md, err_mg = rel(xs.double(), closed), rel(gc.double(), gref)
    print(f"[measured] float32 mirror descent vs closed form: x {err_md:.1e}, grad {err_mg:.1e}")
    assert err_md < 1e-6 and err_mg < 1e-5, (err_md, err_mg)
