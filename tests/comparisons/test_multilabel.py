"""k-subset (LML) layers: forward KKT, closed-form backward vs central differences, folded
backward vs closed form, cvxpylayers cross-check, symmetric label noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comparisons.multilabel.data import symmetric_noise
from comparisons.multilabel.layers import (
    LML,
    EntropicKSubset,
    folded_layer,
    solve_binary,
    solve_xlogx,
)

REF = {"binary": (LML, solve_binary), "xlogx": (EntropicKSubset, solve_xlogx)}


def _logits(seed: int, B: int = 32, n: int = 10) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(B, n, generator=gen, dtype=torch.float64)


def _vjp(layer, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    cc = c.clone().requires_grad_(True)
    (out,) = torch.autograd.grad((layer(cc) * g).sum(), cc)
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_forward_satisfies_kkt(k: int) -> None:
    c = _logits(0)
    x = solve_binary(c, k)
    torch.testing.assert_close(x.sum(1), torch.full((32,), float(k), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    nu = torch.logit(x) - c                      # binary: logit(x_i) − c_i = ν for every i
    assert float((nu - nu.mean(1, keepdim=True)).abs().max()) < 1e-8
    x = solve_xlogx(c, k)
    assert float((x.sum(1) - k).abs().max()) < 1e-12 and bool((x <= 1).all())
    free = x < 1 - 1e-12
    nu = c - torch.log(x) - 1                    # −x log x: c_i − log x_i − 1 = ν on x < 1 …
    nu_row = torch.where(free, nu, torch.nan).nanmean(1, keepdim=True)
    assert float(torch.where(free, nu - nu_row, torch.zeros_like(nu)).abs().max()) < 1e-10
    assert bool((torch.where(~free, nu - nu_row, torch.zeros_like(nu)) >= -1e-10).all())  # ≥ ν


@pytest.mark.parametrize("kind", ["binary", "xlogx"])
@pytest.mark.parametrize("k", [2, 3])
def test_closed_form_backward_matches_central_differences(kind: str, k: int) -> None:
    fn, solve = REF[kind]
    c, g = _logits(1), _logits(2)
    u = _logits(3)
    eps = 1e-6
    fd = ((solve(c + eps * u, k) - solve(c - eps * u, k)) * g).sum(1) / (2 * eps)
    an = (_vjp(lambda x: fn.apply(x, float(k)), c, g) * u).sum(1)
    torch.testing.assert_close(an, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["binary", "xlogx"])
@pytest.mark.parametrize("k", [2, 3])
def test_folded_gradient_equals_closed_form(kind: str, k: int) -> None:
    fn, _ = REF[kind]
    c, g = _logits(4, B=64), _logits(5, B=64)
    exact = _vjp(lambda x: fn.apply(x, float(k)), c, g)
    for eta in (1.0, 0.1):                       # any step size: same fixed point and gradient
        folded = _vjp(folded_layer(kind, float(k), step_size=eta), c, g)
        assert float((folded - exact).abs().max()) <= 1e-8


def test_cvxpylayers_layer_matches_lml() -> None:
    pytest.importorskip("cvxpylayers")
    from comparisons.multilabel.layers import cvxpylayers_layer

    c, g = _logits(6, B=4), _logits(7, B=4)
    lay = cvxpylayers_layer(10, 2.0)
    with torch.no_grad():
        assert float((lay(c) - solve_binary(c, 2)).abs().max()) < 1e-5
    assert float((_vjp(lay, c, g) - _vjp(lambda x: LML.apply(x, 2.0), c, g)).abs().max()) < 1e-4


def test_symmetric_label_noise_statistics() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200_000)
    noisy = symmetric_noise(y, 0.4, 10, rng)
    flipped = noisy != y
    assert abs(flipped.mean() - 0.4) < 0.005
    offsets = ((noisy - y) % 10)[flipped]
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0                        # a flip never keeps the label
    np.testing.assert_allclose(counts[1:] / flipped.sum(), 1 / 9, atol=0.005)
