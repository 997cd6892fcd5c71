"""Pure-torch oracle: every rank gathers everything and picks out its part. Slow and obviously
right.

Dispatch order (the contract every transport meets): rows grouped by local expert; within an expert,
by source rank; within a source, by token then slot. Combine puts each row back at (source, token,
slot) and takes the weighted sum. Works over any process group (gloo included).
Legend: T tokens on this rank, K slots/token, H hidden, N ranks, G local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..routing import RoutingPlan
from .base import Transport


def _gather_sizes(n: int, group, device) -> list[int]:
    sizes = [
        torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    return [int(s) for s in sizes]


class _AllGatherRows(torch.autograd.Function):
    """Variable-size all_gather along dim 0 with autograd; backward is an all_reduce (gloo has no
    reduce_scatter) of the padded gradient, of which each rank keeps its own rows."""

    @staticmethod
    def forward(ctx, x, group):
        sizes = _gather_sizes(x.shape[0], group, x.device)
        width = max(sizes)
        padded = torch.cat([x, x.new_zeros((width - x.shape[0],) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.sizes, ctx.width = group, sizes, width
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        chunks = grad.split(ctx.sizes)
        padded = torch.stack(
            [
                torch.cat([c, c.new_zeros((ctx.width - c.shape[0],) + tuple(c.shape[1:]))])
                for c in chunks
            ]
        )
        dist.all_reduce(padded, group=ctx.group)
        me = dist.get_rank(ctx.group)
        return padded[me, : ctx.sizes[me]], None


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherRows.apply(x, group)


@dataclass(frozen=True)
class ReferenceHandle:
    source_M: torch.Tensor  # for each dispatched row: its source rank, token and slot
    token_M: torch.Tensor
    slot_M: torch.Tensor
    weights_TK: torch.Tensor


class ReferenceTransport(Transport):
    name = "reference"

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = dist.get_world_size(group) if group is not None else 1
        self.ep_rank = dist.get_rank(group) if group is not None else 0

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def _gather(self, x):
        return all_gather_rows(x, self.group) if self.group is not None else x

    def _dispatch(self, x_TH: torch.Tensor, plan: RoutingPlan):
        T, K = plan.expert_idx_TK.shape
        dev = x_TH.device
        src_T = torch.full((T,), self.ep_rank, dtype=torch.int64, device=dev)
        all_x = self._gather(x_TH)
        all_e = self._gather(plan.expert_idx_TK)
        all_src = self._gather(src_T)
        all_tok = self._gather(torch.arange(T, device=dev))
        G = self.num_local_experts
        rows, keys, meta = [], [], []
        for t in range(all_x.shape[0]):
            for k in range(K):
                e = int(all_e[t, k])
                if e >= 0 and e // G == self.ep_rank:
                    src, tok = int(all_src[t]), int(all_tok[t])
                    rows.append(t)
                    keys.append((e % G, src, tok, k))
                    meta.append((src, tok, k))
        order = sorted(range(len(rows)), key=keys.__getitem__)
        index = torch.tensor([rows[i] for i in order], dtype=torch.int64, device=dev)
        tokens = all_x.index_select(0, index)
        counts = torch.zeros(G, dtype=torch.int64, device=dev)
        for i in order:
            counts[keys[i][0]] += 1
        m = torch.tensor([meta[i] for i in order], dtype=torch.int64, device=dev).reshape(-1, 3)
        return tokens, counts, ReferenceHandle(m[:, 0], m[:, 1], m[:, 2], plan.weights_TK)

    def _combine(self, y_MH: torch.Tensor, h: ReferenceHandle) -> torch.Tensor:
        T, K = h.weights_TK.shape
        y_MH = y_MH[: h.source_M.numel()]
        all_y = self._gather(y_MH)
        all_src, all_tok, all_slot = (self._gather(v) for v in (h.source_M, h.token_M, h.slot_M))
        mine = (all_src == self.ep_rank).nonzero().flatten()
        y_TKH = y_MH.new_zeros(T * K, y_MH.shape[-1]).index_put(
            (all_tok[mine] * K + all_slot[mine],), all_y[mine]
        )
        y_TKH = y_TKH.view(T, K, y_MH.shape[-1])
        return (y_TKH * h.weights_TK.to(y_TKH.dtype).unsqueeze(-1)).sum(
            1
        )  # plain autograd: the oracle
