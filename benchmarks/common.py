"""Shared benchmark plumbing: timing with CUDA events (median after warm-up), peak memory, and
result files that say where and when they were measured."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_ms(fn, warmup: int = 3, iters: int = 10, calls: int = 1) -> dict:
    """Median / min / max milliseconds per fn() call. CUDA: events around `calls` calls issued
    back to back (no wait between them: with calls > 1 the host's launch overhead overlaps
    queued GPU work, as in a training loop), after warm-up; CPU: wall clock."""
    for _ in range(warmup):
        fn()
    samples = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / calls)
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "iters": iters,
    }


def host_ms(fn, iters: int = 10) -> float | None:
    """Median milliseconds the host spends issuing fn() (from the call to its return, the GPU
    idle at the start; None on CPU). Near the step's GPU time, the step is host-bound: the GPU
    waits for launches (Python, Triton's launcher, autograd), or a host sync hides inside."""
    if not torch.cuda.is_available():
        return None
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def peak_memory_mb(fn) -> float | None:
    """Peak device memory fn() allocates above what was already allocated (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    env["device"] = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({os.cpu_count()} cores)"
    )
    for mod in ("triton", "deepspeed", "nvshmem"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "present")
        except Exception:  # noqa: BLE001 - absence is the information
            env[mod] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
    return env


def kernel_bench_cli(doc: str, argv, iters: int, warmup: int, reps: int):
    """The command line of a kernel benchmark: --smoke (tiny shapes in Triton's interpreter on
    CPU), --shapes, --iters, --out. Call it before importing any Triton kernel (the interpreter is
    chosen when a kernel is defined). Returns (args, cuda, device, dtype, timed): timed(fn) is
    time_ms over args.reps back-to-back calls per sample (`reps` on a GPU, one call on CPU)."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's interpreter")
    p.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    cuda = torch.cuda.is_available() and not args.smoke
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n, w, args.reps = (args.iters, warmup, reps) if cuda else (1, 0, 1)
    return args, cuda, dev, dt, lambda fn: time_ms(fn, warmup=w, iters=n, calls=args.reps)


def save_results(name: str, payload: dict, out_dir: str | os.PathLike | None) -> Path | None:
    """Writes {environment, **payload} as JSON to out_dir/name.json (nothing when out_dir is
    None)."""
    if out_dir is None:
        return None
    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


def init_single_process_group() -> None:
    """DeepSpeed's MoE layer insists on torch.distributed; give it a world of one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from moe_dist.parallel import init_distributed

    init_distributed()
