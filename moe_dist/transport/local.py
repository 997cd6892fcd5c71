"""EP=1: every expert is here, so dispatch is a sort of the slots by expert and combine its inverse.

Shape-static and sync-free: all T*K slots become rows; unused slots (top-p, capacity drops) sort
last and are masked in combine. This is the base case the distributed transports generalise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routing import RoutingPlan
from .base import Transport
from .permute import SlotOrder, gather_token_copies, sort_slots_by_expert, weighted_sum_of_slots


@dataclass(frozen=True)
class LocalHandle:
    slots: SlotOrder
    weights_TK: torch.Tensor
    used_TK: torch.Tensor | None


class LocalTransport(Transport):
    name = "local"
    ep_size = 1
    ep_rank = 0

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    @property
    def num_local_experts(self) -> int:
        return self.num_experts

    def _dispatch(self, x_TH: torch.Tensor, plan: RoutingPlan):
        slots = sort_slots_by_expert(plan.expert_idx_TK, self.num_experts)
        used_TK = plan.expert_idx_TK >= 0 if plan.may_have_unused_slots else None
        tokens_SH = gather_token_copies(x_TH, slots, plan.top_k, used_TK)
        return tokens_SH, slots.counts_E, LocalHandle(slots, plan.weights_TK, used_TK)

    def _combine(self, y_SH: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return weighted_sum_of_slots(y_SH, handle.slots, handle.weights_TK, handle.used_TK)
