"""FSDP2 for models holding MoELayers: experts sharded over the expert-data-parallel (EDP) mesh,
everything else over the data-parallel (DP) mesh — torchtitan's layout.

Why the experts' gradients are divided by the whole DP degree W and not by the EDP size:
each rank's loss is the mean over its own tokens, and the EP=1 gradient is the mean over ranks,
(1/W) sum_r dL_r/dw. At EP=P, the all-to-all backward already sums into expert e the terms of every
rank of its EP row, so after FSDP's reduce-scatter (a sum over the EDP column) expert e holds
sum over all W ranks of dL_r/dw. FSDP's default would divide by the EDP size (W/P), leaving the
gradient P times too large; dividing by W gives exactly the EP=1 gradient.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from moe_dist.layer import MoELayer, mark_expert_param
from moe_dist.training.router_bias import RouterBiasUpdater


def shard(
    model: nn.Module,
    groups,
    mp_policy: MixedPrecisionPolicy | None = None,
    *,
    units: list[nn.Module] | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Applies fully_shard in place (and returns the model): each MoELayer's experts over
    groups.mesh["edp"], each module of `units` (default: `default_units`, the transformer blocks)
    and then the root over groups.dp_mesh. A sigmoid router's bias and load are buffers, which
    FSDP leaves whole: `attach_router_bias(model, groups, optimizer)` updates the bias before each
    optimizer step."""
    moe_layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not moe_layers:
        raise ValueError(f"{type(model).__name__} holds no MoELayer; use fully_shard directly")
    mp_policy = mp_policy or MixedPrecisionPolicy()
    for layer in moe_layers:
        if layer.experts.w_in.shape[0] != layer.cfg.num_experts // groups.ep_size:
            raise ValueError(
                f"MoE layer '{layer.name}' holds {layer.experts.w_in.shape[0]} experts, but "
                f"num_experts ({layer.cfg.num_experts}) / ep_size ({groups.ep_size}) = "
                f"{layer.cfg.num_experts // groups.ep_size}: built with other groups?"
            )
        fully_shard(
            layer.experts,
            mesh=groups.mesh["edp"],
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
        )
        layer.experts.set_gradient_divide_factor(float(groups.world_size))
        if groups.backend != "nccl" and groups.edp_size > 1:
            # A divide factor other than the group size becomes NCCL's PREMUL_SUM, which gloo lacks:
            # sum, then divide. Not on a one-rank mesh: there torch 2.13 divides twice in that mode.
            layer.experts.set_force_sum_reduction_for_comms(True)
        # fully_shard registered new (DTensor) parameters: carry the expert tags over.
        for p in layer.experts.parameters():
            mark_expert_param(p, groups.ep_size)
    if units is None:
        units = default_units(model)
    for unit in units:
        fully_shard(
            unit,
            mesh=groups.dp_mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard_after_forward,
        )
    fully_shard(
        model, mesh=groups.dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward
    )
    return model


def attach_router_bias(model: nn.Module, groups, optimizer) -> RouterBiasUpdater:
    """The sigmoid routers' bias update, once per `optimizer.step()` (a step pre-hook), with the
    load summed over groups.dp_group. Call it after `shard` (the optimizer holds the sharded
    parameters)."""
    return RouterBiasUpdater(model, groups).attach(optimizer)


def default_units(model: nn.Module) -> list[nn.Module]:
    """The entries of the model's outermost nn.ModuleLists (the transformer blocks). ModuleLists
    nested in those (a Chain-of-Experts layer's extra routers) stay inside their block's unit: a
    router's weight is also read outside its forward (`router.logits(...)`: the Hugging Face
    interop, expert merging), where FSDP would not unshard a unit of its own."""
    units: list[nn.Module] = []
    outer: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(
            o == "" or name.startswith(o + ".") for o in outer
        ):
            outer.append(name)
            units.extend(module)
    return units


def is_fsdp_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


__all__ = [
    "MixedPrecisionPolicy",
    "attach_router_bias",
    "default_units",
    "is_fsdp_sharded",
    "shard",
]
