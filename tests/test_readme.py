"""The README's Python examples run as written (each asserts its own numbers)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs(i):
    code = BLOCKS[i]
    assert "assert" in code, "every README example checks its own result"
    exec(compile(code, f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})
