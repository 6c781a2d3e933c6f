"""Bad input to ``fp.fold`` is answered at the call with a FoldError naming the argument and
the fix; non-finite values and missing gradient paths are reported, never silent."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fold_plugins as fp

DT = torch.float64


def affine_step(x, c):
    """x = 0.5 x + c: x* = 2c, dx*/dc = 2 I."""
    return 0.5 * x + c


def test_nan_step_at_x_star_is_reported_per_instance_and_others_stay_exact():
    # instance 1's step is NaN at x*: the old behaviour was a silent 0 gradient (truth 2.0)
    c = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], dtype=DT, requires_grad=True)

    def step(x, c_):
        bad = torch.tensor([0.0, float("nan"), 0.0], dtype=DT)[:, None]
        return affine_step(x, c_) + bad

    x_star = 2 * c.detach()
    with pytest.warns(fp.FoldConvergenceWarning, match=r"NaN/Inf for instance\(s\) \[1\] of 3"):
        x, info = fp.fold(step, x_star, c, return_info=True)
    x.sum().backward()
    assert bool(torch.isnan(c.grad[1]).all())
    assert torch.allclose(c.grad[[0, 2]], torch.full((2, 2), 2.0, dtype=DT), rtol=1e-12)
    assert info.extra["nonfinite_step"].tolist() == [False, True, False]
    with pytest.raises(fp.FoldError, match=r"NaN/Inf for instance\(s\) \[1\]"):
        fp.fold(step, x_star, c, strict=True)


def test_nan_in_a_captured_tensor_is_named_at_the_call():
    c = torch.tensor([[1.0, float("nan")]], dtype=DT, requires_grad=True)
    with pytest.raises(fp.FoldError, match="captured by step.*NaN/Inf"):
        fp.fold(lambda x: affine_step(x, c), torch.zeros(1, 2, dtype=DT))


@pytest.mark.parametrize("how", ["detach", "numpy"])
def test_param_without_a_gradient_path_warns_naming_it(how):
    c = torch.tensor([[1.0, 2.0]], dtype=DT, requires_grad=True)

    def step(x, c_):
        if how == "detach":
            return 0.5 * x + c_.detach()
        return torch.from_numpy(0.5 * x.detach().numpy() + c_.detach().numpy())

    with pytest.warns(fp.FoldConvergenceWarning, match=r"params\[0\] require\(s\) grad but"):
        x = fp.fold(step, 2 * c.detach(), c)
    assert not x.requires_grad  # no path: no graph, and the user has been told


def test_a_used_param_gives_no_such_warning():
    c = torch.tensor([[1.0, 2.0]], dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = fp.fold(affine_step, 2 * c.detach(), c)
    x.sum().backward()
    assert torch.allclose(c.grad, torch.full((1, 2), 2.0, dtype=DT), rtol=1e-12)


def test_empty_batch_returns_an_empty_result():
    c = torch.zeros(0, 3, dtype=DT, requires_grad=True)
    x, info = fp.fold(affine_step, torch.zeros(0, 3, dtype=DT), c, return_info=True)
    assert x.shape == (0, 3) and info.batch_size == 0


@pytest.mark.parametrize("c_shape", [(0, 3), (3,)])
def test_empty_batch_differentiates_to_exact_zeros_in_every_mode(c_shape):
    """A training loop's empty last batch: backward, double backward and forward mode give
    the exact (zero) derivative, shaped like the parameter."""
    c = torch.randn(*c_shape, dtype=DT, requires_grad=True)
    x0 = torch.zeros(0, 3, dtype=DT)
    x = fp.fold(affine_step, x0, c)
    assert x.requires_grad and x.shape == (0, 3)
    (x ** 2).sum().backward()
    assert c.grad is not None and torch.equal(c.grad, torch.zeros(c_shape, dtype=DT))
    (g,) = torch.autograd.grad(fp.fold(affine_step, x0, c).sum(), c, create_graph=True)
    assert torch.equal(g, torch.zeros(c_shape, dtype=DT))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(c.detach(), torch.ones(c_shape, dtype=DT))
        out = fp.fold(affine_step, x0, dual)
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    assert out.shape == (0, 3) and tangent is not None and tangent.shape == (0, 3)


def test_meta_tensor_is_refused():
    with pytest.raises(fp.FoldError, match="x_star is a meta tensor"):
        fp.fold(affine_step, torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_at_forward_time(dtype):
    c = torch.ones(2, 3, dtype=dtype, requires_grad=True)
    with pytest.raises(fp.FoldError, match="Cast x_star and params to float32"):
        fp.fold(affine_step, 2 * c.detach(), c)


def test_solver_options_typo_is_caught_at_the_call():
    c = torch.ones(2, 3, dtype=DT, requires_grad=True)
    with pytest.raises(fp.FoldError, match=r"solver_options has \['restrat'\].*'restart'"):
        fp.fold(affine_step, 2 * c.detach(), c, solver="gmres", solver_options={"restrat": 5})


@pytest.mark.parametrize("kind", ["method", "setitem"])
def test_in_place_step_is_refused(kind):
    c = torch.ones(2, 3, dtype=DT, requires_grad=True)

    def step(x, c_):
        if kind == "method":
            return x.mul_(0.5).add(c_)
        x[:, 0] = 0.0
        return 0.5 * x + c_

    with pytest.raises(fp.FoldError, match="in place"):
        fp.fold(step, 2 * c.detach(), c)


@pytest.mark.parametrize("kwargs, match", [
    ({"fixed_point_tol": -1.0}, "fixed_point_tol must be"),
    ({"fixed_point_tol": float("nan")}, "fixed_point_tol must be"),
    ({"maxiter": True}, "maxiter must be a positive int"),
    ({"maxiter": 0}, "maxiter must be a positive int"),
    ({"tol": True}, "tol must be"),
    ({"tol": float("inf")}, "tol must be"),
    ({"batched": 1}, "batched must be True or False"),
    ({"solver": "gmress"}, "gmress"),
    ({"solver_options": [1]}, "solver_options must be a dict"),
])
def test_bad_keywords_are_refused_at_the_call(kwargs, match):
    c = torch.ones(2, 3, dtype=DT, requires_grad=True)
    with pytest.raises(fp.FoldError, match=match):
        fp.fold(affine_step, 2 * c.detach(), c, **kwargs)


def test_numpy_array_param_passes_through_untouched():
    # non-tensor params are the step's business: no check, no gradient, no warning
    c = torch.ones(1, 2, dtype=DT, requires_grad=True)
    scale = np.array(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = fp.fold(lambda x, c_, s: float(s) * x + c_, 2 * c.detach(), c, scale)
    x.sum().backward()
    assert torch.allclose(c.grad, torch.full((1, 2), 2.0, dtype=DT), rtol=1e-12)


def test_nan_in_a_captured_constant_is_named_at_the_call():
    """A closure matrix with a NaN (it needs no grad, so it is not a param): the FoldError
    comes at the call and names the tensor, not a batch-mixing verdict in backward."""
    M = 0.5 * torch.eye(3, dtype=DT)
    M[1, 2] = float("nan")
    c = torch.randn(4, 3, dtype=DT, requires_grad=True)

    def step(x, c):
        return x @ M.T + c

    with pytest.raises(fp.FoldError, match=r"captured constant\(s\) #0 \(shape \(3, 3\), "
                                           r"torch.float64, 1 NaN/Inf\)"):
        fp.fold(step, torch.zeros(4, 3, dtype=DT), c)


def test_a_nonfinite_first_instance_is_not_mistaken_for_batch_mixing():
    """Instance 0's step is NaN (log of a negative number): it is excluded with a warning and
    gets NaN gradients, the others stay exact (x* = 2c, dx*/dc = 2I), and the batch-mixing
    probe (which now starts from the first finite instance and ignores NaN rows) blames no
    coupling."""
    c = torch.tensor([[-1.0, 1.0], [0.5, 1.0], [1.0, 2.0]], dtype=DT, requires_grad=True)

    def step(x, c):
        return 0.5 * x + c + 0.0 * torch.log(c[:, :1])

    with pytest.warns(fp.FoldConvergenceWarning, match=r"instance\(s\) \[0\] of 3"):
        x = fp.fold(step, 2 * c.detach(), c)
    x.sum().backward()
    assert torch.isnan(c.grad[0]).all()
    assert torch.allclose(c.grad[1:], torch.full((2, 2), 2.0, dtype=DT), rtol=1e-10)
