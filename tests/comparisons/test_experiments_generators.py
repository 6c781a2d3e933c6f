"""The learning experiments' data generators against the statistics of their recipes."""

from __future__ import annotations

import math

import torch

from comparisons.experiments.generators import (
    feature_net,
    nonconvex_qp_data,
    optnet_signals,
    portfolio_data,
)


def test_portfolio_covariance_is_factor_model_and_matches_sample_covariance():
    """Σ = LLᵀ + (0.01τ)²I exactly, and the realised returns scatter around their mean with
    that covariance (20,000 draws: sample covariance within 5 % in Frobenius norm)."""
    tau = 1.0
    d = portfolio_data(20_000, 3, 6, 1, tau, seed=1)
    assert torch.allclose(d.cov, d.L @ d.L.T + (0.01 * tau) ** 2 * torch.eye(6, dtype=d.cov.dtype),
                          rtol=0, atol=1e-18)
    assert float(d.L.abs().max()) <= 0.0025 * tau
    r = d.c - d.mean
    emp = r.T @ r / r.shape[0]
    assert float((emp - d.cov).norm() / d.cov.norm()) < 0.05
    assert float(r.mean(0).abs().max()) < 5 * 0.011 * tau / math.sqrt(20_000)


def test_portfolio_mean_is_polynomial_of_a_binary_linear_map():
    """mean^(1/deg) is affine in x with weights in {0, 0.05/√p} and intercept 0.1^(1/deg)."""
    p = 5
    for deg in (1, 4):
        d = portfolio_data(200, p, 7, deg, 0.1, seed=2)
        root = d.mean ** (1.0 / deg)
        X = torch.cat([d.x, torch.ones(200, 1, dtype=d.x.dtype)], 1)
        coef = torch.linalg.lstsq(X, root).solution
        assert float((X @ coef - root).abs().max()) < 1e-12
        w = coef[:p] / (0.05 / math.sqrt(p))
        assert float((w - w.round()).abs().max()) < 1e-9 and set(w.round().unique().tolist()) \
            <= {0.0, 1.0}
        assert float((coef[p] - 0.1 ** (1.0 / deg)).abs().max()) < 1e-12


def test_optnet_signals_breakpoints_heights_noise():
    """1–9 breakpoints (uniform: mean 5), integer heights in 10..99, noise σ = 10."""
    clean, noisy = optnet_signals(1500, n=100, sigma=10.0, seed=0)
    assert float(clean.min()) >= 10 and float(clean.max()) <= 99
    assert bool((clean == clean.round()).all())
    changes = (clean[:, 1:] != clean[:, :-1]).sum(1).double()
    assert int(changes.max()) <= 9 and int(changes.min()) >= 0
    # equal neighbouring heights (prob. 1/90 per breakpoint) hide a few breakpoints
    assert abs(float(changes.mean()) - 5 * (1 - 1 / 90)) < 0.2  # std of the mean 0.07
    noise = noisy - clean
    assert abs(float(noise.std()) - 10.0) < 0.1  # std error 0.02
    assert abs(float(noise.mean())) < 0.05


def test_dc3_nonconvex_recipe():
    """Q ∈ [0,1], p ∈ [0,1], h = Σ|GA⁺| (so y = A⁺b is feasible for b ∈ [0,1]), features are a
    fixed function of p."""
    d = nonconvex_qp_data(40, 12, 5, 6, seed=3)
    Ap = torch.linalg.pinv(d.A)
    assert torch.allclose(d.h, (d.G @ Ap).abs().sum(1), rtol=0, atol=1e-12)
    y0 = Ap @ d.b
    assert float((d.A @ y0 - d.b).abs().max()) < 1e-12
    assert bool((d.G @ y0 <= d.h + 1e-12).all())
    for t in (d.Q, d.p, d.b):
        assert float(t.min()) >= 0 and float(t.max()) <= 1
    with torch.no_grad():
        assert torch.allclose(feature_net(12, 50, 2, 4)(d.p), d.z, rtol=0, atol=1e-14)
