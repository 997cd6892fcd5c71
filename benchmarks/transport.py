"""Dispatch and combine latency and bandwidth: nvshmem against collective (all_to_all_single) in one
run.

    python benchmarks/transport.py --out benchmarks/results                     # one GPU, one PE
    torchrun --nproc-per-node 2 benchmarks/transport.py --backend gloo ...      # PEs sharing one
    GPU (correctness-grade timings) python benchmarks/transport.py --smoke
    # CPU: collective only (CI)

With several PEs, `nvshmem_put` is the nvshmem transport with every peer on the put-with-signal path
(NvshmemOptions(peer_path="put")), the path taken for peers without a P2P route.

Bandwidth counts the rows each phase reads and writes: dispatch reads S = T*top_k token rows and
writes S rows, combine reads S expert rows and writes them back to their owners, so
bytes = 4 * S * hidden * itemsize, the same read+write convention as the device copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import save_results, time_ms  # noqa: E402
from moe_dist import ParallelGroups  # noqa: E402
from moe_dist.routing import RoutingPlan  # noqa: E402
from moe_dist.transport import CollectiveTransport, nvshmem_unavailable_reason  # noqa: E402


def copy_bandwidth_gbs(device) -> float:
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    t = time_ms(lambda: b.copy_(a), warmup=3, iters=20)["median_ms"]
    return 2 * a.numel() * a.element_size() / t / 1e6


def random_plan(T, E, K, device, gen) -> RoutingPlan:
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(device)
    w = torch.rand(T, K, generator=gen).to(device)
    counts = torch.zeros(E, dtype=torch.int64, device=device).scatter_add_(
        0, idx.reshape(-1), torch.ones_like(idx.reshape(-1))
    )
    return RoutingPlan(
        idx,
        w / w.sum(1, keepdim=True),
        counts,
        torch.zeros((), device=device),
        torch.zeros((), dtype=torch.int64, device=device),
        False,
    )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--tokens", default="128,4096")
    p.add_argument("--hidden", default="2048,7168")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--backend", default=None, help="process-group backend (gloo for several PEs on one GPU)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.iters = "16", "32", 2
    from moe_dist.parallel import init_distributed

    rank, world, device = init_distributed(backend=args.backend)
    if torch.cuda.is_available() and not args.smoke:
        device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    groups = ParallelGroups(ep_size=world)
    E, K = args.experts, args.top_k
    transports = {"collective": CollectiveTransport(E, groups.ep_group)}
    reason = nvshmem_unavailable_reason(device)
    if reason is None:
        from moe_dist.transport import NvshmemOptions
        from moe_dist.transport.nvshmem.transport import NvshmemTransport

        max_t = max(int(t) for t in args.tokens.split(","))
        nv = NvshmemOptions.from_env(os.environ, max_tokens_per_rank=max_t)
        transports["nvshmem"] = NvshmemTransport(E, K, groups, device, nv)
        if world > 1:  # the put-with-signal path (for peers without P2P), forced for every peer
            transports["nvshmem_put"] = NvshmemTransport(
                E, K, groups, device, dataclasses.replace(nv, peer_path="put")
            )
    elif rank == 0:
        print(f"nvshmem skipped: {reason}")
    copy_gbs = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    gen = torch.Generator().manual_seed(rank)
    rows = []
    for H in (int(h) for h in args.hidden.split(",")):
        for T in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(T, H, device=device, dtype=dtype)
            plan = random_plan(T, E, K, device, gen)
            row = {"tokens_per_rank": T, "hidden": H, "top_k": K, "experts": E, "pes": world}
            for name, tr in transports.items():
                with torch.no_grad():
                    tok, counts, h = tr.dispatch(x, plan)
                    y = tok.clone()
                    ref_tok, ref_counts, ref_h = transports["collective"].dispatch(x, plan)
                    n = int(counts.sum())
                    assert torch.equal(tok[:n], ref_tok), f"{name} dispatch differs from collective"
                    out = tr.combine(y, h)
                    ref_out = transports["collective"].combine(ref_tok.clone(), ref_h)
                    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
                    d = time_ms(lambda: tr.dispatch(x, plan), warmup=3, iters=args.iters)
                    dc = time_ms(lambda: _round_trip(tr, x, plan), warmup=3, iters=args.iters)
                moved = 4 * T * K * H * x.element_size()
                row[name] = {
                    "dispatch_ms": d["median_ms"],
                    "dispatch_combine_ms": dc["median_ms"],
                    "GBps": moved / dc["median_ms"] / 1e6,
                }
                if (
                    name.startswith("nvshmem") and device.type == "cuda"
                ):  # no host sync: it can be captured
                    row[name]["dispatch_combine_graph_ms"] = _graph_round_trip_ms(
                        tr, x, plan, args.iters
                    )
                if copy_gbs:
                    row[name]["fraction_of_copy_bw"] = row[name]["GBps"] / copy_gbs
            rows.append(row)
            if rank == 0:
                print(
                    f"T={T:5d} H={H:5d} k={K} PEs={world}: "
                    + "  ".join(
                        f"{n}: dispatch {row[n]['dispatch_ms']:.3f} ms, d+c"
                        f" {row[n]['dispatch_combine_ms']:.3f} ms"
                        + (
                            f" (graph {row[n]['dispatch_combine_graph_ms']:.3f})"
                            if "dispatch_combine_graph_ms" in row[n]
                            else ""
                        )
                        + f", {row[n]['GBps']:.0f} GB/s"
                        + (f" ({row[n]['fraction_of_copy_bw']:.0%} of copy)" if copy_gbs else "")
                        for n in transports
                    ),
                    flush=True,
                )
    if rank == 0:
        print(f"device copy bandwidth (read+write): {copy_gbs} GB/s")
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        note = (
            "one PE: all traffic local"
            if world == 1
            else (
                "several PEs on one GPU are time-sliced: correctness-grade timings"
                if gpus < world
                else "one PE per GPU, peers over NVLink"
            )
        )
        save_results(
            f"transport_{world}pe" + ("_smoke" if args.smoke else ""),
            {"copy_bandwidth_GBps": copy_gbs, "gpus": gpus, "note": note, "results": rows},
            args.out,
        )
    dist.barrier()


def _round_trip(tr, x, plan):
    tok, _, h = tr.dispatch(x, plan)
    return tr.combine(tok, h)


def _graph_round_trip_ms(tr, x, plan, iters) -> float:
    """Dispatch+combine captured in a CUDA graph and replayed: the GPU time without Python's launch
    cost (a round trip is two calls, so replays keep the buffer parity in step on every PE)."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _round_trip(tr, x, plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _round_trip(tr, x, plan)
        return time_ms(graph.replay, warmup=3, iters=iters)["median_ms"]


if __name__ == "__main__":
    main()
