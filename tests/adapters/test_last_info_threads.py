"""``last_info`` describes the calling thread's call, also while other threads call the same
module (every adapter reads it through ``FoldedModule``), and it survives copy and pickle."""

from __future__ import annotations

import copy
import pickle
import threading

import torch

from fold_plugins.adapters import FoldedLoop

DT = torch.float64


def _affine(x, c):
    """x = 0.5 x + c: x* = 2c."""
    return 0.5 * x + c


def test_each_thread_reads_its_own_calls_info():
    loop = FoldedLoop(_affine, x0=lambda c: torch.zeros_like(c), tol=1e-12, maxiter=200)
    sizes = [1, 2, 3, 4]
    barrier = threading.Barrier(len(sizes))
    seen: dict[int, tuple[int, float]] = {}

    def work(B: int) -> None:
        c = torch.full((B, 3), float(B), dtype=DT)
        x = loop(c)
        barrier.wait()  # every thread has called before any reads: the reads interleave
        info = loop.last_info
        seen[B] = (info.batch_size, float((x - 2 * c).abs().max()))

    threads = [threading.Thread(target=work, args=(B,)) for B in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {B: s[0] for B, s in seen.items()} == {B: B for B in sizes}
    assert max(s[1] for s in seen.values()) < 1e-10
    assert loop.last_info is None  # the main thread made no call


def test_last_info_survives_deepcopy_and_pickle():
    loop = FoldedLoop(_affine, x0=torch.zeros_like, tol=1e-12, maxiter=200)
    loop(torch.ones(2, 3, dtype=DT))
    for twin in (copy.deepcopy(loop), pickle.loads(pickle.dumps(loop))):
        assert twin.last_info is not None and twin.last_info.batch_size == 2
        x = twin(torch.ones(5, 3, dtype=DT))
        assert twin.last_info.batch_size == 5 and loop.last_info.batch_size == 2
        assert torch.allclose(x, torch.full((5, 3), 2.0, dtype=DT), atol=1e-10)
