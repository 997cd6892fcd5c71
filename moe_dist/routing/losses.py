"""Router regularisers. Each is computed over this rank's tokens (a data-parallel micro-batch).

Legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_TE: torch.Tensor, idx_TK: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch/GShard auxiliary loss: E * sum_e f_e * P_e, where f_e is the fraction of routed slots
    that chose expert e and P_e the mean router probability of e. Equals 1 under perfect balance."""
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    routed_TK = (idx_TK >= 0).to(probs_TE.dtype)
    counts_E = torch.zeros(num_experts, device=idx_TK.device, dtype=probs_TE.dtype)
    # Unused slots (-1) add 0 to expert 0: masking by weight, not by boolean indexing, avoids a host
    # sync.
    counts_E.scatter_add_(0, idx_TK.clamp(min=0).reshape(-1), routed_TK.reshape(-1))
    fraction_E = counts_E / routed_TK.sum().clamp(min=1)
    return num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-partition; keeps router logits small and bf16-safe."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
