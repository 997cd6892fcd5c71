"""What the trainer reports: the progress bar (tqdm), one log line per interval, a JSONL stream and
TensorBoard scalars, all from one dict of metrics per interval. Rank 0 only; other ranks get a
`MetricsSink` that does nothing.

Units: loss in nats per byte (the byte-level cross-entropy, natural log), lr per step, tokens/s
over the whole global batch, memory in GiB, times in seconds.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

# bf16 dense peak FLOP/s (vendor datasheets, SXM parts) by substring of the device name; MFU is
# shown only for these.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}

# The routing-telemetry abbreviations of the run's summary line, explained once in the log.
TELEMETRY_LEGEND = (
    "routing telemetry legend: imbalance = busiest expert's load / mean load per step;"
    " SRP@m = segment routing best performance (best F1 of serving every m-token window with one"
    " fixed expert set; 1 = perfectly local routing); SCH@m,C = segment cache best hit rate (hit"
    " rate of a C-expert cache that sees m tokens ahead; C=2k: twice the experts per token)."
    " Liang et al., arXiv 2505.16056"
)


def flops_per_token(model_cfg, moe_cfg, vocab_size: int = 256) -> float:
    """Training FLOPs per token (forward + backward = 6 x multiply-adds of the active weights,
    plus attention scores), the nanoGPT/PaLM estimate. Routed experts count top_k x iterations
    times, shared experts and routers once per Chain-of-Experts iteration."""
    d, L, S = model_cfg.d_model, model_cfg.n_layers, model_cfg.max_seq_len
    in_width = 2 if moe_cfg.activation == "swiglu" else 1
    expert = (in_width + 1) * d * moe_cfg.ffn_hidden_size
    routed = moe_cfg.top_k * model_cfg.coe_iterations * expert
    shared = model_cfg.coe_iterations * (in_width + 1) * d * moe_cfg.shared_hidden
    router = model_cfg.coe_iterations * d * moe_cfg.num_experts
    per_layer = 4 * d * d + routed + shared + router
    return 6.0 * (L * per_layer + d * vocab_size) + 12.0 * L * d * S


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """(GiB, what it measures): peak CUDA allocation on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 2**20, "rss"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_line(m: dict) -> str:
    """One log line from an interval's metrics (keys as `MetricsSink.log` receives them)."""
    parts = [
        f"step {m['step']:>{len(str(m['total_steps']))}}/{m['total_steps']}",
        f"loss {m['loss']:.4f}",
    ]
    if m.get("val_loss") is not None:
        parts.append(f"val {m['val_loss']:.4f}")
    parts.append(f"lr {m['lr']:.2e}")
    if m.get("grad_norm") is not None:
        parts.append(f"gnorm {m['grad_norm']:.3f}")
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"mem {m['mem_gib']:.2f} GiB")
    parts.append(f"load {m['load_imbalance']:.2f}")
    parts.append(f"dropped {m['dropped']}")
    parts.append(f"{duration(m['elapsed_s'])}<{duration(m['eta_s'])}")
    return " | ".join(parts)


class MetricsSink:
    """Rank 0's outputs. `active=False` (other ranks): every method does nothing."""

    def __init__(
        self,
        *,
        active: bool,
        total_steps: int,
        start_step: int,
        progress: str = "auto",
        jsonl: str | None = None,
        tensorboard: str | None = None,
    ):
        self.active = active
        self.bar = self.jsonl = self.tb = None
        if not active:
            return
        from tqdm.auto import tqdm

        # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs, pipes).
        disable = {"auto": None, "on": False, "off": True}[progress]
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            disable=disable,
            file=sys.stderr,
            leave=False,
        )
        if jsonl is not None:
            Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(jsonl, "a", buffering=1)  # line-buffered: every record flushed
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter  # cli.validate checked it is there

            self.tb = SummaryWriter(tensorboard)

    def say(self, text: str) -> None:
        """A line on stdout that does not break the bar."""
        if not self.active:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        sys.stdout.flush()

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, metrics: dict) -> None:
        """One interval: the log line, a JSONL record, TensorBoard scalars, the bar's postfix."""
        if not self.active:
            return
        self.say(format_line(metrics))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
        if self.jsonl is not None:
            record = {"time": time.time(), **metrics}
            self.jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            step = metrics["step"]
            for key, value in metrics.items():
                if key in ("step", "total_steps") or value is None:
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(
                        f"train/{key}" if key != "val_loss" else "val/loss", value, step
                    )
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
