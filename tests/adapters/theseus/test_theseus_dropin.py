"""FoldedTheseusLayer as a drop-in for th.TheseusLayer: API, objective state, truncated forwards.

Truths: central finite differences of the whole Theseus solve (float64), Theseus's own
``unroll`` backward on the same truncated forward, and ``th.TheseusLayer`` itself (API
signatures, DCEM gradients with the same random stream).
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import fold_plugins as fp

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*skparse.cholmod.*")
    th = pytest.importorskip("theseus")

from fold_plugins.adapters.theseus import FoldedTheseusLayer  # noqa: E402

DT = torch.float64
N = 12
X = torch.linspace(0.0, 1.0, N, dtype=DT).reshape(1, N)
W = torch.tensor([[0.7, -1.3]], dtype=DT)
H = 1e-5


def exp_residual(optim_vars, aux_vars):
    """r = exp(a·x) + b − y (module level, so the objective pickles)."""
    a, b = optim_vars
    x, y = aux_vars
    return torch.exp(a.tensor * x.tensor) + b.tensor - y.tensor


def make_optimizer(opt_cls=th.GaussNewton, **kw):
    a, b = th.Vector(1, name="a", dtype=DT), th.Vector(1, name="b", dtype=DT)
    aux = [th.Variable(X.clone(), name="x"), th.Variable(torch.zeros(1, N, dtype=DT), name="y")]
    obj = th.Objective(dtype=DT)
    obj.add(th.AutoDiffCostFunction([a, b], exp_residual, N, aux_vars=aux, name="fit",
                                    cost_weight=th.ScaleCostWeight(torch.ones(1, 1, dtype=DT))))
    params = dict(abs_err_tolerance=0.0, rel_err_tolerance=0.0, max_iterations=15)
    params.update(kw)
    return opt_cls(obj, **params)


def data(B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(1.5 * X) + 0.5 + 0.5 * torch.randn(B, N, generator=g, dtype=DT)


def init(B: int) -> dict:
    return {"a": torch.ones(B, 1, dtype=DT), "b": torch.zeros(B, 1, dtype=DT)}


def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.cat([a, b], dim=1) * W).sum(1)


def fd_truth(y: torch.Tensor) -> torch.Tensor:
    """Central differences of the converged Theseus solve w.r.t. every entry of ``y``."""
    layer = th.TheseusLayer(make_optimizer())
    B, n = y.shape
    E = torch.eye(n, dtype=DT)
    ys = torch.cat([y.unsqueeze(1) + H * E, y.unsqueeze(1) - H * E], dim=1).reshape(-1, n)
    with torch.no_grad():
        v, _ = layer({"y": ys, **init(ys.shape[0])})
    L = loss_of(v["a"], v["b"]).reshape(B, 2, n)
    return (L[:, 0] - L[:, 1]) / (2 * H)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- objective state

def test_objective_holds_the_differentiable_solution():
    """After forward the objective's variables are the folded solution: a loss that mixes a
    returned value with an objective variable gets the exact gradient (≤1e-8 vs FD)."""
    y = data(3)
    fd = fd_truth(y)
    layer = FoldedTheseusLayer(make_optimizer())
    yy = y.clone().requires_grad_(True)
    values, _ = layer({"y": yy, **init(3)})
    b_var = layer.objective.get_optim_var("b").tensor
    assert b_var.requires_grad and torch.equal(b_var, values["b"])
    (g,) = torch.autograd.grad(loss_of(values["a"], b_var).sum(), yy)
    assert rel(g, fd) <= 1e-8


# ----------------------------------------------------------------------------- API parity

def _public(cls_or_obj) -> set[str]:
    return {n for n in dir(cls_or_obj) if not n.startswith("_")}


def test_api_parity_with_theseus_layer():
    """Every public name of th.TheseusLayer (class and instance) exists on FoldedTheseusLayer;
    each method (and the constructor) takes Theseus's parameters in Theseus's order, with
    the same kinds and defaults; extra parameters are keyword-only with defaults."""
    ref = th.TheseusLayer(make_optimizer())
    ours = FoldedTheseusLayer(make_optimizer())
    names = _public(ref) | {"__init__", "forward"}
    missing = sorted(n for n in names if not hasattr(ours, n))
    assert not missing
    checked = 0
    for n in sorted(names):
        ref_attr = inspect.getattr_static(th.TheseusLayer, n, None)
        if not inspect.isfunction(ref_attr):
            continue
        p_ref = list(inspect.signature(ref_attr).parameters.values())
        p_our = list(inspect.signature(getattr(FoldedTheseusLayer, n)).parameters.values())
        for k, p in enumerate(p_ref):
            q = p_our[k]
            assert (q.name, q.kind) == (p.name, p.kind) or (
                p.kind is p.VAR_KEYWORD and q.kind is q.VAR_KEYWORD), (n, p, q)
            assert q.default == p.default or p.default is p.empty, (n, p, q)
        for q in p_our[len(p_ref):]:
            assert q.kind is q.KEYWORD_ONLY and q.default is not q.empty, (n, q)
        checked += 1
    assert checked >= 6  # __init__, forward, compute_samples, verify_jacobians, to, …
    # positional use as with th.TheseusLayer: FoldedTheseusLayer(optimizer, vectorize)
    layer = FoldedTheseusLayer(make_optimizer(), False)
    assert not layer.objective.vectorized
    # the API calls themselves: same printed verdict, samples of the same shape
    ours({"y": data(2), **init(2)})
    ref({"y": data(2), **init(2)})
    out_ref, out_our = io.StringIO(), io.StringIO()
    from contextlib import redirect_stdout
    with redirect_stdout(out_ref):
        ref.verify_jacobians()
    with redirect_stdout(out_our):
        ours.verify_jacobians()
    assert out_our.getvalue() == out_ref.getvalue() != ""
    torch.manual_seed(1)
    s_ref = ref.compute_samples(ref.optimizer.linear_solver, n_samples=4)
    torch.manual_seed(1)
    s_our = ours.compute_samples(ours.optimizer.linear_solver, n_samples=4)
    assert s_our.shape == s_ref.shape == (2, 2, 4) and ours.compute_samples() is None


def test_deepcopy_and_pickle_give_the_same_gradient():
    """The layer deep-copies and pickles like th.TheseusLayer; copies compute the same
    values and exact gradients as the original."""
    y = data(2, seed=3)
    fd = fd_truth(y)
    layer = FoldedTheseusLayer(make_optimizer(), step="newton")
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        yy = y.clone().requires_grad_(True)
        values, info = clone({"y": yy, **init(2)})
        (g,) = torch.autograd.grad(loss_of(values["a"], values["b"]).sum(), yy)
        assert rel(g, fd) <= 1e-8 and info.fold_info.extra["step"] == "newton"


def test_dcem_runs_with_theseus_backward_and_one_note():
    """DCEM has no least-squares step: the layer runs Theseus's backward, so its gradient is
    th.TheseusLayer's (same random stream), with one note per layer."""
    y = data(2, seed=5)
    grads = []
    for cls in (th.TheseusLayer, FoldedTheseusLayer):
        layer = cls(make_optimizer(th.DCEM, max_iterations=5, n_sample=20, n_elite=4))
        yy = y.clone().requires_grad_(True)
        torch.manual_seed(7)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            values, _ = layer({"y": yy, **init(2)})
            if cls is FoldedTheseusLayer:
                torch.manual_seed(7)
                layer({"y": y, **init(2)})  # a second call: no second note
        notes = [w for w in rec if "Theseus's own backward" in str(w.message)]
        assert len(notes) == (1 if cls is FoldedTheseusLayer else 0)
        (g,) = torch.autograd.grad(loss_of(values["a"], values["b"]).sum(), yy)
        grads.append(g)
    assert float(grads[0].abs().max()) > 0
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------- truncated forwards

class InitNet(nn.Module):
    """Predicts the initial (a, b) from the data: the model learns through the initialisation."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N, 2, dtype=DT)
        with torch.no_grad():
            self.lin.weight.mul_(0.1)

    def forward(self, y: torch.Tensor) -> dict:
        ab = self.lin(y)
        return {"a": ab[:, :1], "b": ab[:, 1:]}


def test_truncated_forward_matches_theseus_unroll():
    """Two Gauss-Newton iterations from a predicted initial value (unconverged on purpose):
    the gradients w.r.t. the network and the data equal Theseus's unroll (≤1e-10)."""
    y = data(4, seed=11)
    grads = []
    for cls, kw in ((th.TheseusLayer, {"backward_mode": "unroll"}), (FoldedTheseusLayer, {})):
        torch.manual_seed(0)
        net = InitNet()
        layer = cls(make_optimizer(max_iterations=2))
        yy = y.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            values, info = layer({"y": yy, **net(yy)}, optimizer_kwargs=kw)
        grads.append(torch.autograd.grad(loss_of(values["a"], values["b"]).sum(),
                                         [yy, *net.parameters()]))
    fi = info.fold_info
    assert not bool(fi.forward_converged.any()) and bool(fi.extra["unrolled"].all())
    assert fi.extra["counts"]["unrolled"] == 4
    for g_ref, g in zip(*grads):
        assert float(g_ref.abs().max()) > 0
        assert float((g - g_ref).abs().max()) <= 1e-10 * float(g_ref.abs().max())


def test_converged_instances_fold_and_init_gets_exact_zero_once():
    """Converged forward from a predicted initial value: exact gradient w.r.t. the data
    (≤1e-8 vs FD), exactly zero w.r.t. the network, and the note about it comes once."""
    y = data(3, seed=2)
    fd = fd_truth(y)
    net = InitNet()
    layer = FoldedTheseusLayer(make_optimizer())
    for call in range(2):
        yy = y.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            values, info = layer({"y": yy, **net(yy.detach())})
            loss = loss_of(values["a"], values["b"]).sum()
            g, *g_net = torch.autograd.grad(loss, [yy, *net.parameters()])
        notes = [w for w in rec if "exact zero gradient" in str(w.message)]
        assert len(notes) == (1 if call == 0 else 0)
        assert rel(g, fd) <= 1e-8
        assert all(torch.equal(t, torch.zeros_like(t)) for t in g_net)
    # a leaf initial value: exact zero too, and the note is not repeated
    seen = 0
    for _ in range(2):
        a0 = init(3)["a"].requires_grad_(True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            values, info = layer({"y": y, "a": a0, "b": init(3)["b"]})
            (ga,) = torch.autograd.grad(loss_of(values["a"], values["b"]).sum(), a0)
        seen += sum("exact zero gradient" in str(w.message) for w in rec)
        assert torch.equal(ga, torch.zeros_like(ga))
        assert bool(info.fold_info.forward_converged.all())
    assert seen == 0
    assert info.fold_info.extra["counts"]["converged"] == 3 * 4


def test_failed_batch_warning_is_truthful():
    """CholeskyDenseSolver fails the whole batch when one instance has NaN data: the other
    instances stop where the failure happened (not at a minimum). The warning says so (FAIL,
    biased) instead of promising exact gradients, and they are not marked converged."""
    y = data(3, seed=4)
    y[1, 2] = float("nan")
    layer = FoldedTheseusLayer(make_optimizer())
    yy = y.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        values, info = layer({"y": yy, **init(3)})
    msgs = " | ".join(str(w.message) for w in rec)
    assert "status FAIL" in msgs and "biased" in msgs and "[0, 2] of 3" in msgs
    assert "keep their exact gradients" not in msgs
    fi = info.fold_info
    assert fi.forward_converged.tolist() == [False, False, False]
    assert fi.extra["excluded"].tolist() == [False, True, False]
    a_stopped = values["a"].detach()[[0, 2]]
    # with LUDenseSolver the NaN stays in its instance and the others are exact (vs FD)
    layer = FoldedTheseusLayer(make_optimizer(linear_solver_cls=th.LUDenseSolver))
    yy = y.clone().requires_grad_(True)
    with pytest.warns(fp.FoldConvergenceWarning, match=r"NaN/Inf.*\[1\] of 3"):
        values, info = layer({"y": yy, **init(3)})
    (g,) = torch.autograd.grad(loss_of(values["a"], values["b"])[[0, 2]].sum(), yy)
    assert rel(g[[0, 2]], fd_truth(y[[0, 2]])) <= 1e-8
    assert info.fold_info.forward_converged.tolist() == [True, False, True]
    # where the Cholesky batch stopped is far from the minimiser (so no exact gradient there)
    assert float((a_stopped - values["a"].detach()[[0, 2]]).abs().min()) > 1e-3


# ----------------------------------------------------------------------------- linear solvers

class Float32Cholesky(th.LinearSolver):
    """A linear solver that rounds its solve through float32 (as Theseus's CHOLMOD path does)."""

    def __init__(self, objective, linearization_cls=None, linearization_kwargs=None, **kw):
        super().__init__(objective, th.DenseLinearization, linearization_kwargs, **kw)

    def solve(self, damping=None, **kw):
        lin = self.linearization
        M = lin.AtA.float()
        if damping is not None:
            M = M + float(damping) * torch.eye(M.shape[-1], dtype=M.dtype)
        out = torch.cholesky_solve(lin.Atb.float(), torch.linalg.cholesky(M))
        return out.squeeze(2).to(lin.AtA.dtype)


def test_imprecise_linear_solver_floors_the_backward_without_warnings():
    """The backward's tolerance floor is the linear solver's measured precision: no warning
    storm, gradients as exact as the solver allows (≤1e-5 vs FD), the residual recorded."""
    y = data(2, seed=6)
    fd = fd_truth(y)
    layer = FoldedTheseusLayer(make_optimizer(linear_solver_cls=Float32Cholesky))
    for _ in range(3):
        yy = y.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            values, info = layer({"y": yy, **init(2)})
            (g,) = torch.autograd.grad(loss_of(values["a"], values["b"]).sum(), yy)
        assert not [w for w in rec if issubclass(w.category, fp.FoldConvergenceWarning)]
        assert rel(g, fd) <= 1e-5
    res = info.fold_info.extra["linear_solve_residual"]
    assert 1e-10 < float(res.max()) < 1e-4  # float32 round-off, measured
    assert bool(info.fold_info.backward_converged.all())


@pytest.mark.parametrize("mode", ["unroll", "implicit", "truncated", "dlm"])
def test_values_equal_theseus_for_every_backward_mode(mode):
    """Theseus sees the caller's backward_mode, so the returned values are th.TheseusLayer's
    bit for bit in every mode (implicit and truncated end with a forced Gauss-Newton step),
    also for a truncated forward, whose gradient is then Theseus's own for that mode."""
    y = data(3, seed=8)
    kw = {"backward_mode": mode}
    if mode == "truncated":
        kw["backward_num_iterations"] = 2
    out = []
    for cls in (th.TheseusLayer, FoldedTheseusLayer):
        yy = y.clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            values, _ = cls(make_optimizer(max_iterations=3))({"y": yy, **init(3)}, dict(kw))
        # the truncated forward is said (every call), and nothing else is a convergence alarm
        said = [w for w in rec if issubclass(w.category, fp.FoldConvergenceWarning)]
        assert len(said) == (cls is FoldedTheseusLayer)
        assert all(issubclass(w.category, fp.ForwardConvergenceWarning) for w in said)
        (g,) = torch.autograd.grad(loss_of(values["a"], values["b"]).sum(), yy)
        out.append((values, g))
    (v_ref, g_ref), (v, g) = out
    assert all(torch.equal(v[k].detach(), v_ref[k].detach()) for k in v_ref)
    assert float((g - g_ref).abs().max()) <= 1e-10 * float(g_ref.abs().max())


def test_theseus_converged_never_warns():
    """Theseus's default tolerances stop one instance of this batch (seed 1, instance with
    step length 1.2e-6 > 1e-6) where its status says CONVERGED: that is convergence here too
    (no 'biased' warning, nothing unrolled); its gradient is as close to the tight solution's
    (vs FD) as Theseus's stopping point allows."""
    y = data(16, seed=1)
    layer = FoldedTheseusLayer(make_optimizer(abs_err_tolerance=1e-10, rel_err_tolerance=1e-8,
                                              max_iterations=20))
    yy = y.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp.FoldConvergenceWarning)
        warnings.filterwarnings("error", message=".*did not converge")
        values, info = layer({"y": yy, **init(16)})
    fi = info.fold_info
    assert float(fi.forward_residual.max()) > 1e-6  # the old fixed threshold would have warned
    assert bool(fi.forward_converged.all()) and not bool(fi.extra["unrolled"].any())
    k = int(fi.forward_residual.argmax())
    (g,) = torch.autograd.grad(loss_of(values["a"], values["b"])[k], yy)
    assert rel(g[k:k + 1], fd_truth(y[k:k + 1])) <= 1e-4
