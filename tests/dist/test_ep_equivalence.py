"""EP=N equals EP=1: outputs and gradients, over gloo with 2 and 4 CPU processes.

Every rank builds the EP=N layer and an EP=1 layer under the same seed (no weight copying: this also
tests EP-invariant initialisation), runs the EP=N layer on its own tokens and the EP=1 layer on
everyone's tokens, and compares its own slice. Token counts differ per rank, one rank has none.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer, ParallelGroups
from moe_dist.training.router_bias import RouterBiasUpdater

from .harness import run_distributed

H, F = 16, 24


def tokens_of(rank: int, world: int, seed: int) -> torch.Tensor:
    counts = [7, 0, 11, 4][:world] if world > 1 else [7]
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randn(counts[rank], H, generator=gen)


def skew_router_to_one_expert(layer: MoELayer, expert: int) -> None:
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[expert] = 5.0  # tokens are shifted positive below, so this expert wins


def compare_layers(cfg: MoEConfig, transport: str, seed: int, skew: bool = False, train_steps: int = 1):
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = ParallelGroups(ep_size=world)
    torch.manual_seed(seed)
    ep_layer = MoELayer(cfg.replace(transport=transport), groups)
    torch.manual_seed(seed)
    ref_layer = MoELayer(cfg.replace(transport="local"))
    if skew:
        skew_router_to_one_expert(ep_layer, 3)
        skew_router_to_one_expert(ref_layer, 3)

    for step in range(train_steps):
        xs = [tokens_of(r, world, seed + step) + (3.0 if skew else 0.0) for r in range(world)]
        x_mine = xs[rank].clone().requires_grad_(True)
        x_all = torch.cat(xs).requires_grad_(True)
        g_mine = torch.cos(torch.arange(x_mine.numel(), dtype=torch.float32)).view_as(x_mine)
        g_all = torch.cat([torch.cos(torch.arange(x.numel(), dtype=torch.float32)).view_as(x) for x in xs])

        ep_layer.zero_grad()
        ref_layer.zero_grad()
        # aux loss is a per-micro-batch quantity: it equals EP=1 on this rank's tokens alone.
        expected_aux = ref_layer.router(x_mine.detach()).aux_loss.detach()
        out, aux, counts = ep_layer(x_mine)
        ref_out, _, ref_counts = ref_layer(x_all)
        (out * g_mine).sum().backward()
        (ref_out * g_all).sum().backward()

        start = sum(x.shape[0] for x in xs[:rank])
        mine = slice(start, start + x_mine.shape[0])
        torch.testing.assert_close(out, ref_out[mine], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_mine.grad, x_all.grad[mine], rtol=1e-5, atol=1e-5)
        if x_mine.shape[0]:
            torch.testing.assert_close(aux, expected_aux, rtol=1e-5, atol=1e-6)
        total = counts.clone()
        dist.all_reduce(total)
        assert torch.equal(total, ref_counts), (total, ref_counts)

        # Expert weights: this rank's experts already saw every rank's tokens (all-to-all backward).
        G = cfg.num_experts // world
        for name in ("w_in", "w_out"):
            mine_e = slice(rank * G, (rank + 1) * G)
            torch.testing.assert_close(getattr(ep_layer.experts, name), getattr(ref_layer.experts, name)[mine_e])
            torch.testing.assert_close(getattr(ep_layer.experts, name).grad,
                                       getattr(ref_layer.experts, name).grad[mine_e], rtol=1e-5, atol=1e-5)
        # Replicated weights: their gradient is the sum over ranks (a data-parallel all-reduce).
        for (name, p), (_, p_ref) in zip(ep_layer.named_parameters(), ref_layer.named_parameters()):
            if name.startswith("experts."):
                continue
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        # The optimizer step's bias update: EP=N sums its ranks' loads, EP=1 saw every token.
        RouterBiasUpdater(ep_layer, groups).step()
        RouterBiasUpdater(ref_layer).step()
        torch.testing.assert_close(ep_layer.router.expert_bias, ref_layer.router.expert_bias)


def scenario_all(world: int):
    E = 8
    base = MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=2)
    cases = [
        (base, {}),
        (base.replace(num_shared_experts=2, activation="gelu"), {}),
        (base.replace(router="sigmoid", num_expert_groups=4, topk_groups=2), {"train_steps": 3}),
        (base.replace(router="group_limited", num_expert_groups=4, topk_groups=2, z_loss_coef=1e-3), {}),
        (base.replace(router="top_p", top_p=0.6, top_k=3), {}),
        (base.replace(top_k=1), {"skew": True}),
        (base.replace(top_k=2), {"skew": True}),
    ]
    for i, (cfg, kw) in enumerate(cases):
        for transport in ("collective", "reference"):
            compare_layers(cfg, transport, seed=10 + i, **kw)


@pytest.mark.parametrize("world", [2, 4])
def test_ep_equals_ep1(world):
    run_distributed(scenario_all, world, world)


def scenario_bad_configs():
    groups = ParallelGroups(ep_size=4)
    with pytest.raises(ValueError, match=r"num_experts \(6\) must be divisible by ep_size \(4\)"):
        MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=6, top_k=2), groups)
    with pytest.raises(ValueError, match=r"world size \(4\) must be divisible by ep_size \(3\)"):
        ParallelGroups(ep_size=3)
    with pytest.raises(ValueError, match="transport='local'"):
        MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=8, transport="local"), groups)


def test_bad_configs_fail_at_construction():
    run_distributed(scenario_bad_configs, 4)
