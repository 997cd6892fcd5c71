"""Forward+backward time and peak memory of one MoE layer (EP=1), against its peers in the same run:

moe_dist      MoELayer, transport "local", torch._grouped_mm experts
floor         only the expert matmuls through torch._grouped_mm on a perfectly balanced layout
hf_loop       Hugging Face Mixtral-style per-expert loop (same router and weights as moe_dist)
deepspeed     deepspeed.moe.layer.MoE, dropless top-2, same expert shape (SwiGLU)

  python -m benchmarks.layer --out benchmarks/results          # GPU, bf16, DESIGN.md's two configs
  python -m benchmarks.layer --smoke                           # tiny CPU run (CI)
"""

from __future__ import annotations

import argparse
import gc

import torch

from benchmarks.common import (
    init_single_process_group,
    peak_memory_mb,
    save_results,
    time_ms,
)
from benchmarks.peers import SwiGLUExpert, deepspeed_moe, hf_loop_forward
from moe_dist import MoEConfig, MoELayer

CONFIGS = {  # tokens, hidden, ffn, experts, top-k (DESIGN.md)
    "mixtral": (8192, 4096, 14336, 8, 2),
    "fine_grained": (16384, 2048, 1408, 64, 2),
}
SMOKE_CONFIGS = {"mixtral": (64, 32, 64, 4, 2), "fine_grained": (128, 32, 16, 16, 2)}


def build_variants(name, T, H, Fh, E, K, device, dtype):
    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=H,
        ffn_hidden_size=Fh,
        num_experts=E,
        top_k=K,
        transport="local",
        aux_loss_coef=0.0,
    )
    layer = MoELayer(cfg, device=device, dtype=dtype)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, H, device=device, dtype=dtype)

    def run_moe_dist():
        layer(x).output.backward(grad)

    def run_hf_loop():
        hf_loop_forward(layer, x).backward(grad)

    # Floor: balanced offsets, the two grouped GEMMs forward and backward, nothing else.
    S = T * K
    xs = torch.randn(S, H, device=device, dtype=dtype, requires_grad=True)
    act = torch.randn(S, Fh, device=device, dtype=dtype, requires_grad=True)
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * (S // E)
    offs[-1] = S
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    g_h, g_y = torch.randn(S, w_in.shape[1], device=device, dtype=dtype), torch.randn(
        S, H, device=device, dtype=dtype
    )

    def run_floor():
        torch._grouped_mm(xs, w_in.transpose(-2, -1), offs=offs).backward(g_h)
        torch._grouped_mm(act, w_out.transpose(-2, -1), offs=offs).backward(g_y)

    variants = {"moe_dist": run_moe_dist, "floor": run_floor, "hf_loop": run_hf_loop}
    try:
        variants["deepspeed"] = deepspeed_variant(layer, x, grad, K)
    except Exception as e:  # noqa: BLE001 - reported in the results, the other peers still run
        print(f"[{name}] deepspeed unavailable: {type(e).__name__}: {e}")

    with torch.no_grad():  # correctness first: moe_dist against the HF loop on the same weights
        ref = hf_loop_forward(layer, x).float()
        rel = ((layer(x).output.float() - ref).norm() / ref.norm()).item()
    return variants, rel


def deepspeed_variant(layer: MoELayer, x, grad, k):
    init_single_process_group()
    expert = SwiGLUExpert(layer.experts.w_in[0], layer.experts.w_out[0])
    ds = deepspeed_moe(layer.cfg.hidden_size, expert, layer.cfg.num_experts, 1, k)
    ds = ds.to(x.device, x.dtype)

    def run():
        out, _, _ = ds(x.unsqueeze(0))
        out.squeeze(0).backward(grad)

    return run


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes, fp32, few iterations (CPU CI)"
    )
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--skip", default="", help="comma-separated variants to skip")
    p.add_argument("--out", default=None, help="directory for layer.json")
    p.add_argument(
        "--profile", action="store_true", help="print where moe_dist's time goes (torch.profiler)"
    )
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = SMOKE_CONFIGS if args.smoke else CONFIGS
    iters, warmup = (2, 1) if args.smoke else (args.iters, 5)
    results = {}
    for name in args.configs.split(","):
        T, H, Fh, E, K = table[name]
        variants, rel = build_variants(name, T, H, Fh, E, K, device, dtype)
        row = {
            "config": dict(tokens=T, hidden=H, ffn=Fh, experts=E, top_k=K, dtype=str(dtype)),
            "rel_error_vs_hf_loop": rel,
        }
        for vname, fn in variants.items():
            if vname in args.skip.split(","):
                continue
            row[vname] = time_ms(fn, warmup=warmup, iters=iters)
            row[vname]["peak_mb"] = peak_memory_mb(fn)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if device.type == "cuda" else []
            )
            with profile(activities=acts) as prof:
                for _ in range(3):
                    variants["moe_dist"]()
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60))
        base = row["moe_dist"]["median_ms"]
        row["ratio_to_floor"] = base / row["floor"]["median_ms"]
        for peer in ("hf_loop", "deepspeed"):
            if peer in row:
                row[f"speedup_vs_{peer}"] = row[peer]["median_ms"] / base
        results[name] = row
        print(f"== {name} T={T} H={H} F={Fh} E={E} k={K} {dtype}  rel err vs HF loop {rel:.2e}")
        for vname in variants:
            if vname in row:
                mem = row[vname]["peak_mb"]
                print(
                    f"   {vname:10s} {row[vname]['median_ms']:9.3f} ms"
                    + (f"  peak {mem:9.1f} MiB" if mem else "")
                )
        print(
            f"   ratio to floor {row['ratio_to_floor']:.3f}"
            + "".join(
                f"  speedup vs {k[11:]} {v:.2f}x"
                for k, v in row.items()
                if k.startswith("speedup_vs_")
            )
        )
        assert rel < (
            2e-2 if dtype == torch.bfloat16 else 1e-4
        ), f"moe_dist disagrees with the HF loop: {rel}"
    save_results("layer" + ("_smoke" if args.smoke else ""), {"results": results}, args.out)
    return results


if __name__ == "__main__":
    main()
