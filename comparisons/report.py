"""Suite results and the markdown report: tables, number formats, figures, header."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: PNG files only

from .config import Config  # noqa: E402
from .measure import MEMORY_METHOD, TIMING_METHOD  # noqa: E402

__all__ = ["Figure", "SuiteResult", "table", "fmt_ms", "fmt_bytes", "fmt_ratio", "fmt_err",
           "save_figure", "write_report", "GLOSSARY", "INTROS", "intro_for"]

#: Terms the sections use, defined once at the top of the report.
GLOSSARY: tuple[tuple[str, str], ...] = (
    ("folded", "the library's backward: one update step evaluated at the solution, then the "
     "linear system (I − Φ)ᵀv = g solved by a few matrix-free iterations (fp.fold)"),
    ("unrolled K", "back-propagating through K recorded solver iterations (what a plain "
     "PyTorch loop does); error shrinks like ρ(Φ)^K, memory grows with K"),
    ("Φ, ρ(Φ)", "Φ = ∂U/∂x, the Jacobian of one update step U at the solution; ρ(Φ) its "
     "spectral radius, the factor by which each iteration shrinks the error"),
    ("VJP", "vector-Jacobian product Jᵀu: what a backward pass computes for a cotangent u"),
    ("gradient error", "relative error ‖a − b‖/‖b‖ of a gradient (a VJP) against the stated "
     "truth (closed form, finite differences, cvxpylayers or diffcp)"),
    ("LFPI", "linear fixed-point iteration v ← Φᵀv + g: the folded solver 'fixed_point', and "
     "exactly what unrolling from the solution computes"),
    ("GMRES / dense", "the folded backward solved by restarted GMRES (one VJP per iteration) / "
     "by forming Φ with batched VJPs and an LU factorisation"),
    ("Theseus implicit / truncated / dlm", "Theseus's own backward modes: implicit "
     "differentiation with the Gauss-Newton Hessian JᵀJ / unrolling only the last iterations / "
     "direct loss minimisation (a perturbation-based approximation)"),
    ("cvxpylayers, diffcp, SCS, Clarabel", "differentiable convex-optimisation layers; the "
     "cone-program derivative they use; two cone solvers"),
    ("DC3", "the nonconvex constrained test problems of Donti, Rolnick & Kolter (2021)"),
    ("× (ratio)", "time of a method divided by the named baseline's time, measured in the same "
     "run; > 1 means slower than the baseline"),
)

#: One plain-language sentence opening each suite's section, for suites whose module does not
#: define ``INTRO`` itself.
INTROS: dict[str, str] = {
    "portfolio": "Trains a return predictor through a risk-constrained portfolio problem and "
                 "compares the decisions it learns (test regret) and the training time of "
                 "folding, cvxpylayers, unrolling and two baselines.",
    "tv_denoising": "Learns the difference operator of a total-variation denoiser and compares "
                    "the denoising error and training time of folding, unrolling and "
                    "cvxpylayers.",
    "nonconvex": "Learns through a nonconvex constrained problem that convex layers cannot "
                 "express, and compares the decisions of two folded layers with a two-stage "
                 "baseline.",
    "multilabel": "Trains a top-k classifier through a k-subset layer on noisy labels and "
                  "compares the folded layer with the hand-derived closed form, cvxpylayers "
                  "and plain cross-entropy in accuracy and training time.",
    "acopf": "Learns generator costs through an AC optimal power flow problem solved by Ipopt "
             "and compares the folded backward with a one-iteration truncation and a two-stage "
             "baseline.",
}


def intro_for(name: str, module: Any = None) -> str:
    """The plain-language sentence that opens suite ``name``'s section: its module's ``INTRO``,
    else :data:`INTROS`, else ``""``."""
    own = getattr(module, "INTRO", "") if module is not None else ""
    return own or INTROS.get(name, "")


@dataclass
class Figure:
    """A PNG written under the output folder, linked from the suite's section."""

    path: str  # relative to the report
    caption: str


@dataclass
class SuiteResult:
    """What a suite hands back: its markdown section, figures, numbers, and any errors.

    Attributes:
        name: the suite's CLI name.
        title: section heading.
        markdown: the section body (tables, notes).
        figures: PNGs to link.
        data: the measured numbers (written to ``results.json``; tests read them).
        errors: parts that failed (a dependency missing or raising); any error makes the run
            exit non-zero after the report is written.
        headline: optional rows for the report's summary table.
        seconds: wall time the suite took (filled by the runner).
        intro: one plain-language sentence opening the section (filled by the runner from the
            suite module's ``INTRO`` when empty).
    """

    name: str
    title: str
    markdown: str = ""
    figures: list[Figure] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    intro: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors


# ----------------------------------------------------------------------------- formatting

def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with 3 significant figures."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_bytes(n: int | float | None) -> str:
    """Bytes as kB/MB/GB (decimal)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def fmt_ratio(r: float | None) -> str:
    """A ratio with 3 significant figures (2 below 1): ``123×``, ``12.3×``, ``1.23×``,
    ``0.43×``, ``0.0042×``; never rounded to ``0.00×``."""
    if r is None or (isinstance(r, float) and (math.isnan(r) or math.isinf(r))):
        return "—"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    if r >= 1:
        return f"{r:.2f}×"
    if r == 0:
        return "0×"
    return f"{r:#.2g}×"


def fmt_err(e: float | None) -> str:
    """A relative error in scientific notation."""
    if e is None or (isinstance(e, float) and math.isnan(e)):
        return "—"
    return f"{e:.1e}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def save_figure(fig: Any, cfg: Config, name: str, caption: str) -> Figure:
    """Save a matplotlib figure as ``<out>/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Figure(path.name, caption)


# ----------------------------------------------------------------------------- the report

def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return _jsonable(x.detach().cpu().tolist())
    except ImportError:
        pass
    return str(x)


def write_report(cfg: Config, env: dict[str, str], results: Sequence[SuiteResult],
                 started: _dt.datetime, seconds: float, argv: Sequence[str]) -> Path:
    """Write ``<out>/report.md`` and ``<out>/results.json``; return the report's path."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    lines = ["# fold-plugins comparisons", ""]
    lines.append(f"Generated {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} by "
                 f"`python -m comparisons {' '.join(argv)}` in {seconds:.0f} s.")
    lines.append("")
    lines.append("Each section below compares the library's *folded* backward pass with the "
                 "alternatives a user has (unrolling the solver, Theseus's backward modes, "
                 "cvxpylayers, diffcp) on the same problems in the same run: first how exact "
                 "the gradients are, then how long they take and how much memory they use.")
    lines.append("")
    lines.append("**Terms used below.**")
    lines.append("")
    lines.append(table(["term", "meaning"], GLOSSARY))
    lines.append("## Machine, versions, settings")
    lines.append("")
    rows = [(k, v) for k, v in env.items()]
    rows += [(k, v) for k, v in cfg.settings().items()]
    lines.append(table(["", "value"], rows))
    threads = cfg.extra.get("native thread pools (threadpoolctl, read back after the run)")
    lines.append(f"`torch.set_num_threads({cfg.threads})` was called before any measurement "
                 "(on a shared 2-core machine torch's OpenMP threads collapse under load), and "
                 "the whole run was wrapped in `threadpoolctl.threadpool_limits(1)` (BLAS and "
                 "OpenMP pools of numpy/scipy/SCS/torch, with `OMP_NUM_THREADS`, "
                 "`OPENBLAS_NUM_THREADS` and `MKL_NUM_THREADS` set to 1 for libraries loaded "
                 "later); cvxpylayers/diffcp are also given one job (`n_jobs_forward = "
                 "n_jobs_backward = 1`). "
                 + (f"Thread pools read back with `threadpoolctl.threadpool_info()` after the "
                    f"last suite: {threads}." if threads else
                    "The thread pools were not read back (threadpoolctl unavailable)."))
    lines.append("")
    lines.append(f"**Timing.** {TIMING_METHOD}")
    lines.append("")
    lines.append(f"**Memory.** {MEMORY_METHOD}")
    lines.append("")
    lines.append("## Summary")
    lines.append("")
    srows = []
    for r in results:
        status = "ok" if r.ok else f"**FAILED** ({len(r.errors)} error(s))"
        srows.append((f"[{r.name}](#{_anchor(r.title)})", status, f"{r.seconds:.0f} s",
                      "<br>".join(r.headline) or "—"))
    lines.append(table(["suite", "status", "time", "headline"], srows))
    for r in results:
        lines.append(f"## {r.title}")
        lines.append("")
        intro = r.intro or intro_for(r.name)
        if intro:
            lines.append(f"*{intro}*")
            lines.append("")
        if r.errors:
            lines.append("> **This suite did not complete.** Errors:")
            lines.append(">")
            for e in r.errors:
                lines.append("> ```")
                lines += [f"> {ln}" for ln in e.strip().splitlines()[-25:]]
                lines.append("> ```")
            lines.append("")
        if r.markdown:
            lines.append(r.markdown.strip())
            lines.append("")
        for fig in r.figures:
            lines.append(f"![{fig.caption}]({fig.path})")
            lines.append("")
            lines.append(f"*{fig.caption}*")
            lines.append("")
        if r.warnings:
            lines.append(f"<details><summary>{len(r.warnings)} distinct warning(s) raised "
                         "during this suite</summary>")
            lines.append("")
            for w in r.warnings:
                lines.append(f"- `{w[:400]}`")
            lines.append("")
            lines.append("</details>")
            lines.append("")
    path = cfg.out / "report.md"
    path.write_text("\n".join(lines))
    payload = {"started": started.isoformat(), "seconds": seconds, "argv": list(argv),
               "environment": env, "settings": cfg.settings(),
               "suites": {r.name: {"ok": r.ok, "errors": r.errors, "seconds": r.seconds,
                                   "data": r.data, "figures": [f.path for f in r.figures]}
                          for r in results}}
    (cfg.out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1))
    return path


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, spaces to dashes, punctuation dropped."""
    keep = [c for c in title.lower() if c.isalnum() or c in " -_"]
    return "".join(keep).replace(" ", "-")
