"""--tiny runs of the three learning suites: the numbers each reports are consistent with
independent recomputations (regret ≥ 0, gradient checks vs central differences, the fixed-D
MSE recomputed, the tables built from the recorded runs)."""

from __future__ import annotations

import warnings

import pytest
import torch

from comparisons.config import Config


def _run(name: str, tmp_path):
    import importlib

    mod = importlib.import_module(f"comparisons.suites.{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mod.run(Config(mode="tiny", out=tmp_path, progress=False))


def test_portfolio_tiny_consistent(tmp_path):
    pytest.importorskip("clarabel")
    pytest.importorskip("cvxpylayers")
    res = _run("portfolio", tmp_path)
    assert res.errors == []
    sz = res.data["sizes"]
    for deg, runs in res.data["runs"].items():
        assert set(runs) >= {"folded SQP", "cvxpylayers", "SPO+", "two-stage (MSE)"}
        for name, rs in runs.items():
            for r in rs:
                # regret against the true optimum of the same problem: never below 0
                assert min(r["metric"]) >= -1e-7, (deg, name)
                ep = sz["unroll_epochs"] if name.startswith("unrolled") else sz["epochs"]
                assert len(r["metric"]) == ep + 1 and len(r["epoch_s"]) == ep
            for r in rs:  # post-training diagnostics of the decisions x*(ĉ)
                assert r["extra"]["scale"] > 0 and r["extra"]["support"] >= 1
                assert 0 <= r["extra"]["risk_active"] <= 1
        ck = res.data["grad_check"][deg]
        # folded (both subproblems) and unrolled-to-convergence SQP vs central differences
        assert ck["folded SQP"] < 1e-5 and ck["folded SQP (ADMM subproblem)"] < 1e-5
        assert ck["cvxpylayers"] < 1e-3
        assert f"**deg = {deg}**" in res.markdown
    assert res.figures and (tmp_path / "portfolio.png").exists()


def test_tv_tiny_consistent(tmp_path):
    res = _run("tv_denoising", tmp_path)
    d = res.data
    assert all("cvxpylayers" not in e for e in res.errors) or "cvxpylayers" not in d["subset"]
    import fold_plugins as fp
    from comparisons.experiments.generators import optnet_signals
    from comparisons.experiments.tv import folded_tv

    sz = d["sizes"]
    clean, noisy = optnet_signals(sz["N"] + sz["n_test"], n=sz["n"], seed=0)
    Dfix = fp.steps.difference_matrix(sz["n"])
    with torch.no_grad():
        mse = float(((folded_tv(noisy[sz["N"]:], 13.0, Dfix) - clean[sz["N"]:]) ** 2).mean())
    assert abs(d["fixed_D"][13.0] - mse) < 1e-9 * mse
    assert abs(d["noisy_mse"] - float(((noisy - clean)[sz["N"]:] ** 2).mean())) < 1e-9
    # the same D₀ and test set: every method starts from the same test MSE
    starts = [r["metric"][0] for rs in d["runs"].values() for r in rs[:1]]
    assert max(starts) - min(starts) < 1e-9 * max(starts)
    if "cvxpylayers" in d["subset"]:
        f, c = d["subset"]["folded FDPG"][0]["metric"], d["subset"]["cvxpylayers"][0]["metric"]
        assert abs(f[0] - c[0]) < 1e-9 * f[0]
        assert abs(f[-1] - c[-1]) < 0.1 * c[-1]  # close gradients: close training paths
    ck = d["grad_check"]
    assert ck["folded FDPG"] < 1e-5  # the folded gradient vs central differences
    if "cvxpylayers" in ck:
        assert ck["cvxpylayers"] < 0.1  # its default solver tolerances: a few % here


def test_nonconvex_tiny_consistent(tmp_path):
    pytest.importorskip("casadi")
    res = _run("nonconvex", tmp_path)
    assert res.errors == []
    d = res.data
    assert d["ipopt_failures"] == 0
    for _name, rs in d["runs"].items():
        for r in rs:
            assert min(r["metric"]) >= 0 and all(q >= 0 for q in r["extra"]["p90"])
    assert d["grad_check"]["folded SQP"] < 1e-6 and d["grad_check"]["folded PGD"] < 1e-6
    assert "no attribute 'sin'" in d["cvxpylayers"]


def test_paper_scale_mode_parses_and_sizes_are_the_papers():
    from comparisons import cli
    from comparisons.suites import nonconvex, portfolio, tv_denoising

    assert cli.parse_args(["--paper-scale"]).mode == "paper"
    cfg = Config(mode="paper", progress=False)
    assert cfg.pick(tiny=1, quick=2, full=3) == 3 and cfg.pick(1, 2, 3, paper=4) == 4
    assert portfolio.sizes(cfg)["N"] == 256 and portfolio.sizes(cfg)["n_test"] == 64
    assert tv_denoising.sizes(cfg)["N"] == 9000 and tv_denoising.sizes(cfg)["epochs"] == 50
    assert nonconvex.sizes(cfg)["n"] == 100 and nonconvex.sizes(cfg)["N"] == 8334
    for mod in (portfolio, tv_denoising, nonconvex):
        assert mod.PAPER_EXPECTED.startswith("≈")
