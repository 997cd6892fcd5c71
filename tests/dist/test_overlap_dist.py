"""Two layer calls in flight over gloo (collective transport), EP=2 and EP=4: the split call
(start A, start B, run_experts A, run_experts B, finish A, finish B) equals the same two calls made
one after the other, in outputs, aux losses, counts and gradients. Token counts differ per rank, one
rank has none, and one micro-batch is empty on some ranks only: every rank must still make the same
transport calls in the same order, or the run hangs.

Legend: T tokens on this rank, H hidden, E experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_dist import MoEConfig, MoELayer, ParallelGroups

from tests.conftest import assert_fwd_bwd_close, fwd_bwd

from .harness import run_distributed

H, F, E = 16, 24, 8
TOKENS = [13, 0, 5, 1]  # per rank; halves: rank 1 has two empty calls, rank 3 an empty second one


class TwoCalls(nn.Module):
    """The layer on the two halves of x, as split calls in flight together or one after the other;
    returns (output, aux loss, counts) summed over the calls, like one MoELayer call."""

    def __init__(self, layer: MoELayer, split: bool):
        super().__init__()
        self.layer, self.split = layer, split

    def forward(self, x):
        parts = torch.tensor_split(x, 2)
        if self.split:
            calls = [self.layer.start(part) for part in parts]
            for call in calls:
                self.layer.run_experts(call)
            outs = [self.layer.finish(call) for call in calls]
        else:
            outs = [self.layer(part) for part in parts]
        out = torch.cat([o.output for o in outs])
        return out, sum(o.aux_loss for o in outs), sum(o.tokens_per_expert for o in outs)


def scenario(world: int):
    rank = dist.get_rank()
    groups = ParallelGroups(ep_size=world)
    cases = [
        MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=2, num_shared_experts=1),
        MoEConfig(
            hidden_size=H,
            ffn_hidden_size=F,
            num_experts=E,
            top_k=3,
            router="top_p",
            top_p=0.6,
            capacity_factor=1.0,
        ),
    ]
    for c, cfg in enumerate(cases):
        seed = 100 * c
        torch.manual_seed(seed)
        plain = TwoCalls(MoELayer(cfg.replace(transport="collective"), groups), split=False)
        torch.manual_seed(seed)
        split = TwoCalls(MoELayer(cfg.replace(transport="collective"), groups), split=True)
        for step in range(2):
            gen = torch.Generator().manual_seed(seed * 10 + step * 7 + rank)
            x, g = torch.randn(TOKENS[rank], H, generator=gen), torch.randn(
                TOKENS[rank], H, generator=gen
            )
            plain.zero_grad()
            split.zero_grad()
            got, want = fwd_bwd(split, x, g), fwd_bwd(plain, x, g)
            label = f"rank {rank} case {c} step {step}"
            assert_fwd_bwd_close(got, want, label)
            # Not a comparison of zeros: expert weights got gradients somewhere in the group.
            total = want.grads["layer.experts.w_in"].abs().sum().reshape(1)
            dist.all_reduce(total)
            assert total.item() > 0, label
        assert split.layer.step == plain.layer.step == 4


@pytest.mark.parametrize("world", [2, 4])
def test_split_calls_equal_sequential_calls_collective(world):
    run_distributed(scenario, world, world)
