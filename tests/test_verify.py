"""fold_plugins.verify against closed-form VJPs (a wrong finite difference would fail these)."""

from __future__ import annotations

import math

import pytest
import torch

from fold_plugins.verify import (
    GradientReport,
    assert_gradients_close,
    compare_gradients,
    finite_difference_vjp,
)


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fd_linear_map_matches_transpose():
    g = _gen(1)
    A = torch.randn(4, 3, generator=g)
    x = torch.randn(3, generator=g)
    u = torch.randn(4, generator=g)
    (gx,) = finite_difference_vjp(lambda x: A @ x, (x,), u)
    # closed form: (∂(Ax)/∂x)ᵀ u = Aᵀu ; central differences are exact for a linear map up to
    # round-off ~ eps_machine·|φ|/h ≈ 1e-10
    assert torch.allclose(gx, A.T @ u, rtol=0, atol=1e-9)


def test_fd_exp_is_second_order_accurate():
    g = _gen(2)
    x = torch.randn(2, 5, generator=g)
    u = torch.randn(2, 5, generator=g)
    (gx,) = finite_difference_vjp(torch.exp, x, u)
    exact = u * torch.exp(x)
    err = float((gx - exact).norm() / exact.norm())
    # central difference: truncation h²/6·f''' ≈ 2e-13, round-off ≈ 1e-10; a forward
    # difference would be off by h/2·f'' ≈ 5e-7 and fail this
    assert err < 1e-8, err


def test_fd_forward_difference_would_fail():
    # sanity of the threshold above: a one-sided difference on exp misses by ~h/2
    h = 1e-6
    one_sided = (math.exp(0.3 + h) - math.exp(0.3)) / h
    assert abs(one_sided - math.exp(0.3)) / math.exp(0.3) > 1e-7


def test_fd_tuple_output_and_multiple_inputs():
    g = _gen(3)
    W = torch.randn(3, 4, generator=g)
    x = torch.randn(4, generator=g)
    u1 = torch.randn(3, generator=g)
    u2 = torch.randn((), generator=g)

    def f(W, x, scale):
        return W @ x * scale, torch.sin(x).sum()

    gW, gx, gs = finite_difference_vjp(f, (W, x, 2.0), (u1, u2))
    # closed form: ∂/∂W ⟨u1, 2Wx⟩ = 2 u1 xᵀ ; ∂/∂x = 2 Wᵀu1 + u2 cos(x)
    assert gs is None
    assert torch.allclose(gW, 2 * torch.outer(u1, x), atol=1e-8)
    assert torch.allclose(gx, 2 * W.T @ u1 + u2 * torch.cos(x), atol=1e-8)


def test_fd_runs_in_float64_for_float32_inputs():
    x = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float32)
    u = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float32)
    (gx,) = finite_difference_vjp(lambda x: x ** 3, x, u)
    assert gx.dtype == torch.float64
    exact = 3 * x.double() ** 2 * u.double()
    assert torch.allclose(gx, exact, rtol=1e-8, atol=0)


def test_fd_wrt_selects_inputs():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    ga, gb = finite_difference_vjp(lambda a, b: a * b, (a, b), torch.ones(2), wrt=[1])
    assert ga is None
    assert torch.allclose(gb, a, atol=1e-9)


def test_compare_with_fd_on_known_jacobian():
    g = _gen(4)
    A = torch.randn(5, 5, generator=g)
    x = torch.randn(3, 5, generator=g)

    def fn(A, x):  # batched x ↦ tanh(x Aᵀ), Jacobian known in closed form
        return torch.tanh(x @ A.T)

    rep = compare_gradients(fn, "finite_differences", (A, x), n_directions=2, seed=0)
    assert isinstance(rep, GradientReport)
    assert rep.n_directions == 2 and len(rep.inputs) == 2
    assert rep.worst < 1e-8, rep
    assert rep.min_cosine > 1 - 1e-12
    assert "input[0]" in str(rep) and "rel. error" in str(rep)


def _scaled_grad(k: float):
    """y = x² whose backward returns k · (true gradient): a reference with a known error."""

    class F(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x ** 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return k * 2 * x * g

    return F.apply


def test_compare_reports_exact_relative_error_and_cosine():
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    rep = compare_gradients(lambda x: x ** 2, _scaled_grad(2.0), (x,), n_directions=3)
    # a = g, b = 2g  ⇒  ‖a − b‖/‖b‖ = 1/2 exactly, cosine 1, outputs equal
    (row,) = rep.inputs
    assert row.rel_error == pytest.approx(0.5, rel=1e-14)
    assert all(r == pytest.approx(0.5, rel=1e-14) for r in row.rel_errors)
    assert row.cosine == pytest.approx(1.0, abs=1e-14)
    assert rep.value_error == 0.0
    rep_neg = compare_gradients(lambda x: x ** 2, _scaled_grad(-1.0), (x,))
    # b = −a ⇒ relative error 2, cosine −1
    assert rep_neg.worst == pytest.approx(2.0, rel=1e-14)
    assert rep_neg.min_cosine == pytest.approx(-1.0, abs=1e-14)
    assert rep_neg.worst_input.name == "input[0]"


def test_max_abs_error_closed_form():
    x = torch.tensor([[1.0, -2.0]])
    rep = compare_gradients(lambda x: x ** 2, _scaled_grad(1.5), (x,), n_directions=1, seed=7)
    u = torch.randn((1, 2), generator=torch.Generator().manual_seed(7))
    a = 2 * x * u
    assert rep.inputs[0].max_abs_error == pytest.approx(float((0.5 * a).abs().max()), rel=1e-14)
    assert rep.inputs[0].ref_norm == pytest.approx(float((1.5 * a).norm()), rel=1e-14)


def test_assert_gradients_close_passes_and_fails_with_table():
    x = torch.tensor([[0.3, -0.7]])
    rep = assert_gradients_close(torch.sin, "finite_differences", x, rtol=1e-8)
    assert rep.worst < 1e-8
    with pytest.raises(AssertionError) as e:
        assert_gradients_close(lambda x: x ** 2, _scaled_grad(1.001), (x,), rtol=1e-5)
    msg = str(e.value)
    assert "input[0]" in msg and "rel. error" in msg and "rtol=1.0e-05" in msg
    # 1.001 scaling: relative error 0.001/1.001 passes a looser bound
    assert_gradients_close(lambda x: x ** 2, _scaled_grad(1.001), (x,), rtol=1e-3)


def test_value_mismatch_is_reported():
    x = torch.tensor([[0.3, -0.7]])
    rep = compare_gradients(torch.sin, lambda x: torch.sin(x) + 1e-3, (x,))
    ref = torch.sin(x) + 1e-3
    assert rep.value_error == pytest.approx(float(1e-3 * math.sqrt(2) / ref.norm()), rel=1e-9)
    assert rep.worst == 0.0  # same derivative
    with pytest.raises(AssertionError, match="outputs differ"):
        assert_gradients_close(torch.sin, lambda x: torch.sin(x) + 1e-3, (x,), value_rtol=1e-6)


def test_deterministic_given_seed():
    x = torch.tensor([[0.1, 0.2, 0.3]])
    r1 = compare_gradients(lambda x: x ** 2, _scaled_grad(1.1), (x,), seed=3)
    r2 = compare_gradients(lambda x: x ** 2, _scaled_grad(1.1), (x,), seed=3)
    assert r1.inputs[0].rel_errors == r2.inputs[0].rel_errors


def test_unused_input_gets_zero_gradient_both_ways():
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])
    rep = compare_gradients(lambda x, y: x * 2, "finite_differences", (x, y))
    assert rep.inputs[1].rel_error == 0.0 and rep.inputs[1].cosine == 1.0
    assert rep.inputs[0].rel_error < 1e-9


def test_bad_arguments_are_named():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"cotangent\[0\] has shape \(3,\).*\(2, 3\)"):
        finite_difference_vjp(torch.exp, x, torch.ones(3))
    with pytest.raises(ValueError, match="wrt contains 5"):
        finite_difference_vjp(torch.exp, x, torch.ones(2, 3), wrt=[5])
    with pytest.raises(TypeError, match="only floating-point"):
        finite_difference_vjp(lambda a, b: a, (x, 3), torch.ones(2, 3), wrt=[1])
    with pytest.raises(ValueError, match="finite_differences"):
        compare_gradients(torch.exp, "fd", x)
    with pytest.raises(ValueError, match="n_directions"):
        compare_gradients(torch.exp, "finite_differences", x, n_directions=0)
    with pytest.raises(ValueError, match="returns 1 output"):
        compare_gradients(lambda x: (x, x), lambda x: x, x)
