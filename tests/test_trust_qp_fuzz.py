"""Issue 9, items 7 and 8: a seeded fuzz of random box and simplex QPs (κ(P) up to 1e6, with
strictly active, inactive and weakly active constraints by construction) through
:func:`fold_plugins.steps.qp` under ``strict=True``.

Truth: the KKT closed form of each QP's derivative at its constructed solution, with weakly
active constraints free (the documented convention of :mod:`fold_plugins.projections`).
Asserted: every gradient within 1e-6 of the closed form (relative to max(‖truth‖, 1)), no
warning and no error (a correct gradient never warns, never raises under strict), and the
weakly active constraints counted per instance in ``FoldInfo.extra["weakly_active"]``.

``FOLD_PLUGINS_LARGE_FUZZ=1`` runs a 2000-QP version."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from fold_plugins.steps import qp
from fold_plugins.steps.quadprog import INF

DT = torch.float64


def _spd(B, n, g):
    """Random SPD matrices with condition number 10^U(0, 6)."""
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=DT))
    ex = torch.rand(B, 1, generator=g, dtype=DT) * 6
    s = 10 ** (-ex * torch.linspace(0, 1, n, dtype=DT))
    return (Q * s[:, None, :]) @ Q.mT


def box_batch(B, n, g):
    """``min ½xᵀPx + qᵀx, −1 ≤ x ≤ 1`` with a constructed solution. kind: 0 free, 1 lower
    active, 2 upper active (multiplier ≥ 0.1), 3 weakly active (on a bound, multiplier 0)."""
    P = _spd(B, n, g)
    kind = torch.randint(0, 4, (B, n), generator=g)
    x = torch.rand(B, n, generator=g, dtype=DT) * 1.6 - 0.8
    side = torch.where(torch.rand(B, n, generator=g) < 0.5, 1.0, -1.0).to(DT)
    mult = 0.1 + torch.rand(B, n, generator=g, dtype=DT)
    x = torch.where(kind == 1, -1.0, torch.where(kind == 2, 1.0, torch.where(kind == 3, side, x)))
    y = torch.where(kind == 1, -mult, torch.where(kind == 2, mult, torch.zeros_like(mult)))
    q = -(P @ x.unsqueeze(-1)).squeeze(-1) - y
    eye = torch.eye(n, dtype=DT).expand(B, n, n)
    return P, q, eye, -torch.ones(B, n, dtype=DT), torch.ones(B, n, dtype=DT), x, kind, kind == 3


def box_truth(P, kind, w):
    """``(∂L/∂q, ∂L/∂l, ∂L/∂u)`` of ``L = wᵀx*``: ``x_F = −P_FF⁻¹(q_F + P_FA x_A)``."""
    out = []
    for b in range(P.shape[0]):
        F = (kind[b] == 0) | (kind[b] == 3)
        act = ~F
        a = torch.linalg.solve(P[b][F][:, F], w[b][F])
        gq, gb = torch.zeros_like(w[b]), torch.zeros_like(w[b])
        gq[F] = -a
        gb[act] = w[b][act] - P[b][act][:, F] @ a
        zero = torch.zeros_like(gb)
        out.append((gq, torch.where(kind[b] == 1, gb, zero), torch.where(kind[b] == 2, gb, zero)))
    return [torch.stack(t) for t in zip(*out)]


def simplex_batch(B, n, g):
    """``min ½xᵀPx + qᵀx`` on the probability simplex. kind: 0 positive, 1 zero with a
    multiplier ≥ 0.1, 2 zero with multiplier 0 (weakly active)."""
    P = _spd(B, n, g)
    kind = torch.randint(0, 3, (B, n), generator=g)
    kind[:, 0] = 0
    x = torch.where(kind == 0, 0.1 + torch.rand(B, n, generator=g, dtype=DT),
                    torch.zeros(B, n, dtype=DT))
    x = x / x.sum(1, keepdim=True)
    mult = 0.1 + torch.rand(B, n, generator=g, dtype=DT)
    y = torch.cat([torch.where(kind == 1, -mult, torch.zeros_like(mult)),
                   torch.randn(B, 1, generator=g, dtype=DT)], 1)
    A = torch.cat([torch.eye(n, dtype=DT), torch.ones(1, n, dtype=DT)]).expand(B, n + 1, n)
    q = -(P @ x.unsqueeze(-1)).squeeze(-1) - (y.unsqueeze(1) @ A).squeeze(1)
    lo = torch.cat([torch.zeros(B, n, dtype=DT), torch.ones(B, 1, dtype=DT)], 1)
    hi = torch.cat([torch.full((B, n), INF, dtype=DT), torch.ones(B, 1, dtype=DT)], 1)
    return P, q, A, lo, hi, x, kind, kind == 2


def simplex_truth(P, kind, w):
    """``∂L/∂q``: on the free set F, ``[P_FF 1; 1ᵀ 0][x_F; ν] = [−q_F; 1]``."""
    out = []
    for b in range(P.shape[0]):
        F = kind[b] != 1
        k = int(F.sum())
        K = torch.zeros(k + 1, k + 1, dtype=DT)
        K[:k, :k] = P[b][F][:, F]
        K[:k, k] = 1
        K[k, :k] = 1
        a = torch.linalg.solve(K, torch.cat([w[b][F], w.new_zeros(1)]))
        gq = torch.zeros_like(w[b])
        gq[F] = -a[:k]
        out.append(gq)
    return [torch.stack(out)]


def run_fuzz(n_qps: int, B: int = 20, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    worst, worst_x, n_warn, total = 0.0, 0.0, 0, 0
    weak_built = weak_seen = over = 0
    for chunk in range(n_qps // B):
        simplex = chunk % 2 == 1
        n = 3 + (chunk // 2) % 6
        P, q, A, lo, hi, xt, kind, weak = (simplex_batch if simplex else box_batch)(B, n, g)
        w = torch.randn(B, n, generator=g, dtype=DT)
        ps = [t.clone().requires_grad_(True) for t in (q, lo, hi)]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            x, finfo, _ = qp(P, ps[0], A, ps[1], ps[2], return_info=True, strict=True)
            (x * w).sum().backward()
        n_warn += len(rec)
        truth = simplex_truth(P, kind, w) if simplex else box_truth(P, kind, w)
        got = [p.grad for p in ps[: len(truth)]]
        scale = torch.sqrt(sum(t.pow(2).sum(1) for t in truth)).clamp_min(1.0)
        err = torch.sqrt(sum((a - t).pow(2).sum(1) for a, t in zip(got, truth))) / scale
        worst = max(worst, float(err.max()))
        worst_x = max(worst_x, float((x.detach() - xt).abs().max()))
        seen = finfo.extra["weakly_active"]
        built = weak.sum(1)
        weak_built += int(built.sum())
        weak_seen += int(torch.minimum(seen, built).sum())
        over += int((seen > built).sum())
        total += B
    return {"total": total, "worst": worst, "worst_x": worst_x, "warnings": n_warn,
            "weak_built": weak_built, "weak_seen": weak_seen, "over_counted": over}


def _check(r: dict) -> None:
    print(f"[measured] QP fuzz: {r['total']} QPs, worst error vs KKT closed form "
          f"{r['worst']:.1e} (solution x: {r['worst_x']:.1e}), {r['warnings']} warnings, "
          f"weakly active counted {r['weak_seen']}/{r['weak_built']}")
    assert r["worst"] <= 1e-6, r
    # the forward polishes every instance once its residuals are small, first with the rows
    # whose multiplier is round-off dropped: without that, a degenerate, ill-conditioned QP
    # met the ADMM tol with x 1.8e-6 off and a weakly active row on the wrong side (a 0.53
    # gradient mismatch in the 2000-QP run); measured now 5.9e-12
    assert r["worst_x"] <= 1e-8, r
    assert r["warnings"] == 0, r
    assert r["over_counted"] == 0, r
    # measured: every constructed weakly active row counted (418/418); the margin allows a
    # polish that fails and leaves an iterate just outside the √eps band
    assert r["weak_seen"] >= math.floor(0.95 * r["weak_built"]), r


def test_qp_fuzz_box_and_simplex_no_silent_mismatch_no_false_alarm():
    _check(run_fuzz(320))


@pytest.mark.skipif(os.environ.get("FOLD_PLUGINS_LARGE_FUZZ") != "1",
                    reason="set FOLD_PLUGINS_LARGE_FUZZ=1 for the 2000-QP fuzz (≈1 min)")
def test_qp_fuzz_large():
    _check(run_fuzz(2000, seed=1))
