"""Issue 15 on 2 gloo processes: a failing, stalling or disagreeing rank makes every rank raise the
same clear error (layer, step, origin rank), quickly; never a hang, never a wrong output.

Each scenario asserts inside the children what each rank raised; run_distributed's timeout bounds
every test far below gloo's 300 s default (the layers use a few seconds' peer_timeout_s)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import moe_dist
from moe_dist import MoEConfig, MoELayer, ParallelGroups

from .harness import run_distributed

WORLD, H = 2, 8
LIMIT_S = 45  # each test's bound; the 300 s process-group default is never reached


def cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=H, ffn_hidden_size=16, num_experts=4, top_k=2, transport="collective")
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


# -- case 4: DeepSpeed checkpoints load with weights_only=True --------------------------------------
class _Exploit:
    """Unpickling this runs open(marker, 'w'): the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def scenario_deepspeed_refuses_malicious_pickle(root: str):
    from moe_dist.training import deepspeed as moe_ds

    from .test_training_checkpoint import trainer

    base, groups = trainer(ep=WORLD, backend="deepspeed")
    try:
        base.engine.save_checkpoint(root, tag="t")
        dist.barrier()
        # A resume of the untouched checkpoint works with weights_only loading (ZeRO state too).
        base.engine.load_checkpoint(root, tag="t")
        marker = f"{root}/pwned"
        target = f"{root}/t/mp_rank_00_model_states.pt"  # every rank reads it
        if dist.get_rank() == 0:
            state = torch.load(target, map_location="cpu", weights_only=False)  # test's own file
            state["innocent_looking"] = _Exploit(marker)
            torch.save(state, target)
        dist.barrier()
        with pytest.raises(moe_ds.UnsafeCheckpoint, match=r"cannot be loaded safely .*open"):
            base.engine.load_checkpoint(root, tag="t")
        assert not os.path.exists(marker), "the malicious pickle ran"
    finally:
        moe_ds.unregister_groups(groups)


def test_deepspeed_refuses_a_malicious_pickle(tmp_path):
    run_distributed(
        scenario_deepspeed_refuses_malicious_pickle, WORLD, str(tmp_path), timeout_s=LIMIT_S
    )
