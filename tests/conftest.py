"""Shared test settings and helpers."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """One torch thread (small ops: OpenMP threads only slow them down on a shared 2-core
    machine) and a fixed global seed, so no test depends on the order tests run in."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def _count_graph_nodes(t: torch.Tensor) -> int:
    """Autograd nodes reachable from ``t.grad_fn`` through ``next_functions``."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return len(seen)


@pytest.fixture
def graph_nodes():
    """``graph_nodes(t)``: how many autograd nodes the output ``t`` keeps alive."""
    return _count_graph_nodes
