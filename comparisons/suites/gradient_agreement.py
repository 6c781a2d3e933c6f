"""Suite 1 — gradient agreement on the convex cross-check cases (and the nonconvex DC3 case).

For every case of ``comparisons.cases`` (one row each), the folded gradient — a blackbox
forward (cvxpy/Clarabel, OSQP or the library's own driver) followed by ``fp.fold`` of a library
step — is compared with ``fold_plugins.verify.compare_gradients`` against:

* **cvxpylayers (SCS)** and **cvxpylayers (Clarabel)** — ``adapters.cvxpylayers`` (diffcp
  backend, tight tolerances, dense derivative);
* **diffcp** — ``adapters.diffcp``: cvxpy's cone-program data and diffcp's adjoint derivative
  directly, not through cvxpylayers;
* **finite differences** — central differences (float64) of the folded function itself, i.e.
  of the blackbox forward solve.

Each entry is the worst relative VJP error ``‖a − b‖/‖b‖`` over every parameter and several
random cotangents (``a`` folded, ``b`` the reference).
"""

from __future__ import annotations

import math
import time

from ..config import Config
from ..progress import bar
from ..report import SuiteResult, fmt_err, table

TITLE = "1. Gradient agreement: folded vs cvxpylayers vs diffcp vs finite differences"
INTRO = ("Checks that the folded gradients are correct: on every test problem (QPs, "
         "projections, a portfolio, TV denoising, a nonconvex problem) they are compared with "
         "the gradients of cvxpylayers, diffcp and finite differences.")
REFERENCES = ("cvxpylayers (SCS)", "cvxpylayers (Clarabel)", "diffcp", "finite differences")


def _reference(name: str, case):
    from fold_plugins.adapters.cvxpylayers import cvxpylayers_reference
    from fold_plugins.adapters.diffcp import diffcp_reference

    problem, parameters, variables = case.build_cvxpy()
    if name == "cvxpylayers (SCS)":
        ref = cvxpylayers_reference(problem, parameters, variables, solver="SCS")
    elif name == "cvxpylayers (Clarabel)":
        ref = cvxpylayers_reference(problem, parameters, variables, solver="CLARABEL")
    elif name == "diffcp":
        ref = diffcp_reference(problem, parameters, variables)
    else:
        raise ValueError(name)
    return case.wrap_reference(ref)


def _backward_converged(case) -> bool | None:
    """Whether the case's last folded backward converged on every instance (None: unknown)."""
    info = case.last_info
    if info is None or info.backward_converged is None:
        return None
    return bool(info.backward_converged.all())


def _backward_summary(case) -> str:
    """One folded forward + backward of the case: which backward solver, how many iterations."""
    import torch

    params = [p.detach().clone().requires_grad_(p.is_floating_point()) for p in case.params]
    out = case.folded(*params)
    gen = torch.Generator().manual_seed(0)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    (out * cot).sum().backward()
    info = case.last_info
    if info is None or info.backward_iterations is None:
        return "?"
    return f"{info.backward_solver} ({int(info.backward_iterations.max())} it)"


def _note_convergence(entry: dict, case) -> None:
    """AND the case's last folded backward convergence into ``entry['backward_converged']``."""
    conv = _backward_converged(case)
    if conv is not None:
        entry["backward_converged"] = entry.get("backward_converged", True) and conv


#: references less accurate than the folded gradient itself are judged at the general
#: cross-check bound
LOOSE_TOL = 1e-5
_LOOSE = ("cvxpylayers (Clarabel)", "finite differences")


def _judge_tol(case, ref_name: str) -> float:
    """Tolerance for the ✗ mark: the case's own for SCS/diffcp, the general bound otherwise."""
    return max(case.rtol, LOOSE_TOL) if ref_name in _LOOSE else case.rtol


def run(cfg: Config, cases: list[str] | None = None) -> SuiteResult:
    """One row per case: worst relative VJP error of folded against each reference.

    Args:
        cases: case names to run (default: every case; three small ones with ``--tiny``).
    """
    from fold_plugins.verify import compare_gradients

    from ..cases import CASES

    n_dir = cfg.pick(tiny=1, quick=2, full=4)
    n_dir_fd = cfg.pick(tiny=1, quick=1, full=2)
    if cases is not None:
        names = list(cases)
    else:
        names = list(CASES) if cfg.mode != "tiny" else ["box_qp", "sparsemax", "entropy_lp"]
    res = SuiteResult("gradient_agreement", TITLE)
    rows, data = [], {}
    work = [(c, r) for c in names for r in REFERENCES]
    built: dict = {}
    for cname, ref_name in bar(work, cfg, "gradient agreement"):
        if cname not in built:
            try:
                built[cname] = CASES[cname]()
                data.setdefault(cname, {})["backward"] = _backward_summary(built[cname])
                _note_convergence(data[cname], built[cname])
            except Exception as e:  # noqa: BLE001
                built[cname] = None
                res.errors.append(f"case {cname} could not be built or run: "
                                  f"{type(e).__name__}: {e}")
        case = built[cname]
        entry = data.setdefault(cname, {})
        if case is None:
            continue
        if ref_name != "finite differences" and (case.reference != "cvx"
                                                 or case.build_cvxpy is None):
            entry[ref_name] = {"skipped": "no cvxpy form (nonconvex)"}
            continue
        t0 = time.perf_counter()
        try:
            if ref_name == "finite differences":
                rep = compare_gradients(case.folded, "finite_differences", case.params,
                                        n_directions=n_dir_fd, eps=case.fd_eps,
                                        names=case.param_names, seed=cfg.seed)
            else:
                rep = compare_gradients(case.folded, _reference(ref_name, case), case.params,
                                        n_directions=n_dir, names=case.param_names,
                                        seed=cfg.seed, name=ref_name)
            _note_convergence(entry, case)
            wi = rep.worst_input
            entry[ref_name] = {"worst": rep.worst, "worst_input": wi.name if wi else None,
                               "min_cosine": rep.min_cosine, "value_error": rep.value_error,
                               "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001 - a reference failing must not stop the suite
            entry[ref_name] = {"failed": f"{type(e).__name__}: {e}"}
            res.errors.append(f"{cname} vs {ref_name}: {type(e).__name__}: {e}")
    for cname in names:
        case = built.get(cname)
        entry = data.get(cname, {})
        if case is None:
            rows.append((cname, "could not be built", "", "", "") + ("",) * len(REFERENCES))
            continue
        cells = []
        for r in REFERENCES:
            e = entry.get(r, {})
            if "worst" in e:
                ok = "" if e["worst"] <= _judge_tol(case, r) else " ✗"
                cells.append(f"{fmt_err(e['worst'])}{ok}")
            elif "skipped" in e:
                cells.append("n/a")
            elif "failed" in e:
                cells.append("failed")
            else:
                cells.append("—")
        shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(case.param_names,
                                                                     case.params))
        flag = " ✗" if entry.get("backward_converged") is False else ""
        rows.append((case.title, case.forward,
                     f"{case.step} → {entry.get('backward', '?')}{flag}",
                     shapes, f"{case.rtol:.0e}", *cells))
    res.data = {"cases": data, "n_directions": n_dir, "n_directions_fd": n_dir_fd}
    clarabel_vals = [d["cvxpylayers (Clarabel)"]["value_error"] for d in data.values()
                     if d.get("cvxpylayers (Clarabel)", {}).get("value_error") is not None]
    clarabel_note = (f"its solutions differ from the folded ones by up to "
                     f"{max(clarabel_vals):.1e} in this run" if clarabel_vals else
                     "a conic interior-point forward")
    md = [__doc__.split("\n\n", 1)[1].strip(), "",
          f"{n_dir} random cotangent(s) per cvx reference, {n_dir_fd} for finite differences; "
          "✗ in a reference column marks an error above the tolerance the test suite holds "
          "that reference to: the case's own cross-check tolerance (column *tol*) for "
          f"cvxpylayers (SCS) and diffcp, and max(tol, {LOOSE_TOL:.0e}) — the general "
          f"cross-check bound — for Clarabel ({clarabel_note}) and for finite differences "
          "(truncation and round-off). Compare the columns to see which side is off. ✗ after "
          "the backward marks a folded backward solve that did not reach its tolerance on "
          "every instance (`FoldInfo.backward_converged`).", "",
          table(["case", "forward", "folded step → backward", "parameters (shape)", "tol",
                 *REFERENCES], rows)]
    vals = [(e.get("value_error"), c, r) for c, d in data.items() for r, e in d.items()
            if isinstance(e, dict) and e.get("value_error") is not None]
    if vals:
        worst = max(vals, key=lambda v: v[0])
        md.append(f"The solutions themselves agree with every cvx reference to within "
                  f"{worst[0]:.1e} (relative; worst: {worst[1]} vs {worst[2]}).")
    res.markdown = "\n".join(md)
    for r in ("cvxpylayers (SCS)", "diffcp", "finite differences"):
        errs = [d[r]["worst"] for d in data.values() if "worst" in d.get(r, {})]
        if errs:
            res.headline.append(f"folded vs {r}: worst relative VJP error "
                                f"{max(errs):.1e} over {len(errs)} case(s)")
    res.data["summary"] = {r: max((d[r]["worst"] for d in data.values()
                                   if "worst" in d.get(r, {})), default=math.nan)
                           for r in REFERENCES}
    return res
