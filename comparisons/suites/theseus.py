"""Suite 4 — Theseus backward modes against the folded layer on nonlinear least squares.

Problems (float64, Gauss-Newton forward run to machine precision, per-instance data, batch B):

* **zero-residual exp fit** — ``y = exp(a·x) + b`` at 20 points, data exact: every correct
  method agrees (``JᵀJ`` is the full Hessian at a zero residual);
* **noisy exp fit** — the same with noise σ = 0.3: the full Hessian has ``Σ rᵢ∇²rᵢ ≠ 0``;
* **noisy SE2 registration** — a pose ``T ∈ SE2`` with ``T·pᵢ ≈ qᵢ`` for 8 points, targets
  with noise σ = 0.3;
* **noisy Point2 trilateration** — a point ``p ∈ ℝ²`` from its distances ``dⱼ`` to 6 fixed
  beacons, ``rⱼ = ‖p − aⱼ‖ − dⱼ``, distances with noise σ = 0.2 (2 tangent dimensions, a
  residual that is not zero at the optimum: the problem the speed targets name);
* **noisy SE2 pose graph** — N SE2 poses driven round a circle (N = 30, 90 tangent
  dimensions; 33 and 99 with ``--full``), a ``Between`` cost ``log(mₖ⁻¹·xₖ⁻¹·xₖ₊₁)`` for
  each consecutive pair, the last pair closing the loop (``x_{N−1}`` → ``x₀``), and a prior
  ``log(x₀)`` on the first pose;
  measurements ``mₖ = exp(μₖ)`` with tangent noise σ = (0.1, 0.1, 0.05), batch 16. The loop
  closure is what makes the residuals non-zero at the optimum: on an open chain every
  measurement is met exactly whatever the noise, and ``JᵀJ`` is then the full Hessian.

The loss is a fixed random linear function of the solution; the gradient is taken with respect
to the data (``y``, the targets ``q``, or the measurements' tangent coordinates ``μ``). Truth
for the small problems: central finite differences of the same Gauss-Newton solve (step 1e-6,
all perturbations solved as one batch; repeated at step 1e-5, and the difference of the two is
reported as the truth's accuracy). Truth for the pose graph (where dense differences would
need 2·90·16 solves of a 90-dimensional problem): the implicit-function-theorem gradient
``dL/dμ = −(∂²f/∂ξ∂μ)ᵀ H⁻¹ ∂L/∂ξ`` of ``f = ½‖r‖²`` in the poses' tangent coordinates ``ξ``,
with the full Hessian ``H`` and the mixed derivative formed column by column by autograd
through the residuals written here in plain torch (Theseus's conventions, checked against its
cost-function errors), at an x* polished by one Newton step; it is itself checked against
central differences along random directions of ``μ``. Methods:
``th.TheseusLayer`` with ``backward_mode`` ``unroll``, ``implicit``, ``truncated`` (5
iterations) and ``dlm``; ``fold_plugins.adapters.theseus.FoldedTheseusLayer`` with its default
settings (``step="auto"``, ``backward="auto"``: here the exact Newton step, whose Hessian is
built in the forward by one vmapped backward, and no backward solve since ``Φ = 0``) and with
the Gauss-Newton step and a GMRES backward (the layer's previous default, the choice above
its Newton size limit). Baseline of the time ratios: Theseus ``implicit``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..config import Config
from ..measure import Stopwatch, Timing
from ..progress import bar
from ..report import SuiteResult
from ._theseus_pose_graph import _directional_fd, _pose_graph_problem
from ._theseus_problems import (
    FD_OPT,
    FD_STEP,
    FD_STEP_CHECK,
    METHOD_OPT,
    PG_FD_GATE,
    POSE_OPT,
    POSE_TRUTH_OPT,
    Problem,
    _exp_problem,
    _fd_grad,
    _rel,
    _se2_problem,
    _theseus,
    _trilateration_problem,
)
from ._theseus_report import FOLDED, _headline, _markdown, _plot, _target_verdicts

TITLE = "4. Theseus: backward modes vs the folded layer"
#: timed rounds per problem at least (quick and full): the targets sit within 10 % of 1
MIN_REPEATS = 9
INTRO = ("Compares the folded Theseus layer with Theseus's own backward modes on nonlinear "
         "least-squares problems: how far each gradient is from the truth when the residuals "
         "are not zero at the optimum, and what each costs in backward and in forward + "
         "backward time.")


def _methods(th) -> dict[str, tuple[Callable, dict]]:
    """name → (layer factory from an optimizer, optimizer_kwargs)."""
    from fold_plugins.adapters.theseus import FoldedTheseusLayer

    return {
        **_methods_theseus_only(th),
        FOLDED[0]: (lambda opt: FoldedTheseusLayer(opt), {}),
        FOLDED[1]: (lambda opt: FoldedTheseusLayer(opt, step="gauss_newton", backward="gmres"),
                    {}),
    }


def run(cfg: Config) -> SuiteResult:
    """Gradient error vs the truth and forward/backward times for each method."""
    th = _theseus()
    B = cfg.pick(tiny=2, quick=16, full=16)
    poses = cfg.pick(tiny=6, quick=30, full=33)  # 3 tangent dimensions per pose
    problems = [_exp_problem(cfg, B, 0.0, "zero-residual exp fit"),
                _exp_problem(cfg, B, 0.3, "noisy exp fit (σ=0.3)"),
                _se2_problem(cfg, B, 0.3),
                _trilateration_problem(cfg, B),
                _pose_graph_problem(cfg, B, poses)]
    res = SuiteResult("theseus", TITLE)
    try:
        methods = _methods(th)
    except ImportError as e:
        res.errors.append(f"FoldedTheseusLayer is not importable: {e}")
        methods = {k: v for k, v in _methods_theseus_only(th).items()}
    table_rows: dict[str, dict[str, dict]] = {}
    truths: dict[str, dict] = {}
    for prob in bar(problems, cfg, "theseus"):
        t0 = time.perf_counter()
        if prob.truth is None:
            truth = _fd_grad(prob)
            truths[prob.name] = {"kind": "fd",
                                 "fd_step_difference": _rel(_fd_grad(prob, FD_STEP_CHECK),
                                                            truth)}
        else:
            truth, stats = prob.truth(prob)
            stats["directional_fd_error"] = _directional_fd(prob, truth)
            truths[prob.name] = {"kind": "ift", **stats}
            if not stats["directional_fd_error"] <= PG_FD_GATE:
                res.errors.append(
                    f"{prob.name}: the IFT truth disagrees with directional central "
                    f"differences by {stats['directional_fd_error']:.1e} > {PG_FD_GATE:g}; "
                    "the gradient errors of this problem are not trustworthy.")
        truths[prob.name]["seconds"] = time.perf_counter() - t0
        table_rows[prob.name] = _measure(prob, methods, truth, cfg, res)
        truths[prob.name]["problem_seconds"] = time.perf_counter() - t0
    verdicts = _target_verdicts(table_rows, problems)
    res.data = {"batch": B, "poses": poses, "results": table_rows, "truth": truths,
                "target": verdicts, "fd_step": FD_STEP, "optimizer": METHOD_OPT,
                "fd_optimizer": FD_OPT, "pose_graph_optimizer": POSE_OPT,
                "pose_graph_truth_optimizer": POSE_TRUTH_OPT}
    for what, make in (
            ("markdown", lambda: setattr(res, "markdown", _markdown(
                table_rows, list(methods), problems, truths, verdicts, cfg, __doc__))),
            ("plot", lambda: res.figures.append(_plot(table_rows, list(methods), truths, problems,
                                                      cfg))),
            ("headline", lambda: setattr(res, "headline", _headline(table_rows, problems, B)))):
        try:
            make()
        except Exception as e:  # noqa: BLE001 - the measurements are kept in res.data
            res.errors.append(f"theseus {what} could not be written: {type(e).__name__}: {e}")
    return res


def _measure(prob: Problem, methods: dict, truth: torch.Tensor, cfg: Config,
             res: SuiteResult) -> dict[str, dict]:
    """Error of each method's gradient, then its forward/backward medians.

    The timed calls are interleaved (round r calls every method once) so that a change of
    load on a shared machine hits all methods alike instead of whichever ran at that moment.
    """
    rows: dict[str, dict] = {}
    calls: dict[str, Callable[[Stopwatch], torch.Tensor]] = {}
    layers: dict[str, object] = {}
    for name, (factory, kwargs) in methods.items():
        entry: dict = {}
        rows[name] = entry
        try:
            layer = factory(prob.make()).to(cfg.device)

            def once(sw: Stopwatch, layer=layer, kwargs=kwargs) -> torch.Tensor:
                y = prob.wrt.detach().clone().requires_grad_(True)
                inputs = prob.inputs(y)  # untimed: data → input tensors, initial values
                sw.start()
                values, _ = layer(inputs, optimizer_kwargs=dict(kwargs))
                loss = prob.loss(values).sum()
                sw.lap("forward")
                loss.backward()
                sw.lap("backward")
                return y.grad

            entry["error"] = _rel(once(Stopwatch(cfg.device)), truth)
            info = getattr(layer, "last_info", None)
            if info is not None and info.backward_converged is not None:
                entry["backward_converged"] = bool(info.backward_converged.all())
            calls[name], layers[name] = once, layer
        except Exception as e:  # noqa: BLE001 - one method failing must not stop the suite
            entry["failed"] = f"{type(e).__name__}: {e}"
            res.errors.append(f"{name} on {prob.name}: {entry['failed']}")
    # the default layer's targets are ratios within 10 % of 1: at least MIN_REPEATS rounds
    # (outside --tiny), so that one preempted call does not move a median across them
    repeats = prob.repeats or cfg.pick(tiny=cfg.repeats, quick=max(cfg.repeats, MIN_REPEATS),
                                       full=max(cfg.repeats, MIN_REPEATS))
    timings = {name: Timing() for name in calls}
    rounds = range(cfg.warmup + repeats)
    for r in bar(rounds, cfg, f"timing {prob.name[:24]}"):
        for name in list(calls):
            sw = Stopwatch(cfg.device)
            try:
                calls[name](sw)
            except Exception as e:  # noqa: BLE001
                rows[name]["failed"] = f"{type(e).__name__}: {e}"
                res.errors.append(f"{name} on {prob.name}: {rows[name]['failed']}")
                del calls[name]
                continue
            if r >= cfg.warmup:
                for k, v in sw.laps.items():
                    timings[name].samples.setdefault(k, []).append(v)
    for name in calls:
        entry, timing = rows[name], timings[name]
        entry["forward_s"] = timing.median("forward")
        entry["backward_s"] = timing.median("backward")
        entry["total_s"] = timing.median("total")
        entry["repeats"] = timing.repeats
        info = getattr(layers[name], "last_info", None)
        if info is not None and info.backward_converged is not None:
            entry["backward_converged"] = bool(entry.get("backward_converged", True)
                                               and info.backward_converged.all())
        if info is not None and info.backward_iterations is not None:
            entry["backward_iterations"] = int(info.backward_iterations.max())
            if info.extra.get("hessian_vjps"):
                entry["hessian_vjps"] = int(info.extra["hessian_vjps"])
    return rows


def _methods_theseus_only(th) -> dict[str, tuple[Callable, dict]]:
    return {
        "theseus unroll": (th.TheseusLayer, {"backward_mode": "unroll"}),
        "theseus implicit": (th.TheseusLayer, {"backward_mode": "implicit"}),
        "theseus truncated (5)": (th.TheseusLayer, {"backward_mode": "truncated",
                                                    "backward_num_iterations": 5}),
        "theseus dlm": (th.TheseusLayer, {"backward_mode": "dlm"}),
    }
