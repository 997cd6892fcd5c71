"""Train the example MoE language model on bytes of text:

    torchrun --standalone --nproc-per-node 2 -m moe_dist.lm.train
    launch/torchrun_single_node.sh --backend deepspeed --zero-stage 2 --steps 200

Flags and their checks live in cli.py (`--help` lists them), the log line, JSONL and TensorBoard in
metrics.py, the data in data.py; this file holds the backends and the loop. By default the experts
are sharded over every process (EP = world size). The run ends with `final loss X (start Y) ...`;
--json PATH writes the loss curve, --save DIR / --resume DIR checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_dist import MoELayer, ParallelGroups, exit_distributed, init_distributed

from .cli import SIZES, TRAINER_FILE, model_configs, parse_args, preset  # noqa: F401 (re-exported)
from moe_dist.training.router_bias import RouterBiasUpdater
from .data import ByteCorpus, local_rows, rows_per_rank
from .metrics import (
    TELEMETRY_LEGEND,
    MetricsSink,
    flops_per_token,
    peak_flops,
    peak_memory_gib,
)
from .model import MoETransformer

VAL_FRACTION = 0.01  # of the corpus's bytes, held out (its end) for the validation loss
VAL_SEED = 12345  # the validation batches are the same at every evaluation


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
        from moe_dist.training.clip import clip_grad_norm_  # torch.distributed.tensor: slow import

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
            record_backend(directory / f"step_{step}", self.name, extra)
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
        if self.groups.rank == 0:
            record_backend(directory / f"step_{step}", self.name, extra)

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


def record_backend(step_dir: Path, backend: str, extra: dict) -> None:
    """Which backend wrote a checkpoint: --resume reads it before building anything (cli.py)."""
    (step_dir / TRAINER_FILE).write_text(json.dumps({"backend": backend, **extra}))


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


def load_imbalance(load: torch.Tensor) -> float:
    """Slots of the busiest expert over the mean (1.0 = balanced; 0.0 when nothing was routed)."""
    total = int(load.sum())
    return float(load.max()) * load.numel() / total if total else 0.0


# -- the loop
# ------------------------------------------------------------------------------------------------
def shutdown() -> None:
    dist.barrier()  # no rank tears the process group down while a peer is still inside it
    dist.destroy_process_group()


def learning_rate(step: int, args) -> float:
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1))


@contextlib.contextmanager
def observers_paused(model):
    """Telemetry observers see training forwards only, not the validation's."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    saved = [layer._observers for layer in layers]
    for layer in layers:
        layer._observers = []
    try:
        yield
    finally:
        for layer, observers in zip(layers, saved):
            layer._observers = observers


@torch.no_grad()
def validation_loss(model, corpus, batch_size, seq_len, n_batches, groups, device) -> float:
    """Mean next-byte cross-entropy (nats/byte) over `n_batches` fixed global batches of held-out
    bytes, averaged over the data-parallel ranks. Eval mode: no router-bias update."""
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    try:
        with observers_paused(model):
            for i in range(n_batches):
                batch = local_rows(
                    corpus.global_batch(i, batch_size, seq_len, VAL_SEED),
                    groups.rank,
                    groups.world_size,
                )
                batch = batch.to(device)
                total += model(batch[:, :-1], batch[:, 1:]).ce_loss.float()
    finally:
        model.train()
    dist.all_reduce(total, group=groups.dp_group)
    return float(total) / (n_batches * groups.world_size)


def main(argv=None) -> int:
    args = parse_args(argv)  # every flag checked before any process group exists (cli.py)
    if args.check_args:
        return 0
    rank, world, device = init_distributed()
    groups = ParallelGroups(ep_size=args.ep)
    on_gpu = device.type == "cuda"
    model_cfg, moe_cfg = model_configs(args, on_gpu)
    seq_len = model_cfg.max_seq_len
    batch_size = args.batch_size or preset(args, on_gpu)["rows_per_rank"] * world
    local_batch = rows_per_rank(batch_size, world)
    corpus, val_corpus = ByteCorpus.from_path(args.data, args.max_bytes).split_validation(
        VAL_FRACTION, seq_len + 2
    )

    torch.manual_seed(args.seed)  # same seed everywhere: EP-invariant initialisation
    model = MoETransformer(model_cfg, moe_cfg, groups, device=device)
    backend = make_backend(
        args.backend, model, groups, args, device=device, micro_batch=local_batch
    )
    telemetry = ExpertTelemetry(backend.model, groups, moe_cfg.num_experts, device)
    routing = None
    if args.telemetry_every > 0:
        from moe_dist.extensions.telemetry import RoutingTelemetry

        routing = RoutingTelemetry(backend.model, seq_len=seq_len, lrc_every=args.telemetry_every)
    n_params = sum(p.numel() for p in model.parameters())
    E = moe_cfg.num_experts
    moe_kind = (
        f"Chain-of-Experts FFNs ({model_cfg.coe_iterations} iterations x top-{moe_cfg.top_k})"
        if model_cfg.coe_iterations > 1
        else f"MoE FFNs (top-{moe_cfg.top_k})"
    )
    if rank == 0:
        print(
            f"moe_dist.lm.train: {world} processes on {device.type}, expert parallelism EP"
            f" {args.ep} (each rank holds {E // args.ep} of the {E} experts of every layer),"
            f" backend {args.backend}, {model_cfg.n_layers} layers of {moe_kind}"
            f"{', two micro-batches overlapped' if model_cfg.overlap_microbatches > 1 else ''},"
            f" {n_params:,} parameters on rank 0, {len(corpus):,} bytes of text"
            f" (+{len(val_corpus):,} held out), global batch {batch_size} x {seq_len} bytes",
            flush=True,
        )
        print(
            "log columns: loss and val = next-byte cross-entropy in nats/byte (ln 256 = 5.55 at"
            " random), gnorm = gradient norm before clipping, load = busiest expert / mean,"
            " elapsed<ETA (python -m moe_dist.lm.train --help explains every column)",
            flush=True,
        )

    start_step = 0
    if args.resume:
        start_step = int(backend.load(Path(args.resume))["step"])
        if rank == 0:
            print(f"resumed from {args.resume} at step {start_step}", flush=True)
        if start_step >= args.steps:
            if rank == 0:
                print(
                    f"nothing to do: the checkpoint is at step {start_step},"
                    f" --steps is {args.steps}"
                )
            shutdown()
            return 0
    save_dir = Path(args.save) if args.save else None
    if save_dir is not None and rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)

    sink = MetricsSink(
        active=rank == 0,
        total_steps=args.steps,
        start_step=start_step,
        progress=args.progress,
        jsonl=args.metrics_jsonl,
        tensorboard=args.tensorboard,
    )
    low_precision = args.dtype == "bf16" or (args.dtype == "auto" and on_gpu)
    peak = peak_flops(device) if low_precision else None
    step_flops = flops_per_token(model_cfg, moe_cfg) * batch_size * seq_len
    losses: list[float] = []
    val_losses: list[tuple[int, float]] = []
    pending: list[torch.Tensor] = []
    grad_norm = None
    tokens_per_step = batch_size * seq_len
    run_start = time.perf_counter()
    interval_start, interval_steps, timed = run_start, 0, []
    tok_s = 0.0
    for step in range(start_step, args.steps):
        batch = local_rows(corpus.global_batch(step, batch_size, seq_len, args.seed), rank, world)
        batch = batch.to(device)
        out = backend.forward_backward(batch[:, :-1], batch[:, 1:])
        lr = learning_rate(step, args)
        grad_norm = backend.step(lr)  # a device tensor or a float; read at the log line
        telemetry.record(out.tokens_per_expert)
        pending.append(out.ce_loss.detach().float())
        interval_steps += 1
        sink.advance()
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last:
            for layer in model.moe_layers():
                # Errors recorded on the device (NaN logits, overflow, silent peer) raise here,
                # naming the layer and the step they happened at.
                layer.check_errors()
            step_losses = torch.stack(pending)
            dist.all_reduce(step_losses, group=groups.dp_group)
            losses.extend((step_losses / world).tolist())
            pending = []
            if on_gpu:
                torch.cuda.synchronize()
            now = time.perf_counter()
            tok_s = interval_steps * tokens_per_step / (now - interval_start)
            if step + 1 > args.log_every or start_step > 0:  # the first interval includes warm-up
                timed.append(tok_s)
            load, dropped = telemetry.collect()
            val = None
            if last or (args.val_every and (step + 1) % args.val_every == 0):
                val = validation_loss(
                    backend.model, val_corpus, batch_size, seq_len, args.val_batches, groups, device
                )
                val_losses.append((step + 1, val))
            elapsed = time.perf_counter() - run_start
            done = step + 1 - start_step
            sink.log(
                {
                    "step": step + 1,
                    "total_steps": args.steps,
                    "loss": sum(losses[-interval_steps:]) / interval_steps,
                    "val_loss": val,
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "tokens_per_s": tok_s,
                    "mfu": (
                        None
                        if peak is None
                        else tok_s / tokens_per_step * step_flops / (peak * world)
                    ),
                    "mem_gib": peak_memory_gib(device)[0],
                    "load_imbalance": load_imbalance(load),
                    "dropped": dropped,
                    "elapsed_s": elapsed,
                    "eta_s": elapsed / done * (args.steps - step - 1),
                }
            )
            interval_start, interval_steps = time.perf_counter(), 0
        if (
            save_dir is not None
            and args.save_every
            and (step + 1) % args.save_every == 0
            and step + 1 < args.steps
        ):
            backend.save(save_dir, step + 1, {"step": step + 1})
    sink.close()
    say = sink.say
    if save_dir is not None:
        backend.save(save_dir, args.steps, {"step": args.steps})
        say(f"saved checkpoint to {save_dir}")

    tok_s = sum(timed) / len(timed) if timed else tok_s
    routing_summary = routing.reduce(groups.dp_group).summary() if routing is not None else None
    if routing_summary is not None:
        say(TELEMETRY_LEGEND)
        say(routing_summary)
    tail = losses[-10:]  # one step's loss is noisy: the mean of the last ten
    final = sum(tail) / len(tail)
    summary = {
        "first_loss": losses[0],
        "final_loss": final,
        "final_val_loss": val_losses[-1][1],
        "loss_unit": "nats/byte",
        "steps": args.steps,
        "start_step": start_step,
        "tokens_per_s": tok_s,
        "world": world,
        "ep": args.ep,
        "backend": args.backend,
        "coe_iterations": model_cfg.coe_iterations,
        "overlap_microbatches": model_cfg.overlap_microbatches,
        "moe_layer": type(model.moe_layers()[0]).__name__,
        "parameters": n_params,
        "routing": routing_summary,
    }
    if rank == 0 and args.json:
        Path(args.json).write_text(
            json.dumps(
                {**summary, "losses": losses, "val_losses": val_losses, "args": vars(args)},
                indent=1,
            )
        )
    say(
        f"final loss {final:.4f} (start {losses[0]:.4f}; final = mean of the last {len(tail)}"
        f" steps; nats/byte), validation loss {val_losses[-1][1]:.4f}, after {args.steps} steps,"
        f" {tok_s:,.0f} tokens/s"
    )
    shutdown()
    return 0 if math.isfinite(final) else 1


if __name__ == "__main__":
    exit_distributed(main())  # without interpreter finalisation, where gloo may abort
