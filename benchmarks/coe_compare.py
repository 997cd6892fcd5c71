"""Standard MoE vs Chain-of-Experts (2 iterations) at equal compute, on the example byte-level
model.

Equal compute: both variants evaluate the same number of expert FFNs per token per layer —
MoE with top_k = 2k, CoE with 2 iterations of top_k = k over the same experts (the paper's
compute-matched comparison; CoE adds only one extra router, E x H weights). A third run, MoE with
top_k = k (half the expert compute), shows where CoE sits between the two.

    python -m benchmarks.coe_compare --out benchmarks/results        # CPU, a couple of minutes
    python -m benchmarks.coe_compare --smoke                          # seconds (CI)

The model is moe_dist.lm.MoETransformer (the example model that `python -m moe_dist.lm.train`
trains) with ModelConfig.coe_iterations set as the trainer's --coe-iterations sets it (its FFNs: a
MoELayer, or a ChainOfExperts for iterations > 1); the text is the Python standard library's own
source (moe_dist.lm.data.ByteCorpus), so nothing is downloaded. Every variant starts from the same
seed and sees the same batches. Writes coe_compare.json (loss curves, timing, environment) and
coe_compare.png under --out. Step times on a shared CPU are indicative only. """

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from benchmarks.common import save_results
from moe_dist import MoEConfig
from moe_dist.lm.data import ByteCorpus
from moe_dist.lm import ModelConfig, MoETransformer

FULL = dict(
    d_model=64,
    n_layers=2,
    n_heads=4,
    seq=128,
    batch=16,
    experts=16,
    expert_ffn=64,
    k=2,
    steps=200,
    eval_every=20,
    eval_batches=8,
    lr=3e-3,
    data_bytes=3_000_000,
)
SMOKE = dict(
    d_model=32,
    n_layers=1,
    n_heads=2,
    seq=32,
    batch=4,
    experts=4,
    expert_ffn=16,
    k=1,
    steps=6,
    eval_every=3,
    eval_batches=2,
    lr=3e-3,
    data_bytes=200_000,
)


class BytesSlice(ByteCorpus):
    """A contiguous part of a corpus, with ByteCorpus's batching."""

    def __init__(self, data: torch.Tensor):
        self.data, self.num_files = data, 0


# -- training, all variants in lockstep
# ---------------------------------------------------------------------
class Variant:
    """One model + optimizer. Variants step in turn on the same batch, so a busy shared CPU slows
    them alike and their step times stay comparable."""

    def __init__(self, name: str, c: dict, top_k: int, iterations: int, seed: int):
        self.name, self.top_k, self.iterations = name, top_k, iterations
        moe_cfg = MoEConfig(
            hidden_size=c["d_model"],
            ffn_hidden_size=c["expert_ffn"],
            num_experts=c["experts"],
            top_k=top_k,
            router="softmax",
            norm_topk_prob=True,
            aux_loss_coef=1e-2,
        )
        # coe_iterations is what the trainer's --coe-iterations sets: the model builds its FFNs
        # itself.
        model_cfg = ModelConfig(
            d_model=c["d_model"],
            n_layers=c["n_layers"],
            n_heads=c["n_heads"],
            max_seq_len=c["seq"],
            coe_iterations=iterations,
        )
        torch.manual_seed(seed)  # the same seed for every variant
        self.model = MoETransformer(model_cfg, moe_cfg)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=c["lr"], weight_decay=0.0, betas=(0.9, 0.95)
        )
        warmup, steps = max(1, c["steps"] // 20), c["steps"]
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))),
        )
        self.train_loss, self.val_loss, self.step_s = [], [], []

    def step(self, batch: torch.Tensor) -> None:
        t0 = time.perf_counter()
        out = self.model(batch[:, :-1], batch[:, 1:])
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()  # cross-entropy + the MoE layers' aux losses
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.step_s.append(time.perf_counter() - t0)
        self.train_loss.append(out.ce_loss.item())

    def evaluate(self, step: int, val_set: list[torch.Tensor]) -> None:
        self.model.eval()
        with torch.no_grad():
            losses = [self.model(b[:, :-1], b[:, 1:]).ce_loss.item() for b in val_set]
        self.model.train()
        self.val_loss.append([step, sum(losses) / len(losses)])

    def summary(self, tokens_per_step: int) -> dict:
        steady = sorted(self.step_s[len(self.step_s) // 10 :])  # drop warm-up steps
        return {
            "top_k": self.top_k,
            "iterations": self.iterations,
            "expert_ffns_per_token_per_layer": self.top_k * self.iterations,
            "params": sum(p.numel() for p in self.model.parameters()),
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "final_val_loss": self.val_loss[-1][1],
            "median_step_ms": 1e3 * steady[len(steady) // 2],
            "tokens_per_s": tokens_per_step * len(self.step_s) / sum(self.step_s),
        }


def train_all(c: dict, variants: dict, train: ByteCorpus, val: ByteCorpus, seed: int) -> dict:
    runs = [Variant(name, c, top_k, its, seed) for name, (top_k, its) in variants.items()]
    val_set = [val.global_batch(i, c["batch"], c["seq"], seed=2) for i in range(c["eval_batches"])]
    for r in runs:
        r.evaluate(0, val_set)
    for step in range(1, c["steps"] + 1):
        batch = train.global_batch(
            step, c["batch"], c["seq"], seed=1
        )  # the same batches for every variant
        for r in runs:
            r.step(batch)
        if step % c["eval_every"] == 0 or step == c["steps"]:
            for r in runs:
                r.evaluate(step, val_set)
            print(
                f"  step {step:4d}  "
                + "  ".join(
                    f"{r.name} {r.train_loss[-1]:.3f}/{r.val_loss[-1][1]:.3f}" for r in runs
                )
                + "   (train/val)",
                flush=True,
            )
    return {r.name: r.summary(c["batch"] * c["seq"]) for r in runs}


def mean_curves(per_seed: list[dict]) -> dict:
    """Per variant: train and val curves averaged over seeds, final val loss of each seed, and
    timing."""
    out = {}
    for name in per_seed[0]:
        runs = [r[name] for r in per_seed]
        finals = [r["final_val_loss"] for r in runs]
        out[name] = {
            k: runs[0][k]
            for k in ("top_k", "iterations", "expert_ffns_per_token_per_layer", "params")
        }
        out[name].update(
            train_loss=torch.tensor([r["train_loss"] for r in runs]).mean(0).tolist(),
            val_loss=[
                [step, sum(r["val_loss"][i][1] for r in runs) / len(runs)]
                for i, (step, _) in enumerate(runs[0]["val_loss"])
            ],
            final_val_loss=sum(finals) / len(finals),
            final_val_loss_per_seed=finals,
            median_step_ms=sorted(r["median_step_ms"] for r in runs)[len(runs) // 2],
            tokens_per_s=sum(r["tokens_per_s"] for r in runs) / len(runs),
        )
    return out


def plot(results: dict, path: Path, title: str) -> None:
    """Training loss (smoothed), validation loss, and validation loss minus the first variant's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val, ax_diff) = plt.subplots(1, 3, figsize=(15, 4))
    base_name = next(iter(results))
    base_vals = [v for _, v in results[base_name]["val_loss"]]
    for name, r in results.items():
        label = f"{name} (top-{r['top_k']} x {r['iterations']} it.)"
        loss = torch.tensor(r["train_loss"])
        w = max(1, len(loss) // 20)  # moving average over 5% of the run
        smooth = (
            torch.nn.functional.avg_pool1d(loss.view(1, 1, -1), w, stride=1).flatten()
            if w > 1
            else loss
        )
        skip = len(loss) // 10  # the first steps fall from 5.5 and would squash the rest
        ax_train.plot(range(w + skip, len(loss) + 1), smooth[skip:].tolist(), label=label)
        steps, vals = zip(*r["val_loss"][1:])
        ax_val.plot(steps, vals, marker="o", markersize=3, label=label)
        ax_diff.plot(
            steps,
            [v - b for v, b in zip(vals, base_vals[1:])],
            marker="o",
            markersize=3,
            label=label,
        )
    ax_train.set(
        xlabel="step", ylabel="nats/byte", title=f"train loss (moving average of {w} steps)"
    )
    ax_val.set(xlabel="step", ylabel="nats/byte", title="validation loss")
    ax_diff.set(xlabel="step", ylabel="nats/byte", title=f"validation loss minus {base_name}'s")
    ax_diff.axhline(0.0, color="grey", linewidth=0.8)
    for ax in (ax_train, ax_val, ax_diff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="directory for coe_compare.json and coe_compare.png"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (seconds)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="model seeds (default: 0 1 2; smoke: 0)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 is steadier on a busy shared CPU)",
    )
    args = parser.parse_args(argv)
    c = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        c["steps"] = args.steps
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus = ByteCorpus.from_path(None, max_bytes=c["data_bytes"])
    split = int(0.9 * len(corpus))
    train, val = BytesSlice(corpus.data[:split]), BytesSlice(
        corpus.data[split:]
    )  # held-out last 10%
    k = c["k"]
    variants = {  # name -> (top_k, iterations)
        f"moe_top{2 * k}": (2 * k, 1),
        f"coe2_top{k}": (k, 2),
        f"moe_top{k}": (k, 1),
    }
    print(
        f"byte LM on {len(corpus) / 1e6:.1f} MB of stdlib source; seeds {seeds}; config {c}",
        flush=True,
    )
    per_seed = []
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        per_seed.append(train_all(c, variants, train, val, seed))
    results = mean_curves(per_seed)
    print(
        f"\nvariant        expert FFNs/token/layer  params   final val loss (mean of {len(seeds)}"
        " seeds: each)   median step ms"
    )
    for name, r in results.items():
        each = " ".join(f"{v:.4f}" for v in r["final_val_loss_per_seed"])
        print(
            f"{name:14s} {r['expert_ffns_per_token_per_layer']:>10d}  {r['params']:>14,d}  "
            f"{r['final_val_loss']:>8.4f}: {each}  {r['median_step_ms']:>10.1f}"
        )
    if args.out:
        out = Path(args.out)
        payload = {
            "benchmark": "coe_compare",
            "smoke": args.smoke,
            "config": c,
            "seeds": seeds,
            "threads": torch.get_num_threads(),
            "note": (
                "train/val curves are means over seeds; per_seed holds every run. Step times were "
                "taken on a shared CPU with the variants interleaved step by step."
            ),
            "runs": results,
            "per_seed": dict(zip(map(str, seeds), per_seed)),
        }
        path = save_results("coe_compare_smoke" if args.smoke else "coe_compare", payload, out)
        png = path.with_suffix(".png")
        plot(
            results,
            png,
            f"Byte-level LM, {c['experts']} experts, mean of {len(seeds)} seeds: "
            "MoE vs Chain-of-Experts at equal compute",
        )
        print(f"wrote {path} and {png}")
    return results


if __name__ == "__main__":
    main()
