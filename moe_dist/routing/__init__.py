"""Routers: logits -> RoutingPlan (expert ids, weights, counts, losses). No process groups here."""

from .capacity import drop_over_capacity, expert_capacity
from .losses import load_balancing_loss, router_z_loss
from .plan import RoutingPlan, scale_inputs
from .router import Router

__all__ = [
    "Router",
    "RoutingPlan",
    "drop_over_capacity",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "scale_inputs",
]
