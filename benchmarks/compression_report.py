"""Expert compression report: output error and loss change versus experts kept, on the example
byte-level MoE language model (moe_dist.lm.MoETransformer) trained a little on the Python standard
library.

Methods, each applied to every MoE layer with the same number of experts kept:
  prune        moe_dist.extensions.compress.prune_experts: EASY-EP importance (gate score x expert
  output norm) merge        moe_dist.extensions.compress.merge_experts: MC-SMoE (logit-similarity
  groups, aligned, frequency-weighted) prune_freq   keep the most frequently routed experts (a
  simpler statistic, for reference) random       keep a random subset (the baseline; mean and spread
  over --random-trials draws)
Calibration and evaluation batches are disjoint draws from the corpus. Output error is the relative
L2 error of the logits against the uncompressed model; loss change is eval cross-entropy minus the
uncompressed model's. The uncompressed model's routing telemetry (load, SRP, SCH) is reported too.

    python -m benchmarks.compression_report --out benchmarks/results      # CPU, a few minutes
    python -m benchmarks.compression_report --smoke                       # seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, save_results
from moe_dist import MoEConfig
from moe_dist.extensions.compress import (
    merge_experts,
    prune_experts,
    remove_experts,
    routing_statistics,
)
from moe_dist.extensions.compress.prune import top_experts
from moe_dist.lm.data import ByteCorpus
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.extensions.telemetry import RoutingTelemetry

FULL = dict(
    d_model=64,
    layers=2,
    heads=4,
    experts=8,
    top_k=2,
    ffn=128,
    seq_len=64,
    batch=16,
    steps=400,
    lr=3e-3,
    calib_batches=8,
    eval_batches=8,
    max_bytes=4_000_000,
)
SMOKE = dict(
    d_model=32,
    layers=2,
    heads=2,
    experts=4,
    top_k=2,
    ffn=32,
    seq_len=32,
    batch=4,
    steps=10,
    lr=3e-3,
    calib_batches=2,
    eval_batches=2,
    max_bytes=200_000,
)
SEEDS = {"train": 0, "calib": 1, "eval": 2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        default=None,
        help=f"directory for compression_report.json/.png (e.g. {RESULTS_DIR})",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: runs in seconds")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400; smoke 10)")
    p.add_argument(
        "--random-trials", type=int, default=None, help="random-removal draws per point (default 5)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train(model: MoETransformer, corpus: ByteCorpus, p: dict, seed: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95))
    losses = []
    model.train()
    for step in range(p["steps"]):
        batch = corpus.global_batch(step, p["batch"], p["seq_len"], seed=SEEDS["train"] + 10 * seed)
        out = model(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = p["lr"] * min(1.0, (step + 1) / 20)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.ce_loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, batches, reference_logits=None) -> dict:
    ce, err_num, err_den, outs = 0.0, 0.0, 0.0, []
    for i, batch in enumerate(batches):
        out = model(batch[:, :-1], batch[:, 1:])
        ce += float(out.ce_loss)
        outs.append(out.logits)
        if reference_logits is not None:
            err_num += float((out.logits - reference_logits[i]).square().sum())
            err_den += float(reference_logits[i].square().sum())
    result = {"loss": ce / len(batches)}
    if reference_logits is not None:
        result["output_rel_error"] = math.sqrt(err_num / err_den)
    return result, outs


def main(argv=None) -> int:
    args = parse_args(argv)
    p = dict(SMOKE if args.smoke else FULL)
    if args.steps is not None:
        p["steps"] = args.steps
    trials = args.random_trials or (2 if args.smoke else 5)
    t0 = time.perf_counter()
    corpus = ByteCorpus.from_path(None, p["max_bytes"])
    model_cfg = ModelConfig(
        d_model=p["d_model"], n_layers=p["layers"], n_heads=p["heads"], max_seq_len=p["seq_len"]
    )
    moe_cfg = MoEConfig(
        hidden_size=p["d_model"],
        ffn_hidden_size=p["ffn"],
        num_experts=p["experts"],
        top_k=p["top_k"],
    )
    torch.manual_seed(args.seed)
    model = MoETransformer(model_cfg, moe_cfg)
    losses = train(model, corpus, p, args.seed)
    print(
        f"trained {p['steps']} steps: loss {losses[0]:.3f} ->"
        f" {sum(losses[-10:]) / len(losses[-10:]):.3f} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )

    def draw(kind, n):
        return [
            corpus.global_batch(i, p["batch"], p["seq_len"], seed=SEEDS[kind] + 10 * args.seed)
            for i in range(n)
        ]

    calib_tokens = [b[:, :-1] for b in draw("calib", p["calib_batches"])]
    eval_batches = draw("eval", p["eval_batches"])

    with RoutingTelemetry(model, segment_length=16 if not args.smoke else 4) as tel:
        base, ref_logits = evaluate(model, eval_batches)
    telemetry = {
        name: {
            k: v[k]
            for k in (
                "imbalance",
                "dead_experts",
                "srp",
                "srp_threshold",
                "sch",
                "cache_size",
                "load_fraction",
                "gate_mean",
                "output_norm_mean",
            )
        }
        for name, v in tel.metrics().items()
    }
    print(tel.summary(), flush=True)
    print(f"uncompressed eval loss {base['loss']:.4f}", flush=True)

    freq = {name: f for name, (f, _) in routing_statistics(model, calib_tokens).items()}
    E = p["experts"]
    kept_counts = sorted({E, E * 3 // 4, E // 2, max(1, E // 4), 1, p["top_k"]} - {0}, reverse=True)
    rows = []
    for keep in kept_counts:
        results = {
            "prune": evaluate(prune_experts(model, calib_tokens, keep), eval_batches, ref_logits)[
                0
            ],
            "merge": evaluate(merge_experts(model, calib_tokens, keep), eval_batches, ref_logits)[
                0
            ],
            "prune_freq": evaluate(
                remove_experts(model, {n: top_experts(f.double(), keep) for n, f in freq.items()}),
                eval_batches,
                ref_logits,
            )[0],
        }
        gen = torch.Generator().manual_seed(1000 + keep)
        draws = [
            evaluate(
                remove_experts(
                    model, {n: torch.randperm(E, generator=gen)[:keep].tolist() for n in freq}
                ),
                eval_batches,
                ref_logits,
            )[0]
            for _ in range(trials)
        ]
        results["random"] = {
            key: sum(d[key] for d in draws) / trials for key in ("loss", "output_rel_error")
        }
        results["random"]["loss_std"] = _std([d["loss"] for d in draws])
        results["random"]["trials"] = trials
        for method, r in results.items():
            r["loss_change"] = r["loss"] - base["loss"]
            rows.append({"experts_kept": keep, "method": method, **r})
            print(
                f"keep {keep:2d}/{E} {method:10s} loss {r['loss']:.4f} ({r['loss_change']:+.4f})  "
                f"output rel. error {r['output_rel_error']:.4f}",
                flush=True,
            )

    payload = {
        "config": {**p, "seed": args.seed, "smoke": args.smoke, "random_trials": trials},
        "train_loss_first": losses[0],
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "uncompressed_eval_loss": base["loss"],
        "telemetry_summary": tel.summary(),
        "telemetry": telemetry,
        "results": rows,
        "seconds": time.perf_counter() - t0,
    }
    path = save_results("compression_report" + ("_smoke" if args.smoke else ""), payload, args.out)
    if path is not None:
        print(f"wrote {path} and {plot(rows, E, path.with_suffix('.png'))}")
    return 0


def _std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def plot(rows, num_experts, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("prune", "merge", "prune_freq", "random"):
        sub = [r for r in rows if r["method"] == method]
        x = [r["experts_kept"] for r in sub]
        style = dict(marker="o", ls="--" if method == "random" else "-", label=method)
        axes[0].plot(x, [r["loss_change"] for r in sub], **style)
        if method == "random":
            lo = [r["loss_change"] - r["loss_std"] for r in sub]
            hi = [r["loss_change"] + r["loss_std"] for r in sub]
            axes[0].fill_between(x, lo, hi, alpha=0.2, color=axes[0].lines[-1].get_color())
        axes[1].plot(x, [r["output_rel_error"] for r in sub], **style)
    axes[0].set(
        xlabel=f"experts kept (of {num_experts}) per layer",
        ylabel="eval loss change (nats/byte)",
        title="loss change vs experts kept",
    )
    axes[1].set(
        xlabel=f"experts kept (of {num_experts}) per layer",
        ylabel="relative L2 error of logits",
        title="output error vs experts kept",
    )
    for ax in axes:
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
