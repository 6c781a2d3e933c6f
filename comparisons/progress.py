"""tqdm progress bars that honour ``cfg.progress`` (stderr; nested bars do not linger)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from .config import Config

T = TypeVar("T")

__all__ = ["bar"]


def bar(it: Iterable[T], cfg: Config, desc: str, total: int | None = None,
        leave: bool = False, **kw: Any) -> Iterable[T]:
    """Wrap ``it`` in a tqdm bar when progress is on (else return ``it``)."""
    if not cfg.progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=leave, dynamic_ncols=True, **kw)
