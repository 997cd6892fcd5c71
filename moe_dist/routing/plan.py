"""RoutingPlan: what the router decided, the one object a transport needs besides the tokens.

Legend: T tokens on this rank, K slots per token (top_k), E experts (global), S = T*K slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_tokens(self) -> int:
        return self.expert_idx_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_idx_TK.shape[1]
