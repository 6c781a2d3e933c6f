"""Cross-check cases: one problem, its folded gradient, and its cvxpy form for the references.

Each builder returns a :class:`CrossCheckCase` holding batched float64 parameter tensors, a
``folded(*params)`` function (a forward solver — cvxpy with Clarabel, OSQP, or the library's
own forward driver — then :func:`fold_plugins.fold` with a library step) and, for convex
problems, ``build_cvxpy()`` returning ``(problem, parameters, variables)`` in the same
parameter order, ready for :func:`fold_plugins.adapters.cvxpylayers.cvxpylayers_reference` and
:func:`fold_plugins.adapters.diffcp.diffcp_reference`. The nonconvex DC3 case has no cvxpy form; its
reference is finite differences of ``folded`` itself.

    from comparisons.cases import CASES
    case = CASES["box_qp"](n=10, batch=3, seed=0)
    x = case.folded(*case.params)
    problem, parameters, variables = case.build_cvxpy()

``tests/crosscheck`` asserts these; the comparisons suites reuse them (larger sizes).
cvxpy, clarabel and osqp are imported when a case's forward runs (``fold-plugins[cvx]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

import fold_plugins as fp
from fold_plugins import FoldError

__all__ = ["CrossCheckCase", "CASES", "all_cases", "box_qp", "sparsemax", "k_subset",
           "general_qp", "constrained_least_squares", "markowitz", "tv_denoising",
           "entropy_lp", "dc3_nonconvex", "solve_cvxpy_batch", "CLARABEL_TIGHT"]

F64 = torch.float64

#: Clarabel settings for the blackbox forwards (1e-12 often ends in InsufficientProgress).
CLARABEL_TIGHT = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10,
                  "tol_ktratio": 1e-8, "max_iter": 400}


@dataclass
class CrossCheckCase:
    """One cross-check problem.

    Attributes:
        name: registry key.
        title: one line for reports.
        step: the library step folded (``fp.steps.<step>``).
        forward: the forward solver used by ``folded``.
        params: batched float64 parameter tensors (dim 0 is the batch unless noted in
            ``shared``), in the order of ``folded`` and of ``build_cvxpy()``'s parameters.
        param_names: one label per parameter.
        folded: ``folded(*params) -> Tensor`` (the solution, differentiable by folding).
        build_cvxpy: ``() -> (problem, parameters, variables)`` (fresh objects on every call),
            or ``None`` for a nonconvex case.
        to_cvxpy: differentiable torch map from ``params`` to the cvxpy parameters' values,
            when cvxpy needs a different (DPP) parametrisation; ``None``: the identity.
        reference: ``"cvx"`` (cvxpylayers and diffcp) or ``"finite_differences"``.
        slow: worth ``@pytest.mark.slow``.
        rtol: the relative VJP error the cross-check asserts against cvxpylayers (SCS) and diffcp
            (SCS) — or against finite differences for ``reference="finite_differences"`` — at
            the builder's default sizes: about 30–70× the worst error measured there (quoted in
            each builder's docstring), never looser than 1e-5. References that are less
            accurate themselves (Clarabel, finite differences of a convex case) or other sizes
            may exceed it.
        fd_eps: finite-difference step for ``reference="finite_differences"``.
        fold_options: keywords ``folded`` passes to ``fp.fold`` (backward solver, tol).
        notes: anything a reader of the report should know.
        extras: fixed data of the problem that is not a parameter (for checks and plots).
        last_info: the most recent :class:`fold_plugins.FoldInfo` of ``folded``.
    """

    name: str
    title: str
    step: str
    forward: str
    params: tuple[Tensor, ...]
    param_names: tuple[str, ...]
    folded: Callable[..., Tensor]
    build_cvxpy: Callable[[], tuple[Any, list, list]] | None
    reference: str = "cvx"
    to_cvxpy: Callable[..., tuple[Tensor, ...]] | None = None
    slow: bool = False
    rtol: float = 1e-5
    fd_eps: float = 1e-5
    fold_options: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    last_info: Any = None

    @property
    def batch(self) -> int:
        return int(self.params[0].shape[0])

    def wrap_reference(self, reference: Callable[..., Any]) -> Callable[..., Any]:
        """``reference`` (a function of the cvxpy parameters) as a function of ``params``."""
        if self.to_cvxpy is None:
            return reference

        def wrapped(*params: Tensor) -> Any:
            return reference(*self.to_cvxpy(*params))
        wrapped.__name__ = getattr(reference, "__name__", "reference")
        return wrapped


# ----------------------------------------------------------------------------- helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _instance(t: Tensor, shape: Sequence[int], i: int) -> np.ndarray:
    v = t.detach().to(device="cpu", dtype=F64)
    if v.dim() == len(shape) + 1:
        v = v[i]
    return v.numpy()


def solve_cvxpy_batch(problem: Any, parameters: Sequence[Any], variables: Sequence[Any],
                      params: Sequence[Tensor], *, solver: str = "CLARABEL",
                      duals: Sequence[Any] = (), **solver_opts: Any,
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Blackbox forward: solve ``problem`` once per instance with cvxpy (no gradient).

    Args:
        problem, parameters, variables: as from ``build_cvxpy()``.
        params: tensors in the parameters' order, each shaped like its parameter or with a
            leading batch dim.
        solver: a cvxpy solver name (default Clarabel, with :data:`CLARABEL_TIGHT` unless
            ``solver_opts`` are given).
        duals: constraints whose dual values to return too.

    Returns:
        ``(variable values, dual values)``: lists of ``(B, ...)`` tensors in ``params[0]``'s
        dtype and device.

    Raises:
        FoldError: naming the instance whose solve did not end optimal.
    """
    import cvxpy as cp

    opts = dict(CLARABEL_TIGHT) if (solver == "CLARABEL" and not solver_opts) else solver_opts
    sizes = [t.shape[0] for t, p in zip(params, parameters) if t.dim() == len(p.shape) + 1]
    B = sizes[0] if sizes else 1
    vals: list[list[np.ndarray]] = [[] for _ in variables]
    dvals: list[list[np.ndarray]] = [[] for _ in duals]
    for i in range(B):
        for p, t in zip(parameters, params):
            p.value = _instance(t, p.shape, i)
        try:
            problem.solve(solver=solver, **opts)
        except cp.error.SolverError as e:
            raise FoldError(f"cvxpy ({solver}) failed on instance {i}: {e}") from e
        if problem.status != cp.OPTIMAL:
            raise FoldError(f"cvxpy ({solver}) ended with status {problem.status!r} on instance "
                            f"{i}; the forward needs an optimal solution (is it feasible?).")
        for k, v in enumerate(variables):
            vals[k].append(np.asarray(v.value, dtype=np.float64).reshape(v.shape))
        for k, c in enumerate(duals):
            dvals[k].append(np.asarray(c.dual_value, dtype=np.float64).reshape(c.shape))
    ref = params[0]

    def stack(arrs: list[np.ndarray]) -> Tensor:
        return torch.as_tensor(np.stack(arrs)).to(dtype=ref.dtype, device=ref.device)

    return [stack(a) for a in vals], [stack(a) for a in dvals]


def _cvxpy_forward(build: Callable[[], tuple[Any, list, list]], duals: Callable | None = None):
    """A cached cvxpy problem (built on first use) solved per instance by Clarabel."""
    cache: dict[str, Any] = {}

    def solve(params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if "prob" not in cache:
            cache["prob"], cache["ps"], cache["vs"] = build()
            cache["duals"] = duals(cache["prob"]) if duals is not None else ()
        return solve_cvxpy_batch(cache["prob"], cache["ps"], cache["vs"], params,
                                 duals=cache["duals"])
    return solve


def _fold(case_ref: dict, step: Callable, x_star: Any, *params: Any, **options: Any):
    """``fp.fold`` with the case's options; keeps the FoldInfo on the case."""
    opts = {"tol": 1e-12}
    opts.update(options)
    out, info = fp.fold(step, x_star, *params, return_info=True, **opts)
    if case_ref.get("case") is not None:
        case_ref["case"].last_info = info
    return out


def _lmax(M: Tensor) -> Tensor:
    """``λ_max`` of symmetric ``M`` (``(n, n)`` or ``(B, n, n)``), detached."""
    return torch.linalg.eigvalsh(M.detach())[..., -1]


def _finish(case: CrossCheckCase, ref: dict) -> CrossCheckCase:
    ref["case"] = case
    return case


# ----------------------------------------------------------------------------- cases

def box_qp(n: int = 10, batch: int = 3, seed: int = 0) -> CrossCheckCase:
    """``min ½‖Lx‖² + qᵀx  s.t.  lo ≤ x ≤ hi`` by projected gradient; Clarabel forward.

    Params ``q (B, n)``, ``L (n, n)`` (shared: its gradient sums over the batch), ``lo, hi
    (B, n)``. Step ``Π_[lo,hi](x − α(LᵀLx + q))``, ``α = 1/λ_max(LᵀL)``. Measured worst VJP
    error 1.5e-9 (limited by Clarabel's forward, fixed-point residual ~1e-9): ``rtol = 1e-7``.
    """
    g = _gen(seed)
    L = torch.randn(n, n, generator=g, dtype=F64) / n ** 0.5 + torch.eye(n, dtype=F64)
    q = 1.5 * torch.randn(batch, n, generator=g, dtype=F64)
    lo = -0.3 - 0.5 * torch.rand(batch, n, generator=g, dtype=F64)
    hi = 0.3 + 0.5 * torch.rand(batch, n, generator=g, dtype=F64)

    def build():
        import cvxpy as cp
        x = cp.Variable(n)
        qp_, Lp, lp, hp = cp.Parameter(n), cp.Parameter((n, n)), cp.Parameter(n), \
            cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp @ x) + qp_ @ x),
                          [x >= lp, x <= hp])
        return prob, [qp_, Lp, lp, hp], [x]

    forward = _cvxpy_forward(build)
    ref: dict = {}

    def grad(x: Tensor, q: Tensor, L: Tensor) -> Tensor:
        return (x @ L.T) @ L + q

    def folded(q: Tensor, L: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        (x_star,), _ = forward((q, L, lo, hi))
        alpha = float(1.0 / _lmax(L.T @ L))
        step = fp.steps.projected_gradient(grad, fp.projections.box, alpha, n_grad_params=2)
        return _fold(ref, step, x_star, q, L, lo, hi)

    return _finish(CrossCheckCase(
        "box_qp", f"box-constrained QP (n={n}, B={batch})", "projected_gradient",
        "cvxpy/Clarabel", (q, L, lo, hi), ("q", "L", "lo", "hi"), folded, build, rtol=1e-7), ref)


def sparsemax(n: int = 12, batch: int = 4, seed: int = 1) -> CrossCheckCase:
    """sparsemax ``argmin_{x ∈ Δ} ‖x − θ‖²`` by projected gradient (α = ½, so Φ ≠ 0).

    Forward: the sort-based ``fp.projections.simplex(θ)``. Measured worst VJP error 1.5e-12:
    ``rtol = 1e-10``.
    """
    theta = 0.7 * torch.randn(batch, n, generator=_gen(seed), dtype=F64)

    def build():
        import cvxpy as cp
        x, tp = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - tp)), [x >= 0, cp.sum(x) == 1])
        return prob, [tp], [x]

    ref: dict = {}
    step = fp.steps.projected_gradient(lambda x, th: x - th, fp.projections.simplex, 0.5)

    def folded(theta: Tensor) -> Tensor:
        with torch.no_grad():
            x_star = fp.projections.simplex(theta)
        return _fold(ref, step, x_star, theta)

    return _finish(CrossCheckCase(
        "sparsemax", f"sparsemax / simplex projection (n={n}, B={batch})",
        "projected_gradient + projections.simplex", "projections.simplex (sort)", (theta,),
        ("theta",), folded, build, rtol=1e-10), ref)


def k_subset(n: int = 10, k: int = 3, batch: int = 4, seed: int = 2) -> CrossCheckCase:
    """LML projection ``argmin ‖x − θ‖²  s.t.  0 ≤ x ≤ 1, 1ᵀx = k`` by projected gradient.

    Forward: ``fp.projections.k_subset(θ, k)`` (exact sort-based threshold). Measured worst VJP
    error 8.6e-14: ``rtol = 5e-12``.
    """
    theta = torch.randn(batch, n, generator=_gen(seed), dtype=F64)

    def build():
        import cvxpy as cp
        x, tp = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - tp)),
                          [x >= 0, x <= 1, cp.sum(x) == k])
        return prob, [tp], [x]

    ref: dict = {}
    step = fp.steps.projected_gradient(lambda x, th: x - th,
                                       lambda y: fp.projections.k_subset(y, k), 0.5)

    def folded(theta: Tensor) -> Tensor:
        with torch.no_grad():
            x_star = fp.projections.k_subset(theta, k)
        return _fold(ref, step, x_star, theta)

    return _finish(CrossCheckCase(
        "k_subset", f"k-subset (LML) projection (n={n}, k={k}, B={batch})",
        "projected_gradient + projections.k_subset", "projections.k_subset", (theta,),
        ("theta",), folded, build, rtol=5e-12), ref)


def _osqp_batch(P: Tensor, q: Tensor, A: Tensor, lo: Tensor, up: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Blackbox forward: OSQP (polished, eps 1e-12) per instance → ``(x, z, y)``."""
    import osqp
    import scipy.sparse as sp

    def np64(t: Tensor) -> np.ndarray:
        return t.detach().to(device="cpu", dtype=F64).numpy()

    B = q.shape[0]
    xs, ys = [], []
    for i in range(B):
        Pi, Ai = (M[i] if M.dim() == 3 else M for M in (P, A))
        s = osqp.OSQP()
        s.setup(sp.csc_matrix(np.triu(np64(Pi))), np64(q[i]), sp.csc_matrix(np64(Ai)),
                np64(lo[i]), np64(up[i]), eps_abs=1e-12, eps_rel=1e-12, polishing=True,
                max_iter=200_000, verbose=False)
        r = s.solve(raise_error=False)  # status checked below
        if r.info.status != "solved":
            raise FoldError(f"OSQP ended with status {r.info.status!r} on instance {i}; the "
                            "forward needs a solved QP (is it feasible?).")
        xs.append(torch.as_tensor(r.x))
        ys.append(torch.as_tensor(r.y))
    x = torch.stack(xs).to(dtype=q.dtype, device=q.device)
    y = torch.stack(ys).to(dtype=q.dtype, device=q.device)
    with torch.no_grad():
        z = torch.clamp((A.detach() @ x.unsqueeze(-1)).squeeze(-1), lo.detach(), up.detach())
    return x, z, y


def general_qp(n: int = 10, m_eq: int = 3, m_in: int = 6, batch: int = 3,
               seed: int = 3) -> CrossCheckCase:
    """``min ½‖Lx‖² + qᵀx  s.t.  Ax = b, Gx ≤ h`` by ``admm_qp``; OSQP forward.

    Params ``q (B, n)``, ``L (n, n)`` (shared), ``A (B, m_eq, n)``, ``b (B, m_eq)``,
    ``G (B, m_in, n)``, ``h (B, m_in)``; folded as ``l ≤ [A; G] x ≤ u`` with
    ``l = [b; −INF]``, ``u = [b; h]`` (so ``P = LᵀL`` and the stacked rows get gradients).
    Measured worst VJP error 8.7e-13: ``rtol = 5e-11``.
    """
    g = _gen(seed)
    L = torch.randn(n, n, generator=g, dtype=F64) / n ** 0.5 + torch.eye(n, dtype=F64)
    q = torch.randn(batch, n, generator=g, dtype=F64)
    A = torch.randn(batch, m_eq, n, generator=g, dtype=F64)
    G = torch.randn(batch, m_in, n, generator=g, dtype=F64)
    x0 = torch.randn(batch, n, generator=g, dtype=F64)
    b = (A @ x0.unsqueeze(-1)).squeeze(-1)
    h = (G @ x0.unsqueeze(-1)).squeeze(-1) + 0.5 * torch.rand(batch, m_in, generator=g,
                                                              dtype=F64)

    def build():
        import cvxpy as cp
        x = cp.Variable(n)
        qp_, Lp = cp.Parameter(n), cp.Parameter((n, n))
        Ap, bp, Gp, hp = cp.Parameter((m_eq, n)), cp.Parameter(m_eq), \
            cp.Parameter((m_in, n)), cp.Parameter(m_in)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp @ x) + qp_ @ x),
                          [Ap @ x == bp, Gp @ x <= hp])
        return prob, [qp_, Lp, Ap, bp, Gp, hp], [x]

    ref: dict = {}
    step = fp.steps.admm_qp()
    INF = fp.steps.INF

    def stacked(q, L, A, b, G, h):
        P = L.T @ L
        Aq = torch.cat([A, G], dim=1)
        lo = torch.cat([b, torch.full_like(h, -INF)], dim=1)
        up = torch.cat([b, h], dim=1)
        return P, q, Aq, lo, up

    def folded(q, L, A, b, G, h):
        P, q_, Aq, lo, up = stacked(q, L, A, b, G, h)
        state = _osqp_batch(P, q_, Aq, lo, up)
        x, _, _ = _fold(ref, step, state, P, q_, Aq, lo, up)
        return x

    return _finish(CrossCheckCase(
        "general_qp", f"QP with equalities and inequalities (n={n}, m_eq={m_eq}, "
        f"m_in={m_in}, B={batch})", "admm_qp", "OSQP (polished)", (q, L, A, b, G, h),
        ("q", "L", "A", "b", "G", "h"), folded, build, rtol=5e-11), ref)


def constrained_least_squares(n: int = 8, rows: int = 14, m_eq: int = 2, batch: int = 2,
                              seed: int = 4) -> CrossCheckCase:
    """``min ½‖Fx − g‖²  s.t.  Cx = d, x ≥ 0`` by projected gradient onto the polytope
    ``{Cx = d, x ≥ 0}`` (``fp.projections.polytope``: an inner folded ADMM); Clarabel forward.

    Params ``F (B, rows, n)``, ``g (B, rows)``, ``C (m_eq, n)`` (shared), ``d (B, m_eq)``.
    Measured worst VJP error 4.4e-10: ``rtol = 3e-8``.
    """
    gen = _gen(seed)
    F = torch.randn(batch, rows, n, generator=gen, dtype=F64) / rows ** 0.5
    g = torch.randn(batch, rows, generator=gen, dtype=F64)
    C = torch.randn(m_eq, n, generator=gen, dtype=F64)
    x0 = torch.rand(batch, n, generator=gen, dtype=F64) + 0.1
    d = x0 @ C.T

    def build():
        import cvxpy as cp
        x = cp.Variable(n)
        Fp, gp, Cp, dp = cp.Parameter((rows, n)), cp.Parameter(rows), cp.Parameter((m_eq, n)), \
            cp.Parameter(m_eq)
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Fp @ x - gp)),
                          [Cp @ x == dp, x >= 0])
        return prob, [Fp, gp, Cp, dp], [x]

    forward = _cvxpy_forward(build)
    ref: dict = {}

    def grad(x, F, g):
        r = (F @ x.unsqueeze(-1)).squeeze(-1) - g
        return (F.mT @ r.unsqueeze(-1)).squeeze(-1)

    def project(y, C, d):
        eye = torch.eye(n, dtype=y.dtype, device=y.device)
        return fp.projections.polytope(y, A=C, b=d, G=-eye, h=y.new_zeros(n))

    def folded(F, g, C, d):
        (x_star,), _ = forward((F, g, C, d))
        alpha = (1.0 / _lmax(F.mT @ F)).detach()
        step = fp.steps.projected_gradient(grad, project, alpha, n_grad_params=2)
        return _fold(ref, step, x_star, F, g, C, d)

    return _finish(CrossCheckCase(
        "constrained_ls", f"constrained least squares (n={n}, rows={rows}, m_eq={m_eq}, "
        f"B={batch})", "projected_gradient + projections.polytope (nested fold)",
        "cvxpy/Clarabel", (F, g, C, d), ("F", "g", "C", "d"), folded, build, slow=True,
        rtol=3e-8), ref)


def markowitz(n: int = 8, batch: int = 3, seed: int = 5) -> CrossCheckCase:
    """``max μᵀw  s.t.  1ᵀw = 1, w ≥ 0, ‖Fw‖² ≤ σ²`` by ``sqp``; Clarabel forward (with duals).

    Params ``μ (B, n)``, ``F (n, n)`` (shared risk factor, Σ = FᵀF), ``σ² (B,)`` set to
    1.3× the equal-weight portfolio's risk so the risk constraint is active. Measured worst VJP
    error 1.6e-11: ``rtol = 1e-9``.
    """
    gen = _gen(seed)
    mu = 0.1 + 0.05 * torch.randn(batch, n, generator=gen, dtype=F64)
    F = torch.randn(n, n, generator=gen, dtype=F64) / n ** 0.5 + 0.3 * torch.eye(n, dtype=F64)
    w_eq = torch.full((n,), 1.0 / n, dtype=F64)
    s2 = 1.3 * float((F @ w_eq).pow(2).sum()) * (1 + 0.1 * torch.rand(batch, generator=gen,
                                                                       dtype=F64))

    def build():
        import cvxpy as cp
        w = cp.Variable(n)
        mp, Fp, sp_ = cp.Parameter(n), cp.Parameter((n, n)), cp.Parameter(nonneg=True)
        prob = cp.Problem(cp.Maximize(mp @ w),
                          [cp.sum_squares(Fp @ w) <= sp_, w >= 0, cp.sum(w) == 1])
        return prob, [mp, Fp, sp_], [w]

    forward = _cvxpy_forward(build, duals=lambda prob: prob.constraints)
    ref: dict = {}

    def f(w, mu, F, s2):
        return -(mu * w).sum(1)

    def gfun(w, mu, F, s2):  # ‖Fw‖² − σ² ≤ 0, −w ≤ 0
        return torch.cat([(w @ F.T).pow(2).sum(1, keepdim=True) - s2.reshape(-1, 1), -w], 1)

    def hfun(w, mu, F, s2):
        return w.sum(1, keepdim=True) - 1

    step = fp.steps.sqp(f, gfun, hfun, hessian="exact")

    def folded(mu, F, s2):
        (w,), (lam_risk, lam_pos, nu) = forward((mu, F, s2))
        # cvxpy's duals follow L = f + λᵀg + νᵀh for these constraint forms (Maximize μᵀw is
        # Minimize −μᵀw)
        lam = torch.cat([lam_risk.reshape(-1, 1), lam_pos], 1)
        # Clarabel ends 'AlmostSolved' on this SOC form (KKT residual ~1e-7, measured): two or
        # three exact-Hessian SQP steps from its point reach 1e-13
        (w, lam, nu), _ = fp.steps.solve_sqp(f, gfun, hfun, w, mu, F, s2, lam0=lam,
                                             nu0=nu.reshape(-1, 1), tol=1e-13, maxiter=20,
                                             hessian="exact")
        return _fold(ref, step, (w, lam, nu), mu, F, s2)[0]

    return _finish(CrossCheckCase(
        "markowitz", f"Markowitz portfolio, quadratic risk constraint (n={n}, B={batch})",
        "sqp (QP subproblem: admm_qp, folded)", "cvxpy/Clarabel (primal + duals)",
        (mu, F, s2), ("mu", "F", "sigma2"), folded, build, slow=True, rtol=1e-9), ref)


def tv_denoising(n: int = 16, batch: int = 3, seed: int = 6) -> CrossCheckCase:
    """``min ½‖x − y‖² + λ‖Dx‖₁`` by ``fdpg_tv`` on the dual; forward ``steps.solve_tv``.

    Params ``y (B, n)`` (piecewise constant + noise), ``λ (B,)``, ``D (n−1, n)`` (shared,
    learnable: a perturbed difference matrix). Measured worst VJP error 1.0e-13:
    ``rtol = 5e-12``.
    """
    gen = _gen(seed)
    levels = torch.randn(batch, 4, generator=gen, dtype=F64)
    y = levels.repeat_interleave((n + 3) // 4, dim=1)[:, :n] \
        + 0.3 * torch.randn(batch, n, generator=gen, dtype=F64)
    lam = 0.2 + 0.3 * torch.rand(batch, generator=gen, dtype=F64)
    D = fp.steps.difference_matrix(n) + 0.05 * torch.randn(n - 1, n, generator=gen, dtype=F64)

    def build():
        # λ‖Dx‖₁ with both λ and D parameters is not DPP: cvxpy gets the product λD instead
        import cvxpy as cp
        x = cp.Variable(n)
        yp, LDp = cp.Parameter(n), cp.Parameter((n - 1, n))
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - yp) + cp.norm1(LDp @ x)))
        return prob, [yp, LDp], [x]

    def to_cvxpy(y, lam, D):
        return y, lam.reshape(-1, 1, 1) * D

    ref: dict = {}
    step = fp.steps.fdpg_tv()

    def folded(y, lam, D):
        u_star, _ = fp.steps.solve_tv(y, lam, D, tol=1e-13)
        u = _fold(ref, step, u_star, y, lam, D)
        return fp.steps.tv_primal(u, y, D)

    return _finish(CrossCheckCase(
        "tv_denoising", f"TV denoising, learnable D and λ (n={n}, B={batch})", "fdpg_tv",
        "steps.solve_tv (FDPG)", (y, lam, D), ("y", "lam", "D"), folded, build,
        to_cvxpy=to_cvxpy, rtol=5e-12), ref)


def entropy_lp(n: int = 10, batch: int = 3, seed: int = 7) -> CrossCheckCase:
    """Entropy-regularised LP ``min cᵀx + ε Σ x log x  s.t.  x ∈ Δ`` by ``mirror_descent``.

    Params ``c (B, n)``, ``ε (B,)``. Step size ``η = 1/(2ε)`` (``Φ = ½(I − x1ᵀ)``, not 0);
    forward: ``steps.iterate`` of the same step from ``x = 1/n``. Measured worst VJP error
    3.3e-7, set by diffcp's exponential-cone derivative (the values agree to 1e-13): ``rtol =
    1e-5`` (30×; the 1e-5 ceiling).
    """
    gen = _gen(seed)
    c = torch.randn(batch, n, generator=gen, dtype=F64)
    eps = 0.3 + 0.7 * torch.rand(batch, generator=gen, dtype=F64)

    def build():
        import cvxpy as cp
        x = cp.Variable(n)
        cp_, ep = cp.Parameter(n), cp.Parameter(nonneg=True)
        prob = cp.Problem(cp.Minimize(cp_ @ x - ep * cp.sum(cp.entr(x))), [cp.sum(x) == 1])
        return prob, [cp_, ep], [x]

    ref: dict = {}

    def grad(x, c, eps):
        return c + eps.reshape(-1, 1) * (1 + torch.log(x))

    def folded(c, eps):
        step = fp.steps.mirror_descent(grad, 0.5 / eps.detach())
        x0 = torch.full_like(c, 1.0 / n)
        x_star, _ = fp.steps.iterate(step, x0, c, eps, tol=1e-14, maxiter=2000)
        return _fold(ref, step, x_star, c, eps)

    return _finish(CrossCheckCase(
        "entropy_lp", f"entropy-regularised LP on the simplex (n={n}, B={batch})",
        "mirror_descent", "steps.iterate (mirror descent)", (c, eps), ("c", "eps"), folded,
        build, rtol=1e-5), ref)


def dc3_nonconvex(n: int = 8, m_eq: int = 2, m_in: int = 3, batch: int = 2,
                  seed: int = 10, q_scale: float = 0.05) -> CrossCheckCase:
    """DC3 benchmark form ``min ½xᵀQx + pᵀsin(x)  s.t.  Ax = b, Gx ≤ h`` (nonconvex) by ``sqp``.

    ``Q = diag(q_scale·U[0,1])`` (DC3 uses ``q_scale = 1``; with 0.05 and seed 10 the Hessian
    ``Q − diag(p ⊙ sin x)`` is indefinite at instance 0's solution, λ_min ≈ −0.011, with two
    inequalities active), ``A, G`` Gaussian (fixed), params ``p (B, n)``, ``b (B, m_eq)``,
    ``h (B, m_in)`` with ``h = Σ_j |(G A⁺)_ij|`` as in DC3. Forward ``steps.solve_sqp``
    warm-started at the first solution (so finite differences track the same local minimum).
    Reference: finite differences (cvxpy cannot express the problem). Measured worst VJP error
    7.4e-8 against central differences with step 1e-5 (their truncation and rounding error):
    ``rtol = 3e-6``.
    """
    gen = _gen(seed)
    Q = torch.diag(q_scale * torch.rand(n, generator=gen, dtype=F64))
    A = torch.randn(m_eq, n, generator=gen, dtype=F64)
    G = torch.randn(m_in, n, generator=gen, dtype=F64)
    p = torch.rand(batch, n, generator=gen, dtype=F64)
    b = 2 * torch.rand(batch, m_eq, generator=gen, dtype=F64) - 1
    h = (G @ torch.linalg.pinv(A)).abs().sum(1).expand(batch, m_in).clone()

    def f(x, p, b, h):
        return 0.5 * ((x @ Q) * x).sum(1) + (p * torch.sin(x)).sum(1)

    def gfun(x, p, b, h):
        return x @ G.T - h

    def hfun(x, p, b, h):
        return x @ A.T - b

    ref: dict = {}
    warm: dict[str, Any] = {}
    step = fp.steps.sqp(f, gfun, hfun)

    def folded(p, b, h):
        x0 = warm.get("x", torch.zeros_like(p))
        (x, lam, nu), info = fp.steps.solve_sqp(
            f, gfun, hfun, x0, p, b, h, tol=1e-13, maxiter=100,
            lam0=warm.get("lam"), nu0=warm.get("nu"))
        if "x" not in warm:
            warm.update(x=x, lam=lam, nu=nu)
        return _fold(ref, step, (x, lam, nu), p, b, h)[0]

    return _finish(CrossCheckCase(
        "dc3_nonconvex", f"DC3 nonconvex QP + pᵀsin(x) (n={n}, m_eq={m_eq}, m_in={m_in}, "
        f"B={batch})", "sqp", "steps.solve_sqp (ℓ1-merit SQP)", (p, b, h), ("p", "b", "h"),
        folded, None, reference="finite_differences", slow=True, fd_eps=1e-5, rtol=3e-6,
        extras={"Q": Q, "A": A, "G": G, "f": f, "g": gfun, "h": hfun}), ref)


CASES: dict[str, Callable[..., CrossCheckCase]] = {
    "box_qp": box_qp,
    "sparsemax": sparsemax,
    "k_subset": k_subset,
    "general_qp": general_qp,
    "constrained_ls": constrained_least_squares,
    "markowitz": markowitz,
    "tv_denoising": tv_denoising,
    "entropy_lp": entropy_lp,
    "dc3_nonconvex": dc3_nonconvex,
}


def all_cases(**overrides: Any) -> list[CrossCheckCase]:
    """Every case with its default sizes (``overrides`` go to every builder that takes them)."""
    import inspect

    out = []
    for builder in CASES.values():
        sig = inspect.signature(builder).parameters
        out.append(builder(**{k: v for k, v in overrides.items() if k in sig}))
    return out
