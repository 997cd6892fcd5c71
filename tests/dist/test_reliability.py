"""Issue 15 on 2 gloo processes: a failing, stalling or disagreeing rank makes every rank raise the
same clear error (layer, step, origin rank), quickly; never a hang, never a wrong output.

Each scenario asserts inside the children what each rank raised; run_distributed's timeout bounds
every test far below gloo's 300 s default (the layers use a few seconds' peer_timeout_s)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import moe_dist
from moe_dist import MoEConfig, MoELayer, ParallelGroups

from .harness import run_distributed

WORLD, H = 2, 8
LIMIT_S = 45  # each test's bound; the 300 s process-group default is never reached


def cfg(**kw) -> MoEConfig:
    base = dict(
        hidden_size=H, ffn_hidden_size=16, num_experts=4, top_k=2, transport="collective"
    )
    base.update(kw)
    return MoEConfig(**base)


def scenario_clip_refuses_groups_none():
    groups = ParallelGroups(ep_size=WORLD)
    torch.manual_seed(0)
    layer = MoELayer(cfg(), groups)
    layer(torch.randn(5, H)).output.sum().backward()
    with pytest.raises(ValueError, match=r"EP>1 layer \(group_name 'ep_size_2'\) but groups=None"):
        moe_dist.clip_grad_norm_(layer.parameters(), 0.1, None)
    moe_dist.clip_grad_norm_(layer.parameters(), 0.1, groups)  # the right call still works


def test_clip_refuses_groups_none_at_ep2():
    run_distributed(scenario_clip_refuses_groups_none, WORLD, timeout_s=LIMIT_S)
