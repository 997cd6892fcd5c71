"""Where the nvshmem transport's time goes, one PE: torch.profiler over dispatch+combine at one
shape, kernels by GPU time and the host time per call (launch-bound or bandwidth-bound?).

    python -m benchmarks.nvshmem_profile --tokens 4096 --hidden 7168 --top-k 8  # GPU + nvshmem4py
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.transport import random_plan


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument(
        "--grad", action="store_true", help="profile with autograd recording (training path)"
    )
    args = p.parse_args(argv)
    from moe_dist.parallel import init_distributed
    from moe_dist.transport.nvshmem.transport import NvshmemTransport

    init_distributed()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    T, H, K, E = args.tokens, args.hidden, args.top_k, args.experts
    from moe_dist.transport import NvshmemOptions

    nv = NvshmemOptions.from_env(os.environ, max_tokens_per_rank=T)
    tr = NvshmemTransport(E, K, None, dev, nv)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    plan = random_plan(T, E, K, dev, torch.Generator().manual_seed(0))

    def step():
        with torch.set_grad_enabled(args.grad):
            tok, _, h = tr.dispatch(x, plan)
            return tr.combine(tok, h)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        step()
    host_ms = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / n * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    )
    events = [
        e
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)
    ]
    kernels = (
        sum(e.count for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0) / 5
    )
    gpu_ms = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 5 / 1e3
    moved = 4 * T * K * H * 2
    print(
        f"T={T} H={H} K={K} E={E} grad={args.grad}: host issue {host_ms:.3f} ms/call, wall"
        f" {wall_ms:.3f} ms/call, GPU busy {gpu_ms:.3f} ms/call over ~{kernels:.0f} kernels;"
        f" {moved / wall_ms / 1e6:.0f} GB/s by the 4*S*H convention ({len(events)} event kinds)"
    )


if __name__ == "__main__":
    main()
