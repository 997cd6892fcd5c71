"""Expert pruning and merging: identities, invariances and exact cases, on single-rank models."""

import pytest
import torch
from torch import nn

from moe_dist import MoELayer
from moe_dist.extensions.compress import (
    group_experts,
    match_units,
    merge_experts,
    merge_layer,
    prune_experts,
    remove_experts,
    routing_statistics,
)
from moe_dist.extensions.compress.merge import permute_units

from tests.conftest import config_builder

H, F = 16, 12


cfg_of = config_builder(hidden_size=H, ffn_hidden_size=F, num_experts=6, expert_backend="loop")


class TinyModel(nn.Module):
    """embedding -> two residual MoE blocks -> head: enough structure to find layers by path."""

    def __init__(self, cfg, groups=None):
        super().__init__()
        self.inp = nn.Linear(4, H)
        self.blocks = nn.ModuleList(MoELayer(cfg, groups, name=f"blocks.{i}") for i in range(2))
        self.out = nn.Linear(H, 3)

    def forward(self, x):
        h = self.inp(x)
        for moe in self.blocks:
            h = h + moe(h).output
        return self.out(h)


def batches(n=3, seed=0, shape=(2, 10, 4)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize(
    "kw", [{}, {"router": "sigmoid", "num_shared_experts": 1, "activation": "gelu"}]
)
def test_prune_to_all_experts_and_merge_to_all_are_identity(kw):
    torch.manual_seed(0)
    model = TinyModel(cfg_of(**kw))
    x = batches(1, seed=9)[0]
    rng = torch.get_rng_state()
    for compressed in (prune_experts(model, batches(), 6), merge_experts(model, batches(), 6)):
        assert all(b.cfg == model.blocks[0].cfg for b in compressed.blocks)
        torch.testing.assert_close(compressed(x), model(x), rtol=0, atol=0)
        assert compressed.blocks[0] is not model.blocks[0] and compressed.inp is not model.inp
    assert torch.equal(torch.get_rng_state(), rng)  # building the new layers drew nothing


def never_chosen(layer: MoELayer, expert: int) -> None:
    """Inputs get a large positive coordinate 0; every router row but `expert` reads it."""
    with torch.no_grad():
        layer.router.weight[:, 0] = 3.0
        layer.router.weight[expert] = 0.0


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_pruning_an_unused_expert_leaves_outputs_unchanged(router):
    torch.manual_seed(1)
    layer = MoELayer(cfg_of(router=router, num_shared_experts=1))
    never_chosen(layer, 4)
    if router == "sigmoid":
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.arange(6) * 0.01)

    def inputs(seed):
        x = batches(1, seed, (40, H))[0]
        x[:, 0] = 4.0 + x[:, 0].abs()
        return x

    calib = [inputs(s) for s in range(3)]
    pruned = prune_experts(layer, calib, keep=5)
    assert pruned.cfg.num_experts == 5 and pruned.cfg.top_k == 2
    kept = [0, 1, 2, 3, 5]
    torch.testing.assert_close(pruned.router.weight, layer.router.weight[kept])
    torch.testing.assert_close(pruned.router.expert_bias, layer.router.expert_bias[kept])
    torch.testing.assert_close(pruned.experts.w_in, layer.experts.w_in[kept])
    x = inputs(7)
    y, _, counts = layer(x)
    assert counts[4] == 0
    torch.testing.assert_close(pruned(x).output, y)


def test_remove_experts_reindexes_and_clips_top_k():
    torch.manual_seed(2)
    model = TinyModel(cfg_of(top_k=3))
    small = remove_experts(model, {"blocks.0": [5, 1], "blocks.1": [0, 2, 3, 4]})
    assert small.blocks[0].cfg.num_experts == 2 and small.blocks[0].cfg.top_k == 2
    assert small.blocks[1].cfg.num_experts == 4 and small.blocks[1].cfg.top_k == 3
    torch.testing.assert_close(small.blocks[0].experts.w_out, model.blocks[0].experts.w_out[[1, 5]])
    torch.testing.assert_close(
        small.blocks[1].router.weight, model.blocks[1].router.weight[[0, 2, 3, 4]]
    )
    assert model.blocks[0].cfg.num_experts == 6  # the original is untouched
    with pytest.raises(ValueError, match=r"subset of \[0, 6\)"):
        remove_experts(model, {"blocks.0": [6]})
    with pytest.raises(ValueError, match=r"keep \(7\) must be an int in \[1, num_experts \(6\)\]"):
        prune_experts(model, batches(), 7)
    with pytest.raises(ValueError, match="calibration_batches is empty"):
        prune_experts(model, [], 3)


def test_group_limited_routing_keeps_groups_only_when_even():
    torch.manual_seed(3)
    layer = MoELayer(cfg_of(router="group_limited", num_expert_groups=3, topk_groups=2))
    even = remove_experts(layer, {"": [0, 2, 4]})  # one per group of two
    assert (even.cfg.router, even.cfg.num_expert_groups) == ("group_limited", 3)
    with pytest.warns(UserWarning, match="cannot keep 3-group routing"):
        uneven = remove_experts(layer, {"": [0, 1, 2, 4]})
    assert (uneven.cfg.router, uneven.cfg.num_expert_groups, uneven.cfg.topk_groups) == (
        "softmax",
        1,
        1,
    )
    uneven(torch.randn(5, H))


@pytest.mark.parametrize("method", ["scipy", "greedy"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_match_units_recovers_a_permutation(method, activation):
    torch.manual_seed(4)
    layer = MoELayer(cfg_of(activation=activation))
    w_in, w_out = layer.experts.w_in[0], layer.experts.w_out[0]
    perm = torch.randperm(F)
    inv = torch.argsort(perm)
    shuffled_in, shuffled_out = permute_units(w_in, w_out, perm, F)
    from moe_dist.extensions.compress.merge import _unit_features

    found = match_units(
        _unit_features(w_in, w_out, F), _unit_features(shuffled_in, shuffled_out, F), method
    )
    assert torch.equal(found, inv)
    back_in, back_out = permute_units(shuffled_in, shuffled_out, found, F)
    assert torch.equal(back_in, w_in) and torch.equal(back_out, w_out)


def test_group_experts_by_frequency_and_logit_similarity():
    freq = torch.tensor([5, 50, 3, 40, 0])
    sim = torch.eye(5, dtype=torch.float64)
    sim[0, 3] = sim[3, 0] = 0.9
    sim[2, 1] = sim[1, 2] = 0.5
    sim[4, 1] = sim[1, 4] = 0.2
    assert group_experts(freq, sim, 2) == [[1, 2, 4], [3, 0]]


@pytest.mark.parametrize("method", ["scipy", "greedy"])
def test_merging_identical_experts_is_exact(method):
    """Experts 3, 4 are hidden-unit permutations of 0, 1 (the same functions), with the same router
    rows: merging 5 -> 3 must give the layer's outputs back, and 2 stays alone."""
    torch.manual_seed(5)
    layer = MoELayer(cfg_of(num_experts=5, top_k=1, num_shared_experts=1))
    with torch.no_grad():
        for src, dst in ((0, 3), (1, 4)):
            w_in, w_out = permute_units(
                layer.experts.w_in[src], layer.experts.w_out[src], torch.randperm(F), F
            )
            layer.experts.w_in[dst], layer.experts.w_out[dst] = w_in, w_out
            layer.router.weight[dst] = layer.router.weight[src]
    calib = batches(4, 11, (50, H))
    _, sim = routing_statistics(layer, calib)[""]
    assert sim[0, 3] == pytest.approx(1.0) and sim[1, 4] == pytest.approx(1.0)
    merged = merge_experts(layer, calib, 3, method=method)
    assert merged.cfg.num_experts == 3 and merged.cfg.top_k == 1
    x = batches(1, 12, (64, H))[0]
    torch.testing.assert_close(merged(x).output, layer(x).output, rtol=1e-5, atol=1e-6)
    # Top-1 ties went to the lower id, so 3 and 4 never fired: average with weight on both members
    # too.
    both = merge_layer(layer, [[0, 3], [1, 4], [2]], torch.tensor([3, 1, 2, 5, 7]), method=method)
    torch.testing.assert_close(both.experts.w_in, layer.experts.w_in[:3], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(both(x).output, layer(x).output, rtol=1e-5, atol=1e-6)


def test_merge_weights_by_frequency_after_alignment():
    torch.manual_seed(6)
    layer = MoELayer(cfg_of(num_experts=2, top_k=1))
    calib = batches(2, 13, (60, H))
    freq, _ = routing_statistics(layer, calib)[""]
    merged = merge_experts(layer, calib, 1)
    from moe_dist.extensions.compress.merge import _unit_features

    d, o = (0, 1) if freq[0] >= freq[1] else (1, 0)
    w = layer.experts
    perm = match_units(
        _unit_features(w.w_in[d], w.w_out[d], F), _unit_features(w.w_in[o], w.w_out[o], F)
    )
    a_in, a_out = permute_units(w.w_in[o], w.w_out[o], perm, F)
    fd, fo = freq[d].item() / freq.sum().item(), freq[o].item() / freq.sum().item()
    torch.testing.assert_close(merged.experts.w_in[0], fd * w.w_in[d] + fo * a_in)
    torch.testing.assert_close(merged.experts.w_out[0], fd * w.w_out[d] + fo * a_out)
    torch.testing.assert_close(
        merged.router.weight[0], layer.router.weight[d]
    )  # the dominant's row


def test_compressed_model_saves_and_loads_into_a_fresh_model(tmp_path):
    torch.manual_seed(7)
    model = TinyModel(cfg_of())
    for compressed in (prune_experts(model, batches(), 4), merge_experts(model, batches(), 3)):
        torch.save(compressed.state_dict(), tmp_path / "c.pt")
        fresh = TinyModel(compressed.blocks[0].cfg)
        fresh.load_state_dict(torch.load(tmp_path / "c.pt"))
        x = batches(1, 8)[0]
        torch.testing.assert_close(fresh(x), compressed(x), rtol=0, atol=0)
