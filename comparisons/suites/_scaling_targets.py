"""The scaling suite's VJP-floor table and the status of its speed targets (GMRES backward
against ``#VJPs × one VJP``, ``auto`` against the better of dense and GMRES)."""

from __future__ import annotations

from collections.abc import Callable

from ..report import fmt_ms, table

#: (auto is left out: its timed calls may mix dense and gmres while it measures both)
FLOOR_METHODS = ("folded gmres", "folded fixed_point")
#: speed targets quoted with their status: GMRES backward ÷ VJP floor at n ≥ 100, and
#: auto ÷ the better of dense and gmres over the grid
FLOOR_TARGET, AUTO_TARGET = 1.5, 1.2


def floor_markdown(results: dict, vjp_s: dict, points: list[tuple[int, int]], data: dict,
                   cell_missing: Callable) -> str:
    """The VJP-floor table and the status of the floor and auto targets (``results``: the
    scaling suite's points per (n, B) and method; ``vjp_s``: one VJP's seconds per (n, B))."""
    rows, gm_ratios, auto_ratios = [], [], []
    for n, b in points:
        row, t1 = results[(n, b)], vjp_s.get((n, b))
        cells: list = [n, b, f"{t1 * 1e6:.0f}" if t1 else "—"]
        for name in FLOOR_METHODS:
            p = row.get(name)
            if p is None or p.timing is None or p.matvecs is None or not t1:
                cells.append(cell_missing(p) or "—")
                continue
            bw = p.timing.median("backward")
            if "dense" in p.solver_ran:
                cells.append(f"{fmt_ms(bw)} (dense: one batched VJP)")
                continue
            ratio = bw / (p.matvecs * t1)
            cells.append(f"{fmt_ms(bw)} / {p.matvecs} / {fmt_ms(p.matvecs * t1)} / "
                         f"{ratio:.2f}×")
            if name == "folded gmres" and n >= 100:
                gm_ratios.append(((n, b), ratio))
        best = [row.get(k) for k in ("folded gmres", "folded dense")]
        au = row.get("folded auto")
        if au and au.timing and all(q and q.timing for q in best):
            r = au.timing.median("backward") / min(q.timing.median("backward") for q in best)
            first = au.solver_ran.removeprefix("auto (").removesuffix(")")
            auto_ratios.append(((n, b), r, first))
            cells.append(f"{r:.2f}× (first call: {first})")
        else:
            cells.append("—")
        rows.append(cells)
    md = ["", "**VJP floor** (backward ms / #VJPs / floor = #VJPs × one VJP, ms / backward ÷ "
          "floor):", "",
          table(["n", "B", "one VJP µs"] + list(FLOOR_METHODS)
                + ["auto ÷ min(dense, gmres) backward"], rows)]
    status = []
    if gm_ratios:
        (wn, wb), worst = max(gm_ratios, key=lambda t: t[1])
        met = worst <= FLOOR_TARGET
        status.append(f"- GMRES backward ≤ {FLOOR_TARGET}× the VJP floor at n ≥ 100: "
                      f"{'met' if met else 'not met'} (worst {worst:.2f}× at n={wn}, B={wb})")
        data["target_gmres_floor"] = {"worst": worst, "met": met}
    if auto_ratios:
        (wn, wb), worst, ran = max(auto_ratios, key=lambda t: t[1])
        met = worst <= AUTO_TARGET
        status.append(f"- auto backward ≤ {AUTO_TARGET}× the better of dense and gmres over "
                      f"the grid: {'met' if met else 'not met'} (worst {worst:.2f}× at n={wn}, "
                      f"B={wb}; its first call there ran {ran})")
        data["target_auto"] = {"worst": worst, "met": met}
    if status:
        md += ["", "Targets (this run):"] + status
    return "\n".join(md)
