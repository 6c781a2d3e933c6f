"""The README's Python examples run as written (each asserts its own numbers), its links
resolve inside the repository, and nothing in the repository points to a file outside it."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    code = BLOCKS[i]
    assert "assert" in code, "every README example checks its own result"
    exec(compile(code, f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})


def test_quick_start_is_short_and_first():
    first = TEXT.index("```python")
    assert TEXT.rindex("## Quick start", 0, first) > 0
    assert len(BLOCKS[0].strip().splitlines()) <= 12


def test_readme_links_resolve_inside_the_repository():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "docs/design.md" in local and any(t.endswith(".png") for t in local)
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
    anchors = set(re.findall(r"\]\(#([^)]+)\)", TEXT))
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", TEXT, flags=re.M)}
    assert anchors <= headings, anchors - headings


def _repository_text_files() -> list[pathlib.Path]:
    """The repository's files (git's view; every non-hidden file outside a git checkout)."""
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode == 0:
        paths = [ROOT / p for p in res.stdout.splitlines()]
    else:  # an unpacked archive: skip hidden folders (.venv …) and generated output
        paths = [p for p in ROOT.rglob("*") if not any(
            part.startswith(".") or part in {"out", "build", "__pycache__"}
            or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]
    return [p for p in paths if p.is_file() and p.suffix in {".py", ".md", ".toml", ".txt", ""}]


def test_nothing_in_the_repository_points_outside_it():
    """Users get the repository only: the design document is docs/design.md."""
    # assembled from parts, so that this guard does not itself match a repository-wide scan
    ext = "sha" + "red"
    pattern = re.compile("DESIGN" + r"\.md" + rf"|(?i:{ext} folder|\.\./{ext}|/work/{ext})")
    this = pathlib.Path(__file__).resolve()
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in _repository_text_files() if p != this
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def test_every_library_name_the_readme_mentions_exists():
    import fold_plugins as fp

    names = set(re.findall(r"\bfp\.((?:steps|projections|verify|diagnostics|solvers)\.\w+)",
                           TEXT))
    # the problem table lists more projections/prox operators after the first, unprefixed
    for row in TEXT.splitlines():
        if row.startswith("| ") and "`fp.projections." in row:
            names |= {f"projections.{n}" for n in re.findall(r"`(\w+)`", row.split("|")[3])}
    assert len(names) >= 25, names
    missing = [n for n in sorted(names)
               if not hasattr(getattr(fp, n.split(".")[0]), n.split(".")[1])]
    assert not missing, missing
