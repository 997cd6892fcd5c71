"""Expert capacity: keep at most `capacity` slots per expert, dropping the lowest-weight ones first.

Legend: T tokens, K slots per token, E experts, S = T*K slots.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard's capacity: capacity_factor times an even share of this rank's slots (at least 1)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def drop_over_capacity(
    idx_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int
):
    """Returns (idx_TK, weights_TK, dropped) with dropped slots set to expert -1 and weight 0.

    Within an expert, slots are ranked by weight (highest first); ties keep token order, so the
    result is deterministic. No host synchronisation."""
    T, K = idx_TK.shape
    e_S = idx_TK.reshape(-1)
    w_S = weights_TK.reshape(-1).detach()
    routed_S = e_S >= 0
    key_S = torch.where(routed_S, e_S, num_experts)
    # Two stable sorts = lexicographic (expert ascending, weight descending, slot ascending).
    by_weight = torch.argsort(-w_S, stable=True)
    order = by_weight[torch.argsort(key_S[by_weight], stable=True)]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key_S.device)
    counts.scatter_add_(0, key_S, torch.ones_like(key_S))  # not bincount: that syncs on CUDA
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(order)
    rank_in_expert[order] = torch.arange(order.numel(), device=order.device) - starts[key_S[order]]
    keep_S = routed_S & (rank_in_expert < capacity)
    dropped = (routed_S & ~keep_S).sum()
    keep_TK = keep_S.view(T, K)
    idx_TK = torch.where(keep_TK, idx_TK, torch.full_like(idx_TK, -1))
    return idx_TK, weights_TK * keep_TK, dropped
