"""EP>1 over torch.distributed: all_to_all_single of token rows (NCCL on GPUs, gloo on CPU).

Protocol per dispatch: (1) sort slots by global expert, so rows for rank r are contiguous; (2)
exchange per-expert counts (all_to_all of E ints); (3) read the split sizes on the host (the one
sync this transport needs, which the nvshmem transport removes); (4) all_to_all the rows; (5)
reorder the rows received in (source rank, local expert) order into (local expert, source rank)
order for the grouped GEMM. Combine runs the same steps backwards. Autograd: the backward of an
all_to_all is the reverse all_to_all. Legend: T tokens, K slots/token, S = T*K, N ranks in the EP
group, G local experts, R received rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..routing import RoutingPlan
from .base import Transport
from .permute import (
    SlotOrder,
    gather_token_copies,
    permute_rows,
    sort_slots_by_expert,
    weighted_sum_of_slots,
)


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        grad_in = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad.contiguous(), send_splits, recv_splits, group=ctx.group
        )
        return grad_in, None, None, None


def all_to_all_rows(x, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return _AllToAllRows.apply(x, send_splits, recv_splits, group)


@dataclass(frozen=True)
class CollectiveHandle:
    slots: SlotOrder
    weights_TK: torch.Tensor
    used_TK: torch.Tensor | None
    send_splits: list[int]
    recv_splits: list[int]
    regroup_R: torch.Tensor  # (local expert, source) position -> (source, local expert) row
    ungroup_R: torch.Tensor  # its inverse


class CollectiveTransport(Transport):
    name = "collective"

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup):
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        assert num_experts % self.ep_size == 0, "validated by MoELayer"

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts_E[e]: rows this rank sends to expert e -> recv_NG[src, g]: rows src sends to local
        g."""
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E, group=self.ep_group)
        return recv.view(self.ep_size, self.num_local_experts)

    def _dispatch(self, x_TH: torch.Tensor, plan: RoutingPlan):
        N, G = self.ep_size, self.num_local_experts
        slots = sort_slots_by_expert(plan.expert_idx_TK, self.num_experts)
        recv_NG = self.exchange_counts(slots.counts_E)
        send_splits, recv_splits = torch.stack(
            [slots.counts_E.view(N, G).sum(1), recv_NG.sum(1)]
        ).tolist()  # the host sync
        rows_SH = gather_token_copies(x_TH, slots, plan.top_k)
        received_RH = all_to_all_rows(
            rows_SH[: sum(send_splits)], send_splits, recv_splits, self.ep_group
        )

        local_expert_of_row = torch.repeat_interleave(
            torch.arange(G, device=x_TH.device).repeat(N),
            recv_NG.reshape(-1),
            output_size=sum(recv_splits),
        )
        regroup_R = torch.argsort(local_expert_of_row, stable=True)
        ungroup_R = torch.empty_like(regroup_R)
        ungroup_R[regroup_R] = torch.arange(regroup_R.numel(), device=regroup_R.device)
        tokens_RH = permute_rows(received_RH, regroup_R, ungroup_R)

        used_TK = plan.expert_idx_TK >= 0 if plan.may_have_unused_slots else None
        handle = CollectiveHandle(
            slots, plan.weights_TK, used_TK, send_splits, recv_splits, regroup_R, ungroup_R
        )
        return tokens_RH, recv_NG.sum(0), handle

    def _combine(self, y_RH: torch.Tensor, h: CollectiveHandle) -> torch.Tensor:
        by_source_RH = permute_rows(y_RH[: h.regroup_R.numel()], h.ungroup_R, h.regroup_R)
        returned = all_to_all_rows(by_source_RH, h.recv_splits, h.send_splits, self.ep_group)
        unused = h.slots.order_S.numel() - returned.shape[0]
        if unused:
            returned = torch.cat([returned, returned.new_zeros(unused, returned.shape[1])])
        return weighted_sum_of_slots(returned, h.slots, h.weights_TK, h.used_TK)
