"""Expert selection: from router logits to (expert ids, weights) per token. Pure functions, no
state.

Legend: T tokens, E experts, K slots per token, G expert groups.
"""

from __future__ import annotations

import torch


def softmax_topk(logits_TE: torch.Tensor, k: int, normalize: bool):
    probs_TE = logits_TE.softmax(dim=-1)
    weights_TK, idx_TK = probs_TE.topk(k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return idx_TK, weights_TK, probs_TE


def group_limited_topk(
    logits_TE: torch.Tensor, k: int, groups: int, topk_groups: int, normalize: bool
):
    """DeepSeek-V2: a token may only pick experts inside its `topk_groups` best groups (best = max
    prob)."""
    probs_TE = logits_TE.softmax(dim=-1)
    allowed_TE = _allowed_by_group(probs_TE, groups, topk_groups, lambda s: s.amax(dim=-1))
    weights_TK, idx_TK = probs_TE.masked_fill(~allowed_TE, -1.0).topk(k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return idx_TK, weights_TK, probs_TE


def sigmoid_topk(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    k: int,
    groups: int,
    topk_groups: int,
    normalize: bool,
):
    """DeepSeek-V3: sigmoid affinities; the load-balancing bias steers selection only, never
    weights.

    With groups > 1 a group's score is the sum of its two best biased affinities (V3's rule)."""
    scores_TE = logits_TE.sigmoid()
    biased_TE = scores_TE + bias_E
    if groups > 1:
        per_group = scores_TE.shape[-1] // groups
        best = min(2, per_group)
        allowed_TE = _allowed_by_group(
            biased_TE, groups, topk_groups, lambda s: s.topk(best, dim=-1).values.sum(dim=-1)
        )
        biased_TE = biased_TE.masked_fill(~allowed_TE, float("-inf"))
    idx_TK = biased_TE.topk(k, dim=-1).indices
    weights_TK = scores_TE.gather(-1, idx_TK)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    # Normalised affinities stand in for probabilities in the load-balancing loss.
    probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
    return idx_TK, weights_TK, probs_TE


def top_p_select(logits_TE: torch.Tensor, max_k: int, p: float, normalize: bool):
    """Dynamic routing ("harder tokens need more experts"): take experts in order of probability
    until their cumulative mass reaches p, at least one and at most max_k. Unused slots get expert
    -1, weight 0."""
    probs_TE = logits_TE.softmax(dim=-1)
    weights_TK, idx_TK = probs_TE.topk(max_k, dim=-1)
    mass_before_TK = weights_TK.cumsum(dim=-1) - weights_TK
    used_TK = mass_before_TK < p
    used_TK[:, 0] = True
    weights_TK = weights_TK * used_TK
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    idx_TK = torch.where(used_TK, idx_TK, torch.full_like(idx_TK, -1))
    return idx_TK, weights_TK, probs_TE


def _allowed_by_group(scores_TE, groups, topk_groups, group_score):
    T, E = scores_TE.shape
    group_scores_TG = group_score(scores_TE.view(T, groups, E // groups))
    best_groups = group_scores_TG.topk(topk_groups, dim=-1).indices
    allowed_TG = torch.zeros(T, groups, dtype=torch.bool, device=scores_TE.device)
    allowed_TG.scatter_(1, best_groups, True)
    return allowed_TG.repeat_interleave(E // groups, dim=1)
