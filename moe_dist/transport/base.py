"""The one interface every transport implements.

    tokens_MH, counts_G, handle = transport.dispatch(x_TH, plan)
    out_TH = transport.combine(y_MH, handle)

`tokens_MH` holds the rows this rank's local experts must process, grouped by local expert
(`counts_G` rows each, on the device); rows past sum(counts_G) may exist (shape-static transports)
and are ignored. `handle` is immutable and carries everything combine needs: transports keep no
per-call state, so several dispatches may be in flight at once (micro-batches, pipelined chunks).
Legend: T tokens on this rank, H hidden, M received rows, G local experts.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..routing import RoutingPlan


class Transport(Protocol):
    name: str
    ep_size: int
    ep_rank: int
    num_experts: int

    @property
    def num_local_experts(self) -> int: ...

    def dispatch(
        self, x_TH: torch.Tensor, plan: RoutingPlan
    ) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y_MH: torch.Tensor, handle: Any) -> torch.Tensor: ...

    def global_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Expert load summed over every rank that shares this layer's router (the whole batch)."""
        ...
