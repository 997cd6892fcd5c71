"""The deduplicated collective transport against the reference oracle over gloo, forward and
backward, with stamped tokens (columns 0 and 1 = source rank, token index), and its row counters
against the count of distinct (token, rank) pairs computed from the routing.
Legend: T tokens, K slots per token, E experts, G local experts, H hidden."""

import pytest
import torch
import torch.distributed as dist

from moe_dist import ParallelGroups
from moe_dist.routing import RoutingPlan
from moe_dist.routing.capacity import drop_over_capacity
from moe_dist.transport import CollectiveTransport, ReferenceTransport
from moe_dist.transport.dedup import count_pairs

from .harness import run_distributed

E, H = 8, 6


def make_plan(idx, w, unused):
    counts = torch.zeros(E, dtype=torch.long)
    counts.scatter_add_(0, idx[idx >= 0].flatten(), torch.ones_like(idx[idx >= 0].flatten()))
    return RoutingPlan(idx, w, counts, torch.zeros(()), torch.zeros((), dtype=torch.long), unused)


def routing(case, T, K, gen):
    idx = (
        torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
        if T
        else torch.zeros(0, K, dtype=torch.long)
    )
    w = torch.rand(T, K, generator=gen)
    unused = False
    if case == "one_expert" and T:
        idx[:, 0] = 5  # every token to expert 5 (one rank gets everything, the others nothing)
        idx[:, 1:] = -1
        unused = True
    if case == "top_p" and T:
        idx[torch.rand(T, K, generator=gen) < 0.35] = -1
        unused = True
    if case == "capacity":
        idx, w, _ = drop_over_capacity(idx, w, E, capacity=2)
        unused = True
    return idx, w * (idx >= 0), unused


def scenario(K):
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = ParallelGroups(ep_size=world)
    fast = CollectiveTransport(E, groups.ep_group)
    oracle = ReferenceTransport(E, groups.ep_group)
    G = E // world
    for trial, case in enumerate(["random", "top_p", "one_expert", "capacity", "random"]):
        gen = torch.Generator().manual_seed(100 * trial + rank)
        T = [5, 0, 13, 2][rank % 4] + 3 * trial  # uneven; rank 1 has no tokens in trial 0
        idx, w, unused = routing(case, T, K, gen)
        x = torch.randn(T, H, generator=gen)
        x[:, 0], x[:, 1] = rank, torch.arange(T, dtype=torch.float32)  # stamps
        outs, grads = [], []
        for tr in (fast, oracle):
            xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            tok, counts, handle = tr.dispatch(xg, make_plan(idx, wg, unused))
            n = int(counts.sum())
            scale = torch.repeat_interleave(torch.arange(1, G + 1, dtype=torch.float32), counts)
            y = torch.tanh(tok[:n]) * scale[:, None]  # a per-expert nonlinear "expert"
            out = tr.combine(y, handle)
            gout = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view_as(out)
            (out * gout).sum().backward()
            outs.append((tok[:n], counts, out))
            grads.append((xg.grad, wg.grad))
        (tok, counts, out), (ref_tok, ref_counts, ref_out) = outs
        assert torch.equal(counts, ref_counts), (case, counts, ref_counts)
        assert torch.equal(tok, ref_tok), (
            f"rank {rank} {case}: rows (source, token) {tok[:, :2].tolist()} "
            f"!= expected {ref_tok[:, :2].tolist()}"
        )
        torch.testing.assert_close(out, ref_out, msg=lambda m: f"{case} out: {m}")
        torch.testing.assert_close(grads[0][0], grads[1][0], msg=lambda m: f"{case} dx: {m}")
        torch.testing.assert_close(grads[0][1], grads[1][1], msg=lambda m: f"{case} dw: {m}")
        # Rows sent = distinct (token, destination rank) pairs; rows returned = pairs received.
        pairs_N = count_pairs(idx, G, world)
        all_pairs = [torch.zeros_like(pairs_N) for _ in range(world)]
        dist.all_gather(all_pairs, pairs_N)
        st = fast.stats
        assert st.last_dispatch.rows == int(pairs_N.sum()), (case, st.last_dispatch, pairs_N)
        assert st.last_dispatch.peer_rows == int(pairs_N.sum() - pairs_N[rank])
        assert st.last_dispatch.payload_bytes == int(pairs_N.sum()) * H * 4
        assert st.last_combine.rows == int(torch.stack(all_pairs)[:, rank].sum())
        slots = int((idx >= 0).sum())
        assert st.last_dispatch.rows <= slots  # fewer than the K-copies baseline, never more
    assert fast.stats.total_dispatch.calls == 5


@pytest.mark.parametrize("world,K", [(2, 3), (4, 4)])
def test_dedup_collective_matches_reference(world, K):
    run_distributed(scenario, world, K, timeout_s=120)
