"""Per-rank dedup: each token crosses to a destination rank once, however many of its experts live
there. Index math (plain torch, no host sync) and the two row operations built on it.

Sender: a *pair* is a distinct (token, destination rank); pairs are ordered by (destination,
token), so the rows bound for rank r are contiguous. Receiver: a received row carries the local
expert of each of its K slots (-1 where that slot went elsewhere); it is expanded into one row per
(row, slot) in expert-major order (local expert, source rank, token, slot: the reference order).

Both sides use one structure, `RowLinks`, between A "owner" rows of J slots and B "member" rows:
member b is slot (a, j) of owner a. `gather_rows` copies owners to members (its backward sums the
members' gradients into their owner: the reduce at the expert rank); `reduce_rows` sums members
into owners, weighted, in float32 (its backward copies the owner's gradient to the members). Both
are gathers, never atomic scatters, so they are deterministic on every device.

Legend: T tokens, K slots per token, S = T*K, N ranks, G local experts, P pairs sent (B rows on the
sender), R rows received, M expanded rows (expert-major), A owners, J slots per owner, B members,
H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLinks:
    """slots_AJ[a, j]: the member row of slot (a, j), or num_members where there is none;
    owner_B[b]: a * J + j of member b. A bijection between the valid slots and the members."""

    slots_AJ: torch.Tensor
    owner_B: torch.Tensor
    num_members: int


@dataclass(frozen=True)
class PairPlan:
    """The sender's side of a deduplicated dispatch (shape-static: P_max = S rows, pairs first)."""

    links: RowLinks  # owners = tokens [T, K]; members = pairs, in (destination, token) order
    dest_TK: torch.Tensor  # destination rank of each slot, N for unused slots
    pairs_N: torch.Tensor  # int64 pairs bound for each rank (its rows sent, one per token)


def first_of_rank(dest_TK: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """first_TK[t, k]: slot k is token t's first slot bound for its rank (unused slots: False)."""
    K = dest_TK.shape[1]
    same_TKK = dest_TK.unsqueeze(2) == dest_TK.unsqueeze(1)
    earlier_KK = torch.ones(K, K, dtype=torch.bool, device=dest_TK.device).tril(-1)
    return (dest_TK < num_ranks) & ~(same_TKK & earlier_KK).any(2)


def plan_pairs(expert_idx_TK: torch.Tensor, num_local: int, num_ranks: int) -> PairPlan:
    """Which (token, rank) pairs to send, in (rank, token) order. No host sync: the first
    pairs_N.sum() members are the pairs; the rest are slots that are not the first of their rank."""
    T, K = expert_idx_TK.shape
    dev = expert_idx_TK.device
    N = num_ranks
    dest_TK = torch.where(
        expert_idx_TK >= 0, torch.div(expert_idx_TK, num_local, rounding_mode="floor"), N
    )
    first_S = first_of_rank(dest_TK, N).reshape(-1)
    token_S = torch.arange(T * K, device=dev) // K
    key_S = torch.where(first_S, dest_TK.reshape(-1) * T + token_S, N * T)
    order_S = torch.argsort(key_S, stable=True)
    pos_S = torch.empty_like(order_S)
    pos_S[order_S] = torch.arange(T * K, device=dev)
    pairs_N = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    pairs_N.scatter_add_(0, torch.where(first_S, dest_TK.reshape(-1), N), torch.ones_like(pos_S))
    slots_TK = torch.where(first_S, pos_S, T * K).view(T, K)  # T*K: "no member" (made exact below)
    return PairPlan(RowLinks(slots_TK, order_S, T * K), dest_TK, pairs_N[:N])


def trim_links(links: RowLinks, num_members: int) -> RowLinks:
    """Keep the first `num_members` members (a host int): the rest become "no member"."""
    slots = torch.where(links.slots_AJ < num_members, links.slots_AJ, num_members)
    return RowLinks(slots, links.owner_B[:num_members], num_members)


def slot_experts(expert_idx_TK, dest_TK, token_P, dest_P, num_local: int) -> torch.Tensor:
    """gl_PK: for each pair, the local expert (at the pair's destination) of each slot of its token,
    -1 where that slot is unused or bound to another rank."""
    here_PK = dest_TK.index_select(0, token_P) == dest_P.unsqueeze(1)
    return torch.where(here_PK, expert_idx_TK.index_select(0, token_P) % num_local, -1)


def expand_links(local_expert_RK: torch.Tensor, num_local: int, num_rows: int) -> RowLinks:
    """The receiver's side: rows [R] with K slots each -> members in expert-major order (local
    expert, then row order = source and token, then slot). `num_rows` (M, known from the count
    exchange) is the number of valid slots."""
    R, K = local_expert_RK.shape
    key = torch.where(local_expert_RK >= 0, local_expert_RK, num_local).reshape(-1)
    order = torch.argsort(key, stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    slots_RK = torch.where(key < num_local, pos, num_rows).view(R, K)
    return RowLinks(slots_RK, order[:num_rows], num_rows)


# -- the two row operations ------------------------------------------------------------------------


def reduce_rows_fwd(y_BH, links: RowLinks, w_AJ=None, out_dtype=None) -> torch.Tensor:
    """out[a] = sum_j w[a, j] * y[slots[a, j]] in float32 (w = 1 when None); a slot without member
    contributes exactly 0, whatever y holds past the members (uninitialised rows may be NaN)."""
    A, J = links.slots_AJ.shape
    B = links.num_members
    acc_AH = torch.zeros(A, y_BH.shape[-1], dtype=torch.float32, device=y_BH.device)
    if B:
        for j in range(J):
            idx = links.slots_AJ[:, j]
            ok = (idx < B).unsqueeze(1)
            v = y_BH.index_select(0, idx.clamp(max=B - 1))
            v = torch.where(ok, v.float(), 0.0)
            acc_AH += v if w_AJ is None else v * w_AJ[:, j : j + 1].float()
    return acc_AH.to(out_dtype or y_BH.dtype)


def gather_rows_fwd(x_AH, links: RowLinks, scale_AJ=None) -> torch.Tensor:
    """member b = x[owner of b] (times scale[a, j] of its slot when given, in float32)."""
    J = links.slots_AJ.shape[1]
    rows = x_AH.index_select(0, torch.div(links.owner_B, J, rounding_mode="floor"))
    if scale_AJ is None:
        return rows
    s = scale_AJ.reshape(-1).index_select(0, links.owner_B).float().unsqueeze(1)
    return (rows.float() * s).to(x_AH.dtype)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AH, links):
        ctx.links = links
        return gather_rows_fwd(x_AH, links)

    @staticmethod
    def backward(ctx, grad_BH):
        # One token row fed several members: its gradient is their sum (the reduce at the expert
        # rank, float32).
        return reduce_rows_fwd(grad_BH.contiguous(), ctx.links), None


class _ReduceRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_BH, w_AJ, links):
        ctx.links = links
        ctx.save_for_backward(y_BH, w_AJ)
        return reduce_rows_fwd(y_BH, links, w_AJ)

    @staticmethod
    def backward(ctx, grad_AH):
        y_BH, w_AJ = ctx.saved_tensors
        links = ctx.links
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = gather_rows_fwd(grad_AH, links, w_AJ)
            pad = y_BH.shape[0] - grad_y.shape[0]  # rows past the members get no gradient
            if pad:
                grad_y = torch.cat([grad_y, grad_y.new_zeros(pad, grad_y.shape[1])])
        if w_AJ is not None and ctx.needs_input_grad[1]:
            grad_w = slot_dots(y_BH, grad_AH, links).to(w_AJ.dtype)
        return grad_y, grad_w, None


def slot_dots(y_BH, grad_AH, links: RowLinks) -> torch.Tensor:
    """d out[a] / d w[a, j] = <y[slots[a, j]], grad[a]> in float32 (0 where there is no member)."""
    A, J = links.slots_AJ.shape
    B = links.num_members
    out = torch.zeros(A, J, dtype=torch.float32, device=grad_AH.device)
    if B:
        for j in range(J):
            idx = links.slots_AJ[:, j]
            v = y_BH.index_select(0, idx.clamp(max=B - 1)).float()
            dot = (v * grad_AH.float()).sum(-1)
            out[:, j] = torch.where(idx < B, dot, 0.0)
    return out


def gather_rows(x_AH: torch.Tensor, links: RowLinks) -> torch.Tensor:
    return _GatherRows.apply(x_AH, links)


def reduce_rows(y_BH: torch.Tensor, links: RowLinks, w_AJ: torch.Tensor | None = None):
    if w_AJ is None:
        return _ReduceRows.apply(y_BH, None, links)
    return _ReduceRows.apply(y_BH, w_AJ, links)


def count_pairs(expert_idx_TK: torch.Tensor, num_local: int, num_ranks: int) -> torch.Tensor:
    """pairs_N: distinct (token, rank) pairs per destination rank, straight from the routing (the
    oracle for the rows a deduplicated dispatch sends)."""
    T, K = expert_idx_TK.shape
    dest = torch.where(expert_idx_TK >= 0, expert_idx_TK // num_local, num_ranks)
    hit_TN = torch.zeros(T, num_ranks + 1, dtype=torch.bool, device=dest.device)
    hit_TN.scatter_(1, dest, True)
    return hit_TN[:, :num_ranks].sum(0)
