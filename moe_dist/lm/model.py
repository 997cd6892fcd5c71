"""A small decoder-only MoE language model: the example that trains with moe_dist.

Pre-norm blocks of causal self-attention (F.scaled_dot_product_attention) and an MoE FFN, RMSNorm,
learned positions, byte vocabulary by default. The model knows no process group: it hands `groups`
to its MoE layers, which hand it to their transport. With `ModelConfig.coe_iterations` > 1 every MoE
FFN is a Chain-of-Experts layer (moe_dist.extensions.coe) of that many routed passes over the same
experts.

With `ModelConfig.overlap_microbatches=2` each rank's batch is split in two along B (the first half
takes the odd row) and every block interleaves them through the MoE layer's split call
(MoELayer.start / run_experts / finish):

    attn(A), start(A), attn(B), start(B), run_experts(A), run_experts(B), finish(A), finish(B)

so on a GPU A's dispatch travels while B's attention computes, A's experts compute while B's
dispatch travels, and A's combine travels while B's experts compute (moe_dist/overlap.py says what
waits on what). Results equal the one-batch model up to rounding: the head and the loss run on the
whole batch again, and each layer's aux loss is the one of both micro-batches' tokens together
(RoutingPlan.aux_terms), not the sum of two.

Legend: B batch, S sequence, D d_model, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.extensions.coe import build_moe_layer
from moe_dist import MoEConfig, MoELayer
from moe_dist.routing import joint_aux_loss


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    coe_iterations: int = (
        1  # > 1: Chain-of-Experts FFNs (each pass its own router, the same experts)
    )
    overlap_microbatches: int = 1  # 2: two micro-batches interleaved per block (module docstring)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "coe_iterations",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.overlap_microbatches not in (1, 2) or isinstance(self.overlap_microbatches, bool):
            raise ValueError(
                f"overlap_microbatches must be 1 or 2, got {self.overlap_microbatches!r}"
            )
        if self.overlap_microbatches > 1 and self.coe_iterations > 1:
            # A Chain-of-Experts layer has no split call: refused rather than run without overlap.
            raise ValueError(
                f"overlap_microbatches ({self.overlap_microbatches}) needs MoELayer FFNs; "
                f"coe_iterations ({self.coe_iterations}) builds Chain-of-Experts ones"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )


def check_microbatch_overlap(cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
    """What overlap_microbatches=2 cannot keep equal to one batch (the trainer checks it before any
    process group exists)."""
    if cfg.overlap_microbatches > 1 and moe_cfg.capacity_factor is not None:
        raise ValueError(
            f"overlap_microbatches ({cfg.overlap_microbatches}) needs dropless MoE layers: "
            f"capacity_factor ({moe_cfg.capacity_factor}) counts capacity per call, so two "
            "micro-batches would drop other slots than one batch"
        )


class LMOutput(NamedTuple):
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None  # cross-entropy + aux (None without targets)
    ce_loss: torch.Tensor | None  # next-token cross-entropy alone, for logging
    aux_loss: torch.Tensor  # sum of the MoE layers' aux losses
    tokens_per_expert: list[torch.Tensor]  # per MoE layer, int64 [E] routed on this rank


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, device=None, dtype=None):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False, device=device, dtype=dtype)
        self.proj = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = (
            self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, S, D/heads]
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """x + attn(norm(x)), then x + moe(norm(x)). `moe` returns (output, aux_loss,
    tokens_per_expert)."""

    def __init__(self, cfg: ModelConfig, moe: nn.Module, device=None, dtype=None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, device=device, dtype=dtype)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.moe = moe

    def forward(self, x_BSD: torch.Tensor | list[torch.Tensor]):
        """x_BSD, or a list of micro-batches (then the outputs are a list too). One call either way,
        so a wrapper's hooks (FSDP's unshard) run once per block."""
        if isinstance(x_BSD, list):
            return self._microbatches(x_BSD)
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        y, aux, counts = self.moe(self.ffn_norm(x_BSD))
        return x_BSD + y, aux, counts

    def _microbatches(self, xs_BSD: list[torch.Tensor]):
        """The interleaved schedule (module docstring). Every rank makes the same MoE calls in the
        same order whatever its micro-batch sizes (empty ones included): they are collective."""
        hs_BSD, calls = [], []
        for x_BSD in xs_BSD:
            h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
            hs_BSD.append(h_BSD)
            calls.append(self.moe.start(self.ffn_norm(h_BSD)))
        for call in calls:
            self.moe.run_experts(call)
        outs_BSD = [h_BSD + self.moe.finish(call).output for h_BSD, call in zip(hs_BSD, calls)]
        aux = joint_aux_loss([call.plan.aux_terms for call in calls])
        counts = torch.stack([call.plan.tokens_per_expert_E for call in calls]).sum(0)
        return outs_BSD, aux, counts


MoEFactory = Callable[[int], nn.Module]  # layer index -> an MoE FFN module


class MoETransformer(nn.Module):
    """Decoder-only LM whose every FFN is an MoE layer.

    `moe_factory` swaps the MoE implementation (the benchmark puts DeepSpeed's MoE there); by
    default each block gets a moe_dist MoELayer built from `moe_cfg` and `groups`, or a
    ChainOfExperts around one when `cfg.coe_iterations` > 1. Under one torch.manual_seed the model
    is EP-invariant, like MoELayer: every parameter is drawn in the same order at any EP size."""

    def __init__(
        self,
        cfg: ModelConfig,
        moe_cfg: MoEConfig,
        groups=None,
        *,
        moe_factory: MoEFactory | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if cfg.d_model != moe_cfg.hidden_size:
            raise ValueError(
                f"ModelConfig.d_model ({cfg.d_model}) must equal MoEConfig.hidden_size "
                f"({moe_cfg.hidden_size})"
            )
        self.cfg, self.moe_cfg = cfg, moe_cfg
        if moe_factory is None:

            def moe_factory(i):
                return build_moe_layer(
                    moe_cfg,
                    groups,
                    iterations=cfg.coe_iterations,
                    name=f"layers.{i}.moe",
                    device=device,
                    dtype=dtype,
                )

        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, device=device, dtype=dtype)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            Block(cfg, moe_factory(i), device=device, dtype=dtype) for i in range(cfg.n_layers)
        )
        if cfg.overlap_microbatches > 1:
            check_microbatch_overlap(cfg, moe_cfg)
            for i, block in enumerate(self.layers):
                if not isinstance(block.moe, MoELayer):
                    # Refused, not run without overlap: a benchmark would report the plain path
                    # under the overlapped name.
                    raise ValueError(
                        f"overlap_microbatches ({cfg.overlap_microbatches}) needs a MoELayer in "
                        f"every block (its start/finish split call); block {i} holds "
                        f"{type(block.moe).__name__}"
                    )
                check_microbatch_overlap(cfg, block.moe.cfg)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.lm_head = nn.Linear(
            cfg.d_model, cfg.vocab_size, bias=False, device=device, dtype=dtype
        )
        with torch.no_grad():  # small embeddings: the default N(0, 1) makes the first logits huge
            self.embed.weight.normal_(0.0, 0.02)
            self.pos_embed.weight.normal_(0.0, 0.02)

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> LMOutput:
        B, S = tokens_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length ({S}) exceeds max_seq_len ({self.cfg.max_seq_len})")
        positions = torch.arange(S, device=tokens_BS.device)
        x_BSD = self.embed(tokens_BS) + self.pos_embed(positions)
        aux_total = x_BSD.new_zeros((), dtype=torch.float32)
        counts = []
        # Micro-batches (a list) go through the blocks together, then join for the head and loss.
        x = x_BSD if self.cfg.overlap_microbatches == 1 else list(torch.tensor_split(x_BSD, 2))
        for block in self.layers:
            x, aux, tokens_per_expert = block(x)
            aux_total = aux_total + aux.float()
            counts.append(tokens_per_expert)
        x_BSD = x if self.cfg.overlap_microbatches == 1 else torch.cat(x)
        logits_BSV = self.lm_head(self.norm(x_BSD))
        if targets_BS is None:
            return LMOutput(logits_BSV, None, None, aux_total, counts)
        ce = F.cross_entropy(logits_BSV.float().reshape(B * S, -1), targets_BS.reshape(B * S))
        return LMOutput(logits_BSV, ce + aux_total, ce, aux_total, counts)

    def moe_layers(self) -> list[nn.Module]:
        return [block.moe for block in self.layers]
