"""The house's contract: public import paths that users and outside tests rely on stay where
they are, the floors run one way (no import back up, no cycle-breaking imports inside
functions), adapters build only on public core paths, and the declared plugin points
(``fold_plugins.protocols``) hold for the library's own operators and for a user's solver."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fold_plugins as fp
from fold_plugins import FoldError
from fold_plugins.internal import (
    AdjointOperator,
    CountsApplications,
    HasCostKey,
    SolveInfo,
    SupportsMatmat,
    linearize,
    normalize_solve_info,
    step_traits,
)

ROOT = Path(__file__).resolve().parents[1]

#: (module, names) every release keeps importable from exactly these paths
PUBLIC = {
    "fold_plugins": ["fold", "FoldInfo", "FoldError", "FoldConvergenceWarning",
                     "ForwardConvergenceWarning", "steps",
                     "projections", "solvers", "diagnostics", "verify", "preconditioners"],
    "fold_plugins.steps": ["iterate", "qp", "solve_qp_admm", "INF"],
    "fold_plugins.solvers": ["SolveInfo", "gmres", "dense", "fixed_point", "bicgstab", "auto",
                             "get_solver", "SOLVERS"],
    "fold_plugins.preconditioners": ["admm_qp", "lazy"],
    "fold_plugins.verify": ["compare_gradients"],
    "fold_plugins.adapters.theseus": ["FoldedTheseusLayer"],
    "fold_plugins.adapters.cvxpylayers": ["FoldedSolver", "FoldedCvxpyLayer",
                                          "cvxpylayers_reference"],
    "fold_plugins.adapters.diffcp": ["diffcp_reference"],
    "fold_plugins.adapters.unrolled": ["unroll"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_import_paths_are_unchanged(module):
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # an optional dependency of an adapter (theseus, cvxpy)
        pytest.skip(f"{module}: optional dependency missing ({exc})")
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lost public name(s) {missing}"


def test_adapter_subpackages_reexport_the_classes_defined_in_their_rooms():
    th = pytest.importorskip("fold_plugins.adapters.theseus")
    cv = pytest.importorskip("fold_plugins.adapters.cvxpylayers")
    from fold_plugins.adapters.cvxpylayers.solver import FoldedSolver
    from fold_plugins.adapters.theseus.layer import FoldedTheseusLayer

    assert th.FoldedTheseusLayer is FoldedTheseusLayer and cv.FoldedSolver is FoldedSolver
    assert fp.preconditioners.admm_qp.__module__ == "fold_plugins.steps._qp_preconditioner"


def _imports(path: Path, package: str) -> list[tuple[str, bool]]:
    """``(absolute module, inside a function)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.append((mod, nested))
            elif isinstance(child, ast.Import):
                found.extend((a.name, nested) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def _package_of(path: Path, top: Path, name: str) -> str:
    """The package a file's relative imports start from: its folder (``__init__.py`` too)."""
    return ".".join([name, *path.relative_to(top).parts[:-1]])


def test_core_has_no_imports_inside_functions_except_optional_dependencies():
    """A deferred import of another core module only exists to break a cycle."""
    top = ROOT / "fold_plugins"
    offenders = []
    for path in sorted(top.rglob("*.py")):
        for mod, nested in _imports(path, _package_of(path, top, "fold_plugins")):
            if nested and mod.startswith("fold_plugins"):
                offenders.append(f"{path.relative_to(ROOT)}: {mod}")
    assert not offenders, offenders


def test_adapters_import_only_public_core_paths():
    top = ROOT / "adapters"
    offenders = []
    for path in sorted(top.rglob("*.py")):
        for mod, _ in _imports(path, _package_of(path, top, "fold_plugins.adapters")):
            parts = mod.split(".")
            if parts[0] == "fold_plugins" and parts[1:2] != ["adapters"] \
                    and any(p.startswith("_") for p in parts[1:]):
                offenders.append(f"{path.relative_to(ROOT)}: {mod}")
            if parts[0] in ("comparisons", "tests"):
                offenders.append(f"{path.relative_to(ROOT)}: {mod} (an import back up)")
    assert not offenders, offenders


def test_core_never_imports_the_floors_above_it():
    top = ROOT / "fold_plugins"
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sorted(top.rglob("*.py"))
                 for m, _ in _imports(p, _package_of(p, top, "fold_plugins"))
                 if m.split(".")[0] in ("adapters", "comparisons")
                 or m.startswith("fold_plugins.adapters")]
    assert not offenders, offenders


# ------------------------------------------------------------------ declared plugin points
def _linear_step(A):
    return lambda x, b: x - 0.5 * (x @ A.T - b)


def test_library_operator_declares_the_optional_capabilities_it_has():
    A = torch.eye(3, dtype=torch.float64) * 2
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    op = AdjointOperator(linearize(_linear_step(A), torch.zeros(2, 3, dtype=torch.float64), b))
    assert isinstance(op, SupportsMatmat) and isinstance(op, HasCostKey)
    assert isinstance(op, CountsApplications)
    v = torch.randn(2, 3, dtype=torch.float64)
    # Φ = I − A/2 = 0 here: (I − Φ)ᵀ v = v exactly, and one matmat of 4 columns counts 4
    assert torch.equal(op(v), v)
    assert torch.equal(op.matmat(v.expand(4, 2, 3)), v.expand(4, 2, 3)) and op.count == 5


def test_step_traits_take_only_the_literal_declarations():
    class Vouching:
        batch_independent = True
        record_captured = False

        def __call__(self, x):
            return x

    class Truthy:
        batch_independent = 1  # not the literal True: the probe stays on
        record_captured = 0  # not the literal False: the recorder stays on

        def __call__(self, x):
            return x

    assert step_traits(Vouching()) == step_traits(Vouching())
    assert (step_traits(Vouching()).batch_independent, step_traits(Vouching()).record_captured) \
        == (True, False)
    assert (step_traits(Truthy()).batch_independent, step_traits(Truthy()).record_captured) \
        == (False, True)
    assert step_traits(lambda x: x) == step_traits(Truthy())


def test_a_user_solvers_minimal_info_is_normalised_once():
    b = torch.randn(3, 4, dtype=torch.float64)
    raw = SimpleNamespace(iterations=[2, 3, 4], residual=torch.tensor([1e-12, 2e-12, 3e-12]),
                          converged=torch.tensor([1, 1, 0]))
    info = normalize_solve_info(raw, b, "mine")
    assert isinstance(info, SolveInfo) and info.solver == "mine" and info.extra == {}
    assert info.iterations.dtype == torch.int64 and info.residual.dtype == torch.float64
    assert info.converged.tolist() == [True, True, False] and info.diverged is None
    same = SolveInfo(info.iterations, info.residual, info.converged, 7, "gmres")
    assert normalize_solve_info(same, b, "ignored") is same and same.solver == "gmres"


@pytest.mark.parametrize("bad, needle", [
    (SimpleNamespace(iterations=torch.zeros(3), residual=torch.zeros(3)), "converged"),
    (SimpleNamespace(iterations=torch.zeros(2), residual=torch.zeros(3),
                     converged=torch.ones(3, dtype=torch.bool)), "info.iterations must have"),
])
def test_a_user_solvers_malformed_info_raises_naming_the_solver(bad, needle):
    with pytest.raises(FoldError, match=needle) as exc:
        normalize_solve_info(bad, torch.zeros(3, 2, dtype=torch.float64), "mine")
    assert "'mine'" in str(exc.value)


def test_a_user_solver_returning_a_misshapen_x_raises_in_backward_with_its_name():
    A = torch.eye(3, dtype=torch.float64) * 2
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x_star = torch.linalg.solve(A, b.detach().T).T

    def flat_solver(matvec, rhs, *, x0=None, tol=1e-10, maxiter=None):
        return rhs.reshape(-1), SimpleNamespace(iterations=torch.zeros(2), residual=torch.zeros(2),
                                                converged=torch.ones(2, dtype=torch.bool))

    x = fp.fold(_linear_step(A), x_star, b, solver=flat_solver)
    with pytest.raises(FoldError, match=r"'flat_solver' returned x of shape \(6,\)"):
        x.sum().backward()
