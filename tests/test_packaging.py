"""The built wheel installs only ``fold_plugins`` (with ``fold_plugins.adapters``), and the
installed package works even when another distribution's top-level ``adapters`` is importable.

The wheel is built once per module from a copy of the sources (so no ``build/`` folder appears
in the repository) with the virtualenv's own setuptools (``--no-build-isolation``: no index
needed).
"""

from __future__ import annotations

import ast
import csv
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "fold_plugins", "adapters")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """``pip wheel . --no-deps`` of a copy of the repository's package sources."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif p.exists():
            shutil.copy2(p, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "--no-input", "-q", "-w", str(out)],
                   check=True, capture_output=True, text=True, timeout=120)
    (whl,) = out.glob("fold_plugins-*.whl")
    return whl


def _record(whl: pathlib.Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
        return [row[0] for row in csv.reader(io.StringIO(z.read(name).decode()))]


def _dist_info(whl: pathlib.Path, leaf: str) -> str:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(f".dist-info/{leaf}")]
        return z.read(name).decode()


def test_wheel_has_only_fold_plugins_at_top_level(wheel):
    files = _record(wheel)
    top = {f.split("/")[0] for f in files if not f.split("/")[0].endswith(".dist-info")}
    assert top == {"fold_plugins"}, top
    assert _dist_info(wheel, "top_level.txt").split() == ["fold_plugins"]
    # the adapters ship inside the namespace, with the type marker and the licence
    for path in ("fold_plugins/adapters/__init__.py", "fold_plugins/adapters/unrolled.py",
                 "fold_plugins/adapters/theseus/__init__.py",
                 "fold_plugins/adapters/theseus/layer.py",
                 "fold_plugins/adapters/cvxpylayers/__init__.py",
                 "fold_plugins/adapters/cvxpylayers/solver.py",
                 "fold_plugins/adapters/diffcp.py", "fold_plugins/py.typed",
                 "fold_plugins/prox.py", "fold_plugins/steps/proximal.py"):
        assert path in files, path
    assert any(f.endswith(".dist-info/licenses/LICENSE") for f in files), files
    assert not any(f.startswith(("adapters/", "comparisons/", "tests/")) for f in files)


def _third_party_imports(whl: pathlib.Path, prefix: str, exclude: str) -> set[str]:
    """Top-level names of every non-stdlib module imported (anywhere, lazily too) by the
    wheel's ``prefix*.py`` files outside ``exclude``."""
    found = set()
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if not (name.startswith(prefix) and name.endswith(".py")) or name.startswith(exclude):
                continue
            for node in ast.walk(ast.parse(z.read(name).decode())):
                if isinstance(node, ast.Import):
                    found.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"fold_plugins", "__future__"}


def test_wheel_core_dependencies_are_what_the_core_imports(wheel):
    meta = _dist_info(wheel, "METADATA")
    core = {re.split(r"[<>=!~; \[]", ln.split(":", 1)[1].strip())[0]
            for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln}
    assert core == _third_party_imports(wheel, "fold_plugins/", "fold_plugins/adapters/")
    assert "License-Expression: MIT" in meta
    extras = {ln.split(":", 1)[1].strip() for ln in meta.splitlines()
              if ln.startswith("Provides-Extra:")}
    assert {"theseus", "cvx", "report", "test"} <= extras


DECOY_CHECK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {decoy!r})
    import adapters                                  # the other distribution's package
    assert adapters.__file__.startswith({decoy!r}), adapters.__file__
    assert adapters.DECOY is True
    import fold_plugins
    from fold_plugins.adapters import FoldedLoop, folded, truncated, unroll  # noqa: F401
    import fold_plugins.adapters as fa
    assert fold_plugins.__file__.startswith({where!r}), fold_plugins.__file__
    assert fa.__file__.startswith({where!r}), fa.__file__
    assert sys.modules["adapters"] is adapters       # untouched by our imports

    # a folded gradient through the installed adapter, against the closed form
    torch.manual_seed(0)
    n = 6
    A = torch.randn(n, n, dtype=torch.float64)
    P = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    a = 1.0 / float(torch.linalg.eigvalsh(P).max())
    q = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, n, dtype=torch.float64)
    loop = FoldedLoop(lambda x, q: x - a * (x @ P + q), x0=torch.zeros(3, n,
                      dtype=torch.float64), tol=1e-13, maxiter=10000)
    x = loop(q)
    g, = torch.autograd.grad((w * x).sum(), q)
    x_true = -torch.linalg.solve(P, q.detach().T).T      # x* = −P⁻¹q
    g_true = -torch.linalg.solve(P, w.T).T                # ∂⟨w, x*⟩/∂q = −P⁻¹w
    ex = float((x.detach() - x_true).norm() / x_true.norm())
    eg = float((g - g_true).norm() / g_true.norm())
    assert ex < 1e-10 and eg < 1e-9, (ex, eg)
    print("ok", ex, eg)
""")


@pytest.mark.parametrize("install", ["wheel", "editable"])
def test_decoy_adapters_package_does_not_shadow_ours(install, wheel, tmp_path):
    decoy = tmp_path / "decoy"
    (decoy / "adapters").mkdir(parents=True)
    (decoy / "adapters" / "__init__.py").write_text("DECOY = True\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    where = str(ROOT)  # the editable install maps fold_plugins(.adapters) into the repository
    if install == "wheel":
        target = tmp_path / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                        "--no-input", "-q", "--target", str(target), str(wheel)],
                       check=True, capture_output=True, text=True, timeout=120)
        where = str(target)
        env["PYTHONPATH"] = where  # ahead of the editable install of the repository
    code = DECOY_CHECK.format(decoy=str(decoy), where=where)
    # run from an empty folder: the repository's own top-level adapters/ is not on sys.path
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok"), res.stdout
