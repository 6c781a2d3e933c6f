"""The comparison report reads on its own: a glossary at the top, one plain sentence opening
every suite's section, no references to the project's issue tracker, named references in
gradient reports, and a Theseus figure whose panels are titled and whose bars stay visible."""

from __future__ import annotations

import ast
import datetime as dt
import math
import pathlib
import re

import pytest
import torch

from fold_plugins.verify import compare_gradients, reference_name

ROOT = pathlib.Path(__file__).resolve().parents[2]
SUITES_DIR = ROOT / "comparisons" / "suites"
#: the report's text comes from these files (the learning/experiment suites have other owners)
TEXT_SOURCES = ["comparisons/report.py", "comparisons/cli.py",
                "comparisons/suites/gradient_agreement.py",
                "comparisons/suites/unroll_convergence.py", "comparisons/suites/scaling.py",
                "comparisons/suites/theseus.py", "comparisons/suites/_theseus_report.py"]


def _module_intro(name: str) -> str:
    """The suite module's ``INTRO`` constant, read without importing it."""
    path = SUITES_DIR / f"{name}.py"
    if not path.exists():  # a subpackage, or a suite being added
        return ""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "INTRO"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    return ""


def test_every_suite_opens_with_one_plain_sentence():
    pytest.importorskip("matplotlib")
    from comparisons.report import INTROS
    from comparisons.suites import SUITES

    for name in SUITES:
        intro = _module_intro(name) or INTROS.get(name, "")
        assert intro, f"suite {name!r} has no INTRO (module constant or report.INTROS entry)"
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", intro.strip()) if s]
        assert len(sentences) == 1 and intro.strip().endswith("."), (name, intro)
        assert 60 <= len(intro) <= 300, (name, len(intro))
        assert not re.search(r"\d\s*e-?\d|\d+(\.\d+)?×", intro), \
            f"{name}: an intro states no measured number (those come from the run)"


def test_report_has_glossary_first_and_intros_per_section(tmp_path):
    pytest.importorskip("matplotlib")
    from comparisons.config import Config
    from comparisons.report import GLOSSARY, SuiteResult, write_report

    cfg = Config(mode="tiny", out=tmp_path)
    results = [SuiteResult("scaling", "3. Scaling", markdown="body A", intro="Plain one."),
               SuiteResult("portfolio", "6. Portfolio", markdown="body B")]
    path = write_report(cfg, {"CPU": "x"}, results, dt.datetime.now(dt.timezone.utc), 1.0, [])
    text = path.read_text()
    g, m = text.index("**Terms used below.**"), text.index("## Machine, versions, settings")
    assert g < m
    for term, _ in GLOSSARY:
        assert f"| {term} |" in text[g:m]
    for term in ("VJP", "ρ(Φ)", "LFPI", "DC3", "dlm", "unrolled", "folded"):
        assert term in text[g:m], term
    sec_a = text[text.index("## 3. Scaling"):]
    assert sec_a.split("\n")[2] == "*Plain one.*"
    sec_b = text[text.index("## 6. Portfolio"):]
    assert sec_b.split("\n")[2].startswith("*Trains a return predictor")  # INTROS fallback
    assert sec_b.index("*Trains") < sec_b.index("body B")


def test_report_sources_do_not_cite_the_issue_tracker():
    pattern = re.compile(r"\bissues?[- ]?\d|\bthe issue\b|paper's identity|DESIGN\.md", re.I)
    hits = [f"{f}:{n}: {line.strip()}" for f in TEXT_SOURCES
            for n, line in enumerate((ROOT / f).read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def test_gradient_reports_name_their_reference():
    x = torch.randn(3, dtype=torch.float64)

    def fn(t):
        return torch.sin(t)

    named = compare_gradients(fn, lambda t: torch.sin(t), (x,), name="cvxpylayers (SCS)")
    assert named.reference == "cvxpylayers (SCS)" and named.worst == 0.0
    assert str(named).startswith("gradient check vs cvxpylayers (SCS), 3 random cotangent(s)")
    assert compare_gradients(fn, lambda t: torch.sin(t), (x,)).reference == "<lambda>"

    class Ref:
        name = "diffcp"

        def __call__(self, t):
            return torch.sin(t)

    by_attr = compare_gradients(fn, Ref(), (x,))
    assert by_attr.reference == "diffcp" and by_attr.worst == 0.0
    assert reference_name(torch.sin) == "sin"
    assert compare_gradients(fn, "finite_differences", (x,)).reference == "finite_differences"


def test_theseus_figure_panels_titles_floor_and_labels(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import comparisons.suites._theseus_report as suite
    from comparisons.config import Config
    from comparisons.suites._theseus_problems import Problem

    captured = {}

    def keep(fig, cfg, name, caption):
        captured["fig"], captured["caption"] = fig, caption
        return None

    monkeypatch.setattr(suite, "save_figure", keep)
    names = ["theseus implicit", "folded (GN step, gmres)"]
    rows = {"exp fit": {"theseus implicit": {"error": 1.6e-2, "backward_s": 5e-4,
                                             "total_s": 1e-2},
                        "folded (GN step, gmres)": {"error": 3e-10, "backward_s": 4e-3,
                                                    "total_s": 1.2e-2}},
            "pose graph": {"theseus implicit": {"error": 2e-2, "backward_s": 0.03,
                                                "total_s": 0.3},
                           "folded (GN step, gmres)": {"error": 2e-9, "backward_s": 0.05,
                                                       "total_s": 0.33}}}
    problems = [Problem("exp fit", None, "y", torch.zeros(1, 1), None, None, 2),
                Problem("pose graph", None, "μ", torch.zeros(1, 1), None, None, 90)]
    suite._plot(rows, names, {"exp fit": {"fd_step_difference": 1e-9}}, problems,
                Config(out=tmp_path))
    fig = captured["fig"]
    axes = fig.axes
    assert len(axes) == 3
    assert all(ax.get_title() for ax in axes)
    assert "Forward + backward" in axes[2].get_title()
    for ax, key, scale in zip(axes, ("error", "backward_s", "total_s"), (1, 1e3, 1e3)):
        vals = [r[n][key] * scale for r in rows.values() for n in names]
        bottom, top = ax.get_ylim()
        assert ax.get_yscale() == "log"
        assert bottom <= min(vals) / 10 and top >= max(vals)  # the lowest bar stays visible
        heights = sorted(p.get_height() for p in ax.patches)
        assert all(math.isclose(a, b) for a, b in zip(heights, sorted(vals)))
        assert len(ax.texts) == len(vals)  # every bar carries its value
    assert "forward + backward" in captured["caption"]
    # the default layer's targets, dashed at k × implicit: backward 4× (2 dims) and 2× (90
    # dims), forward + backward 1.1× on both problems
    dashed = sorted(float(seg[0][1]) for ax in axes[1:] for c in ax.collections
                    for seg in c.get_segments())
    assert dashed == pytest.approx(sorted([4 * 5e-4 * 1e3, 2 * 0.03 * 1e3,
                                           1.1 * 1e-2 * 1e3, 1.1 * 0.3 * 1e3]))
