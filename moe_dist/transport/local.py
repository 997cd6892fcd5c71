"""EP=1: every expert is here, so dispatch is a sort of the slots by expert and combine its inverse.

Shape-static and sync-free: all T*K slots become rows; unused slots (top-p, capacity drops) sort
last and are masked in combine. This is the base case the distributed transports generalise.

On CUDA (bf16 SwiGLU experts) the layer takes the fused path instead (`fused_experts`): dispatch,
experts and combine as one autograd function over experts/fused's kernels, no K-fold copy passes.
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
        # None: fused on CUDA for bf16 SwiGLU experts; True/False forces it (CPU: the oracle ops).
        self.fused: bool | None = None
        # False: the fused path keeps x, not its K expert-major copies, and gathers again in
        # backward (less activation memory, one more pass).
        self.fused_save_rows = False
        # False: the fused path keeps h but not a = w * silu(gate) * up; its SwiGLU backward
        # recomputes a and writes dh over h (less memory held for backward, one more [R, F] write).
        self.fused_save_act = False

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

    def use_fused(self, x_TH: torch.Tensor, experts) -> bool:
        # plain SwiGLU experts only: no expert biases (GPT-OSS) in the fused kernels
        if experts.activation != "swiglu" or experts.b_in is not None or self.fused is False:
            return False
        return bool(self.fused) or (x_TH.is_cuda and x_TH.dtype == torch.bfloat16)

    def fused_experts(self, x_TH: torch.Tensor, plan: RoutingPlan, experts) -> torch.Tensor:
        """dispatch -> experts -> combine in one (see experts/fused/path.py)."""
        from ..experts.fused import fused_experts

        return fused_experts(
            x_TH,
            plan.weights_TK,
            experts.w_in,
            experts.w_out,
            plan.expert_idx_TK,
            save_rows=self.fused_save_rows,
            save_act=self.fused_save_act,
            slot_hist=plan.slot_hist,
        )
