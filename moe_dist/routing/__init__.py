"""Routers: logits -> RoutingPlan (expert ids, weights, counts, losses). No process groups here."""

from .capacity import drop_over_capacity, expert_capacity
from .losses import AuxTerms, joint_aux_loss, load_balancing_loss, router_z_loss
from .plan import RoutingPlan, scale_inputs
from .router import Router

__all__ = [
    "AuxTerms",
    "Router",
    "RoutingPlan",
    "drop_over_capacity",
    "expert_capacity",
    "joint_aux_loss",
    "load_balancing_loss",
    "router_z_loss",
    "scale_inputs",
]
