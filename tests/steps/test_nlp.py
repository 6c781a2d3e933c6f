"""SQP (fold_plugins/steps/nlp.py): the nonconvex DC3 problem against finite differences, an
indefinite Lagrangian Hessian, strictness reaching the inner QP fold."""

from __future__ import annotations

import warnings

import pytest
import torch
from step_checks import DT, TOL, _dc3, _one_iteration_gmres, fd_directional, leaves, rel

import fold_plugins as fp
from fold_plugins import steps as S


def test_sqp_dc3_nonconvex_vs_fd():
    f, g, he, params = _dc3()
    Q, p, A, b, G, h = params
    B, n = b.shape[0], Q.shape[0]
    (xs, lam, nu), info = S.solve_sqp(f, g, he, torch.zeros(B, n, dtype=DT), *params, tol=1e-12)
    assert bool(info.converged.all())
    assert float(lam.max()) > 1e-3  # an inequality is active
    assert float(S.sqp_kkt_residual(f, g, he, xs, lam, nu, *params).max()) < 1e-12
    w = torch.randn(B, n, dtype=DT)
    pl = leaves(*params)
    (x, _, _), finfo = fp.fold(S.sqp(f, g, he), (xs, lam, nu), *pl, return_info=True)
    grads = torch.autograd.grad((x * w).sum(), pl)
    assert int(finfo.backward_iterations.max()) <= 2  # exact-Hessian SQP: Φ ≈ 0

    def loss(*t):
        (xx, _, _), _ = S.solve_sqp(f, g, he, xs, *t, lam0=lam, nu0=nu, tol=1e-13, warn=False)
        return (xx * w).sum()

    err_fd = fd_directional(loss, list(params), list(grads), n_dirs=3)
    print(
        f"[measured] sqp DC3: rel err vs FD {err_fd:.1e}, SQP iters {info.iterations.tolist()}"
        f", backward iters {int(finfo.backward_iterations.max())}"
    )
    assert err_fd < TOL, err_fd


def test_sqp_indefinite_lagrangian_hessian_is_shifted():
    """Strongly nonconvex (p scaled ×3): ∇²L is indefinite at the solution, hessian="auto"
    shifts it; the fixed point (and the folded gradient) is unchanged."""
    from fold_plugins.steps.nlp import _lagrangian_hessian

    f, g, he, params = _dc3(B=2, n=10, me=3, mi=4)
    params = (params[0], 3 * params[1], *params[2:])
    (xs, lam, nu), info = S.solve_sqp(
        f, g, he, torch.zeros(2, 10, dtype=DT), *params, tol=1e-12, maxiter=300
    )
    assert bool(info.converged.all())
    min_eig = torch.linalg.eigvalsh(_lagrangian_hessian(f, g, he, xs, lam, nu, params))[:, 0]
    assert float(min_eig.min()) < 0
    w = torch.randn(2, 10, dtype=DT)
    pl = leaves(*params)
    (x, _, _), finfo = fp.fold(S.sqp(f, g, he), (xs, lam, nu), *pl, return_info=True)
    grads = torch.autograd.grad((x * w).sum(), pl)

    def loss(*t):
        (xx, _, _), _ = S.solve_sqp(
            f, g, he, xs, *t, lam0=lam, nu0=nu, tol=1e-13, warn=False, maxiter=300
        )
        return (xx * w).sum()

    err_fd = fd_directional(loss, list(params), list(grads), n_dirs=2)
    print(
        f"[measured] sqp indefinite ∇²L (min eig {float(min_eig.min()):.2f}): rel err vs FD "
        f"{err_fd:.1e}, SQP iters {info.iterations.tolist()}, backward iters "
        f"{finfo.backward_iterations.tolist()}"
    )
    assert err_fd < TOL, err_fd


def test_sqp_strict_and_qp_options_reach_the_inner_qp_fold(monkeypatch):
    """The inner (QP) fold of the SQP step gets the step's strict flag and qp_options'
    rho_eq_scale; an inner backward failure raises under strict=True and warns otherwise."""
    from fold_plugins.steps import nlp

    f, g, he, params = _dc3()
    B, n = params[3].shape[0], params[0].shape[0]
    (xs, lam, nu), _ = S.solve_sqp(f, g, he, torch.zeros(B, n, dtype=DT), *params, tol=1e-12)
    seen: dict = {}
    real_admm_qp = nlp.admm_qp

    def spy(**kw):
        seen.update(kw)
        return real_admm_qp(**kw)

    monkeypatch.setattr(nlp, "admm_qp", spy)
    w = torch.randn(B, n, dtype=DT)
    pl = leaves(*params)
    grads = {}
    for scale in (1e3, 50.0):
        step = S.sqp(f, g, he, qp_options={"rho_eq_scale": scale})
        (x, _, _) = fp.fold(step, (xs, lam, nu), *pl)
        grads[scale] = torch.autograd.grad((x * w).sum(), pl)
        assert seen["rho_eq_scale"] == scale
    # ρ changes the inner ADMM's Φ but not its fixed point: the same gradient
    diff = max(rel(a, b) for a, b in zip(grads[50.0], grads[1e3]) if b.norm() > 0)
    print(f"[measured] sqp gradient with inner rho_eq_scale 50 vs 1e3: rel diff {diff:.1e}")
    assert diff < 1e-9, diff
    step = S.sqp(f, g, he, qp_backward=_one_iteration_gmres, strict=True)
    (x, _, _) = fp.fold(step, (xs, lam, nu), *pl)
    # (instance 1's inner system is solved exactly by its one Krylov vector: residual 0)
    with pytest.raises(
        fp.FoldError,
        match=r"folded backward \(_one_iteration_gmres.*did not "
        r"converge for instance\(s\) \[0(, 1)?\] of 2",
    ):
        torch.autograd.grad((x * w).sum(), pl)
    step = S.sqp(f, g, he, qp_backward=_one_iteration_gmres)
    (x, _, _) = fp.fold(step, (xs, lam, nu), *pl)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autograd.grad((x * w).sum(), pl)
    msgs = [str(c.message) for c in caught if c.category is fp.FoldConvergenceWarning]
    # the inner QP backward warns (and the outer one, fed inexact inner VJPs, may too)
    assert any(m.startswith("folded backward (_one_iteration_gmres") for m in msgs), msgs
