"""Overlap of communication with compute (moe_dist/overlap.py), forward and forward+backward:

  t_comm        dispatch + combine alone (the transport; at EP=1 the local permutation)
  t_compute     the routed experts alone, on tokens dispatched beforehand
  t_routed      the routed path alone (route, dispatch, experts, combine; no shared experts)
  t_shared      the shared experts alone
  the layer (routing and shared experts included), three ways, in `layers`:
    no_overlap    one call, every phase on the compute stream (shared_expert_overlap=False)
    side_stream   one call, the shared experts on the side stream (the default)
    microbatches  two micro-batches through MoELayer.start / run_experts / finish (the schedule of
                  `--overlap-microbatches 2`: A's experts run while B's tokens travel, A's combine
                  while B's experts run), side stream on
  ratios        side_stream / no_overlap and microbatches / side_stream (< 1: the overlap pays);
                shared: t_layer / max(t_routed, t_shared) with the side stream on and off (goal:
                <= 1.1 on)

    python -m benchmarks.overlap --out DIR                # one GPU, EP=1, bf16
    torchrun --nproc-per-node 2 -m benchmarks.overlap --backend gloo --out DIR
                                                          # 2 PEs (nvshmem if present)
    python -m benchmarks.overlap --smoke --out DIR        # tiny CPU run (CI)

(Runs before 0.2.0 also timed the chunked pipeline, MoEConfig.num_chunks; it never beat one chunk
and was removed: benchmarks/results/overlap_*.json keep those runs.)

Legend: T tokens per rank, H hidden, F expert ffn width, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from benchmarks.common import save_results, time_ms
from moe_dist import MoEConfig, MoELayer, ParallelGroups
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

    def comm():
        tok, _, h = tr.dispatch(x_g, plan)
        return tr.combine(tok, h)

    def compute():
        return layer.experts(tokens_g, counts)

    def routed():  # not layer.routed_pass: that adds the shared experts
        return layer._routed_experts(x_g, layer.route(x_g))

    def layer_with(**changes):
        """The whole layer's output under cfg.replace(**changes) (the layer reads cfg per call)."""

        def run():
            layer.cfg = cfg.replace(**changes)
            try:
                return layer(x_g).output
            finally:
                layer.cfg = cfg

        return run

    ways = {
        "no_overlap": layer_with(shared_expert_overlap=False),
        "side_stream": layer_with(),
        "microbatches": lambda: microbatched(layer, x_g, 2),
    }
    rows, summary = [], {}
    for mode in MODES:
        t = {
            "comm": timed(comm, mode, ones, args.iters, warmup),
            "compute": timed(compute, mode, ones, args.iters, warmup),
            "routed": timed(routed, mode, ones, args.iters, warmup),
            "shared": timed(lambda: layer.shared_experts(x_g), mode, ones, args.iters, warmup),
        }
        layers = {way: timed(fn, mode, ones, args.iters, warmup) for way, fn in ways.items()}
        rows += [{"mode": mode, "what": what, "ms": ms} for what, ms in t.items()]
        rows += [
            {
                "mode": mode,
                "what": "layer",
                "overlap": way,
                "num_microbatches": 2 if way == "microbatches" else 1,
                "t_layer_ms": ms,
            }
            for way, ms in layers.items()
        ]
        longer = max(t["routed"], t["shared"])
        summary[mode] = {
            **{f"t_{what}_ms": ms for what, ms in t.items()},
            "t_layer_ms": layers,
            "side_stream_vs_no_overlap": layers["side_stream"] / layers["no_overlap"],
            "microbatches_vs_side_stream": layers["microbatches"] / layers["side_stream"],
            "shared_ratio_side_stream_on": layers["side_stream"] / longer,
            "shared_ratio_side_stream_off": layers["no_overlap"] / longer,
        }

    # Shared experts: does the side stream hide the shared path under the routed one?
    shared = {
        "ratio_side_stream_on": summary["fwd_bwd"]["shared_ratio_side_stream_on"],
        "ratio_side_stream_off": summary["fwd_bwd"]["shared_ratio_side_stream_off"],
        "goal": "ratio_side_stream_on <= 1.1 (forward+backward, one GPU)",
    }

    layer.check_errors()  # a run that overflowed or lost a peer is an error, not a figure
    if rank == 0:
        print(
            f"T={T}/rank H={H} F={args.ffn} E={args.experts} k={args.top_k} shared={args.shared} "
            f"ranks={world} transport={tr.name} {dtype} on {device}"
        )
        for mode in MODES:
            s = summary[mode]
            print(
                f"[{mode}] comm {s['t_comm_ms']:.3f} ms, compute {s['t_compute_ms']:.3f} ms,"
                f" routed {s['t_routed_ms']:.3f} ms, shared {s['t_shared_ms']:.3f} ms"
            )
            for way, ms in s["t_layer_ms"].items():
                print(f"  layer, {way:12s} {ms:8.3f} ms")
            print(
                f"  side stream / no overlap {s['side_stream_vs_no_overlap']:.3f},"
                f" 2 micro-batches / side stream {s['microbatches_vs_side_stream']:.3f},"
                f" layer / max(routed, shared) {s['shared_ratio_side_stream_on']:.3f} (side stream"
                f" on) {s['shared_ratio_side_stream_off']:.3f} (off)"
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
