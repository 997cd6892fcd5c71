"""Dispatch and combine: rows and bytes each token sends (routing-only, exact), and latency and
bandwidth of nvshmem against collective (all_to_all_single) in one run.

    python -m benchmarks.transport --out benchmarks/results                 # one GPU, one PE
    torchrun --nproc-per-node 2 -m benchmarks.transport --backend gloo ...
                            # PEs sharing one GPU (correctness-grade timings); several GPUs: one
                            # PE per GPU, same command
    python -m benchmarks.transport --smoke        # CPU: collective only (CI)
    python -m benchmarks.transport --counts-only  # rows and bytes per token, routing only

Rows per token (no processes needed): for top-8 of 64 experts on 2 ranks and top-8 of 256 on 8
ranks, uniformly random routing, the K-copies baseline (one row per routed slot) beside the
deduplicated dispatch (one row per distinct destination rank), counted from the routing, with the
expectation N * (1 - C(E - G, K) / C(E, K)) beside; bytes per token for bf16 and fp8_e4m3 rows
(H bytes + one float32 scale per 128 channels) at DeepSeek-V3's hidden size 7168.

Timings: the collective transport in the activation dtype and with dispatch_dtype="fp8_e4m3"
(hidden sizes that are multiples of 128), and the nvshmem transport where it runs. With several
PEs, `nvshmem_put` is the nvshmem transport with every peer on the put-with-signal path
(NvshmemOptions(peer_path="put")), the path taken for peers without a P2P route. "GBps" is K-copies
equivalent: bytes = 4 * T * top_k * hidden * itemsize per round trip (dispatch reads and writes
S = T*top_k rows, combine the same), whatever the transport really moved (`rows_per_token` says
that), so a transport that moves fewer rows shows as faster, as it is.

Interference (GPU, nvshmem): the slowdown of a grouped GEMM on another stream while dispatch +
combine run beside it with num_comm_sms = 8, 16, 24 and all SMs; the bound on what overlap can win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os

import torch
import torch.distributed as dist

from benchmarks.common import save_results, time_ms
from moe_dist import ParallelGroups
from moe_dist.routing import RoutingPlan
from moe_dist.transport import CollectiveTransport, nvshmem_unavailable_reason
from moe_dist.transport.dedup import count_pairs
from moe_dist.transport.fp8 import FP8_BLOCK, fp8_unsupported_reason

COUNT_CONFIGS = [  # (experts, top_k, ranks): the two cases
    (64, 8, 2),
    (256, 8, 8),
]
COUNT_HIDDEN = 7168  # DeepSeek-V3


def routing_counts(tokens: int, hidden: int, seed: int = 0) -> list[dict]:
    """Rows and bytes per token sent by one source rank (rank 0), from the routing alone."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for E, K, N in COUNT_CONFIGS:
        G = E // N
        plan = random_plan(tokens, E, K, torch.device("cpu"), gen)
        idx = plan.expert_idx_TK
        slots_N = torch.zeros(N, dtype=torch.int64).scatter_add_(
            0, (idx // G).reshape(-1), torch.ones(idx.numel(), dtype=torch.int64)
        )
        pairs_N = count_pairs(idx, G, N)
        expected = N * (1 - math.comb(E - G, K) / math.comb(E, K))
        bf16, fp8 = 2 * hidden, hidden + 4 * (hidden // FP8_BLOCK)
        per_tok = lambda v: float(v) / tokens  # noqa: E731
        row = {
            "experts": E,
            "top_k": K,
            "ranks": N,
            "tokens": tokens,
            "hidden": hidden,
            "k_copies_rows_per_token": per_tok(slots_N.sum()),
            "dedup_rows_per_token": per_tok(pairs_N.sum()),
            "dedup_rows_per_token_expected": expected,
            "k_copies_peer_rows_per_token": per_tok(slots_N[1:].sum()),
            "dedup_peer_rows_per_token": per_tok(pairs_N[1:].sum()),
            "k_copies_over_dedup": float(slots_N.sum() / pairs_N.sum()),
            "dispatch_bytes_per_token": {
                "k_copies_bf16": per_tok(slots_N.sum() * bf16),
                "dedup_bf16": per_tok(pairs_N.sum() * bf16),
                "dedup_fp8_e4m3": per_tok(pairs_N.sum() * fp8),
            },
            # the collective transport also sends, per row, K float32 weights and K local experts
            "dedup_meta_bytes_per_token": per_tok(pairs_N.sum() * 8 * K),
            "combine_bytes_per_token": {
                "k_copies_bf16": per_tok(slots_N.sum() * bf16),
                "dedup_bf16": per_tok(pairs_N.sum() * bf16),
            },
        }
        rows.append(row)
    return rows


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
    p.add_argument("--count-tokens", type=int, default=16384, help="tokens per rank for counts")
    p.add_argument("--sms", default="8,16,24,all", help="num_comm_sms values for interference")
    p.add_argument("--counts-only", action="store_true", help="rows/bytes per token, no timing")
    args = p.parse_args(argv)
    if args.counts_only:  # routing only: no processes, no device
        per_token = routing_counts(args.count_tokens, COUNT_HIDDEN)
        print(json.dumps(per_token, indent=1))
        save_results("transport_rows_per_token", {"rows_per_token": per_token}, args.out)
        return
    if args.smoke:
        args.tokens, args.hidden, args.iters, args.count_tokens = "16", "128", 2, 256
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
    transports = {
        "collective": CollectiveTransport(E, groups.ep_group),
        "collective_fp8": CollectiveTransport(E, groups.ep_group, "fp8_e4m3"),
    }
    per_token = routing_counts(args.count_tokens, COUNT_HIDDEN)
    if rank == 0:
        for c in per_token:
            print(
                f"top-{c['top_k']} of {c['experts']} on {c['ranks']} ranks: rows/token"
                f" {c['k_copies_rows_per_token']:.3f} (K copies) -> {c['dedup_rows_per_token']:.3f}"
                f" (dedup; expected {c['dedup_rows_per_token_expected']:.3f}),"
                f" {c['k_copies_over_dedup']:.2f}x fewer; dispatch bytes/token at H={c['hidden']}: "
                + ", ".join(f"{k} {v:.0f}" for k, v in c["dispatch_bytes_per_token"].items()),
                flush=True,
            )
    reason = nvshmem_unavailable_reason(device)
    if reason is None:
        from moe_dist.transport import NvshmemOptions
        from moe_dist.transport.nvshmem.transport import NvshmemTransport

        max_t = max(int(t) for t in args.tokens.split(","))
        nv = NvshmemOptions.from_env(os.environ, max_tokens_per_rank=max_t)
        # workspaces are made per row width on first use
        transports["nvshmem"] = NvshmemTransport(E, K, groups, device, nv)
        if fp8_unsupported_reason(device) is None:
            transports["nvshmem_fp8"] = NvshmemTransport(
                E, K, groups, device, nv, dispatch_dtype="fp8_e4m3"
            )
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
                if name.endswith("fp8") and H % FP8_BLOCK:
                    continue  # fp8 rows need hidden % 128 == 0
                with torch.no_grad():
                    tok, counts, h = tr.dispatch(x, plan)
                    y = tok.clone()
                    ref_tok, ref_counts, ref_h = transports["collective"].dispatch(x, plan)
                    n = int(counts.sum())
                    tol = 0.07 if name.endswith("fp8") else 0.0  # e4m3: 3 mantissa bits
                    torch.testing.assert_close(
                        tok[:n].float(), ref_tok.float(), rtol=tol, atol=tol,
                        msg=lambda m: f"{name} dispatch differs from collective: {m}",
                    )  # fmt: skip
                    out = tr.combine(y, h)
                    ref_out = transports["collective"].combine(ref_tok.clone(), ref_h)
                    tol = 0.15 if name.endswith("fp8") else 2e-2
                    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
                    d = time_ms(lambda: tr.dispatch(x, plan), warmup=3, iters=args.iters)
                    dc = time_ms(lambda: _round_trip(tr, x, plan), warmup=3, iters=args.iters)
                    syncs = _host_syncs(tr, x, plan)
                moved = 4 * T * K * H * x.element_size()
                row[name] = {
                    "dispatch_ms": d["median_ms"],
                    "dispatch_combine_ms": dc["median_ms"],
                    "GBps": moved / dc["median_ms"] / 1e6,
                    **syncs,
                }
                if getattr(tr, "sent_rows_N", None) is not None:  # nvshmem dedup: to peers only
                    row[name]["peer_rows_per_token"] = int(tr.sent_rows_N.sum()) / max(T, 1)
                if hasattr(tr, "stats"):  # rows this rank really sent in the last dispatch
                    row[name]["rows_per_token"] = tr.stats.last_dispatch.rows / max(T, 1)
                    row[name]["dispatch_bytes_per_token"] = (
                        tr.stats.last_dispatch.payload_bytes / max(T, 1)
                    )
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
                        + (
                            f", host syncs d/c {row[n]['host_syncs_per_dispatch']}"
                            f"/{row[n]['host_syncs_per_combine']}"
                            if "host_syncs_per_dispatch" in row[n]
                            else ""
                        )
                        + (f" ({row[n]['fraction_of_copy_bw']:.0%} of copy)" if copy_gbs else "")
                        for n in transports
                        if n in row
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
        interference = None
        if device.type == "cuda" and "nvshmem" in transports and world == 1 and not args.smoke:
            interference = sm_interference(transports["nvshmem"], device, args)
        save_results(
            f"transport_{world}pe" + ("_smoke" if args.smoke else ""),
            {
                "copy_bandwidth_GBps": copy_gbs,
                "gpus": gpus,
                "note": note,
                "rows_per_token": per_token,
                "results": rows,
                "sm_interference": interference,
            },
            args.out,
        )
    dist.barrier()


def _host_syncs(tr, x, plan) -> dict:
    """The collective transport's device->host reads in one dispatch and one combine (its
    handshake counts them; on a GPU each one stalls the launch queue). {} for other transports."""
    hs = getattr(tr, "handshake", None)
    if hs is None:
        return {}
    before = hs.host_reads
    tok, _, h = tr.dispatch(x, plan)
    mid = hs.host_reads
    tr.combine(tok, h)
    return {"host_syncs_per_dispatch": mid - before, "host_syncs_per_combine": hs.host_reads - mid}


def sm_interference(tr, device, args) -> list[dict]:
    """At one PE: a grouped GEMM (8 experts, 2048 rows each, 4096 x 4096, bf16) on one stream,
    alone and while nvshmem dispatch + combine loop on another, for each num_comm_sms. Slowdown =
    GEMM time beside the transport / GEMM time alone; the transport's own time beside it too."""
    from moe_dist.transport.nvshmem.transport import NvshmemTransport

    G, M, Hd = 8, 2048, 4096
    a = torch.randn(G * M, Hd, device=device, dtype=torch.bfloat16)
    w = torch.randn(G, Hd, Hd, device=device, dtype=torch.bfloat16)
    offs = torch.arange(1, G + 1, device=device, dtype=torch.int32) * M

    def gemm():
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)

    T, H = 4096, 7168
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    plan = random_plan(T, tr.num_experts, tr.top_k, device, torch.Generator().manual_seed(1))
    all_sms = torch.cuda.get_device_properties(device).multi_processor_count
    gemm_alone = time_ms(gemm, warmup=3, iters=args.iters)["median_ms"]
    comm_stream, gemm_stream = torch.cuda.Stream(), torch.cuda.Stream()
    out = []
    for sms in args.sms.split(","):
        n = all_sms if sms == "all" else int(sms)
        nv = dataclasses.replace(tr.options, max_tokens_per_rank=T)
        bounded = NvshmemTransport(
            tr.num_experts, tr.top_k, None, device, nv, hidden_size=H, dtype=torch.bfloat16,
            num_comm_sms=n,
        )  # fmt: skip
        with torch.no_grad():
            comm_alone = time_ms(lambda: _round_trip(bounded, x, plan), 3, args.iters)["median_ms"]

            def loops(gemm_ms):
                """GEMMs that, alone, last as long as the 20 round trips."""
                return max(1, int(round(comm_alone * 20 / max(gemm_ms, 1e-3))))

            def beside(carveout, n_gemm):
                """(GEMM ms, transport ms) with both loops in flight; carveout: SMs the GEMM is
                told to leave free (torch's experimental SM carveout), None: all SMs."""
                torch.cuda.synchronize()
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                with torch.cuda.stream(comm_stream):
                    ev[0].record()
                    for _ in range(20):
                        _round_trip(bounded, x, plan)
                    ev[1].record()
                with torch.cuda.stream(gemm_stream):
                    set_carveout(carveout)
                    try:
                        ev[2].record()
                        for _ in range(n_gemm):
                            gemm()
                        ev[3].record()
                    finally:
                        set_carveout(None)
                torch.cuda.synchronize()
                return ev[2].elapsed_time(ev[3]) / n_gemm, ev[0].elapsed_time(ev[1]) / 20

            carved_alone = None
            if n < all_sms and set_carveout(n):
                try:
                    carved_alone = time_ms(gemm, warmup=3, iters=args.iters)["median_ms"]
                finally:
                    set_carveout(None)
            gemm_beside, comm_beside = beside(None, loops(gemm_alone))
            # whether a GEMM that leaves the comm SMs alone escapes the slowdown (a persistent
            # GEMM waits for its slowest SM; the ones it shares with the transport are slowest)
            carved = (None, None)
            if carved_alone is not None:
                carved = beside(n, loops(carved_alone))
        out.append(
            {
                "num_comm_sms": n,
                "gemm_alone_ms": gemm_alone,
                "gemm_beside_transport_ms": gemm_beside,
                "gemm_slowdown": gemm_beside / gemm_alone,
                "transport_alone_ms": comm_alone,
                "transport_beside_gemm_ms": comm_beside,
                "gemm_alone_carveout_ms": carved_alone,
                "gemm_beside_transport_carveout_ms": carved[0],
                "gemm_slowdown_carveout": carved[0] / gemm_alone if carved[0] else None,
                "transport_beside_carved_gemm_ms": carved[1],
            }
        )
        print(
            f"num_comm_sms={n}: grouped GEMM {gemm_alone:.3f} -> {gemm_beside:.3f} ms beside the"
            f" transport ({gemm_beside / gemm_alone:.2f}x); transport {comm_alone:.3f} ->"
            f" {comm_beside:.3f} ms"
            + (
                f"; GEMM told to leave {n} SMs free: {carved[0]:.3f} ms"
                f" ({carved[0] / gemm_alone:.2f}x)"
                if carved[0]
                else ""
            ),
            flush=True,
        )
    return out


def set_carveout(sms: int | None) -> bool:
    """Tells torch's GEMMs to leave `sms` SMs free (None: use all); False where this torch lacks
    the experimental knob."""
    knob = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if knob is None:
        return False
    knob(sms)
    return True


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
