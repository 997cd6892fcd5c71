"""Shared by the examples: a tiny byte-level language-model setup (moe_dist.lm's example model)
and batches of real text (these examples' own sources), so that the loss visibly falls."""

from pathlib import Path

import torch

from moe_dist import MoEConfig
from moe_dist.lm import ModelConfig

MODEL = ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=32)
MOE = MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=8, top_k=2)
TEXT = torch.frombuffer(
    bytearray(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))),
    dtype=torch.uint8,
)


def batch(step: int, rows: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (inputs, next-byte targets) of step `step`: [rows, seq] int64 each."""
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    starts = torch.randint(0, len(TEXT) - MODEL.max_seq_len - 1, (rows,), generator=gen)
    windows = TEXT[starts[:, None] + torch.arange(MODEL.max_seq_len + 1)].long().to(device)
    return windows[:, :-1], windows[:, 1:]
