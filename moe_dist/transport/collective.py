"""EP>1 over torch.distributed: all_to_all_single of token rows (NCCL on GPUs, gloo on CPU).

Protocol per dispatch: (1) sort slots by global expert, so rows for rank r are contiguous; (2)
exchange per-expert counts (all_to_all of E ints, each peer's behind a header: handshake.py; combine
begins with the same handshake, without counts); (3) read the split sizes on the host (the one
sync this transport needs, which the nvshmem transport removes); (4) all_to_all the rows; (5)
reorder the rows received in (source rank, local expert) order into (local expert, source rank)
order for the grouped GEMM. Combine runs the same steps backwards. Autograd: the backward of an
all_to_all is the reverse all_to_all. Legend: T tokens, K slots/token, S = T*K, N ranks in the EP
group, G local experts, R received rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.groups import all_reduce_sum
from ..routing import RoutingPlan
from .handshake import Handshake
from .permute import (
    SlotOrder,
    gather_token_copies,
    permute_rows,
    sort_slots_by_expert,
    weighted_sum_of_slots,
)


def _all_to_all(out, x, out_splits, in_splits, group, waiter, what: str) -> None:
    if waiter is None:
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        return
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    waiter.wait_rows(work, what)  # gloo: bounded, PeerTimeout naming the layer and the step


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, waiter=None, what="rows"):
        ctx.splits, ctx.group, ctx.waiter, ctx.what = (
            (send_splits, recv_splits),
            group,
            waiter,
            what,
        )
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        _all_to_all(out, x.contiguous(), recv_splits, send_splits, group, waiter, what)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        grad_in = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        _all_to_all(
            grad_in,
            grad.contiguous(),
            send_splits,
            recv_splits,
            ctx.group,
            ctx.waiter,
            f"backward of the {ctx.what}",
        )
        return grad_in, None, None, None, None, None


def all_to_all_rows(
    x, send_splits: list[int], recv_splits: list[int], group, waiter=None, what: str = "rows"
) -> torch.Tensor:
    return _AllToAllRows.apply(x, send_splits, recv_splits, group, waiter, what)


@dataclass(frozen=True)
class CollectiveHandle:
    slots: SlotOrder
    weights_TK: torch.Tensor
    used_TK: torch.Tensor | None
    send_splits: list[int]
    recv_splits: list[int]
    regroup_R: torch.Tensor  # (local expert, source) position -> (source, local expert) row
    ungroup_R: torch.Tensor  # its inverse


class CollectiveTransport:
    name = "collective"

    def __init__(
        self,
        num_experts: int,
        ep_group: dist.ProcessGroup,
        load_group: dist.ProcessGroup | None,
        peer_timeout_s: float = 60.0,
    ):
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.load_group = load_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        assert num_experts % self.ep_size == 0, "validated by MoELayer"
        # Every collective of this transport waits at most peer_timeout_s (PeerTimeout after).
        self.handshake = Handshake(ep_group, self.num_local_experts, peer_timeout_s)

    @property
    def context(self):
        """The caller's identity (layer name, step, chunks, config CRC) carried in each header."""
        return self.handshake.context

    def agree(self) -> None:
        """The one-time configuration check (the layer calls it at construction)."""
        self.handshake.agree()

    def fail_together(self, exc: BaseException, phase: str = "dispatch") -> None:
        """On a rank whose forward failed: the next handshake carries the error; raises on every
        rank of the EP group. (Dispatch and combine handshakes have one shape: the phase only
        labels the message.)"""
        self.handshake.fail_together(exc, phase)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def exchange_counts(
        self, counts_E: torch.Tensor, dtype: torch.dtype, hidden: int, top_k: int
    ) -> torch.Tensor:
        """counts_E[e]: rows this rank sends to expert e -> recv_NG[src, g]: rows src sends to local
        g. The dispatch handshake: raises on every rank if a rank failed or the ranks disagree."""
        counts_NG = counts_E.view(self.ep_size, self.num_local_experts)
        return self.handshake.exchange(counts_NG, "dispatch", dtype, hidden, top_k)

    def dispatch(self, x_TH: torch.Tensor, plan: RoutingPlan):
        N, G = self.ep_size, self.num_local_experts
        slots = sort_slots_by_expert(plan.expert_idx_TK, self.num_experts)
        recv_NG = self.exchange_counts(slots.counts_E, x_TH.dtype, x_TH.shape[-1], plan.top_k)
        send_splits, recv_splits = torch.stack(
            [slots.counts_E.view(N, G).sum(1), recv_NG.sum(1)]
        ).tolist()  # the host sync
        rows_SH = gather_token_copies(x_TH, slots, plan.top_k)
        received_RH = all_to_all_rows(
            rows_SH[: sum(send_splits)],
            send_splits,
            recv_splits,
            self.ep_group,
            self.handshake,
            "dispatch rows",
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

    def combine(self, y_RH: torch.Tensor, h: CollectiveHandle) -> torch.Tensor:
        # The combine handshake: a rank whose experts failed carries the error here instead.
        no_counts = torch.zeros(self.ep_size, self.num_local_experts, dtype=torch.int64)
        self.handshake.exchange(no_counts.to(y_RH.device), "combine", y_RH.dtype, y_RH.shape[-1], 0)
        by_source_RH = permute_rows(y_RH[: h.regroup_R.numel()], h.ungroup_R, h.regroup_R)
        returned = all_to_all_rows(
            by_source_RH,
            h.recv_splits,
            h.send_splits,
            self.ep_group,
            self.handshake,
            "combine rows",
        )
        unused = h.slots.order_S.numel() - returned.shape[0]
        if unused:
            returned = torch.cat([returned, returned.new_zeros(unused, returned.shape[1])])
        return weighted_sum_of_slots(returned, h.slots, h.weights_TK, h.used_TK)

    def global_load(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tokens_per_expert_E.clone(), self.load_group)
