"""Chunked pipeline over gloo (collective transport), EP=2 and EP=4: pipelined == unpipelined in
outputs, aux loss, counts and gradients. Token counts differ per rank, one rank has none, and some
chunks are empty on some ranks only: every rank must still make the same transport calls, or the run
hangs.

Legend: T tokens on this rank, H hidden, E experts, C chunks.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer, ParallelGroups

from tests.conftest import assert_fwd_bwd_close, fwd_bwd

from .harness import run_distributed

H, F, E = 16, 24, 8
TOKENS = [13, 0, 5, 2]  # per rank; with 4 chunks rank 3 has two empty chunks, rank 1 only empty ones


def scenario(world: int):
    rank = dist.get_rank()
    groups = ParallelGroups(ep_size=world)
    cases = [
        MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=2, num_shared_experts=1),
        MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=3, router="top_p", top_p=0.6,
                  capacity_factor=1.0),
    ]
    for c, cfg in enumerate(cases):
        for chunks in (2, 4):
            seed = 100 * c + chunks
            torch.manual_seed(seed)
            plain = MoELayer(cfg.replace(transport="collective"), groups)
            torch.manual_seed(seed)
            piped = MoELayer(cfg.replace(transport="collective", num_chunks=chunks), groups)
            gen = torch.Generator().manual_seed(seed * 10 + rank)
            x, g = torch.randn(TOKENS[rank], H, generator=gen), torch.randn(TOKENS[rank], H, generator=gen)
            got, want = fwd_bwd(piped, x, g), fwd_bwd(plain, x, g)
            label = f"rank {rank} case {c} chunks {chunks}"
            assert_fwd_bwd_close(got, want, label)
            # Not a comparison of zeros: expert weights got gradients somewhere in the group.
            total = want.grads["experts.w_in"].abs().sum().reshape(1)
            dist.all_reduce(total)
            assert total.item() > 0, label


@pytest.mark.parametrize("world", [2, 4])
def test_pipelined_equals_unpipelined_collective(world):
    run_distributed(scenario, world, world)
