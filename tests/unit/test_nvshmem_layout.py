"""The nvshmem transport's index math, on CPU: positions computed from the count matrix reproduce
the reference transport's receive order (expert-major, then source, then slot), with overflow
handling. """

import pytest
import torch

from moe_dist.transport.nvshmem.layout import (
    ranks_in_expert,
    receiver_totals,
    segments,
    send_positions,
    slot_destinations,
    sources_of_rows,
)
from moe_dist.transport.permute import sort_slots_by_expert


def simulate(idx_by_rank, E, capacity):
    N = len(idx_by_rank)
    G = E // N
    counts = torch.stack([sort_slots_by_expert(i, E).counts_E for i in idx_by_rank])
    received = {r: {} for r in range(N)}
    for src, idx in enumerate(idx_by_rank):
        s = sort_slots_by_expert(idx, E)
        flat = idx.reshape(-1)
        sorted_e = torch.where(flat >= 0, flat, E)[s.order_S]
        rank, pos, overflow = send_positions(counts, src, sorted_e, capacity)
        for j in range(sorted_e.numel()):
            if rank[j] >= 0:
                key = (int(rank[j]), int(pos[j]))
                assert key not in received[int(rank[j])], f"two rows written to {key}"
                received[int(rank[j])][int(pos[j])] = (int(sorted_e[j]), src, int(s.order_S[j]))
    return counts, received, overflow


def test_positions_reproduce_reference_order():
    torch.manual_seed(0)
    E, K = 8, 2
    idx = [
        (
            torch.stack([torch.randperm(E)[:K] for _ in range(T)])
            if T
            else torch.zeros(0, K, dtype=torch.long)
        )
        for T in (5, 0, 9, 3)
    ]
    idx[2][1, 1] = -1  # an unused slot
    counts, received, overflow = simulate(idx, E, capacity=64)
    assert not overflow.any()
    for r in range(4):
        rows = [received[r][p] for p in range(len(received[r]))]  # dense from 0
        expected = sorted(rows, key=lambda t: (t[0], t[1], t[2]))
        assert rows == expected
        src = sources_of_rows(counts, r, 64)
        assert src[: len(rows)].tolist() == [t[1] for t in rows]
        assert (src[len(rows) :] == -1).all()


def test_overflow_sends_nothing_to_that_receiver():
    idx = [torch.full((6, 1), 0), torch.full((6, 1), 0)]  # 12 rows to rank 0, capacity 8
    counts, received, overflow = simulate(idx, 4, capacity=8)
    assert overflow.tolist() == [True, False]
    assert received[0] == {} and receiver_totals(counts).tolist() == [12, 0]
    assert (sources_of_rows(counts, 0, 8) == -1).all()


def random_routing(T, E, K, seed, unused=0.1):
    g = torch.Generator().manual_seed(seed)
    idx = (
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.long)
    )
    idx[torch.rand(idx.shape, generator=g) < unused] = -1
    return idx


@pytest.mark.parametrize("seed", range(4))
def test_slot_order_layout_matches_sorted_order(seed):
    """The kernels' slot-order destinations are the sorted-order positions, and the receiver's
    segments tile exactly the rows written to it, source by source."""
    E, K, N = 12, 3, 4
    idx = [random_routing(T, E, K, seed * 10 + r) for r, T in enumerate((7, 0, 11, 4))]
    capacity = 64 if seed % 2 == 0 else 9  # odd seeds: some receivers overflow
    counts, received, overflow = simulate(idx, E, capacity)
    for src in range(N):
        flat = idx[src].reshape(-1)
        rank_S, pos_S, over = slot_destinations(counts, src, flat, capacity)
        assert torch.equal(over, overflow)
        s = sort_slots_by_expert(idx[src], E)
        sorted_e = torch.where(flat >= 0, flat, E)[s.order_S]
        want_rank, want_pos, _ = send_positions(counts, src, sorted_e, capacity)
        assert torch.equal(rank_S[s.order_S], want_rank) and torch.equal(pos_S[s.order_S], want_pos)
    G = E // N
    for r in range(N):
        seg = segments(counts, r, capacity)
        covered = {}
        for src in range(N):
            for g in range(G):
                for i in range(int(seg[1, src, g])):
                    covered[int(seg[0, src, g]) + i] = (r * G + g, src)
        assert covered == {p: (e, src) for p, (e, src, _) in received[r].items()}


def test_ranks_in_expert_are_stable_token_order():
    idx = torch.tensor([3, -1, 3, 0, 3, 0])
    rank, counts = ranks_in_expert(idx, 4)
    assert rank.tolist() == [0, -1, 1, 0, 2, 1] and counts.tolist() == [2, 0, 0, 3]


def test_ep_nodes_from_the_launcher_environment():
    """transport='auto' takes nvshmem only inside one node (P2P stores); this counts the nodes an EP
    group spans."""
    from moe_dist.transport import ep_nodes

    assert ep_nodes([0, 1, 2, 3], {"LOCAL_WORLD_SIZE": "8"}) == 1
    assert ep_nodes([4, 5, 6, 7], {"LOCAL_WORLD_SIZE": "4"}) == 1
    assert ep_nodes([2, 3, 4, 5], {"LOCAL_WORLD_SIZE": "4"}) == 2
    assert ep_nodes(list(range(16)), {"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}) == 2
    assert ep_nodes([0, 1, 2], {}) == 1  # unknown layout: one node
