"""Measurement helpers: median timings with warm-up, peak memory, machine/version facts.

Timing: every figure is the median of ``repeats`` calls after ``warmup`` untimed calls,
measured with ``time.perf_counter`` (``torch.cuda.synchronize`` before each reading on GPU).

Memory (two extra, untimed calls per measurement; :func:`measure_memory`):

* ``torch_peak``: peak bytes of torch tensor storage live during the call, above the level
  at entry. On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
  On CPU, the allocation events of ``torch.profiler`` (``profile_memory=True``): every
  allocation and free of the c10 CPU allocator in order; the peak of their running sum.
* ``saved``: bytes of the distinct storages autograd saved for backward
  (``torch.autograd.graph.saved_tensors_hooks``) — the graph memory unrolling pays per step.
* ``host_peak``: ``tracemalloc`` peak — Python objects and NumPy arrays (NumPy reports its
  buffers to tracemalloc), which is where cvxpylayers/diffcp keep their data.
* ``rss_peak_delta``: the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus its resident set at entry: everything, including C/C++
  allocations of SCS/diffcp, but coarse (allocator caches make it a lower bound).

``tracked = torch_peak + host_peak``; the plots show ``peak = max(tracked, rss_peak_delta)``
(:attr:`MemoryStats.peak`): tracked misses C/C++ allocations (SCS, diffcp), RSS Δ misses memory
the allocator reuses, so the larger of the two is the better lower bound of each method's peak.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Stopwatch", "Timing", "time_phases", "MemoryStats", "measure_memory",
           "environment", "MEMORY_METHOD", "TIMING_METHOD", "sync"]

MEMORY_METHOD = (
    "Peak memory is measured in two extra untimed calls (the profiler's own bookkeeping would "
    "otherwise show up in tracemalloc). *torch peak*: on CPU the running sum "
    "of the c10 CPU allocator's allocation/free events recorded by `torch.profiler` "
    "(`profile_memory=True`), its maximum above the level at entry; on CUDA "
    "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. *host peak*: "
    "`tracemalloc` peak (Python objects and NumPy buffers — where cvxpylayers/diffcp keep "
    "their data). *saved*: bytes of the distinct storages autograd saved for backward "
    "(`saved_tensors_hooks`). *RSS Δ*: peak resident set (`VmHWM`, reset via "
    "`/proc/self/clear_refs`) minus the resident set at entry — includes C/C++ allocations "
    "(SCS, diffcp) but is coarse: memory the allocator already holds is reused unseen. "
    "*tracked* = torch peak + host peak misses C/C++ allocations, RSS Δ misses reused memory: "
    "plots show *peak* = max(tracked, RSS Δ) per method and point.")

TIMING_METHOD = (
    "Every time is the median over the stated number of repeats after warm-up call(s), "
    "`time.perf_counter` (with `torch.cuda.synchronize` on GPU); ratios divide by a baseline "
    "measured in the same run on the same problem instance.")


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Lap timer: ``start()``, then ``lap(name)`` records the seconds since the last mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def start(self) -> None:
        sync(self.device)
        self.laps = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        sync(self.device)
        t = time.perf_counter()
        dt = t - self._t
        self.laps[name] = self.laps.get(name, 0.0) + dt
        self._t = t
        return dt


@dataclass
class Timing:
    """Per-phase seconds of each timed repeat; ``median(phase)``, ``'total'`` = sum of phases."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    def median(self, phase: str = "total") -> float:
        if phase == "total":
            n = len(next(iter(self.samples.values()))) if self.samples else 0
            tot = [sum(v[i] for v in self.samples.values()) for i in range(n)]
            return statistics.median(tot) if tot else float("nan")
        vals = self.samples.get(phase)
        return statistics.median(vals) if vals else float("nan")

    @property
    def repeats(self) -> int:
        return len(next(iter(self.samples.values()))) if self.samples else 0


def time_phases(run_once: Callable[[Stopwatch], Any], device: torch.device, repeats: int,
                warmup: int = 1, budget_s: float | None = None) -> Timing:
    """Time ``run_once(sw)`` (which calls ``sw.start()`` and ``sw.lap(phase)``) repeatedly.

    Args:
        run_once: one measured call; untimed setup may precede ``sw.start()``.
        repeats: timed calls; the median per phase is reported.
        warmup: untimed calls first (at least one is made when ``budget_s`` is set).
        budget_s: when the first call alone exceeds it, only one timed call is made (noted).

    Returns:
        :class:`Timing` with one sample per timed call and phase.
    """
    sw = Stopwatch(device)
    timing = Timing()
    first = None
    for _ in range(max(warmup, 1 if budget_s is not None else 0)):
        t0 = time.perf_counter()
        run_once(sw)
        first = time.perf_counter() - t0 if first is None else first
    n = repeats
    if budget_s is not None and first is not None and first > budget_s:
        n = 1
        timing.note = f"one timed call (warm-up took {first:.1f} s > budget {budget_s:.0f} s)"
    for _ in range(n):
        run_once(sw)
        for k, v in sw.laps.items():
            timing.samples.setdefault(k, []).append(v)
    return timing


def vjp_time(step: Callable, x: Any, *params: Any, device: torch.device, rounds: int = 5,
             per_round: int = 10) -> float:
    """Seconds of one application of the folded backward's operator ``v ↦ v − Φᵀv`` of
    ``step`` at ``x``, through the same entry point the backward solvers call (one VJP and one
    subtraction): the unit of the "VJP floor" ``#VJPs × vjp_time`` that a Krylov backward
    cannot go below.

    Measured as a backward runs them, back to back: the median over ``rounds`` of the mean
    time of ``per_round`` consecutive applications (a median of isolated calls would miss the
    preemption a long backward suffers on a loaded machine, and flatter the floor)."""
    from fold_plugins.internal import AdjointOperator, linearize

    lin = linearize(step, x, *params)
    op = AdjointOperator(lin)
    v = torch.ones(lin.spec.B, lin.spec.n, dtype=lin.x_parts[0].dtype, device=device)
    op(v)
    times = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(per_round):
            op(v)
        sync(device)
        times.append((time.perf_counter() - t0) / per_round)
    return statistics.median(times)


@dataclass
class MemoryStats:
    """Peak-memory figures of one call, in bytes (``None`` where the method is unavailable)."""

    torch_peak: int | None
    saved: int
    host_peak: int | None
    rss_peak_delta: int | None

    @property
    def tracked(self) -> int | None:
        if self.torch_peak is None and self.host_peak is None:
            return None
        return (self.torch_peak or 0) + (self.host_peak or 0)

    @property
    def peak(self) -> int | None:
        """``max(tracked, rss_peak_delta)``: what the plots show (module docstring)."""
        vals = [v for v in (self.tracked, self.rss_peak_delta) if v is not None]
        return max(vals) if vals else None


def _read_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_alloc_peak(prof: Any) -> int | None:
    """Peak of the running sum of CPU allocation events in a finished profiler (None if the
    profiler's event tree is unavailable in this torch)."""
    try:
        from torch._C._profiler import _EventType

        tree = prof.profiler.kineto_results.experimental_event_tree()
    except Exception:  # noqa: BLE001 - private API: degrade to "not measured"
        return None
    events: list[tuple[int, int]] = []
    stack = list(tree)
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if str(getattr(f, "device", "cpu")).startswith("cpu"):
                events.append((e.start_time_ns, int(f.alloc_size)))
        stack.extend(e.children)
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto prints a line on every profiler start/stop)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


_PROFILER_WARM = False


def _warm_profiler() -> None:
    """One empty profiled region: kineto's one-time start-up (seconds, and its own
    allocations) must not land in the first measurement."""
    global _PROFILER_WARM
    if _PROFILER_WARM:
        return
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.zeros(1)
    _PROFILER_WARM = True


def measure_memory(fn: Callable[[], Any], device: torch.device) -> MemoryStats:
    """Run ``fn()`` twice and return its peak memory (see the module docstring for methods).

    The first run measures torch memory (profiler on CPU, allocator statistics on CUDA) and
    the saved-for-backward bytes; the second measures host memory (tracemalloc) and the RSS
    high-water mark. They are separate because the profiler's own bookkeeping is Python
    memory that tracemalloc would count.
    """
    saved_ptrs: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            saved_ptrs[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            saved_ptrs[id(t)] = t.numel() * t.element_size()
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    # run 1: torch tensors and saved bytes
    gc.collect()
    torch_peak: int | None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            fn()
        torch.cuda.synchronize(device)
        torch_peak = torch.cuda.max_memory_allocated(device) - base
    else:
        from torch.profiler import ProfilerActivity, profile

        _warm_profiler()
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():
            prof.start()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                fn()
        finally:
            with _quiet_stderr():
                prof.stop()
        torch_peak = _cpu_alloc_peak(prof)
        del prof

    # run 2: host (Python/NumPy) memory and the process's resident-set high-water mark
    gc.collect()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    host0 = tracemalloc.get_traced_memory()[0]
    rss0 = _read_status("VmRSS")
    hwm_ok = _reset_hwm()
    fn()
    host_peak = tracemalloc.get_traced_memory()[1] - host0
    hwm = _read_status("VmHWM") if hwm_ok else None
    if not tracing:
        tracemalloc.stop()
    rss_delta = max(0, hwm - rss0) if (hwm is not None and rss0 is not None) else None
    return MemoryStats(torch_peak, sum(saved_ptrs.values()), max(0, host_peak), rss_delta)


# ----------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return "unknown"
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """Machine, library versions and load, for the report header."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    env = {
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "memory": _mem_total(),
        "OS": platform.platform(),
        "python": platform.python_version(),
    }
    env["GPU"] = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                  "none used" + ("" if torch.cuda.is_available() else
                                 " (torch.cuda.is_available() is False)"))
    for dist in ("torch", "theseus-ai", "cvxpy", "cvxpylayers", "diffcp", "scs", "clarabel",
                 "numpy", "scipy", "fold-plugins"):
        env[dist] = _version(dist)
    env["fold-plugins commit"] = _git_commit(Path(__file__).resolve().parent.parent)
    try:
        env["load average at start (1/5/15 min)"] = " / ".join(f"{x:.2f}"
                                                              for x in os.getloadavg())
    except OSError:
        pass
    return env
