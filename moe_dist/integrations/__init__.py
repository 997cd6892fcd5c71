"""Training integrations for models holding MoELayers. Each submodule loads on first use, so that
deepspeed stays an optional dependency:

    moe_dist.integrations.fsdp       shard(model, groups)        FSDP2: experts over EDP, the rest over DP
    moe_dist.integrations.deepspeed  initialize(model, groups, config)   DeepSpeed ZeRO-0/1/2
    moe_dist.integrations.ddp        allreduce_gradients(model, groups)  plain data parallelism
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("ddp", "deepspeed", "fsdp")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
