"""The Theseus suite's report: tables, the speed targets' verdicts, the headline and the
plot (suite 4, :mod:`comparisons.suites.theseus`)."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import Config
from ..report import fmt_err, fmt_ms, fmt_ratio, save_figure, table
from ._theseus_problems import (
    FD_OPT,
    FD_STEP,
    FD_STEP_CHECK,
    METHOD_OPT,
    PG_FD_DIRECTIONS,
    PG_FD_GATE,
    PG_FD_STEP,
    POSE_NAME,
    POSE_OPT,
    Problem,
)

BASELINE = "theseus implicit"

#: print the SE2 log-map explanation only when Theseus's Jacobians differ from autograd's by
#: more than this, at a residual angle within SE2_SWITCH_WINDOW (just above its series switch)
JACOBIAN_EXPLAIN = 1e-10
SE2_SWITCH_WINDOW = (1e-3, 1e-1)
#: the speed targets of the layer's *default* settings against Theseus ``implicit`` (same run,
#: batch 16): forward + backward at most TARGET_TOTAL× on every problem; backward at most
#: TARGET_BACKWARD_LARGE× from LARGE_DIMS tangent dimensions on, TARGET_BACKWARD_SMALL× up to
#: SMALL_DIMS (none in between); and a gradient error at most TARGET_ERROR
TARGET_TOTAL = 1.1
TARGET_BACKWARD_LARGE, LARGE_DIMS = 2.0, 50
TARGET_BACKWARD_SMALL, SMALL_DIMS = 4.0, 3
TARGET_ERROR = 1e-8
FOLDED = ("folded (default)", "folded (GN step, gmres)")


def backward_target(dims: int) -> float | None:
    """The backward ÷ implicit target for a problem of ``dims`` tangent dimensions."""
    if dims >= LARGE_DIMS:
        return TARGET_BACKWARD_LARGE
    return TARGET_BACKWARD_SMALL if dims <= SMALL_DIMS else None


def _ratios(e: dict, imp: dict) -> tuple[float | None, float | None]:
    """(backward ÷ implicit's backward, forward+backward ÷ implicit's forward+backward)."""
    bwd = e["backward_s"] / imp["backward_s"] if "backward_s" in e and "backward_s" in imp \
        else None
    tot = e["total_s"] / imp["total_s"] if "total_s" in e and "total_s" in imp else None
    return bwd, tot


def _flag(e: dict) -> str:
    """`` ✗`` when a folded backward did not converge on every instance."""
    return " ✗" if e.get("backward_converged") is False else ""


def _headline(rows: dict, problems: list[Problem], B: int) -> list[str]:
    """The default layer against Theseus ``implicit`` on every problem, in one line each for
    the smallest noisy problem and the pose graph, plus the targets' tally."""
    out = []
    name = FOLDED[0]
    for pname in ("noisy Point2 trilateration (σ=0.2)", POSE_NAME):
        r = rows.get(pname, {})
        imp, fold = r.get(BASELINE, {}), r.get(name, {})
        if not all(k in d for d in (imp, fold) for k in ("error", "total_s")):
            continue
        bwd, tot = _ratios(fold, imp)
        dims = next((p.tangent_dim for p in problems if p.name == pname), 0)
        out.append(
            f"{pname} ({dims} dims, B={B}), default layer ÷ implicit: forward+backward "
            f"{fmt_ratio(tot)}, backward {fmt_ratio(bwd)}; gradient error implicit "
            f"{fmt_err(imp['error'])} vs folded {fmt_err(fold['error'])}{_flag(fold)}")
    return out


def _short(name: str) -> str:
    """``folded (newton step, fixed_point)`` → ``newton+fixed_point`` (headline labels)."""
    inner = name[name.index("(") + 1:-1] if "(" in name else name
    return inner.replace(" step", "").replace(", ", "+")


def _target_verdicts(rows: dict, problems: list[Problem]) -> dict:
    """The targets per problem for every folded variant, from this run's medians (the targets
    are set for the default; the others are judged the same way for comparison)."""
    out: dict = {}
    for prob in problems:
        r = rows.get(prob.name, {})
        imp = r.get(BASELINE, {})
        if "total_s" not in imp:
            continue
        for name in FOLDED:
            e = r.get(name, {})
            if "total_s" not in e:
                continue
            vs_imp, total_vs_imp = _ratios(e, imp)
            limit = backward_target(prob.tangent_dim)
            checks = {"forward+backward": total_vs_imp <= TARGET_TOTAL,
                      "gradient error": e.get("error", math.inf) <= TARGET_ERROR}
            if limit is not None:
                checks["backward"] = vs_imp <= limit
            out.setdefault(prob.name, {})[name] = {
                "vs_implicit": vs_imp, "total_vs_implicit": total_vs_imp,
                "backward_target": limit, "error": e.get("error"),
                "missed": [k for k, ok in checks.items() if not ok],
                "met": all(checks.values())}
    return out


def _default_markdown(rows: dict, problems: list[Problem], verdicts: dict) -> str:
    """First: what a user switching one line gets — the layer's default settings against
    Theseus ``implicit``, forward + backward and backward, with the gradient error and the
    targets' verdict."""
    name = FOLDED[0]
    out = []
    for prob in problems:
        r = rows.get(prob.name, {})
        e, base = r.get(name, {}), r.get(BASELINE, {})
        limit = backward_target(prob.tangent_dim)
        want = f"≤ {TARGET_TOTAL:g}× / " + (f"≤ {limit:g}×" if limit else "—")
        if "backward_s" not in e:
            out.append((prob.name, prob.tangent_dim, "—", "—", want, "—",
                        "failed" if "failed" in e else "—"))
            continue
        ratio, total_ratio = _ratios(e, base)
        v = verdicts.get(prob.name, {}).get(name)
        verdict = "—" if v is None else ("met" if v["met"] else
                                         "not met: " + ", ".join(v["missed"]))
        out.append((prob.name, prob.tangent_dim, fmt_ratio(total_ratio), fmt_ratio(ratio),
                    want, fmt_err(e["error"]) + _flag(e), verdict))
    return "\n".join([
        f"**Default settings** (`FoldedTheseusLayer(optimizer)`, listed as \"{name}\" below) "
        f"against Theseus `implicit`, with the targets set for them: forward + backward at "
        f"most {TARGET_TOTAL:g}× implicit's on every problem; backward at most "
        f"{TARGET_BACKWARD_SMALL:g}× up to {SMALL_DIMS} tangent dimensions and "
        f"{TARGET_BACKWARD_LARGE:g}× from {LARGE_DIMS} on; gradient error at most "
        f"{TARGET_ERROR:g}. Verdicts come from this run's medians (a ratio near a threshold "
        "can flip between runs on a loaded machine).", "",
        table(["problem", "tangent dims", f"forward+backward ÷ {BASELINE}",
               f"backward ÷ {BASELINE}", "target (f+b / backward)", "gradient error",
               "target"], out)])


def _markdown(rows: dict, names: list[str], problems: list[Problem], truths: dict,
              verdicts: dict, cfg: Config, doc: str) -> str:
    """The suite's section: ``doc`` (the suite module's docstring, minus its title line), the
    default layer's verdicts, one table per problem, the truths' checks, the tally."""
    md = [doc.split("\n\n", 1)[1].strip(), "",
          "Error = worst instance's relative error ‖g − g_truth‖/‖g_truth‖ of ∂loss/∂data; "
          "per-instance data throughout. Times are medians on a shared machine (rough: "
          "neighbours' load moves them by tens of percent).", "",
          _default_markdown(rows, problems, verdicts), ""]
    for prob in problems:
        r = rows.get(prob.name, {})
        base = r.get(BASELINE, {})
        out = []
        for name in names:
            e = r.get(name, {})
            if "failed" in e:
                out.append((name, "failed: " + e["failed"][:120], "", "", "", "", ""))
                continue
            if "error" not in e:
                continue
            if "backward_s" not in e:  # the check call ran, the timed calls failed
                out.append((name, fmt_err(e["error"]) + _flag(e), "", "", "", "", ""))
                continue
            ratio, total_ratio = _ratios(e, base)
            its = e.get("backward_iterations")
            out.append((name, fmt_err(e["error"]) + _flag(e), fmt_ms(e["forward_s"]),
                        fmt_ms(e["backward_s"]) + _flag(e), fmt_ratio(ratio),
                        fmt_ratio(total_ratio), "" if its is None else str(its)))
        t = truths.get(prob.name, {})
        truth_name = "FD" if t.get("kind", "fd") == "fd" else "IFT truth"
        reps = next((e["repeats"] for e in r.values() if "repeats" in e), cfg.repeats)
        md += [f"**{prob.name}** (tangent dimension {prob.tangent_dim}, gradient w.r.t. "
               f"`{prob.wrt_name}` {tuple(prob.wrt.shape)}, batch {prob.wrt.shape[0]}, "
               f"{prob.iterations} Gauss-Newton iterations, median of {reps})", "",
               table(["method", f"gradient error vs {truth_name}", "forward ms", "backward ms",
                      f"backward ÷ {BASELINE}", f"forward+backward ÷ {BASELINE}",
                      "folded backward iterations"], out)]
        if t.get("kind") == "fd":
            md.append(f"Truth check: central differences at steps {FD_STEP:g} and "
                      f"{FD_STEP_CHECK:g} (× (1+|data|)) differ by "
                      f"{fmt_err(t['fd_step_difference'])} (worst instance, relative): the FD "
                      "truth's error is of that order, and gradient errors at or below it "
                      "cannot be resolved.")
            md.append("")
        if t.get("kind") == "ift":
            passed = t["directional_fd_error"] <= PG_FD_GATE
            jac, angle = t["jacobian_vs_theseus"], t.get("jacobian_vs_theseus_angle", math.nan)
            explain = jac > JACOBIAN_EXPLAIN and \
                SE2_SWITCH_WINDOW[0] < angle < SE2_SWITCH_WINDOW[1]
            md.append(
                f"Truth check: the IFT gradient agrees with central differences along "
                f"{PG_FD_DIRECTIONS} random unit directions per instance (step {PG_FD_STEP:g}) "
                f"to {fmt_err(t['directional_fd_error'])} ("
                + (f"within the gate {PG_FD_GATE:g}" if passed else
                   f"**above the gate {PG_FD_GATE:g}: the truth is not trustworthy**")
                + f"); its residuals "
                f"match Theseus's cost-function errors to {t['residual_vs_theseus']:.1e}; "
                f"Theseus's x* has ‖∇f‖ = {t['stationarity_before']:.1e}, polished to "
                f"{t['stationarity_after']:.1e} (smallest Hessian eigenvalue "
                f"{t['hessian_min_eig']:.1e}). Theseus's analytic Jacobians differ from "
                f"autograd's of the same errors by up to {jac:.1e} (at a residual angle "
                f"|θ| = {angle:.1e}). "
                + ("Its SE2 log-map Jacobian evaluates 1/θ − ½·sin θ/(1 − cos θ), which "
                   "cancels catastrophically for residual angles just above its 1e-3 series "
                   "switch, where this largest difference lies; Theseus's fixed point Jᵀr = 0 "
                   "and every gradient of it (unroll, folded) inherit that, so errors of that "
                   "order or below are Theseus's Jacobian floor, not the backward's. "
                   if explain else "")
                + f"This problem took {t['problem_seconds']:.0f} s in all (truth and its check "
                f"{t['seconds']:.1f} s).")
            md.append("")
    floor = truths.get(POSE_NAME, {}).get("iterations_to_floor")
    fd_floor = _fd_floor(truths)
    md.append(f"Every method's forward runs a fixed number of Gauss-Newton iterations "
              f"({METHOD_OPT['max_iterations']}; {POSE_OPT['max_iterations']} on the pose graph, "
              + ("" if floor is None else
                 f"whose objective is within 1e-9 of its floor after {floor} from dead "
                 "reckoning in the truth's solve")
              + ") with Theseus's "
              "tolerances set to 0 (its objective-decrease test would stop at ‖δx‖ ≈ 1e-8 on "
              "non-zero residuals); the finite differences use "
              f"{FD_OPT['max_iterations']} (central, step {FD_STEP:g}·(1+|data|), float64)"
              + (f"; the two FD steps differ by at most {fmt_err(fd_floor)} over these "
                 "problems (dotted line in the plot)" if fd_floor is not None else "")
              + ".")
    if any(e.get("backward_converged") is False for r in rows.values() for e in r.values()):
        md.append("")
        md.append("✗ marks a folded layer whose backward solve did not reach its tolerance on "
                  "every instance (`FoldInfo.backward_converged`).")
    md += ["", _target_markdown(verdicts, problems)]
    return "\n".join(md)


def _target_markdown(verdicts: dict, problems: list[Problem]) -> str:
    """The tally of the targets: the default layer (what they are set for) and, for
    comparison, the other folded variant judged the same way."""
    lines = ["**Targets, tally** (this run):", ""]
    for name in FOLDED:
        vs = [(p, verdicts[p.name][name]) for p in problems if name in verdicts.get(p.name, {})]
        if not vs:
            continue
        missed = [f"{p.name} ({', '.join(v['missed'])})" for p, v in vs if not v["met"]]
        lines.append(f"- {name}: met on {sum(v['met'] for _, v in vs)} of {len(vs)} problems"
                     + (f"; missed on {'; '.join(missed)}" if missed else "")
                     + (" — the settings the targets are set for" if name == FOLDED[0] else
                        " — for comparison"))
    if len(lines) == 2:
        return "(no verdict: a method needed for it did not run)"
    return "\n".join(lines)


def _fd_floor(truths: dict) -> float | None:
    """Largest difference between the two FD steps over the FD-truth problems (measured)."""
    vals = [t["fd_step_difference"] for t in truths.values() if "fd_step_difference" in t]
    return max(vals) if vals else None


def _annotate(ax, xs: list[float], values: list[float], fmt: Callable[[float], str]) -> None:
    """Print each bar's value just above it (small, vertical), so low bars stay readable."""
    for x, v in zip(xs, values):
        if not math.isnan(v):
            ax.text(x, v * 1.25, fmt(v), rotation=90, ha="center", va="bottom", fontsize=5.5)


def _plot(rows: dict, names: list[str], truths: dict, problems: list[Problem], cfg: Config):
    """Gradient error, backward and forward + backward time per problem and method (log
    bars, each labelled), with the default layer's targets dashed."""
    import matplotlib.pyplot as plt

    dims = {p.name: p.tangent_dim for p in problems}

    probs = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.2))
    width = 0.8 / max(1, len(names))
    values: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for i, name in enumerate(names):
        entries = [rows[p].get(name, {}) for p in probs]
        errs = [max(e.get("error", math.nan), 1e-16) for e in entries]
        bwd = [e.get("backward_s", math.nan) * 1e3 for e in entries]
        tot = [e.get("total_s", math.nan) * 1e3 for e in entries]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(probs))]
        for k, (vals, fmt) in enumerate(((errs, lambda v: f"{v:.0e}"),
                                         (bwd, lambda v: f"{v:.3g}"),
                                         (tot, lambda v: f"{v:.3g}"))):
            axes[k].bar(xs, vals, width, label=name, color=f"C{i}")
            _annotate(axes[k], xs, vals, fmt)
            values[k] += [v for v in vals if not math.isnan(v)]
    titles = ("Gradient error against the truth (lower is better)",
              "Backward time (the gradient only)",
              "Forward + backward time (what a training step pays)")
    labels = ("relative gradient error (log scale)", "backward ms (log scale)",
              "forward + backward ms (log scale)")
    for k, ax in enumerate(axes):
        ax.set_yscale("log")
        ax.set_title(titles[k], fontsize=10)
        ax.set_xticks(range(len(probs)))
        ax.set_xticklabels([p.replace(" (", "\n(") for p in probs], fontsize=8)
        ax.set_ylabel(labels[k])
        ax.grid(True, axis="y", alpha=0.3)
        if values[k]:  # a floor well below the lowest bar, room above for the labels
            ax.set_ylim(min(values[k]) / 20, max(values[k]) * 30)
    fd_floor = _fd_floor(truths)
    if fd_floor is not None:
        axes[0].axhline(max(fd_floor, 1e-16), color="k", ls=":", lw=1,
                        label="resolution of the finite-difference truth")
    marks = []
    for j, p in enumerate(probs):  # the default layer's targets, × implicit's time
        imp = rows[p].get(BASELINE, {})
        limits = ((1, "backward_s", backward_target(dims.get(p, 0))), (2, "total_s", TARGET_TOTAL))
        for k, key, limit in limits:
            if key in imp and limit is not None:
                m = axes[k].hlines(limit * imp[key] * 1e3, j - 0.45, j + 0.45, colors="k",
                                   linestyles="--", lw=1,
                                   label="target of the default layer (× Theseus implicit)")
                marks.append(m)
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=5, fontsize=8, frameon=False)
    if marks:
        axes[1].legend(handles=marks[:1], fontsize=7, loc="upper left")
        axes[2].legend(handles=marks[:1], fontsize=7, loc="upper left")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save_figure(fig, cfg, "theseus", "Theseus's backward modes vs FoldedTheseusLayer on "
                       f"{len(probs)} least-squares problems: gradient error against the truth "
                       "(finite "
                       "differences; the implicit-function-theorem gradient on the pose graph; "
                       "dotted: how far the finite-difference truth at steps "
                       f"{FD_STEP:g} and {FD_STEP_CHECK:g} disagrees with itself), backward "
                       "time, and forward + backward time; every bar is labelled with its "
                       "value; dashed: the default layer's targets (backward "
                       f"{TARGET_BACKWARD_SMALL:g}× Theseus implicit up to {SMALL_DIMS} "
                       f"dimensions, {TARGET_BACKWARD_LARGE:g}× from {LARGE_DIMS}; forward + "
                       f"backward {TARGET_TOTAL:g}×).")
