"""Overlap of communication with expert compute (moe_dist/overlap.py), forward and forward+backward:

  t_comm        dispatch + combine alone (the transport; at EP=1 the local permutation)
  t_compute     the routed experts alone, on tokens dispatched beforehand
  t_overlapped  the routed path pipelined over C chunks (C = 1, 2, 4, 8), routing done beforehand
  t_layer       the whole layer (routing and shared experts included) at C chunks, and split in two
                micro-batches through MoELayer.start / run_experts / finish (the schedule of
                `--overlap-microbatches 2`: A's experts run while B's tokens travel, A's combine
                while B's experts run), one chunk each: `microbatches` in the JSON
  efficiency    (t_comm + t_compute - t_overlapped) / min(t_comm, t_compute): the fraction of the
                shorter phase hidden under the longer one (1 = fully hidden, 0 = serial, < 0 =
                slower)
  shared        routed path alone (route + experts), shared experts alone, and the layer with
                both with the side stream on and off; ratio = t_layer / max(t_routed, t_shared)
                (goal: <= 1.1 on)

    python -m benchmarks.overlap --out DIR                # one GPU, EP=1, bf16
    torchrun --nproc-per-node 2 -m benchmarks.overlap --backend gloo --out DIR
                                                          # 2 PEs (nvshmem if present)
    python -m benchmarks.overlap --smoke --out DIR        # tiny CPU run (CI)

Legend: T tokens per rank, H hidden, F expert ffn width, E experts, K top-k, C chunks.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from benchmarks.common import save_results, time_ms
from moe_dist import MoEConfig, MoELayer, ParallelGroups
from moe_dist.overlap import pipelined_moe
from moe_dist.transport import NvshmemOptions, TransportOptions
from moe_dist.parallel import init_distributed

MODES = ("fwd", "fwd_bwd")


def timed(fn, mode: str, grad_of, iters: int, warmup: int) -> float:
    """Median ms of fn() (mode 'fwd', under no_grad) or of fn() and its backward (mode
    'fwd_bwd')."""
    if mode == "fwd":

        def step():
            with torch.no_grad():
                fn()

    else:

        def step():
            out = fn()
            out.backward(grad_of(out))

    return time_ms(step, warmup=warmup, iters=iters)["median_ms"]


def microbatched(layer, x, n: int) -> torch.Tensor:
    """The layer over n micro-batches of x, interleaved as the LM's blocks do."""
    calls = [layer.start(part) for part in torch.tensor_split(x, n)]
    for call in calls:
        layer.run_experts(call)
    return torch.cat([layer.finish(call).output for call in calls])


def efficiency(t_comm: float, t_compute: float, t_overlapped: float) -> float:
    return (t_comm + t_compute - t_overlapped) / min(t_comm, t_compute)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, seconds")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--shared", type=int, default=1, help="shared experts (each --ffn wide)")
    p.add_argument("--chunks", default="1,2,4,8")
    p.add_argument("--transport", default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--backend", default=None, help="process-group backend (gloo for several PEs on one GPU)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.ffn, args.experts, args.top_k, args.iters = (
            64,
            32,
            16,
            8,
            2,
            2,
        )

    rank, world, _ = init_distributed(backend=args.backend)
    if torch.cuda.is_available() and not args.smoke:
        device = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    warmup = 1 if args.smoke else 3
    groups = ParallelGroups(ep_size=world) if world > 1 else None
    T, H = args.tokens, args.hidden
    cfg = MoEConfig(
        hidden_size=H,
        ffn_hidden_size=args.ffn,
        num_experts=args.experts,
        top_k=args.top_k,
        num_shared_experts=args.shared,
        transport=args.transport,
        router_bias_update_rate=0.0,
        check_finite=False,
        error_check="deferred",
    )  # no host sync
    torch.manual_seed(0)
    options = TransportOptions(
        nvshmem=NvshmemOptions.from_env(os.environ, max_tokens_per_rank=max(T, 1))
    )
    layer = MoELayer(cfg, groups, transport_options=options, device=device, dtype=dtype)
    tr = layer.transport
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    with torch.no_grad():
        plan = layer.route(x)
        tokens, counts, _ = tr.dispatch(x, plan)
    x_g = x.clone().requires_grad_(True)
    tokens_g = tokens.clone().requires_grad_(True)
    ones = lambda out: torch.ones_like(out)  # noqa: E731 - the gradient fed to every backward
    chunk_counts = [int(c) for c in args.chunks.split(",")]

    def comm():
        tok, _, h = tr.dispatch(x_g, plan)
        return tr.combine(tok, h)

    def compute():
        return layer.experts(tokens_g, counts)

    rows, summary = [], {}
    for mode in MODES:
        t_comm = timed(comm, mode, ones, args.iters, warmup)
        t_compute = timed(compute, mode, ones, args.iters, warmup)
        rows += [
            {"mode": mode, "what": "comm", "ms": t_comm},
            {"mode": mode, "what": "compute", "ms": t_compute},
        ]
        s = summary[mode] = {
            "t_comm_ms": t_comm,
            "t_compute_ms": t_compute,
            "t_overlapped_ms": {},
            "efficiency": {},
            "t_layer_ms": {},
        }
        for C in chunk_counts:
            t_ov = timed(
                lambda: pipelined_moe(layer.transport, layer.experts, x_g, plan, C, layer.streams),
                mode,
                ones,
                args.iters,
                warmup,
            )
            layer.cfg = cfg.replace(num_chunks=C)
            t_layer = timed(lambda: layer(x_g).output, mode, ones, args.iters, warmup)
            layer.cfg = cfg
            s["t_overlapped_ms"][C], s["efficiency"][C], s["t_layer_ms"][C] = (
                t_ov,
                efficiency(t_comm, t_compute, t_ov),
                t_layer,
            )
            rows.append(
                {
                    "mode": mode,
                    "what": "layer",
                    "num_chunks": C,
                    "t_overlapped_ms": t_ov,
                    "efficiency": s["efficiency"][C],
                    "t_layer_ms": t_layer,
                }
            )
        s["best_num_chunks"] = min(chunk_counts, key=lambda c: s["t_layer_ms"][c])
        t_micro = timed(lambda: microbatched(layer, x_g, 2), mode, ones, args.iters, warmup)
        s["t_microbatches_ms"] = {2: t_micro}
        s["microbatches_vs_best_chunks"] = t_micro / s["t_layer_ms"][s["best_num_chunks"]]
        rows.append(
            {"mode": mode, "what": "microbatches", "num_microbatches": 2, "t_layer_ms": t_micro}
        )

    # Shared experts: does the side stream hide the shared path under the routed one?
    shared = {}
    for mode in MODES:
        t_routed = timed(lambda: layer.routed_pass(x_g)[0], mode, ones, args.iters, warmup)
        t_shared = timed(lambda: layer.shared_experts(x_g), mode, ones, args.iters, warmup)
        res = {"t_routed_ms": t_routed, "t_shared_ms": t_shared}
        for on in (True, False):
            layer.cfg = cfg.replace(shared_expert_overlap=on)
            t = timed(lambda: layer(x_g).output, mode, ones, args.iters, warmup)
            res[f"t_layer_side_stream_{'on' if on else 'off'}_ms"] = t
            res[f"ratio_side_stream_{'on' if on else 'off'}"] = t / max(t_routed, t_shared)
        layer.cfg = cfg
        shared[mode] = res
    shared["ratio_side_stream_on"] = shared["fwd_bwd"]["ratio_side_stream_on"]
    shared["goal"] = "ratio_side_stream_on <= 1.1 (forward+backward, one GPU)"

    layer.check_errors()  # a run that overflowed or lost a peer is an error, not a figure
    if rank == 0:
        print(
            f"T={T}/rank H={H} F={args.ffn} E={args.experts} k={args.top_k} shared={args.shared} "
            f"ranks={world} transport={tr.name} {dtype} on {device}"
        )
        for mode in MODES:
            s = summary[mode]
            print(f"[{mode}] comm {s['t_comm_ms']:.3f} ms, compute {s['t_compute_ms']:.3f} ms")
            print("   C  overlapped ms  efficiency  layer ms")
            for C in chunk_counts:
                print(
                    f"  {C:2d}  {s['t_overlapped_ms'][C]:13.3f}  {s['efficiency'][C]:10.2f} "
                    f" {s['t_layer_ms'][C]:8.3f}"
                )
            print(
                f"  2 micro-batches: layer {s['t_microbatches_ms'][2]:.3f} ms"
                f" ({s['microbatches_vs_best_chunks']:.3f} x the best chunk count,"
                f" C={s['best_num_chunks']})"
            )
            sh = shared[mode]
            print(
                f"  shared: routed {sh['t_routed_ms']:.3f} ms, shared {sh['t_shared_ms']:.3f} ms,"
                f" layer {sh['t_layer_side_stream_on_ms']:.3f} (side stream on, ratio"
                f" {sh['ratio_side_stream_on']:.3f}) / {sh['t_layer_side_stream_off_ms']:.3f} ms"
                f" (off, ratio {sh['ratio_side_stream_off']:.3f})"
            )
        note = (
            "several PEs on one GPU are time-sliced: correctness-grade timings"
            if world > 1
            else "EP=1"
        )
        save_results(
            "overlap" + (f"_{world}pe" if world > 1 else ""),
            {
                "config": {
                    "tokens_per_rank": T,
                    "hidden": H,
                    "ffn": args.ffn,
                    "experts": args.experts,
                    "top_k": args.top_k,
                    "shared": args.shared,
                    "ranks": world,
                    "transport": tr.name,
                    "dtype": str(dtype),
                },
                "note": note,
                "results": rows,
                "summary": summary,
                "shared": shared,
            },
            args.out,
        )
    if world > 1:
        dist.barrier()


if __name__ == "__main__":
    main()
