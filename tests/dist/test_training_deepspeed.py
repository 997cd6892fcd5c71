"""DeepSpeed integration: our groups in DeepSpeed's registry, MoE optimizer groups partitioned over
EDP, DeepSpeed checkpoints that resume exactly and whose experts reload at another EP size, moe_dist
checkpoints of an engine's model, ZeRO-3 refused. (EP=N == EP=1 training under ZeRO-0/1/2 is in
test_training_equivalence.py.) """
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moe_dist import MoEConfig
from moe_dist.training import checkpoint
from moe_dist.training import deepspeed as moe_ds
from moe_dist.lm import ModelConfig, MoETransformer

from .harness import run_distributed
from .test_training_checkpoint import logits_of_everyone, train, trainer
from .test_training_equivalence import WORLD


def scenario_registry_and_checkpoints(root: str):
    from deepspeed.utils import groups as ds_groups

    base, groups = trainer(ep=2, backend="deepspeed")
    try:
        engine = base.engine
        # DeepSpeed reduces and partitions over the very groups our tokens use.
        assert ds_groups._get_expert_parallel_group("ep_size_2") is groups.ep_group
        assert ds_groups._get_expert_data_parallel_group("ep_size_2") is groups.edp_group
        assert list(ds_groups._get_expert_parallel_group_ranks("ep_size_2")) == groups.ep_ranks
        assert engine.has_moe_layers and engine.num_experts == [8, 8]
        moe_groups = [i for i, g in enumerate(engine.optimizer.optimizer.param_groups) if g.get("moe")]
        assert [engine.optimizer.optimizer.param_groups[i]["name"] for i in moe_groups] == ["ep_size_2"]
        assert all(engine.optimizer.real_dp_process_group[i] is groups.edp_group for i in moe_groups)

        first = train(base, groups, range(0, 2))
        engine.save_checkpoint(root, tag="step_2", client_state={"moe_dist": {"step": 2}})
        checkpoint.save(engine, f"{root}/portable")  # moe_dist's own format, from the engine's model
        saved_logits = logits_of_everyone(base, groups)
        uninterrupted = train(base, groups, range(2, 4))
        assert uninterrupted[-1] < first[0]
    finally:
        moe_ds.unregister_groups(groups)
    # One file per global expert, DeepSpeed's naming; the dense file holds no expert weight.
    for layer in range(2):
        for e in range(8):
            assert os.path.exists(f"{root}/step_2/layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"), (layer, e)
    dense = torch.load(f"{root}/step_2/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert not [k for k in dense["module"] if ".experts." in k]

    # Resume at the same EP size (ZeRO optimizer state included): the curve continues.
    resumed, groups = trainer(ep=2, backend="deepspeed", seed=7)
    try:
        assert resumed.load(Path(root)) == {"step": 2}
        torch.testing.assert_close(train(resumed, groups, range(2, 4)), uninterrupted, rtol=1e-5, atol=1e-5)
    finally:
        moe_ds.unregister_groups(groups)

    # The portable checkpoint loads into an FSDP2 model at EP=1.
    fsdp, groups = trainer(ep=1, backend="fsdp", seed=7)
    checkpoint.load(fsdp.model, f"{root}/portable")
    torch.testing.assert_close(logits_of_everyone(fsdp, groups), saved_logits, rtol=1e-5, atol=1e-5)

    # The weights alone reload at EP=4: each rank reads its experts' files by global index.
    other, groups = trainer(ep=4, backend="deepspeed", seed=7)
    try:
        other.engine.load_checkpoint(root, tag="step_2", load_module_only=True)
        torch.testing.assert_close(logits_of_everyone(other, groups), saved_logits, rtol=1e-5, atol=1e-5)
    finally:
        moe_ds.unregister_groups(groups)
    dist.barrier()


def test_deepspeed_registry_checkpoints_and_reshard(tmp_path):
    run_distributed(scenario_registry_and_checkpoints, WORLD, str(tmp_path))


def test_zero3_is_refused_with_a_clear_message():
    model = MoETransformer(ModelConfig(d_model=8, n_layers=1, n_heads=2, max_seq_len=4),
                           MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, top_k=1))
    with pytest.raises(ValueError, match=r"zero_optimization.stage 3 is not supported .* FSDP2"):
        moe_ds.initialize(model, None, {"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    with pytest.raises(ValueError, match=r"zero_optimization.contiguous_gradients must be true"):
        moe_ds.checked_config({"zero_optimization": {"stage": 2, "contiguous_gradients": False}})
