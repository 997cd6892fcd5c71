"""Expert merging, MC-SMoE's recipe (Li et al., "Merge, Then Compress", ICLR 2024).

Per layer, from calibration tokens:
  1. frequency f_e: slots routed to expert e; the `num_experts` most frequent experts are the
     dominant ones (ties: lower id), one per group;
  2. every other expert joins the dominant expert whose router-logit vector (its logit for each
     calibration token) has the highest cosine similarity with its own;
  3. each member's FFN hidden units are permuted to match the dominant expert's (weight matching:
  the
     permutation minimising the squared distance between unit weight vectors [gate row, up row,
     output column], by scipy's linear_sum_assignment, or a greedy matcher without scipy);
  4. the group becomes one expert: the f-weighted average of the aligned weights (plain copy of the
     dominant expert when the whole group never fired).
Router: MC-SMoE keeps routing over the old experts and sends a group's tokens to its merged expert;
a plain MoELayer with fewer experts cannot, so each merged expert takes the dominant expert's router
row and bias entry. The other rows are dropped: tokens that picked a member now pick among the
dominant rows, which steer close to the members' (that is how the groups were formed).

Legend: T tokens, H hidden, E experts, F ffn hidden, U unit features.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_dist import MoELayer
from .common import (
    build_layer,
    check_count,
    moe_layers,
    replace_layers,
    run_calibration,
    shrunk_config,
)

try:
    from scipy.optimize import linear_sum_assignment
except ImportError:  # optional: the greedy matcher stands in
    linear_sum_assignment = None


class _RoutingObserver:
    """Slot counts per expert and the Gram matrix of router-logit vectors (no per-token storage)."""

    def __init__(self, num_experts: int, device):
        self.freq_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.gram_EE = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=device)

    @torch.no_grad()
    def __call__(self, layer: MoELayer, x_TH, plan, counts_G, y_MH) -> None:
        logits_TE = layer.router.logits(x_TH).double()
        self.gram_EE += logits_TE.t() @ logits_TE
        self.freq_E += plan.tokens_per_expert_E


@torch.no_grad()
def routing_statistics(
    model: nn.Module, calibration_batches
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer path: (slot frequency [E], cosine similarity of router-logit vectors [E, E])."""
    layers = moe_layers(model)
    observers = {
        name: _RoutingObserver(lay.cfg.num_experts, lay.router.weight.device)
        for name, lay in layers.items()
    }
    run_calibration(model, calibration_batches, observers)
    out = {}
    for name, obs in observers.items():
        norm_E = obs.gram_EE.diagonal().clamp(min=1e-30).sqrt()
        out[name] = (obs.freq_E, obs.gram_EE / (norm_E[:, None] * norm_E[None, :]))
    return out


def group_experts(
    freq_E: torch.Tensor, similarity_EE: torch.Tensor, num_groups: int
) -> list[list[int]]:
    """MC-SMoE grouping: dominant = most frequent; each other expert joins its most similar
    dominant. Returns groups (dominant first, then members ascending), ordered by dominant id."""
    freq = freq_E.cpu()
    sim = similarity_EE.double().cpu()
    dominant = sorted(torch.sort(-freq.double(), stable=True).indices[:num_groups].tolist())
    groups = {d: [d] for d in dominant}
    for e in range(freq.numel()):
        if e not in groups:
            best = max(dominant, key=lambda d: (sim[e, d].item(), -d))
            groups[best].append(e)
    return [groups[d] for d in dominant]


def _unit_features(w_in: torch.Tensor, w_out: torch.Tensor, F: int) -> torch.Tensor:
    """[F, U]: everything one hidden unit owns: its input row(s) (gate and up for SwiGLU) and its
    output column."""
    rows = [w_in[f0 : f0 + F] for f0 in range(0, w_in.shape[0], F)]
    return torch.cat(rows + [w_out.t()], dim=1).double()


def match_units(ref_FU: torch.Tensor, other_FU: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """perm [F]: unit perm[f] of `other` is matched to unit f of `ref`, minimising the total squared
    distance. method: "scipy" (optimal), "greedy" (closest free pair first), "auto" (scipy if
    present). """
    if method not in ("auto", "scipy", "greedy"):
        raise ValueError(f"method must be 'auto', 'scipy' or 'greedy', got {method!r}")
    cost_FF = torch.cdist(ref_FU.detach().double(), other_FU.detach().double()).square().cpu()
    if method == "scipy" or (method == "auto" and linear_sum_assignment is not None):
        if linear_sum_assignment is None:
            raise ImportError("method='scipy' needs scipy (pip install scipy)")
        rows, cols = linear_sum_assignment(cost_FF.numpy())
        perm = torch.empty(cost_FF.shape[0], dtype=torch.int64)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
        return perm
    F = cost_FF.shape[0]
    perm = torch.full((F,), -1, dtype=torch.int64)
    taken = torch.zeros(F, dtype=torch.bool)
    for flat in torch.argsort(cost_FF.reshape(-1), stable=True).tolist():
        f, g = divmod(flat, F)
        if perm[f] < 0 and not taken[g]:
            perm[f], taken[g] = g, True
            if bool(taken.all()):
                break
    return perm


def permute_units(w_in: torch.Tensor, w_out: torch.Tensor, perm: torch.Tensor, F: int):
    """One expert's weights with hidden unit perm[f] moved to position f (the same function)."""
    perm = perm.to(w_in.device)
    index_in = torch.cat([perm + f0 for f0 in range(0, w_in.shape[0], F)])
    return w_in.index_select(0, index_in), w_out.index_select(1, perm)


@torch.no_grad()
def merge_layer(
    layer: MoELayer,
    groups: list[list[int]],
    freq_E: torch.Tensor,
    *,
    layer_name: str = "",
    method: str = "auto",
) -> MoELayer:
    """The layer with each group (dominant expert first) merged into one expert, in group order."""
    F = layer.cfg.ffn_hidden_size
    w_in, w_out = layer.experts.w_in, layer.experts.w_out
    groups = sorted(groups, key=lambda g: g[0])  # new expert order = dominant id order
    new_in, new_out = [], []
    for group in groups:
        d = group[0]
        ref_FU = _unit_features(w_in[d], w_out[d], F)
        f = freq_E[group].double().to(w_in.device)
        weights = (
            f / f.sum()
            if f.sum() > 0
            else torch.eye(len(group), dtype=torch.float64, device=w_in.device)[0]
        )
        acc_in = torch.zeros_like(w_in[d], dtype=torch.float64)
        acc_out = torch.zeros_like(w_out[d], dtype=torch.float64)
        for e, w in zip(group, weights):
            if e == d:
                a_in, a_out = w_in[e], w_out[e]
            else:
                perm = match_units(ref_FU, _unit_features(w_in[e], w_out[e], F), method)
                a_in, a_out = permute_units(w_in[e], w_out[e], perm, F)
            acc_in += w * a_in.double()
            acc_out += w * a_out.double()
        new_in.append(acc_in.to(w_in.dtype))
        new_out.append(acc_out.to(w_out.dtype))
    dominant = torch.tensor([g[0] for g in groups], device=layer.router.weight.device)
    return build_layer(
        layer,
        shrunk_config(layer.cfg, sorted(g[0] for g in groups), layer_name or layer.name),
        layer.router.weight.index_select(0, dominant),
        layer.router.expert_bias.index_select(0, dominant),
        torch.stack(new_in),
        torch.stack(new_out),
    )


def merge_experts(
    model: nn.Module, calibration_batches, num_experts: int, *, method: str = "auto"
) -> nn.Module:
    """Runs `model` over `calibration_batches` and returns a copy whose MoE layers hold
    `num_experts` merged experts each (module docstring; top_k clipped). The model must be
    single-rank (EP=1); `model` itself is left unchanged. `method` picks the unit matcher (see
    match_units)."""
    layers = moe_layers(model)
    for name, layer in layers.items():
        check_count("num_experts", num_experts, layer.cfg.num_experts, name or layer.name)
    stats = routing_statistics(model, calibration_batches)
    new_layers = {}
    for name, layer in layers.items():
        freq_E, sim_EE = stats[name]
        groups = group_experts(freq_E, sim_EE, num_experts)
        new_layers[name] = merge_layer(layer, groups, freq_E.cpu(), layer_name=name, method=method)
    return replace_layers(model, new_layers)
