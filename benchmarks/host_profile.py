"""Where the host's time goes while it issues one fused MoE layer step (forward + backward):
Python's cProfile over steps issued without waiting for the GPU, the top functions by own time and
by cumulative time, beside the median time to issue one step. Tells Python, Triton's launcher and
the autograd engine apart when a step's GPU idles waiting for launches (benchmarks.layer's
`host_ms` and `largest_gaps`).

  python -m benchmarks.host_profile --configs fine_grained --out benchmarks/results   # GPU
  python -m benchmarks.host_profile --smoke --out DIR                                 # CPU (CI)

Writes host_profile_<device>.json (the figures) and host_profile_<device>.txt (the tables).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from benchmarks.common import save_results
from benchmarks.layer import CONFIGS, SMOKE_CONFIGS, build_layer, moe_dist_step


def profile_config(T, H, Fh, E, K, device, dtype, steps: int, rows: int) -> tuple[dict, str]:
    layer, x, grad = build_layer(T, H, Fh, E, K, device, dtype)
    keep = layer.transport.fused_save_rows, layer.transport.fused_save_act  # the defaults
    step = moe_dist_step(layer, x, grad, True, *keep)

    def fn():
        step.clear()
        step.forward().backward(grad)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):  # compiles, autotunes
        fn()
    issue = []
    for _ in range(20):  # the GPU idle before each: the host's own time to issue one step
        sync()
        t0 = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - t0) * 1e3)
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    sync()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumtime").print_stats(rows)
    issue.sort()
    figures = {
        "config": dict(tokens=T, hidden=H, ffn=Fh, experts=E, top_k=K, dtype=str(dtype)),
        "host_issue_ms_median": issue[len(issue) // 2],
        "profiled_steps": steps,
        "profiled_ms_per_step": stats.total_tt * 1e3 / steps,
    }
    return figures, text.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, CPU (CI)")
    p.add_argument(
        "--configs", default="fine_grained", help="comma-separated benchmarks.layer names"
    )
    p.add_argument("--steps", type=int, default=50, help="profiled steps per config")
    p.add_argument("--rows", type=int, default=30, help="functions listed per table")
    p.add_argument("--out", default=None, help="directory for the JSON and the tables")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = SMOKE_CONFIGS if args.smoke else CONFIGS
    names = list(table)[:1] if args.smoke else args.configs.split(",")
    steps = 3 if args.smoke else args.steps
    results, tables = {}, []
    for name in names:
        results[name], text = profile_config(*table[name], device, dtype, steps, args.rows)
        median = results[name]["host_issue_ms_median"]
        tables.append(f"== {name}: host issue ms median {median:.3f}\n{text}")
        print(tables[-1].splitlines()[0], flush=True)
    if args.smoke or device.type == "cpu":
        tag = "smoke" if args.smoke else "cpu"
    else:
        tag = "h200" if "H200" in torch.cuda.get_device_name() else "gpu"
    save_results(f"host_profile_{tag}", {"results": results}, args.out)
    if args.out:
        Path(args.out, f"host_profile_{tag}.txt").write_text("\n".join(tables))
    return results


if __name__ == "__main__":
    main()
