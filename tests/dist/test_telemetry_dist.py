"""Over gloo: telemetry reduced across EP ranks equals EP=1 telemetry on everyone's tokens, and
models compressed at EP=1 load and run at EP=2 with the EP=1 outputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_dist import MoEConfig, MoELayer, ParallelGroups, is_expert_param
from moe_dist.extensions.compress import merge_experts, prune_experts
from moe_dist.extensions.telemetry import RoutingTelemetry

from ..unit.test_compress import TinyModel  # the same two-block model the compress tests use
from .harness import run_distributed

H = 16
ADDITIVE = ("tokens", "tokens_per_expert", "coactivation", "gate_sum", "output_norm_sum", "dropped_slots",
            "srp", "srp_f1_by_threshold", "sch_by_cache_size")


def sequences(n: int, seed: int, S: int = 12) -> torch.Tensor:
    return torch.randn(n, S, H, generator=torch.Generator().manual_seed(seed))


def scenario_telemetry(world: int):
    rank = dist.get_rank()
    groups = ParallelGroups(ep_size=world)
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=24, num_experts=8, top_k=2, num_shared_experts=1)
    torch.manual_seed(0)
    ep_layer = MoELayer(cfg.replace(transport="collective"), groups)
    torch.manual_seed(0)
    ref_layer = MoELayer(cfg.replace(transport="local"))
    tel = RoutingTelemetry(ep_layer, segment_length=4, cache_size=3)
    ref = RoutingTelemetry(ref_layer, segment_length=4, cache_size=3)
    for step, counts in enumerate(([3, 0], [1, 2])):  # sequences per rank; one rank has none
        xs = [sequences(n, 100 * step + r) for r, n in enumerate(counts)]
        ep_layer(xs[rank])
        ref_layer(torch.cat(xs))
    got = tel.reduce(groups.dp_group).metrics()["moe"]
    want = ref.metrics()["moe"]
    for key in ADDITIVE:
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64),
                                   torch.tensor(want[key], dtype=torch.float64), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert got["steps"] == 2 * world  # each rank counts its own forwards
    local = tel.metrics()["moe"]  # unreduced: only this rank's share
    assert local["tokens"] == sum(n for n in ([3, 0][rank], [1, 2][rank])) * 12


def test_telemetry_reduce_equals_ep1():
    run_distributed(scenario_telemetry, 2, 2)


def load_full_state(model: nn.Module, state: dict, ep_rank: int, ep_size: int) -> None:
    """Loads an EP=1 state dict into an EP=N model: expert tensors keep this rank's slice of
    experts."""
    params = dict(model.named_parameters())
    own = {}
    for key, value in state.items():
        if key in params and is_expert_param(params[key]):
            n = value.shape[0] // ep_size
            value = value[ep_rank * n:(ep_rank + 1) * n]
        own[key] = value
    model.load_state_dict(own)


def scenario_compressed_at_ep(world: int, path: str):
    """Every rank compresses the same EP=1 model (calibration is deterministic), saves it with
    moe_dist.training.checkpoint (collective) and reloads it into an EP=2 model built from the new
    config."""
    from moe_dist.training import checkpoint

    rank = dist.get_rank()
    groups = ParallelGroups(ep_size=world)
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=12, num_experts=8, top_k=3, router="sigmoid",
                    num_shared_experts=1, transport="collective")
    gen = torch.Generator().manual_seed(5)
    calib = [torch.randn(2, 10, 4, generator=gen) for _ in range(3)]
    x = torch.randn(4 * world, 6, 4, generator=gen)
    mine = slice(rank * 4, (rank + 1) * 4)
    torch.manual_seed(1)
    model = TinyModel(cfg)  # EP=1: groups=None
    for kind, compressed in (("prune", prune_experts(model, calib, 4)), ("merge", merge_experts(model, calib, 2))):
        compressed.eval()  # training forwards would move the sigmoid router's bias
        new_cfg = compressed.blocks[0].cfg
        assert new_cfg.num_experts == (4 if kind == "prune" else 2)
        y = compressed(x).detach()
        directory = f"{path}/{kind}"
        checkpoint.save(compressed, directory, extra={"moe_cfg": dataclasses.asdict(new_cfg)})

        ep_cfg = MoEConfig(**checkpoint.read_meta(directory)["extra"]["moe_cfg"])
        assert ep_cfg == new_cfg
        from_ckpt = TinyModel(ep_cfg, groups).eval()
        checkpoint.load(from_ckpt, directory)
        from_state = TinyModel(ep_cfg, groups).eval()
        load_full_state(from_state, compressed.state_dict(), groups.ep_rank, world)
        for how, ep_model in (("checkpoint", from_ckpt), ("state_dict", from_state)):
            torch.testing.assert_close(ep_model(x[mine]), y[mine], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, kind=kind, how=how: f"{kind} via {how}: {m}")
    torch.manual_seed(1)
    sharded = TinyModel(cfg, groups)
    with pytest.raises(ValueError, match=r"sharded over ep_size \(2\)"):
        prune_experts(sharded, calib, 4)


def test_compressed_models_load_at_ep2(tmp_path):
    run_distributed(scenario_compressed_at_ep, 2, 2, str(tmp_path))
