"""RoutingPlan: what the router decided, the one object a transport needs besides the tokens.

Legend: T tokens on this rank, K slots per token (top_k), E experts (global), S = T*K slots.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .losses import AuxTerms


@dataclass(frozen=True)
class SlotHistogram:
    """The counting sort's histogram of a plan's slots, as the routing kernel counted them: the
    fused expert path's sort then runs no histogram pass (experts/fused/ops.sort_slots). It
    counts `expert_idx_TK` only: `for_ids` gives it back for that very tensor, else None, so a
    plan whose ids were replaced (capacity drops, chunks, Llama 4's rows) sorts from scratch."""

    counts: torch.Tensor  # int32 [blocks, bins]: slots of each block per expert (bin E: unused)
    block: int  # slots per block (the routing kernel's tokens per program times K)
    expert_idx_TK: torch.Tensor  # the ids it counts

    def for_ids(self, expert_idx_TK: torch.Tensor) -> "SlotHistogram | None":
        return self if expert_idx_TK is self.expert_idx_TK else None


@dataclass(frozen=True)
class RoutingPlan:
    expert_idx_TK: (
        torch.Tensor
    )  # int64 global expert of each slot; -1 = unused (top-p) or dropped (capacity)
    weights_TK: torch.Tensor  # float32 combine weight of each slot (0 where the slot is unused)
    tokens_per_expert_E: torch.Tensor  # int64 slots kept per expert on this rank
    aux_loss: (
        torch.Tensor
    )  # scalar: coefficient-weighted load-balancing + z loss of this rank's tokens
    dropped_tokens: torch.Tensor  # int64 scalar: slots dropped by capacity on this rank
    may_have_unused_slots: bool  # static: False guarantees every slot is routed (no masking needed)
    # The aux loss as sums over tokens, so several plans give their tokens' joint loss
    # (losses.joint_aux_loss); None for plans not made by a Router (or a chunk of one).
    aux_terms: AuxTerms | None = None
    # bool scalar on the device, True when every router logit was finite; None unless the caller
    # asked the router for it (Router(..., check_finite=True)). No host sync to compute.
    logits_finite: torch.Tensor | None = None
    # The routing kernel's histogram of expert_idx_TK for the counting sort (None: not counted).
    slot_hist: SlotHistogram | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_idx_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_idx_TK.shape[1]


def scale_inputs(x_TH: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, RoutingPlan]:
    """Llama 4's routing: an expert sees its token times the routing weight, and its output joins
    the sum unweighted. Returns (x_SH, plan_S1): one scaled row per slot (S = T*K; with K = 1 the
    tokens themselves, scaled) and a plan routing each row to its slot's expert with weight 1.
    Summing the combined rows over K (out_SH.view(T, K, H).sum(1)) gives the layer output."""
    T, K = plan.expert_idx_TK.shape
    x_SH = x_TH.unsqueeze(1) * plan.weights_TK.unsqueeze(-1).to(x_TH.dtype)
    x_SH = x_SH.reshape(T * K, x_TH.shape[-1])  # not -1: T = 0 is a valid call
    # Unused or dropped slots (expert -1) keep weight 0; every other row counts once.
    weights_S1 = (plan.expert_idx_TK.reshape(T * K, 1) >= 0).to(plan.weights_TK.dtype)
    plan_S1 = replace(
        plan, expert_idx_TK=plan.expert_idx_TK.reshape(T * K, 1), weights_TK=weights_S1
    )
    return x_SH, plan_S1
