"""Train the example MoE language model on bytes of text:

    torchrun --standalone --nproc-per-node 2 -m moe_dist.lm.train --ep 2 --backend fsdp
    launch/torchrun_single_node.sh --ep 2 --backend deepspeed --zero-stage 2 --steps 200

By default it reads the Python standard library's sources (every machine has them); --data PATH for
yours. The global batch is the same at every world and EP size, each data-parallel rank takes its
rows, so loss curves are comparable across parallel layouts. On CPU the default model is tiny (about
a minute over two gloo processes); with GPUs it is larger, runs in bf16 and uses the fastest
transport.

--coe-iterations N (default 1) turns every MoE FFN into a Chain-of-Experts layer of N routed passes.
Prints a progress line per --log-every steps (loss, tokens/s, expert load, dropped tokens) and ends
with `final loss X (start Y) ...`. --json PATH writes the loss curve; --save DIR / --resume DIR
checkpoint."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer, ParallelGroups, init_distributed
from moe_dist.training.clip import clip_grad_norm_
from moe_dist.training.router_bias import RouterBiasUpdater
from .data import ByteCorpus, local_rows, rows_per_rank
from .model import ModelConfig, MoETransformer

SIZES = (
    {  # rows_per_rank: sequences per data-parallel rank (the global batch scales with the world)
        "tiny": (
            dict(
                d_model=64,
                layers=2,
                heads=4,
                experts=8,
                top_k=2,
                ffn=128,
                seq_len=64,
                rows_per_rank=8,
            )
        ),
        "small": (
            dict(
                d_model=512,
                layers=8,
                heads=8,
                experts=16,
                top_k=2,
                ffn=1024,
                seq_len=512,
                rows_per_rank=16,
            )
        ),
        "medium": (
            dict(
                d_model=1024,
                layers=16,
                heads=16,
                experts=64,
                top_k=6,
                ffn=704,
                seq_len=1024,
                rows_per_rank=8,
            )
        ),
    }
)


def preset(args, on_gpu: bool) -> dict:
    """The --size preset (tiny on CPU, small on GPU by default) with the explicit flags applied."""
    size = dict(SIZES[args.size or ("small" if on_gpu else "tiny")])
    for name in size:
        if getattr(args, name, None) is not None:
            size[name] = getattr(args, name)
    return size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moe_dist.lm.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--ep", type=int, default=1, help="expert-parallel size (divides the world size)"
    )
    p.add_argument(
        "--backend",
        choices=("fsdp", "deepspeed", "none"),
        default="fsdp",
        help="fsdp: FSDP2; deepspeed: DeepSpeed ZeRO; none: replicated data parallel",
    )
    p.add_argument("--zero-stage", type=int, default=1, help="DeepSpeed ZeRO stage (0, 1 or 2)")
    p.add_argument(
        "--steps",
        type=int,
        default=300,
        help="total optimizer steps (a resumed run continues to it)",
    )
    p.add_argument(
        "--data", default=None, help="text file or directory (default: the Python stdlib sources)"
    )
    p.add_argument(
        "--max-bytes", type=int, default=None, help="read at most this many bytes of text"
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="model preset (default: tiny on CPU, small on GPU); the flags below override it",
    )
    for flag in ("d-model", "layers", "heads", "experts", "top-k", "ffn", "seq-len"):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=(
            "global batch in sequences (default: the preset's per-rank batch times the world size)"
        ),
    )
    p.add_argument("--shared-experts", type=int, default=0)
    p.add_argument(
        "--router", default="softmax", choices=("softmax", "sigmoid", "group_limited", "top_p")
    )
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="drop tokens over capacity (default dropless)",
    )
    p.add_argument(
        "--coe-iterations",
        type=int,
        default=1,
        help=(
            "Chain-of-Experts: > 1 makes every MoE FFN route its tokens this many times through the"
            " same experts, each pass with its own router and a residual (expert compute per token"
            " = iterations x top-k: halve --top-k for equal compute)"
        ),
    )
    p.add_argument("--transport", default="auto")
    p.add_argument(
        "--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on GPU"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save", default=None, help="checkpoint directory, written at the end")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    p.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    p.add_argument("--json", default=None, help="write the loss curve and summary here (rank 0)")
    p.add_argument(
        "--telemetry-every",
        type=int,
        default=50,
        help=(
            "routing telemetry (moe_dist.extensions.telemetry): its local-routing-consistency scan"
            " runs on every N-th forward of a layer; a summary line ends the run (0: off)"
        ),
    )
    return p.parse_args(argv)


def model_configs(args, on_gpu: bool) -> tuple[ModelConfig, MoEConfig]:
    size = preset(args, on_gpu)
    model_cfg = ModelConfig(
        d_model=size["d_model"],
        n_layers=size["layers"],
        n_heads=size["heads"],
        max_seq_len=size["seq_len"],
        coe_iterations=args.coe_iterations,
    )
    moe_cfg = MoEConfig(
        hidden_size=size["d_model"],
        ffn_hidden_size=size["ffn"],
        num_experts=size["experts"],
        top_k=size["top_k"],
        num_shared_experts=args.shared_experts,
        router=args.router,
        num_expert_groups=2 if args.router == "group_limited" else 1,
        capacity_factor=args.capacity_factor,
        transport=args.transport,
        error_check="deferred",
    )  # no host sync inside a step; raised at each log line (train())
    return model_cfg, moe_cfg


# -- backends: one interface over FSDP2, DeepSpeed and plain data parallelism
# ---------------------------------
class ReplicatedBackend:
    """Every rank holds the whole non-expert model (identical: same seed); gradients averaged by
    ddp.allreduce_gradients. In bf16 the weights themselves are bf16 (no fp32 master copy: use fsdp
    or deepspeed for mixed precision)."""

    name = "none"

    def __init__(self, model, groups, args, dtype=None):
        if dtype is not None:
            model.to(dtype)
        self.model, self.groups, self.clip = model, groups, args.clip
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95)
        )
        # The sigmoid router's bias: updated before each optimizer step from the step's load.
        self.router_bias = RouterBiasUpdater(model, groups).attach(self.optimizer)

    def forward_backward(self, tokens, targets):
        out = self.model(tokens, targets)
        out.loss.backward()
        return out

    def reduce_gradients(self):
        from moe_dist.training.ddp import allreduce_gradients

        allreduce_gradients(self.model, self.groups)

    def step(self, lr: float) -> float | None:
        """Reduces gradients, clips, steps; returns the global gradient norm before clipping (None:
        no clip)."""
        self.reduce_gradients()
        norm = (
            clip_grad_norm_(self.model.parameters(), self.clip, self.groups)
            if self.clip > 0
            else None
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)

    def save(self, directory: Path, step: int, extra: dict) -> None:
        from moe_dist.training import checkpoint

        checkpoint.save(
            self.model, directory / f"step_{step}", optimizer=self.optimizer, extra=extra
        )
        if self.groups.rank == 0:
            (directory / "latest").write_text(f"step_{step}")

    def load(self, directory: Path) -> dict:
        from moe_dist.training import checkpoint

        return checkpoint.load(self.model, _latest(directory), optimizer=self.optimizer)


class FSDPBackend(ReplicatedBackend):
    """FSDP2: experts over the EDP mesh, the rest over the DP mesh (training/fsdp.py)."""

    name = "fsdp"

    def __init__(self, model, groups, args, param_dtype=None):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from moe_dist.training.fsdp import shard

        policy = (
            MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            if param_dtype
            else None
        )
        shard(model, groups, policy)
        super().__init__(model, groups, args)

    def reduce_gradients(self):
        pass  # FSDP reduce-scattered them during backward


class DeepSpeedBackend:
    """DeepSpeed ZeRO-0/1/2 through training/deepspeed.py; checkpoints are DeepSpeed's own."""

    name = "deepspeed"

    def __init__(self, model, groups, args, bf16: bool = False, micro_batch: int = 1):
        from moe_dist.training import deepspeed as moe_ds

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": args.zero_stage},
            "gradient_clipping": args.clip,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(
            moe_ds.moe_param_groups(model),
            lr=args.lr,
            weight_decay=args.weight_decay,
            betas=(0.9, 0.95),
        )
        self.engine, self.optimizer, _, _ = moe_ds.initialize(
            model, groups, config, optimizer=optimizer
        )
        self.model, self.groups = self.engine.module, groups

    def forward_backward(self, tokens, targets):
        out = self.engine(tokens, targets)
        self.engine.backward(out.loss)
        return out

    def step(self, lr: float) -> float | None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, directory: Path, step: int, extra: dict) -> None:
        self.engine.save_checkpoint(
            str(directory), tag=f"step_{step}", client_state={"moe_dist": extra}
        )

    def load(self, directory: Path) -> dict:
        # A run directory (DeepSpeed's `latest` names the tag) or one tag's directory.
        parent, tag = (
            (directory, None)
            if (directory / "latest").is_file()
            else (directory.parent, directory.name)
        )
        path, client = self.engine.load_checkpoint(str(parent), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint at {directory}")
        return client["moe_dist"]


def _latest(directory: Path) -> Path:
    """A run directory (with a `latest` file naming the newest step_N) or a checkpoint directory
    itself."""
    latest = directory / "latest"
    return directory / latest.read_text().strip() if latest.is_file() else directory


def make_backend(name: str, model, groups, args, *, device: torch.device, micro_batch: int):
    low_precision = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    if name == "fsdp":
        return FSDPBackend(
            model, groups, args, param_dtype=torch.bfloat16 if low_precision else None
        )
    if name == "deepspeed":
        return DeepSpeedBackend(model, groups, args, bf16=low_precision, micro_batch=micro_batch)
    return ReplicatedBackend(model, groups, args, dtype=torch.bfloat16 if low_precision else None)


# -- telemetry
# -------------------------------------------------------------------------------------------------
class ExpertTelemetry:
    """Routed slots per expert (summed over layers and ranks) and slots dropped by capacity, per
    interval. Counts stay on the device until `collect` (one all-reduce per log line, no per-step
    sync)."""

    def __init__(self, model, groups, num_experts: int, device):
        self.groups = groups
        self.load = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.dropped = torch.zeros((), dtype=torch.int64, device=device)
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
            layer.add_observer(self._observe)

    def _observe(self, layer, x_TH, plan, counts_G, y_MH) -> None:
        self.dropped += plan.dropped_tokens.to(self.dropped.device)

    def record(self, tokens_per_expert: list[torch.Tensor]) -> None:
        for counts in tokens_per_expert:
            self.load += counts.to(self.load.device)

    def collect(self) -> tuple[torch.Tensor, int]:
        both = torch.cat([self.load, self.dropped.view(1)])
        dist.all_reduce(both, group=self.groups.dp_group)
        self.load.zero_()
        self.dropped.zero_()
        return both[:-1].cpu(), int(both[-1])


def progress_line(
    step: int, total: int, loss: float, tok_s: float, load: torch.Tensor, dropped: int
) -> str:
    width = 20
    done = int(width * step / total)
    share = load.float() / max(int(load.sum()), 1)
    imbalance = float(share.max() * share.numel()) if share.numel() else 0.0
    return (
        f"[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.4f} | "
        f"{tok_s:,.0f} tok/s | expert load % {' '.join(f'{100 * s:.0f}' for s in share.tolist())} "
        f"(max/mean {imbalance:.2f}) | dropped {dropped}"
    )


# -- the loop
# ------------------------------------------------------------------------------------------------
def shutdown() -> None:
    dist.barrier()  # no rank tears the process group down while a peer is still inside it
    dist.destroy_process_group()


def learning_rate(step: int, args) -> float:
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    groups = ParallelGroups(ep_size=args.ep)
    model_cfg, moe_cfg = model_configs(args, device.type == "cuda")
    batch_size = args.batch_size or preset(args, device.type == "cuda")["rows_per_rank"] * world
    local_batch = rows_per_rank(batch_size, world)
    corpus = ByteCorpus.from_path(args.data, args.max_bytes)

    torch.manual_seed(args.seed)  # same seed everywhere: EP-invariant initialisation
    model = MoETransformer(model_cfg, moe_cfg, groups, device=device)
    backend = make_backend(
        args.backend, model, groups, args, device=device, micro_batch=local_batch
    )
    telemetry = ExpertTelemetry(backend.model, groups, moe_cfg.num_experts, device)
    routing = None
    if args.telemetry_every > 0:
        from moe_dist.extensions.telemetry import RoutingTelemetry

        routing = RoutingTelemetry(
            backend.model, seq_len=model_cfg.max_seq_len, lrc_every=args.telemetry_every
        )
    say = print if rank == 0 else (lambda *a, **k: None)
    n_params = sum(p.numel() for p in model.parameters())
    moe_kind = (
        f"Chain-of-Experts FFNs ({model_cfg.coe_iterations} iterations x top-{moe_cfg.top_k})"
        if model_cfg.coe_iterations > 1
        else f"MoE FFNs (top-{moe_cfg.top_k})"
    )
    say(
        f"moe_dist.lm.train: backend {args.backend}, world {world}, ep {args.ep}, device"
        f" {device.type}, {n_params:,} parameters on rank 0, {moe_cfg.num_experts} experts,"
        f" {moe_kind}, {len(corpus):,} bytes of text, global batch {batch_size} x"
        f" {model_cfg.max_seq_len}",
        flush=True,
    )

    start_step = 0
    if args.resume:
        start_step = int(backend.load(Path(args.resume))["step"])
        say(f"resumed from {args.resume} at step {start_step}", flush=True)
        if start_step >= args.steps:
            say(f"nothing to do: the checkpoint is at step {start_step}, --steps is {args.steps}")
            shutdown()
            return 0
    save_dir = Path(args.save) if args.save else None
    if save_dir is not None and rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)

    losses: list[float] = []
    pending: list[torch.Tensor] = []
    tokens_per_step = batch_size * model_cfg.max_seq_len
    interval_start, interval_steps, timed = time.perf_counter(), 0, []
    for step in range(start_step, args.steps):
        batch = local_rows(
            corpus.global_batch(step, batch_size, model_cfg.max_seq_len, args.seed), rank, world
        )
        batch = batch.to(device)
        out = backend.forward_backward(batch[:, :-1], batch[:, 1:])
        backend.step(learning_rate(step, args))
        telemetry.record(out.tokens_per_expert)
        pending.append(out.loss.detach().float())
        interval_steps += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            for (
                layer
            ) in (
                model.moe_layers()
            ):  # errors recorded on the device (NaN logits, overflow, silent peer)
                layer.check_errors()  # raise here, naming the layer and the step they happened at
            step_losses = torch.stack(pending)
            dist.all_reduce(step_losses, group=groups.dp_group)
            losses.extend((step_losses / world).tolist())
            pending = []
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - interval_start
            tok_s = interval_steps * tokens_per_step / elapsed
            if step + 1 > args.log_every or start_step > 0:  # the first interval includes warm-up
                timed.append(tok_s)
            load, dropped = telemetry.collect()
            interval_loss = sum(losses[-interval_steps:]) / interval_steps
            say(
                progress_line(step + 1, args.steps, interval_loss, tok_s, load, dropped), flush=True
            )
            interval_start, interval_steps = time.perf_counter(), 0
        if (
            save_dir is not None
            and args.save_every
            and (step + 1) % args.save_every == 0
            and step + 1 < args.steps
        ):
            backend.save(save_dir, step + 1, {"step": step + 1})
    if save_dir is not None:
        backend.save(save_dir, args.steps, {"step": args.steps})
        say(f"saved checkpoint to {save_dir}", flush=True)

    tok_s = sum(timed) / len(timed) if timed else tok_s
    routing_summary = routing.reduce(groups.dp_group).summary() if routing is not None else None
    if routing_summary is not None:
        say(routing_summary, flush=True)
    final = sum(losses[-10:]) / len(
        losses[-10:]
    )  # one step's loss is noisy: the mean of the last ten
    summary = {
        "first_loss": losses[0],
        "final_loss": final,
        "steps": args.steps,
        "start_step": start_step,
        "tokens_per_s": tok_s,
        "world": world,
        "ep": args.ep,
        "backend": args.backend,
        "coe_iterations": model_cfg.coe_iterations,
        "moe_layer": type(model.moe_layers()[0]).__name__,
        "parameters": n_params,
        "routing": routing_summary,
    }
    if rank == 0 and args.json:
        Path(args.json).write_text(
            json.dumps({**summary, "losses": losses, "args": vars(args)}, indent=1)
        )
    say(
        f"final loss {final:.4f} (start {losses[0]:.4f}; final = mean of the last"
        f" {len(losses[-10:])} steps) after {args.steps} steps, {tok_s:,.0f} tokens/s",
        flush=True,
    )
    shutdown()
    return 0 if math.isfinite(final) else 1


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalization: with torch 2.13 over gloo, a worker thread that drops
    # the last collective's tensors while Python finalizes aborts the process ("terminate called
    # without an active exception", ~AsyncBarrierWork taking the GIL) in a few percent of runs.
    # Output is flushed, the process group destroyed; nothing is left to finalize.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
