"""Upcycling at EP=2: each rank holds only its slices of the dense FFN, and with every expert active
(through the collective transport) the layer still computes the dense FFN on each rank's tokens."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_dist import ParallelGroups
from moe_dist.extensions.interop import all_experts_output, upcycle

from .harness import run_distributed

H, FD, E = 16, 48, 6


def scenario():
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = ParallelGroups(ep_size=world)
    torch.manual_seed(0)  # the same dense FFN on every rank
    dense = nn.Sequential(nn.Linear(H, FD, bias=False), nn.GELU(), nn.Linear(FD, H, bias=False))
    layer = upcycle(dense, E, top_k=2, groups=groups)
    G, f = E // world, FD // E
    assert layer.experts.w_in.shape == (G, f, H)
    torch.testing.assert_close(layer.experts.w_in.reshape(G * f, H), dense[0].weight[rank * G * f:(rank + 1) * G * f])
    x = torch.randn([5, 11][rank], H, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(all_experts_output(layer, x), dense(x), rtol=1e-5, atol=1e-6)
    zero_router = upcycle(dense, E, top_k=E, groups=groups, router_init="zeros")
    with torch.no_grad():
        torch.testing.assert_close(zero_router(x).output, dense(x), rtol=1e-5, atol=1e-6)


def test_upcycle_ep2():
    run_distributed(scenario, 2)
