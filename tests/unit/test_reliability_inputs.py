"""Issue 15, cases 5 and 6 (single process): every bad configuration value or layer input is a
clear error at construction or at the layer's entry, never a late failure or a silent result."""

import dataclasses
import inspect
import json
import math

import pytest
import torch

from moe_dist import MoEConfig, MoELayer, NonFiniteRouterLogits


def make(**kw):
    base = dict(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


BAD = [
    (dict(num_shared_experts=1.5), r"num_shared_experts must be an int, got 1.5"),
    (dict(top_k=True), r"top_k must be a positive int, got True"),
    (dict(init_seed_offset=False), r"init_seed_offset must be an int, got False"),
    (dict(capacity_factor=math.inf), r"capacity_factor must be a finite number .*inf"),
    (dict(capacity_factor=True), r"capacity_factor must be a finite number .*True"),
    (dict(routed_scaling_factor=math.nan), r"routed_scaling_factor must be a finite number"),
    (dict(routed_scaling_factor=-math.inf), r"routed_scaling_factor must be a finite number"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor must be > 0, got 0.0"),
    (dict(aux_loss_coef=math.inf), r"aux_loss_coef must be a finite number, got inf"),
    (dict(z_loss_coef=math.nan), r"z_loss_coef must be a finite number, got nan"),
    (dict(router_bias_update_rate=math.nan), r"router_bias_update_rate must be a finite"),
    (dict(check_finite=1), r"check_finite must be a bool, got 1"),
    (dict(norm_topk_prob="yes"), r"norm_topk_prob must be a bool, got 'yes'"),
    (dict(shared_expert_gate=0), r"shared_expert_gate must be a bool, got 0"),
    (dict(shared_ffn_hidden_size=8.0), r"shared_ffn_hidden_size must be a positive int"),
    (dict(num_expert_groups=2), r"router='softmax' ignores num_expert_groups=2"),
    (
        dict(router="top_p", num_expert_groups=2, topk_groups=2),
        r"router='top_p' ignores num_expert_groups=2, topk_groups=2",
    ),
    (dict(router="sigmoid", top_p=0.7), r"router='sigmoid' ignores top_p=0.7"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[str(c) for c, _ in BAD])
def test_bad_config_value_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        make(**changes)


REMOVED = (
    r"num_chunks was removed in 0\.2\.0: the chunked pipeline never beat one chunk "
    r"\(benchmarks/results/overlap_\*\.json\); overlap with ModelConfig\.overlap_microbatches=2"
)


@pytest.mark.parametrize("value", [1, 4])
def test_a_removed_field_says_why_and_what_replaces_it(value):
    """An older config (a kwarg, or its saved dict / JSON) that still names num_chunks fails at
    construction with the reason, whatever the value, like any unknown field (TypeError) but
    with the why; replace() raises its unknown-field ValueError with the same note."""
    with pytest.raises(TypeError, match=rf"unexpected keyword argument 'num_chunks': {REMOVED}"):
        make(num_chunks=value)
    old = json.loads(json.dumps({**dataclasses.asdict(make()), "num_chunks": value}))
    with pytest.raises(TypeError, match=REMOVED):
        MoEConfig(**old)
    with pytest.raises(
        ValueError, match=rf"unknown MoEConfig fields: \['num_chunks'\] \({REMOVED}"
    ):
        make().replace(num_chunks=value)
    # any other unknown field keeps Python's own error, without a note
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'no_such_field'$"):
        make(no_such_field=value)
    with pytest.raises(ValueError, match=r"unknown MoEConfig fields: \['no_such_field'\]$"):
        make().replace(no_such_field=value)
    assert "num_chunks" not in inspect.signature(MoEConfig).parameters
    assert "shared_expert_overlap" in inspect.signature(MoEConfig).parameters


def test_settings_a_router_uses_still_pass():
    make(router="top_p", top_p=0.7)
    make(router="sigmoid", num_expert_groups=2, topk_groups=1, capacity_factor=1)
    make(router="group_limited", num_expert_groups=2, topk_groups=1)


def test_non_finite_expert_bias_is_caught_like_logits():
    torch.manual_seed(0)
    layer = MoELayer(make(router="sigmoid"))
    x = torch.randn(5, 16)
    layer(x)
    with torch.no_grad():  # as if loaded from a corrupt checkpoint
        layer.router.expert_bias[torch.randint(0, 4, ())] = math.nan
    with pytest.raises(NonFiniteRouterLogits, match=r"layer 'moe', step 1: .*expert_bias"):
        layer(x)


def test_non_finite_expert_bias_deferred():
    torch.manual_seed(0)
    layer = MoELayer(make(router="sigmoid", error_check="deferred"))
    with torch.no_grad():
        layer.router.expert_bias[1] = math.inf
    layer(torch.randn(5, 16))
    with pytest.raises(NonFiniteRouterLogits, match=r"layer 'moe', step 0"):
        layer.check_errors()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_input_dtype_checked_at_entry(dtype):
    layer = MoELayer(make(), name="blk3")
    x = torch.randn(6, 16).to(dtype)
    with pytest.raises(ValueError, match=rf"layer 'blk3'.*{dtype}.*torch.float32"):
        layer(x)


def test_input_rank_and_device_checked_at_entry():
    layer = MoELayer(make(), name="blk3")
    with pytest.raises(ValueError, match=r"layer 'blk3': input must have >= 1 dims"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"layer 'blk3': input is on meta.*cpu"):
        layer(torch.empty(3, 16, device="meta"))
    assert layer(torch.randn(16)).output.shape == (16,)  # one token, 1-D: still fine
