"""Dispatch/combine against the reference oracle with stamped tokens: each row carries (source rank,
token index) in its first two columns, so a misplaced row names where it came from."""
import pytest
import torch
import torch.distributed as dist

from moe_dist import ParallelGroups
from moe_dist.routing import RoutingPlan
from moe_dist.transport import CollectiveTransport, ReferenceTransport

from tests.conftest import assert_same_rows, stamp

from .harness import run_distributed

E, K, H = 8, 2, 6


def make_plan(T, gen, unused=False, skew=False):
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    if skew:
        idx[:, 0] = 5
        idx[:, 1] = 2
    if unused and T:
        idx[torch.rand(T, K, generator=gen) < 0.3] = -1
    w = torch.rand(T, K, generator=gen) * (idx >= 0)
    counts = torch.bincount(idx[idx >= 0].flatten(), minlength=E)
    return RoutingPlan(idx, w, counts, torch.zeros(()), torch.zeros((), dtype=torch.long), unused)


def scenario():
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = ParallelGroups(ep_size=world)
    fast = CollectiveTransport(E, groups.ep_group)
    oracle = ReferenceTransport(E, groups.ep_group)
    G = E // world
    for trial, (unused, skew) in enumerate([(False, False), (True, False), (False, True)]):
        gen = torch.Generator().manual_seed(100 * trial + rank)
        T = [5, 0, 13, 2][rank % 4] + trial
        x = stamp(torch.randn(T, H, generator=gen), rank)
        plan = make_plan(T, gen, unused, skew)
        tok, counts, handle = fast.dispatch(x, plan)
        ref_tok, ref_counts, ref_handle = oracle.dispatch(x, plan)
        assert torch.equal(counts, ref_counts), (counts, ref_counts)
        n = int(counts.sum())
        assert_same_rows(tok[:n], ref_tok, f"rank {rank}")
        # Every received row's source really routed that token to an expert of this rank.
        all_idx = [torch.zeros(0)] * world
        dist.all_gather_object(all_idx, plan.expert_idx_TK)
        start = 0
        for g, c in enumerate(counts.tolist()):
            for row in tok[start:start + c]:
                src, t = int(row[0]), int(row[1])
                assert rank * G + g in all_idx[src][t].tolist(), f"row from rank {src} token {t} misrouted"
            start += c
        # Combine: experts = identity scaled per local expert; compare with the oracle.
        scale = torch.repeat_interleave(torch.arange(1, G + 1, dtype=torch.float32), counts)
        y = tok[:n] * scale[:, None]
        out = fast.combine(y, handle)
        ref_out = oracle.combine(y, ref_handle)
        torch.testing.assert_close(out, ref_out)
        expected = torch.zeros(T, H)
        for t in range(T):
            for k in range(K):
                e = int(plan.expert_idx_TK[t, k])
                if e >= 0:
                    expected[t] += plan.weights_TK[t, k] * x[t] * (e % G + 1)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("world", [2, 4])
def test_collective_matches_reference_with_stamps(world):
    run_distributed(scenario, world)
