"""Training throughput of the example MoE language model: moe_dist's MoELayer vs DeepSpeed's MoE
layer (deepspeed.moe.layer.MoE) in the same model, one process, same config, same batch.

Each variant runs full training steps (forward, backward, AdamW step) on one fixed batch; timing is
benchmarks.common.time_ms (CUDA events around each step after warm-up; the median is reported), and
tokens/s = batch x sequence / median step time. Both variants are dropless: moe_dist with
capacity_factor=None, DeepSpeed with drop_tokens=False (it pads every expert to the busiest one),
deterministic top-k gating (no noisy gate, no second-expert sampling, no random token selection),
SwiGLU experts of the same width, and the same aux-loss coefficient.

    python -m benchmarks.train_throughput --out benchmarks/results  # GPU: bf16, the configs below
    python -m benchmarks.train_throughput --smoke                   # CPU, seconds (CI)
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.common import (
    environment,
    init_single_process_group,
    save_results,
    time_ms,
)
from benchmarks.peers import SwiGLUExpert, deepspeed_moe
from moe_dist import MoEConfig
from moe_dist.lm import ModelConfig, MoETransformer

# name: model shape, MoE shape, batch. "mixtral-like" and "fine-grained" follow DESIGN.md's peer
# table (scaled to a whole model that fits one GPU).
CONFIGS = {
    "mixtral-like": dict(
        d_model=2048, n_layers=4, n_heads=16, seq=1024, batch=8, experts=8, ffn=7168, top_k=2
    ),
    "fine-grained": dict(
        d_model=2048, n_layers=4, n_heads=16, seq=1024, batch=8, experts=64, ffn=1408, top_k=2
    ),
}
SMOKE = {
    "smoke": dict(d_model=32, n_layers=2, n_heads=2, seq=32, batch=4, experts=4, ffn=48, top_k=2)
}
AUX_LOSS_COEF = 1e-2


class DeepSpeedMoEFFN(nn.Module):
    """deepspeed.moe.layer.MoE with moe_dist's return convention: (output, scaled aux loss,
    counts)."""

    def __init__(self, c: dict):
        super().__init__()
        expert = SwiGLUExpert.fresh(c["d_model"], c["ffn"])
        self.moe = deepspeed_moe(c["d_model"], expert, c["experts"], 1, c["top_k"])

    def forward(self, x):
        out, aux, counts = self.moe(x)
        return out, AUX_LOSS_COEF * aux, counts


def build(variant: str, c: dict, device, dtype) -> MoETransformer:
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        d_model=c["d_model"], n_layers=c["n_layers"], n_heads=c["n_heads"], max_seq_len=c["seq"]
    )
    moe_cfg = MoEConfig(
        hidden_size=c["d_model"],
        ffn_hidden_size=c["ffn"],
        num_experts=c["experts"],
        top_k=c["top_k"],
        aux_loss_coef=AUX_LOSS_COEF,
        capacity_factor=None,
        transport="auto",
    )
    factory = (lambda i: DeepSpeedMoEFFN(c)) if variant == "deepspeed" else None
    return MoETransformer(model_cfg, moe_cfg, moe_factory=factory).to(device=device, dtype=dtype)


def measure(variant: str, c: dict, device, dtype, warmup: int, iters: int) -> dict:
    model = build(variant, c, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (c["batch"], c["seq"] + 1), generator=gen).to(device)

    def train_step():
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timing = time_ms(train_step, warmup=warmup, iters=iters)
    tokens = c["batch"] * c["seq"]
    result = {
        **timing,
        "tokens_per_s": tokens / (timing["median_ms"] / 1e3),
        "tokens_per_step": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (seconds), for CI")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {sorted(CONFIGS)}")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument(
        "--out", default=None, help="directory for train_throughput.json (e.g. benchmarks/results)"
    )
    args = p.parse_args(argv)

    # DeepSpeed's MoE layer wants torch.distributed, even for one process
    init_single_process_group()
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    configs = SMOKE if args.smoke else CONFIGS
    if args.configs:
        unknown = set(args.configs.split(",")) - set(configs)
        if unknown:
            raise SystemExit(f"unknown --configs {sorted(unknown)}; choose from {sorted(configs)}")
        configs = {name: configs[name] for name in args.configs.split(",")}
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    iters = args.iters if args.iters is not None else (3 if args.smoke else 20)

    results = {}
    for name, c in configs.items():
        results[name] = {"config": c}
        for variant in ("moe_dist", "deepspeed"):
            r = measure(variant, c, device, dtype, warmup, iters)
            results[name][variant] = r
            print(
                f"{name:>13} {variant:>9}: {r['median_ms']:9.2f} ms/step "
                f" {r['tokens_per_s']:>12,.0f} tokens/s",
                flush=True,
            )
        speedup = (
            results[name]["moe_dist"]["tokens_per_s"] / results[name]["deepspeed"]["tokens_per_s"]
        )
        results[name]["moe_dist_speedup"] = speedup
        print(f"{name:>13}   moe_dist / deepspeed tokens/s = {speedup:.2f}x", flush=True)
    payload = {
        "benchmark": "train_throughput",
        "dtype": str(dtype).replace("torch.", ""),
        "warmup": warmup,
        "iters": iters,
        "aux_loss_coef": AUX_LOSS_COEF,
        "results": results,
    }
    path = save_results(
        "train_throughput_smoke" if args.smoke else "train_throughput", payload, args.out
    )
    if path is not None:
        print(f"wrote {path}")
    return {"environment": environment(), **payload}


if __name__ == "__main__":
    main()
