"""fold_plugins.cones: projections checked by their optimality certificates (and cvxpy for the
exponential cone), Jacobians by central finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from fold_plugins import FoldError, cones

F64 = torch.float64


def _fd_jacobian(f, v, eps=1e-6):
    E = torch.eye(v.numel(), dtype=v.dtype)
    return torch.stack([(f(v + eps * e) - f(v - eps * e)) / (2 * eps) for e in E], 1)


def _psd_min_eig(x):
    return torch.linalg.eigvalsh(cones.smat(x)).min(-1).values


def test_second_order_and_psd_moreau_certificates():
    """p = Π_K(v) iff p ∈ K, p − v ∈ K (self-dual), ⟨p, p − v⟩ = 0."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(500, 5, generator=g, dtype=F64) * 2
    p = cones.second_order(v)
    d = p - v
    for t in (p, d):
        assert float((torch.linalg.vector_norm(t[:, 1:], dim=1) - t[:, 0]).max()) < 1e-12
    assert float((p * d).sum(1).abs().max()) < 1e-12
    v = torch.randn(200, 10, generator=g, dtype=F64)  # k = 4
    p = cones.psd(v)
    d = p - v
    assert float(_psd_min_eig(p).min()) > -1e-12 and float(_psd_min_eig(d).min()) > -1e-12
    assert float((p * d).sum(1).abs().max()) < 1e-12  # ⟨svec, svec⟩ = trace inner product


def test_svec_is_an_isometry():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(3, 4, 4, generator=g, dtype=F64)
    M = M + M.transpose(1, 2)
    N = torch.randn(3, 4, 4, generator=g, dtype=F64)
    N = N + N.transpose(1, 2)
    torch.testing.assert_close(cones.smat(cones.svec(M)), M, rtol=0, atol=1e-15)
    torch.testing.assert_close((cones.svec(M) * cones.svec(N)).sum(1),
                               torch.einsum("bij,bji->b", M, N), rtol=1e-14, atol=1e-14)


def test_exponential_matches_cvxpy_and_certificates():
    cp = pytest.importorskip("cvxpy")
    g = torch.Generator().manual_seed(2)
    v = torch.randn(300, 3, generator=g, dtype=F64) * 3
    p = cones.exponential(v)
    x, y, z = p.unbind(1)
    ys = y.clamp(min=1e-300)
    viol = torch.where(y > 0, ys * torch.exp(x / ys) - z, torch.maximum(x, -z))
    assert float(viol.max()) < 1e-12  # p ∈ K
    assert float((p * (p - v)).sum(1).abs().max()) < 1e-10  # complementarity
    dual = cones.exponential_dual(v)  # Moreau: v = Π_K(v) − Π_K*(−v)
    torch.testing.assert_close(cones.exponential(v) - cones.exponential_dual(-v), v,
                               rtol=0, atol=1e-12)
    assert dual.shape == v.shape
    for i in range(0, 300, 30):  # an independent solver on a few points
        q = cp.Variable(3)
        cp.Problem(cp.Minimize(cp.sum_squares(q - v[i].numpy())),
                   [cp.constraints.ExpCone(q[0], q[1], q[2])]).solve(solver="CLARABEL")
        # Clarabel's default 1e-8 gap leaves ~√gap error on a curved cone's face
        assert float((p[i] - torch.as_tensor(q.value)).abs().max()) < 1e-4


@pytest.mark.parametrize("name,fn,dim", [("soc", cones.second_order, 4),
                                         ("exp", cones.exponential, 3),
                                         ("exp_dual", cones.exponential_dual, 3),
                                         ("psd", cones.psd, 6),
                                         ("nonneg", cones.nonnegative, 4)])
def test_jacobians_match_finite_differences(name, fn, dim):
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for _ in range(15):
        v = torch.randn(dim, generator=g, dtype=F64) * 2
        worst = max(worst, float((jacobian(fn, v) - _fd_jacobian(fn, v)).abs().max()))
    assert worst < 1e-6


def test_psd_derivative_finite_at_repeated_eigenvalues():
    """At −I (a triple zero eigenvalue after projection) eigh's own backward is not finite; the
    Löwner formula gives the directional derivative 0 for −I + tH, H ⪯ 0… and H itself
    (restricted) for H ⪰ 0: check against finite differences along symmetric directions."""
    v = cones.svec(-torch.eye(3, dtype=F64))
    J = jacobian(cones.psd, v)
    assert bool(torch.isfinite(J).all())
    v2 = cones.svec(torch.diag(torch.tensor([2.0, 2.0, -1.0], dtype=F64)))
    torch.testing.assert_close(jacobian(cones.psd, v2), _fd_jacobian(cones.psd, v2),
                               rtol=0, atol=1e-8)


def test_product_layout_and_dual():
    dims = cones.ConeDims(zero=2, nonneg=3, soc=(3, 4, 3), psd=(2,), exp=2)
    g = torch.Generator().manual_seed(4)
    v = torch.randn(7, dims.size, generator=g, dtype=F64)
    p = cones.product(v, dims)
    ref = torch.cat([torch.zeros(7, 2, dtype=F64), v[:, 2:5].clamp(min=0),
                     cones.second_order(v[:, 5:8]), cones.second_order(v[:, 8:12]),
                     cones.second_order(v[:, 12:15]), cones.psd(v[:, 15:18]),
                     cones.exponential(v[:, 18:21]), cones.exponential(v[:, 21:24])], 1)
    torch.testing.assert_close(p, ref, rtol=0, atol=0)
    # Moreau for the product: v = Π_K(v) − Π_K*(−v)
    torch.testing.assert_close(p - cones.product(-v, dims, dual=True), v, rtol=0, atol=1e-12)
    with pytest.raises(FoldError, match="last dim"):
        cones.product(v[:, :-1], dims)
    with pytest.raises(FoldError, match="k\\(k\\+1\\)/2"):
        cones.psd(torch.zeros(4, dtype=F64))


def test_exponential_ray_solve_is_newton_fast_and_exact(monkeypatch):
    """The ray parameter of the projection: a root of the normal equation to round-off, in a
    handful of safeguarded Newton steps (a converged iterate on its bracket's end is kept, not
    thrown back to the midpoint: that made every call run all 40 iterations)."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(400, 3, generator=g, dtype=torch.float64)
    # the points projected onto the boundary ray, with the ray parameter inside the grid
    # (|r| ≤ 200; beyond it the solve bisects to the grid's end, where e^{-200} is round-off)
    v = v[cones._exp_cases(v)[3] & ((v[:, 1] > 0.02) | (v[:, 0] > 0.02))]
    calls = []
    orig = cones._exp_normal_eq
    monkeypatch.setattr(cones, "_exp_normal_eq", lambda r, x: calls.append(1) or orig(r, x))
    r = cones._exp_solve_r(v)
    iterations = (len(calls) - 1) // 3
    monkeypatch.undo()
    res = cones._exp_normal_eq(r, v).abs() / (v.norm(dim=1) * (1 + r.abs()) ** 2)
    assert v.shape[0] > 100 and iterations <= 12 and float(res.max()) < 1e-12
    # and the projection built on it still satisfies Moreau's decomposition
    p, q = cones.exponential(v), cones.exponential_dual(-v)
    assert float((p - q - v).abs().max()) < 1e-10
