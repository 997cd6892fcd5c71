"""Where every row goes, computed on the device from the exchanged count matrix (no host sync).

After the count exchange each PE holds counts_NE[src, e]: slots PE `src` routes to global expert e.
Receiver r (experts [r*G, (r+1)*G)) lays its rows out grouped by local expert, then by source, then
in the source's slot order; that is the order the reference transport defines. Every sender can
compute its own rows' final positions at every receiver from the same matrix, so rows are written
straight to their final place and the receiver never sorts. Legend: N PEs in the EP group, E
experts, G = E/N local experts, S slots of this rank, C capacity rows."""

from __future__ import annotations

import torch


def expert_bases(counts_NE: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """base_E[e]: first row of expert e's block at its receiver (exclusive cumsum within a
    receiver)."""
    totals_RG = counts_NE.sum(0).view(num_ranks, -1)
    return (torch.cumsum(totals_RG, 1) - totals_RG).reshape(-1)


def send_positions(counts_NE: torch.Tensor, me: int, sorted_experts_S: torch.Tensor, capacity: int):
    """For this PE's slots in expert-sorted order (unused slots carry expert E, sorting last):
    returns (dest_rank_S, dest_pos_S, overflow_R): rank -1 for unused slots and for every slot bound
    to a receiver whose rows would exceed `capacity` (nothing is written past a buffer)."""
    N, E = counts_NE.shape
    G = E // N
    valid_S = sorted_experts_S < E
    e_S = sorted_experts_S.clamp(max=E - 1)
    src_prefix_E = (torch.cumsum(counts_NE, 0) - counts_NE)[me]  # rows of lower sources before mine
    mine_E = counts_NE[me]
    my_start_E = torch.cumsum(mine_E, 0) - mine_E  # my sorted slots: expert e starts here
    rank_in_expert_S = torch.arange(e_S.numel(), device=e_S.device) - my_start_E[e_S]
    pos_S = expert_bases(counts_NE, N)[e_S] + src_prefix_E[e_S] + rank_in_expert_S
    overflow_R = receiver_totals(counts_NE) > capacity
    dest_S = torch.div(e_S, G, rounding_mode="floor")
    ok_S = valid_S & ~overflow_R[dest_S]
    return torch.where(ok_S, dest_S, -1), torch.where(ok_S, pos_S, 0), overflow_R


def receiver_totals(counts_NE: torch.Tensor) -> torch.Tensor:
    N, E = counts_NE.shape
    return counts_NE.sum(0).view(N, E // N).sum(1)


def sources_of_rows(counts_NE: torch.Tensor, me: int, capacity: int) -> torch.Tensor:
    """src_C[p]: the PE that writes row p of this receiver's buffer; -1 past the last row.
    Shape-static (C rows) so it needs no host sync: the tail is one dummy segment of -1."""
    N, E = counts_NE.shape
    G = E // N
    seg_GN = counts_NE[:, me * G : (me + 1) * G].t()  # [G, N]: rows from each source, expert-major
    lengths = seg_GN.reshape(-1)
    total = lengths.sum()
    lengths = torch.where(
        total > capacity, torch.zeros_like(lengths), lengths
    )  # overflow: nothing valid
    pad = (capacity - lengths.sum()).reshape(1)
    ids = torch.cat(
        [
            torch.arange(N, device=counts_NE.device).repeat(G),
            torch.full((1,), -1, device=counts_NE.device),
        ]
    )  # not torch.tensor([-1]): a blocking copy
    return torch.repeat_interleave(ids, torch.cat([lengths, pad]), output_size=capacity)


# -- the same layout in slot order, as the Triton kernels compute it (kernels.py); these are their
# oracles --


def ranks_in_expert(idx_S: torch.Tensor, num_experts: int):
    """rank_S[s]: how many earlier slots chose the same expert (-1 for unused slots); counts_E."""
    key = torch.where(idx_S >= 0, idx_S, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx_S.device).scatter_add_(
        0, key, torch.ones_like(key)
    )
    start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(key.numel(), device=idx_S.device) - start[key[order]]
    rank_S = torch.empty_like(rank_sorted)
    rank_S[order] = rank_sorted
    return torch.where(idx_S >= 0, rank_S, -1), counts[:num_experts]


def slot_destinations(counts_NE: torch.Tensor, me: int, idx_S: torch.Tensor, capacity: int):
    """(dest_rank_S, dest_pos_S, overflow_N) in slot order: rank -1 (pos 0) for unused slots and for
    slots bound to an overflowing receiver. Same positions as send_positions gives in sorted order.
    """
    N, E = counts_NE.shape
    G = E // N
    rank_S, _ = ranks_in_expert(idx_S, E)
    e_S = idx_S.clamp(min=0)
    offs_E = expert_bases(counts_NE, N) + (torch.cumsum(counts_NE, 0) - counts_NE)[me]
    overflow_N = receiver_totals(counts_NE) > capacity
    dest_S = torch.div(e_S, G, rounding_mode="floor")
    ok_S = (idx_S >= 0) & ~overflow_N[dest_S]
    return torch.where(ok_S, dest_S, -1), torch.where(ok_S, offs_E[e_S] + rank_S, 0), overflow_N


def segments(counts_NE: torch.Tensor, me: int, capacity: int) -> torch.Tensor:
    """seg_2NG: start and length of the rows source s sent to local expert g of receiver `me`
    (lengths 0 when `me` overflowed)."""
    N, E = counts_NE.shape
    G = E // N
    mine_NG = counts_NE[:, me * G : (me + 1) * G]
    start_NG = (
        expert_bases(counts_NE, N)[me * G : (me + 1) * G] + torch.cumsum(mine_NG, 0) - mine_NG
    )
    overflow = receiver_totals(counts_NE)[me] > capacity
    return torch.stack([start_NG, torch.where(overflow, torch.zeros_like(mine_NG), mine_NG)])
