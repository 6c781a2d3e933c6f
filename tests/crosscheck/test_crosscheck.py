"""Folded gradients vs cvxpylayers vs diffcp (convex cases) and vs finite differences (DC3).

Every case: float64, blackbox or library forward, one library step folded with GMRES; the
relative VJP error ``‖a − b‖/‖b‖`` over 3 random cotangents must be ≤ the case's own ``rtol``
against each reference: about 30–70× its measured worst error, never looser than 1e-5
(measured values are below, in each case's docstring and in the session summary).
"""

from __future__ import annotations

import warnings

import pytest
import torch

cp = pytest.importorskip("cvxpy")
pytest.importorskip("diffcp")
pytest.importorskip("cvxpylayers")
pytest.importorskip("osqp")

import fold_plugins as fp  # noqa: E402
from comparisons.cases import CASES, general_qp  # noqa: E402
from fold_plugins import FoldConvergenceWarning, FoldError  # noqa: E402
from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference  # noqa: E402
from fold_plugins.adapters.diffcp import diffcp_reference  # noqa: E402
from fold_plugins.verify import assert_gradients_close, compare_gradients  # noqa: E402

F64 = torch.float64

# measured worst relative VJP error of the folded gradient (same for both references, which
# share cvxpy's cone program and diffcp; SCS at eps 1e-12, dense derivative):
#   box_qp 1.5e-9 (Clarabel forward, fixed-point residual 1e-9) · sparsemax 1.5e-12 ·
#   k_subset 8.6e-14 · general_qp 8.7e-13 · constrained_ls 4.4e-10 · markowitz 1.6e-11 ·
#   tv_denoising 1.0e-13 · entropy_lp 3.3e-7 (diffcp's exponential-cone derivative; the values
#   agree to 1e-13) · dc3_nonconvex 7.4e-8 vs central differences (step 1e-5)
# asserted per case (CrossCheckCase.rtol): box_qp 1e-7 · sparsemax 1e-10 · k_subset 5e-12 ·
#   general_qp 5e-11 · constrained_ls 3e-8 · markowitz 1e-9 · tv_denoising 5e-12 ·
#   entropy_lp 1e-5 · dc3_nonconvex 3e-6
CONVEX = [name for name in CASES if name != "dc3_nonconvex"]
SLOW = {"constrained_ls", "markowitz"}


def _param(name):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


@pytest.mark.parametrize("name", [_param(n) for n in CONVEX])
def test_folded_matches_cvxpylayers_and_diffcp(name, record):
    case = CASES[name]()
    assert case.reference == "cvx" and all(t.dtype == F64 for t in case.params)
    assert case.rtol <= 1e-5  # each case's own tolerance, never looser than the 1e-5
    prob, ps, vs = case.build_cvxpy()
    cl = case.wrap_reference(cvxpylayers_reference(prob, ps, vs))
    prob2, ps2, vs2 = case.build_cvxpy()
    dc = case.wrap_reference(diffcp_reference(prob2, ps2, vs2))
    with warnings.catch_warnings():
        # an inexact forward or an unconverged backward must fail the case, not just warn
        warnings.simplefilter("error", FoldConvergenceWarning)
        r_cl = assert_gradients_close(case.folded, cl, case.params, rtol=case.rtol,
                                      value_rtol=1e-7, n_directions=3,
                                      names=case.param_names)
        info = case.last_info
        r_dc = assert_gradients_close(case.folded, dc, case.params, rtol=case.rtol,
                                      value_rtol=1e-7, n_directions=3,
                                      names=case.param_names)
    record(name, "cvxpylayers", r_cl)
    record(name, "diffcp", r_dc)
    assert info.backward_ran and bool(info.backward_converged.all())
    assert float(info.fixed_point_residual.max()) < 1e-6
    # the two references agree with each other too
    r_ref = compare_gradients(cl, dc, case.params, n_directions=1)
    assert r_ref.worst < 1e-6, r_ref


@pytest.mark.slow
def test_dc3_nonconvex_sqp_against_finite_differences(record):
    case = CASES["dc3_nonconvex"]()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FoldConvergenceWarning)
        x = case.folded(*case.params).detach()
        rep = assert_gradients_close(case.folded, "finite_differences", case.params,
                                     rtol=case.rtol, eps=case.fd_eps, n_directions=2,
                                     names=case.param_names)
    record("dc3_nonconvex", "finite_differences", rep)
    # the case is genuinely nonconvex where it is solved: ∇²f = Q − diag(p ⊙ sin x) is
    # indefinite at instance 0 (measured λ_min = −0.011) and inequalities are active there
    p = case.params[0]
    Q = case.extras["Q"]
    lam_min = torch.linalg.eigvalsh(Q - torch.diag(p[0] * torch.sin(x[0]))).min()
    assert float(lam_min) < 0
    slack = case.extras["g"](x, *case.params)
    assert bool((slack[0].abs() < 1e-9).any())


# ----------------------------------------------------------------------------- degenerate / bad

def test_weakly_active_bound_gives_finite_free_convention_gradient():
    """Box QP with P = I: x* = clip(−q, lo, hi). Coordinate 0 sits exactly on hi with zero
    multiplier (q₀ = −hi₀): a kink of the solution map. The folded gradient is finite and is
    the documented "free" one-sided derivative (∂x₀/∂q₀ = −1, ∂x₀/∂hi₀ = 0)."""
    n = 5
    q = torch.tensor([[-0.5, 0.2, -2.0, 3.0, 0.1]], dtype=F64)
    lo = torch.full((1, n), -1.0, dtype=F64)
    hi = torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0]], dtype=F64)  # −q₀ = hi₀ exactly
    step = fp.steps.projected_gradient(lambda x, q: x + q, fp.projections.box, 0.5,
                                       n_grad_params=1)

    def folded(q, lo, hi):
        with torch.no_grad():
            x_star = torch.clamp(-q, lo, hi)
        return fp.fold(step, x_star, q, lo, hi, tol=1e-12)

    qq, ll, hh = (t.clone().requires_grad_(True) for t in (q, lo, hi))
    x = folded(qq, ll, hh)
    x[0, 0].backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (qq, ll, hh))
    expected_q = torch.zeros(1, n, dtype=F64)
    expected_q[0, 0] = -1.0
    assert torch.equal(qq.grad, expected_q)
    assert torch.equal(hh.grad, torch.zeros(1, n, dtype=F64))
    # it is the one-sided derivative on the free side (q₀ increasing keeps x₀ < hi₀)
    h = 1e-6
    q_plus = q.clone()
    q_plus[0, 0] += h
    one_sided = (torch.clamp(-q_plus, lo, hi) - torch.clamp(-q, lo, hi))[0, 0] / h
    assert abs(float(one_sided) - float(qq.grad[0, 0])) < 1e-9
    # the full VJP of the folded map matches the free-convention closed form
    free = torch.tensor([[True, True, False, False, True]])

    def closed(q, lo, hi):
        return torch.where(free, -q, torch.where(-q > hi, hi, lo))

    assert_gradients_close(folded, closed, (q, lo, hi), rtol=1e-12, atol=1e-14)


def _infeasible_general_qp():
    case = general_qp(batch=2)
    q, L, A, b, G, h = (t.clone() for t in case.params)
    # instance 1: g₀ᵀx ≤ −1 and −g₀ᵀx ≤ −1 cannot both hold
    G[1, 1] = -G[1, 0]
    h[1, 0] = h[1, 1] = -1.0
    return case, (q, L, A, b, G, h)


def test_infeasible_qp_fails_in_the_forward_with_a_clear_error():
    case, params = _infeasible_general_qp()
    with pytest.raises(FoldError, match=r"OSQP.*infeasible.*instance 1"):
        case.folded(*params)
    prob, ps, vs = case.build_cvxpy()
    with pytest.raises(FoldError, match="instance 1"):
        diffcp_reference(prob, ps, vs)(*params)
    with pytest.raises(FoldError, match="feasible"):
        cvxpylayers_reference(prob, ps, vs)(*params)


def test_case_parameters_of_wrong_shape_are_rejected_by_the_references():
    case = CASES["box_qp"](batch=2)
    prob, ps, vs = case.build_cvxpy()
    q, L, lo, hi = case.params
    with pytest.raises(ValueError, match=r"'.*' has shape \(2, 9\); expected \(10,\)"):
        diffcp_reference(prob, ps, vs)(q[:, :9], L, lo, hi)
