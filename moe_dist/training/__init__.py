"""The training zone: what a training loop around MoE layers needs. Each submodule loads on first
use, so that deepspeed stays an optional dependency:

    moe_dist.training.fsdp       shard(model, groups)        FSDP2: experts over EDP, the rest over
    DP moe_dist.training.deepspeed  initialize(model, groups, config)   DeepSpeed ZeRO-0/1/2
    moe_dist.training.ddp        allreduce_gradients(model, groups)  plain data parallelism
    moe_dist.training.checkpoint save / load, resharding across EP sizes moe_dist.training.clip
    clip_grad_norm_ over expert and non-expert parameters
    moe_dist.training.router_bias  RouterBiasUpdater(model, groups).attach(optimizer): the sigmoid
    router's aux-loss-free bias, updated once per optimizer step
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("checkpoint", "clip", "ddp", "deepspeed", "fsdp", "router_bias")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
