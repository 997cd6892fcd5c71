"""Expert compression from routing statistics: the result is ordinary MoELayers with fewer experts.

    pruned = prune_experts(model, calibration_batches, keep=4)        # EASY-EP importance
    (prune.py) merged = merge_experts(model, calibration_batches, num_experts=4)  # MC-SMoE merging
    (merge.py)

Both take a single-rank (EP=1) model and leave it untouched; save the result's state_dict and load
it into a model built from the new layers' `cfg` at any EP size dividing the new expert count (rank
r holds experts [r * E / ep, (r + 1) * E / ep) of each layer). """

from .merge import group_experts, match_units, merge_experts, merge_layer, routing_statistics
from .prune import expert_importance, prune_experts, remove_experts, top_experts

__all__ = [
    "expert_importance",
    "group_experts",
    "match_units",
    "merge_experts",
    "merge_layer",
    "prune_experts",
    "remove_experts",
    "routing_statistics",
    "top_experts",
]
