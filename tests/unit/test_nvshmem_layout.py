"""The nvshmem transport's index math, on CPU: positions computed from the count matrix reproduce the
reference transport's receive order (expert-major, then source, then slot), with overflow handling."""
import torch

from moe_dist.transport.nvshmem.layout import receiver_totals, send_positions, sources_of_rows
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
    idx = [torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
           for T in (5, 0, 9, 3)]
    idx[2][1, 1] = -1  # an unused slot
    counts, received, overflow = simulate(idx, E, capacity=64)
    assert not overflow.any()
    for r in range(4):
        rows = [received[r][p] for p in range(len(received[r]))]  # dense from 0
        expected = sorted(rows, key=lambda t: (t[0], t[1], t[2]))
        assert rows == expected
        src = sources_of_rows(counts, r, 64)
        assert src[:len(rows)].tolist() == [t[1] for t in rows]
        assert (src[len(rows):] == -1).all()


def test_overflow_sends_nothing_to_that_receiver():
    idx = [torch.full((6, 1), 0), torch.full((6, 1), 0)]  # 12 rows to rank 0, capacity 8
    counts, received, overflow = simulate(idx, 4, capacity=8)
    assert overflow.tolist() == [True, False]
    assert received[0] == {} and receiver_totals(counts).tolist() == [12, 0]
    assert (sources_of_rows(counts, 0, 8) == -1).all()
