"""Run settings shared by every suite: mode (sizes), device, dtype, repeats, output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["Config", "MODES"]

T = TypeVar("T")

# ``tiny`` is for the test-suite and development (seconds); ``quick`` is the default report
# (≈ 6 minutes on 2 cores); ``full`` the suites' full sizes (a quiet machine).
MODES = ("tiny", "quick", "full", "paper")  # paper: the paper's sizes (learning suites; hours)


@dataclass
class Config:
    """Settings of one ``python -m comparisons`` run.

    Attributes:
        mode: ``"tiny"``, ``"quick"`` or ``"full"``; suites choose sizes with :meth:`pick`.
        out: folder the report, figures and ``results.json`` are written to.
        device: where tensors live (``cuda`` when available unless ``--device cpu``).
        dtype: floating dtype of every problem (float64: gradients are compared to 1e-8).
        repeats: timed repetitions per measurement (the median is reported).
        warmup: untimed calls before the timed ones.
        seed: base seed; every suite seeds its own generators from it.
        progress: show tqdm progress bars (stderr).
        threads: ``torch.set_num_threads`` value applied for the whole run.
    """

    mode: str = "quick"
    out: Path = field(default_factory=lambda: Path("comparisons") / "out")
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64
    repeats: int | None = None
    warmup: int = 1
    seed: int = 0
    progress: bool = True
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        self.out = Path(self.out)
        self.device = torch.device(self.device)
        if self.repeats is None:
            self.repeats = self.pick(tiny=2, quick=5, full=9)
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}.")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}.")

    def pick(self, tiny: T, quick: T, full: T, paper: T | None = None) -> T:
        """The value for this run's mode (``paper`` falls back to ``full`` when not given)."""
        return {"tiny": tiny, "quick": quick, "full": full,
                "paper": full if paper is None else paper}[self.mode]

    def tensor(self, data: Any) -> torch.Tensor:
        """``torch.as_tensor`` on this run's device and dtype."""
        return torch.as_tensor(data, dtype=self.dtype, device=self.device)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded ``seed + offset`` (draw on CPU, then move: same numbers on
        every device)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def randn(self, *shape: int, gen: torch.Generator) -> torch.Tensor:
        """Standard normal draws from ``gen`` (on CPU) moved to this run's device/dtype."""
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(self.device,
                                                                            self.dtype)

    def settings(self) -> dict[str, Any]:
        """What the report header prints about this run."""
        return {"mode": self.mode, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "repeats (median of)":
                self.repeats, "warm-up calls": self.warmup, "seed": self.seed,
                "torch threads": self.threads, **self.extra}
