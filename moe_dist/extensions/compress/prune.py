"""Expert pruning from calibration routing (EASY-EP's output-aware importance).

Importance of expert e in a layer = sum over calibration tokens t and their slots k routed to e of
    gate_score[t, k] * || expert_e(x_t) ||_2
(the combine weight times the norm of what the expert adds to the token). The `keep` most important
experts of each layer stay; the others go, with their router rows and aux-loss-free bias entries.
EASY-EP additionally weights each token by how much the routed experts change its hidden state; we
use the plain product, which is its expert-level term.

Legend: T tokens, H hidden, E experts, K slots per token, S = T*K slots.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist import MoELayer
from moe_dist.transport import sort_slots_by_expert
from .common import (
    build_layer,
    check_count,
    moe_layers,
    replace_layers,
    run_calibration,
    shrunk_config,
)


class _ImportanceObserver:
    """Accumulates gate x output-norm per expert. Recomputes the expert outputs from x_TH and the
    plan (in its own slot order) instead of reading y_MH, so it relies on no transport's row
    order."""

    def __init__(self, num_experts: int, device):
        self.score_E = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.slots_E = torch.zeros(num_experts, dtype=torch.int64, device=device)

    @torch.no_grad()
    def __call__(self, layer: MoELayer, x_TH, plan, counts_G, y_MH) -> None:
        E, K = layer.cfg.num_experts, plan.top_k
        idx_TK = plan.expert_idx_TK
        slots = sort_slots_by_expert(idx_TK, E)
        rows_SH = x_TH.index_select(0, slots.order_S // K)
        y_SH = layer.experts(rows_SH, slots.counts_E)  # rows of unused slots sort last, uncomputed
        norm_TK = y_SH.float().norm(dim=-1).index_select(0, slots.inverse_S).view_as(idx_TK)
        routed_TK = idx_TK >= 0
        contrib_TK = torch.where(
            routed_TK, plan.weights_TK.float() * norm_TK, 0.0
        )  # masks NaN rows too
        key_S = torch.where(routed_TK, idx_TK, E).reshape(-1)
        score = torch.zeros(E + 1, dtype=torch.float64, device=idx_TK.device)
        self.score_E += score.scatter_add_(0, key_S, contrib_TK.reshape(-1).double())[:E]
        self.slots_E += plan.tokens_per_expert_E


@torch.no_grad()
def expert_importance(model: nn.Module, calibration_batches) -> dict[str, torch.Tensor]:
    """float64 [E] per layer path: EASY-EP importance summed over the calibration tokens."""
    layers = moe_layers(model)
    observers = {
        name: _ImportanceObserver(lay.cfg.num_experts, lay.router.weight.device)
        for name, lay in layers.items()
    }
    run_calibration(model, calibration_batches, observers)
    return {name: obs.score_E for name, obs in observers.items()}


@torch.no_grad()
def remove_experts(model: nn.Module, kept: dict[str, list[int]]) -> nn.Module:
    """A copy of `model` whose layer `path` holds only experts kept[path] (old ids; kept in
    ascending order, so surviving experts keep their relative order). Layers not named stay as they
    are."""
    layers = moe_layers(model)
    new_layers = {}
    for name, ids in kept.items():
        if name not in layers:
            raise ValueError(f"no MoE layer at '{name}'; layers are {sorted(layers)}")
        layer = layers[name]
        E = layer.cfg.num_experts
        ids = sorted(set(int(e) for e in ids))
        if not ids or ids[0] < 0 or ids[-1] >= E:
            raise ValueError(
                f"MoE layer '{name or layer.name}': expert ids to keep must be a non-empty "
                f"subset of [0, {E}), got {ids}"
            )
        index = torch.tensor(ids, device=layer.router.weight.device)
        new_layers[name] = build_layer(
            layer,
            shrunk_config(layer.cfg, ids, name or layer.name),
            layer.router.weight.index_select(0, index),
            layer.router.expert_bias.index_select(0, index),
            layer.experts.w_in.index_select(0, index),
            layer.experts.w_out.index_select(0, index),
        )
    return replace_layers(model, new_layers)


def top_experts(score_E: torch.Tensor, keep: int) -> list[int]:
    """Ids of the `keep` highest scores (ties: lower id first), ascending."""
    order = torch.sort(-score_E.double().cpu(), stable=True).indices
    return sorted(order[:keep].tolist())


def prune_experts(model: nn.Module, calibration_batches, keep: int) -> nn.Module:
    """Runs `model` over `calibration_batches`, scores every expert (module docstring) and returns a
    copy of the model whose MoE layers keep their `keep` most important experts (top_k clipped to
    `keep`). The model must be single-rank (EP=1); `model` itself is left unchanged."""
    layers = moe_layers(model)
    for name, layer in layers.items():
        check_count("keep", keep, layer.cfg.num_experts, name or layer.name)
    scores = expert_importance(model, calibration_batches)
    return remove_experts(model, {name: top_experts(s, keep) for name, s in scores.items()})
