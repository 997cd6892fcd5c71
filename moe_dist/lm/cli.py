"""The trainer's command line: flags, size presets, and every check that can run before a process
group or a model exists. A bad flag ends the run with one line naming it and exit status 2 (one
line per node under torchrun: only local rank 0 prints), never a traceback from every rank."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from moe_dist import MoEConfig
from moe_dist.config import ROUTERS, TRANSPORTS

from .model import ModelConfig, check_microbatch_overlap

PROG = "python -m moe_dist.lm.train"
TENSORBOARD_PIN = "tensorboard==2.21.0"
SILENT_RANK_EXIT_DELAY_S = 10.0  # bounds the wait of a rank that fails without printing

# rows_per_rank: sequences per data-parallel rank (the global batch scales with the world).
SIZES = {
    "tiny": dict(
        d_model=64, layers=2, heads=4, experts=8, top_k=2, ffn=128, seq_len=64, rows_per_rank=8
    ),
    "small": dict(
        d_model=512, layers=8, heads=8, experts=16, top_k=2, ffn=1024, seq_len=512, rows_per_rank=16
    ),
    "medium": dict(
        d_model=1024,
        layers=16,
        heads=16,
        experts=64,
        top_k=6,
        ffn=704,
        seq_len=1024,
        rows_per_rank=8,
    ),
}
# The flags that override a preset's entries (flag -> SIZES key).
SIZE_FLAGS = {
    "d-model": ("d_model", "model width"),
    "layers": ("layers", "transformer blocks"),
    "heads": ("heads", "attention heads, a divisor of --d-model"),
    "experts": ("experts", "routed experts per MoE layer, a multiple of --ep"),
    "top-k": ("top_k", "experts each token is routed to"),
    "ffn": ("ffn", "hidden width of each expert"),
    "seq-len": ("seq_len", "tokens (bytes) per training sequence"),
}

DESCRIPTION = """\
Train the example MoE language model (moe_dist.lm) on bytes of text, with its experts sharded over
the processes (expert parallelism; by default EP = the number of processes, so every rank holds
1/EP of each layer's experts). Launch it with torchrun, e.g.

  torchrun --standalone --nproc-per-node 2 -m moe_dist.lm.train
  launch/torchrun_single_node.sh --backend deepspeed --zero-stage 2 --steps 200

Data: the Python standard library's sources by default (every machine has them), --data PATH for
yours; the last 1% of the bytes are held out for the validation loss. The global batch is the same
at every world and EP size, so loss curves compare across parallel layouts."""


def _presets_text() -> str:
    lines = ["size presets (--size; the flags in 'model' override single entries):"]
    for name, s in SIZES.items():
        lines.append(
            f"  {name:<7} d_model {s['d_model']}, {s['layers']} layers, {s['heads']} heads,"
            f" {s['experts']} experts top-{s['top_k']} x ffn {s['ffn']}, seq {s['seq_len']},"
            f" {s['rows_per_rank']} rows/rank"
        )
    lines.append("  default: tiny on CPU (about a minute over 2 gloo processes), small on GPU")
    return "\n".join(lines)


EPILOG = (
    _presets_text()
    + """

log line (every --log-every steps, rank 0): step, loss = next-byte cross-entropy in nats per byte
(ln 256 = 5.55 at random; the MoE aux loss is trained but not included), lr, gnorm = global
gradient norm before clipping, tok/s, MFU (GPU only: model FLOPs / the GPU's bf16 dense peak),
mem (peak CUDA memory on GPU, peak process RSS on CPU), load = routed-slot share of the busiest
expert over the mean (1.00 = balanced), dropped slots, elapsed and ETA. --metrics-jsonl streams
the same fields; --tensorboard writes them as scalars."""
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default once: only where the help text does not already mention it, and not
    for None/False (nothing to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" not in text
            and action.default is not None
            and action.default is not False
            and action.default is not argparse.SUPPRESS
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


class TrainerArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and only local rank 0 prints it: under
    torchrun every rank parses the same flags and fails the same way."""

    def error(self, message: str):
        local_rank = os.environ.get("LOCAL_RANK") or os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
        if local_rank in (None, "0"):
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        else:
            # The launcher kills the others as soon as one rank exits: a silent rank that exited
            # first would take local rank 0 down before it printed. Rank 0's exit ends the wait.
            time.sleep(SILENT_RANK_EXIT_DELAY_S)
        sys.exit(2)


def launcher_world_size() -> int:
    """The number of processes the launcher started (torchrun or mpirun), read before any process
    group exists; 1 when run bare."""
    value = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    try:
        return int(value)
    except ValueError:
        return 1


def build_parser() -> TrainerArgumentParser:
    p = TrainerArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    par = p.add_argument_group("parallelism")
    par.add_argument(
        "--ep",
        type=int,
        default=None,
        help="expert-parallel size: must divide the number of processes (default: all of them)",
    )
    par.add_argument(
        "--backend",
        choices=("fsdp", "deepspeed", "none"),
        default="fsdp",
        help="fsdp: FSDP2; deepspeed: DeepSpeed ZeRO (--zero-stage); none: replicated data"
        " parallel",
    )
    par.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2), default=1, help="DeepSpeed ZeRO stage"
    )
    par.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="auto",
        help="how tokens travel to their experts; auto: local at EP=1, nvshmem on one GPU node,"
        " else collective (all_to_all_single)",
    )
    par.add_argument(
        "--overlap-microbatches",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: split each rank's batch in two micro-batches and interleave them in every block,"
        " so one's tokens travel while the other computes (attention, experts); losses and"
        " gradients equal 1's up to rounding. Needs MoE FFNs (not --coe-iterations > 1), dropless"
        " routing (no --capacity-factor) and at least 2 sequences per rank",
    )
    par.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 mixed precision on GPU, fp32 on CPU",
    )

    run = p.add_argument_group("run")
    run.add_argument(
        "--steps",
        type=int,
        default=300,
        help="total optimizer steps (a resumed run continues to it)",
    )
    run.add_argument(
        "--data", default=None, help="text file or directory (default: the Python stdlib sources)"
    )
    run.add_argument(
        "--max-bytes", type=int, default=None, help="read at most this many bytes of text"
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch in sequences (default: the preset's per-rank batch times the processes)",
    )
    run.add_argument("--seed", type=int, default=0, help="model initialisation and data order")

    model = p.add_argument_group("model")
    model.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="model preset (listed below; default: tiny on CPU, small on GPU)",
    )
    for flag, (_, what) in SIZE_FLAGS.items():
        model.add_argument(f"--{flag}", type=int, default=None, help=f"{what} (default: preset)")
    model.add_argument(
        "--shared-experts", type=int, default=0, help="always-on shared experts per MoE layer"
    )
    model.add_argument("--router", default="softmax", choices=ROUTERS, help="routing function")
    model.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="drop slots over capacity x (slots / experts) per expert (default: dropless)",
    )
    model.add_argument(
        "--coe-iterations",
        type=int,
        default=1,
        help="Chain-of-Experts: > 1 makes every MoE FFN route its tokens this many times through"
        " the same experts, each pass with its own router and a residual (expert compute per token"
        " = iterations x top-k: halve --top-k for equal compute)",
    )

    opt = p.add_argument_group("optimizer (AdamW, betas 0.9/0.95)")
    opt.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    opt.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    opt.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")

    log = p.add_argument_group("logging and checkpoints")
    log.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    log.add_argument(
        "--val-every",
        type=int,
        default=100,
        help="steps between validation losses on held-out bytes, a multiple of --log-every; the"
        " last step always validates (0: never)",
    )
    log.add_argument(
        "--val-batches", type=int, default=2, help="global batches per validation loss"
    )
    log.add_argument(
        "--metrics-jsonl",
        default=None,
        metavar="PATH",
        help="append one JSON object per log line here (rank 0, flushed at once)",
    )
    log.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help=f"write TensorBoard scalars here (rank 0; needs pip install {TENSORBOARD_PIN})",
    )
    log.add_argument(
        "--json", default=None, metavar="PATH", help="write the loss curve and summary at the end"
    )
    log.add_argument(
        "--telemetry-every",
        type=int,
        default=50,
        help="routing telemetry (moe_dist.extensions.telemetry): its local-routing-consistency"
        " scan runs on every N-th forward of a layer; a summary line ends the run (0: off)",
    )
    log.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="tqdm progress bar on stderr; auto: only when stderr is a terminal",
    )
    log.add_argument(
        "--check-args",
        action="store_true",
        help="check the flags as a rank of WORLD_SIZE processes would, then exit (0: all good);"
        " launch/torchrun_single_node.sh does this before starting the ranks",
    )
    log.add_argument("--save", default=None, metavar="DIR", help="checkpoint here at the end")
    log.add_argument(
        "--save-every", type=int, default=0, help="also checkpoint every N steps (0: only the end)"
    )
    log.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue from a checkpoint (a --save directory or one of its step_N)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and validates the flags; on a bad one prints one line and exits with status 2.
    `args.ep` comes back resolved (the world size when not given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args, launcher_world_size())
    return args


def preset(args, on_gpu: bool) -> dict:
    """The --size preset (tiny on CPU, small on GPU by default) with the explicit flags applied."""
    size = dict(SIZES[args.size or ("small" if on_gpu else "tiny")])
    for name in size:
        if getattr(args, name, None) is not None:
            size[name] = getattr(args, name)
    return size


def model_configs(args, on_gpu: bool) -> tuple[ModelConfig, MoEConfig]:
    size = preset(args, on_gpu)
    model_cfg = ModelConfig(
        d_model=size["d_model"],
        n_layers=size["layers"],
        n_heads=size["heads"],
        max_seq_len=size["seq_len"],
        coe_iterations=args.coe_iterations,
        overlap_microbatches=args.overlap_microbatches,
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
        error_check="deferred",  # no host sync inside a step; raised at each log line
    )
    check_microbatch_overlap(model_cfg, moe_cfg)
    return model_cfg, moe_cfg


def checkpoint_dir(path: Path) -> Path:
    """A run directory (whose `latest` file names the newest step_N, for both checkpoint formats)
    or one step's directory itself."""
    latest = path / "latest"
    return path / latest.read_text().strip() if latest.is_file() else path


TRAINER_FILE = "trainer.json"


def checkpoint_backend(path: Path) -> str | None:
    """The backend that wrote the checkpoint at `path` ("fsdp", "none" or "deepspeed"), from the
    trainer's record, else from the files' format; None when it holds neither."""
    step_dir = checkpoint_dir(path)
    record = step_dir / TRAINER_FILE
    if record.is_file():
        return json.loads(record.read_text()).get("backend")
    if (step_dir / "moe_dist.json").is_file():
        return "fsdp"  # moe_dist's own format (fsdp and none)
    if any(step_dir.glob("*model_states.pt")):
        return "deepspeed"
    return None


# fsdp and none both write moe_dist.training.checkpoint's format (any sharding, any EP size);
# DeepSpeed writes its own.
FORMAT_OF = {"fsdp": "moe_dist", "none": "moe_dist", "deepspeed": "deepspeed"}


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace, world: int) -> None:
    """Every check that needs no process group; resolves args.ep. Calls parser.error (exit 2)."""
    err = parser.error

    def at_least(flag: str, value, low, what: str = "") -> None:
        if value is not None and value < low:
            err(f"--{flag} must be >= {low}{what}, got {value}")

    at_least("steps", args.steps, 1)
    at_least("log-every", args.log_every, 1)
    for flag in ("save-every", "telemetry-every", "val-every", "warmup", "shared-experts"):
        at_least(flag, getattr(args, flag.replace("-", "_")), 0)
    at_least("val-batches", args.val_batches, 1)
    at_least("coe-iterations", args.coe_iterations, 1)
    at_least("max-bytes", args.max_bytes, 1)
    at_least("batch-size", args.batch_size, 1)
    for flag in SIZE_FLAGS:
        at_least(flag, getattr(args, flag.replace("-", "_")), 1)
    if not args.lr > 0:
        err(f"--lr must be > 0, got {args.lr}")
    if args.clip < 0 or args.weight_decay < 0:
        err(f"--clip ({args.clip}) and --weight-decay ({args.weight_decay}) must be >= 0")
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        err(f"--capacity-factor must be > 0 (omit it for dropless), got {args.capacity_factor}")
    if args.overlap_microbatches > 1 and args.coe_iterations > 1:
        err(
            f"--overlap-microbatches {args.overlap_microbatches} needs MoE FFNs with a split call:"
            f" --coe-iterations {args.coe_iterations} builds Chain-of-Experts ones"
        )
    if args.overlap_microbatches > 1 and args.capacity_factor is not None:
        err(
            f"--overlap-microbatches {args.overlap_microbatches} needs dropless routing:"
            f" --capacity-factor {args.capacity_factor} counts capacity per micro-batch"
        )
    if args.val_every and args.val_every % args.log_every:
        err(
            f"--val-every ({args.val_every}) must be a multiple of --log-every ({args.log_every}):"
            " the validation loss goes on a log line"
        )

    if args.ep is None:
        args.ep = world
    at_least("ep", args.ep, 1)
    if world % args.ep:
        err(
            f"--ep {args.ep} does not divide the number of processes ({world});"
            f" use a divisor of {world}"
        )
    on_gpu = torch.cuda.is_available()
    size = preset(args, on_gpu)
    if size["experts"] % args.ep:
        err(f"--experts ({size['experts']}) must be divisible by --ep ({args.ep})")
    if size["d_model"] % size["heads"]:
        err(f"--d-model ({size['d_model']}) must be divisible by --heads ({size['heads']})")
    if size["top_k"] > size["experts"]:
        err(f"--top-k ({size['top_k']}) must be <= --experts ({size['experts']})")
    batch = args.batch_size or size["rows_per_rank"] * world
    if batch % world:
        err(f"--batch-size ({batch}) must be divisible by the number of processes ({world})")
    if args.overlap_microbatches > batch // world:
        err(
            f"--overlap-microbatches {args.overlap_microbatches} needs at least as many sequences"
            f" per rank, got {batch // world} (--batch-size {batch} over {world} processes)"
        )
    if args.transport == "nvshmem" and not on_gpu:
        err("--transport nvshmem needs a GPU per process (use collective or auto on CPU)")
    try:
        model_configs(args, on_gpu)  # whatever else MoEConfig or ModelConfig refuses
    except ValueError as e:
        err(str(e))

    if args.data is not None and not Path(args.data).exists():
        err(f"--data {args.data}: no such file or directory")
    if args.resume is not None:
        _check_resume(err, Path(args.resume), args.backend)
    if args.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        err(
            f"--tensorboard needs the tensorboard package: pip install {TENSORBOARD_PIN}"
            " (or leave --tensorboard out)"
        )


def _check_resume(err, path: Path, backend: str) -> None:
    if not path.is_dir():
        err(f"--resume {path}: no such directory")
    if (path / "latest").is_file() and not checkpoint_dir(path).is_dir():
        err(f"--resume {path}: its 'latest' names {checkpoint_dir(path).name}, which is missing")
    saved = checkpoint_backend(path)
    if saved is None:
        err(f"--resume {path} holds no checkpoint of this trainer (written with --save)")
    if FORMAT_OF.get(saved) != FORMAT_OF[backend]:
        err(
            f"--resume {path} was written with --backend {saved}, which --backend {backend} cannot"
            f" read (DeepSpeed's checkpoint format differs from fsdp/none's): resume with"
            f" --backend {saved}"
        )
