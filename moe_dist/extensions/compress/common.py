"""What pruning and merging share: finding the MoE layers, running calibration batches through the
model with observers attached, shrinking a config, building the smaller layer, and swapping it in.

Compression runs on a single-rank (EP=1) model, where every expert's weights are at hand; the result
is ordinary MoELayers that load at any EP size dividing the new expert count.
Legend: T tokens, H hidden, E experts, K slots per token, F ffn hidden.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack

import torch
from torch import nn

from moe_dist import MoEConfig, MoELayer


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """Every MoELayer of `model` by module path ("" when the model is one layer), checked to be
    EP=1."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no MoELayer to compress")
    for name, layer in layers.items():
        if layer.transport.ep_size != 1 or layer.experts.num_local != layer.cfg.num_experts:
            raise ValueError(
                f"MoE layer '{name or layer.name}' is sharded over ep_size "
                f"({layer.transport.ep_size}); compress a single-rank (EP=1) copy of the model, "
                "then load the result at any EP size"
            )
    return layers


@torch.no_grad()
def run_calibration(model: nn.Module, batches, observers: dict[str, object]) -> int:
    """Runs `model` in eval mode over `batches` with observers[name] attached to each layer; returns
    how many batches ran. A batch is a tensor (model(batch)), a tuple/list (model(*batch)) or a dict
    (model(**batch))."""
    layers = dict(model.named_modules())
    was_training = model.training
    model.eval()  # eval: no aux-loss-free bias update, no dropout
    count = 0
    try:
        with ExitStack() as stack:
            for name, fn in observers.items():
                layers[name].add_observer(fn)
                stack.callback(layers[name].remove_observer, fn)
            for batch in batches:
                if isinstance(batch, dict):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("calibration_batches is empty: compression needs routing statistics")
    return count


def shrunk_config(cfg: MoEConfig, kept: list[int], layer_name: str) -> MoEConfig:
    """cfg for a layer holding only the experts `kept` (old ids, ascending), in that order.

    top_k is clipped to the new expert count. Group-limited routing keeps its groups only when every
    group keeps the same number of experts (groups stay contiguous); otherwise routing becomes
    ungrouped (group_limited -> softmax, whose probabilities it shares) and a warning says so."""
    k = len(kept)
    changes = dict(num_experts=k, top_k=min(cfg.top_k, k))
    G = cfg.num_expert_groups
    if G > 1:
        per_group = cfg.num_experts // G
        kept_per_group = [sum(1 for e in kept if e // per_group == g) for g in range(G)]
        even = len(set(kept_per_group)) == 1 and kept_per_group[0] > 0
        if not (even and changes["top_k"] <= cfg.topk_groups * kept_per_group[0]):
            warnings.warn(
                f"MoE layer '{layer_name}': experts kept per group {kept_per_group} cannot keep "
                f"{G}-group routing; the compressed layer routes without groups",
                stacklevel=3,
            )
            changes.update(num_expert_groups=1, topk_groups=1)
            if cfg.router == "group_limited":
                changes["router"] = "softmax"
    return cfg.replace(**changes)


def build_layer(
    old: MoELayer,
    cfg: MoEConfig,
    router_weight: torch.Tensor,
    expert_bias: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
) -> MoELayer:
    """A fresh EP=1 MoELayer with `cfg`, holding the given router rows and expert weights and a copy
    of every other state of `old` (shared experts, ...). The global RNG is left as it was."""
    device, dtype = old.experts.w_in.device, old.experts.w_in.dtype
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        new = MoELayer(cfg, None, name=old.name, device=device, dtype=dtype)
    state = old.state_dict()
    state.update(
        {
            "router.weight": router_weight,
            "router.expert_bias": expert_bias,
            "experts.w_in": w_in,
            "experts.w_out": w_out,
        }
    )
    new.load_state_dict(
        state
    )  # strict: a tensor whose shape depends on E and is not handled here fails
    new.step = old.step
    new.train(old.training)
    return new


def replace_layers(model: nn.Module, new_layers: dict[str, MoELayer]) -> nn.Module:
    """A copy of `model` with new_layers[path] in place of each layer; `model` is left untouched.
    (deepcopy with the old layers pre-mapped to the new ones: nothing of the old layers is copied.)
    """
    if "" in new_layers:
        return new_layers[""]
    modules = dict(model.named_modules())
    memo = {id(modules[name]): layer for name, layer in new_layers.items()}
    return copy.deepcopy(model, memo)


def check_count(name: str, value, num_experts: int, layer_name: str) -> None:
    if not isinstance(value, int) or not 1 <= value <= num_experts:
        raise ValueError(
            f"{name} ({value!r}) must be an int in [1, num_experts ({num_experts})] "
            f"for MoE layer '{layer_name}'"
        )
