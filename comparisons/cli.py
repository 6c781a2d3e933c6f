"""``python -m comparisons``: run the suites, write ``<out>/report.md`` (+ PNGs, results.json).

    python -m comparisons                 # --quick (default): ≈ 6 min on 2 cores
    python -m comparisons --full          # the full sizes (a quiet machine)
    python -m comparisons --suite scaling --suite theseus --out /tmp/rep

A suite that fails (missing dependency, exception) records its error in its section; the
others still run, the report is written, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .config import Config
from .measure import environment
from .report import SuiteResult, intro_for, write_report
from .suites import SUITES

__all__ = ["main", "run_suite", "parse_args"]


def _int_at_least(minimum: int, what: str):
    """An argparse ``type``: an integer ``>= minimum``, else a message naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{what} must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = what  # argparse names the type in its "invalid ... value" fallback
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m comparisons",
                                description="Folded backward passes side by side with "
                                "unrolling, Theseus, cvxpylayers and diffcp.")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes, ≈ 6 minutes on a quiet 2-core machine (default)")
    size.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the full sizes (n up to 1000, batch up to 128); run on a quiet "
                           "machine: on 2 cores each learning suite takes 7–15 min and scaling "
                           "alone well over 30 min (cvxpylayers at n = 1000)")
    size.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="smallest sizes (seconds): for tests and development only")
    size.add_argument("--paper-scale", dest="mode", action="store_const", const="paper",
                      help="the paper's sizes for the learning suites (portfolio, tv_denoising, "
                           "nonconvex, acopf, multilabel: hours to a day on 2 cores; the "
                           "expected time is printed first); the other suites run at --full "
                           "sizes")
    p.set_defaults(mode="quick")
    p.add_argument("--suite", action="append", choices=SUITES, metavar="NAME",
                   help=f"run only this suite (repeatable); one of {', '.join(SUITES)}")
    p.add_argument("--out", type=Path, default=Path("comparisons") / "out",
                   help="output folder (default comparisons/out)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available, else cpu")
    p.add_argument("--repeats", type=_int_at_least(1, "--repeats"), default=None,
                   help="timed repeats per measurement, >= 1 (default: 2 tiny, 5 quick, 9 "
                        "full)")
    p.add_argument("--seed", type=_int_at_least(0, "--seed"), default=0,
                   help="base seed, >= 0 (default 0)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    return p.parse_args(argv)


def run_suite(name: str, cfg: Config) -> SuiteResult:
    """Import and run one suite; any exception becomes the result's error (never raised)."""
    t0 = time.perf_counter()
    title, mod = name, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # numpy-2 notice from cvxpylayers' diffcp glue; says nothing about the measurements
        warnings.filterwarnings("ignore", message=r"__array__ implementation",
                                category=DeprecationWarning)
        try:
            mod = importlib.import_module(f"comparisons.suites.{name}")
            title = getattr(mod, "TITLE", name)
            result = mod.run(cfg)
        except Exception:  # noqa: BLE001 - a failing suite must not stop the report
            result = SuiteResult(name, title, errors=[traceback.format_exc()])
    seen: dict[str, None] = {}
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if "skparse.cholmod" in msg:  # theseus import notice, unrelated to any measurement
            continue
        seen.setdefault(msg, None)
    result.warnings = list(seen) + [w for w in result.warnings if w not in seen]
    result.seconds = time.perf_counter() - t0
    result.intro = result.intro or intro_for(name, mod)
    return result


#: native libraries whose thread pools the run limits: imported before the limit is applied
#: (threadpoolctl only sees libraries already loaded)
_NATIVE_MODULES = ("numpy", "scipy.linalg", "scipy.sparse.linalg", "scs", "clarabel", "osqp",
                   "ecos", "diffcp", "cvxpy", "cvxpylayers.torch")
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded() -> Iterator[Callable[[], str | None]]:
    """Limit every BLAS/OpenMP pool to one thread for the block (``threadpoolctl``); the
    environment variables cover libraries loaded later. Yields a function that reads the pools
    back (``None`` when threadpoolctl is missing); everything is restored on exit."""
    for mod in _NATIVE_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(Exception):  # optional dependency: nothing to limit
                importlib.import_module(mod)
    saved_env = {k: os.environ.get(k) for k in _THREAD_ENV}
    for k in _THREAD_ENV:
        os.environ[k] = "1"
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        threadpool_info = threadpool_limits = None

    def read_back() -> str | None:
        if threadpool_info is None:
            return None
        pools = [f"{p.get('internal_api', '?')} {Path(p.get('filepath', '?')).name}: "
                 f"{p.get('num_threads')}" for p in threadpool_info()]
        if not pools:
            return "no BLAS/OpenMP pool loaded"
        counts = {p.get("num_threads") for p in threadpool_info()}
        verdict = "all 1 thread" if counts == {1} else "NOT all limited to 1 thread"
        return f"{verdict} ({'; '.join(pools)})"

    limiter = threadpool_limits(limits=1) if threadpool_limits is not None else None
    try:
        yield read_back
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with _single_threaded() as read_back:
        return _main(args, argv, read_back)


def _main(args: argparse.Namespace, argv: list[str],
          read_back: Callable[[], str | None]) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available to torch", file=sys.stderr)
            return 2
        device = torch.device(args.device)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_all(args, argv, device, read_back)
    finally:
        torch.set_num_threads(torch_threads)


def _run_all(args: argparse.Namespace, argv: list[str], device: torch.device,
             read_back: Callable[[], str | None]) -> int:
    cfg = Config(mode=args.mode, out=args.out, device=device, repeats=args.repeats,
                 seed=args.seed, progress=args.progress, threads=torch.get_num_threads())
    names = list(dict.fromkeys(args.suite)) if args.suite else list(SUITES)
    cfg.extra["suites"] = ", ".join(names)
    if cfg.mode == "paper":  # say how long before starting (suites' PAPER_EXPECTED)
        for name in names:
            try:
                expected = importlib.import_module(f"comparisons.suites.{name}").PAPER_EXPECTED
            except Exception:  # noqa: BLE001 - no estimate; an import error is reported later
                expected = "as --full"
            print(f"[comparisons] --paper-scale {name}: expected {expected}", file=sys.stderr)
    started = dt.datetime.now().astimezone()
    env = environment(device)
    t0 = time.perf_counter()
    results = []
    if cfg.progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="suites", dynamic_ncols=True)
    else:
        it = names
    for name in it:
        if cfg.progress:
            it.set_postfix_str(name)
        r = run_suite(name, cfg)
        status = "ok" if r.ok else "FAILED"
        msg = f"[comparisons] {name}: {status} in {r.seconds:.0f} s"
        if cfg.progress:
            it.write(msg)
        else:
            print(msg, file=sys.stderr)
        results.append(r)
    pools = read_back()
    if pools is not None:
        cfg.extra["native thread pools (threadpoolctl, read back after the run)"] = pools
    path = write_report(cfg, env, results, started, time.perf_counter() - t0, argv)
    print(path.resolve())
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"[comparisons] suite(s) failed: {', '.join(failed)} (see the report)",
              file=sys.stderr)
        return 1
    return 0
