"""Gradient-norm clipping over expert and non-expert parameters: the norm of the whole model's
gradient, as one process holding every parameter would compute it.

Where each piece of the gradient lives decides which ranks' pieces are summed (p-th powers; max for
inf):
  non-expert, plain tensor (replicated, e.g. after a DP all-reduce)   counted once, no reduction
  non-expert, DTensor (FSDP shard)                                    summed over the mesh dims it
  is sharded on expert, plain tensor (this EP rank's experts, replicated over EDP)  summed over the
  EP group only expert, DTensor (FSDP shard over EDP)                               over its shard
  dims (EDP), then the EP group
Expert norms are summed across the EP group (each rank holds other experts), never averaged, and
never summed over EDP replicas, which hold copies."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from moe_dist.layer import is_expert_param


def _reduction_groups(p: torch.Tensor, grad: torch.Tensor, groups) -> tuple:
    """Process groups over which this gradient's pieces must be combined."""
    out = []
    if isinstance(grad, DTensor):
        for dim, placement in enumerate(grad.placements):
            if isinstance(placement, Shard) and grad.device_mesh.size(dim) > 1:
                out.append(grad.device_mesh.get_group(dim))
    if is_expert_param(p) and groups is not None and groups.ep_size > 1:
        out.append(groups.ep_group)
    return tuple(out)


@torch.no_grad()
def total_grad_norm(
    parameters: Iterable[torch.Tensor], groups, norm_type: float = 2.0
) -> torch.Tensor:
    """The global gradient norm (float32 scalar, identical on every rank). Collective: call on all
    ranks."""
    parameters = list(parameters)
    if groups is None or groups.ep_size == 1:
        _refuse_sharded_experts(parameters, groups)
    norm_type = float(norm_type)
    is_inf = math.isinf(norm_type)
    # Parameters are visited in model order, the same on every rank, so every rank issues the same
    # collectives in the same order.
    partial_by_groups: dict[tuple, torch.Tensor] = {}
    for p in parameters:
        # A parameter without a gradient still joins its reduction (as zero), so that every rank
        # reduces the same keys even where some rank left a parameter unused.
        grad = p.grad if p.grad is not None else p
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        if p.grad is None or local.numel() == 0:
            piece = torch.zeros((), dtype=torch.float32, device=local.device)
        elif is_inf:
            piece = local.detach().abs().max().float()
        else:
            piece = torch.linalg.vector_norm(local.detach().float(), norm_type) ** norm_type
        key = _reduction_groups(p, grad, groups)
        if key in partial_by_groups:
            acc = partial_by_groups[key]
            partial_by_groups[key] = torch.maximum(acc, piece) if is_inf else acc + piece
        else:
            partial_by_groups[key] = piece
    total = None
    for key, value in partial_by_groups.items():
        for group in key:
            dist.all_reduce(
                value, op=dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM, group=group
            )
        total = (
            value if total is None else (torch.maximum(total, value) if is_inf else total + value)
        )
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total if is_inf else total ** (1.0 / norm_type)


def _refuse_sharded_experts(parameters: list[torch.Tensor], groups) -> None:
    """Expert parameters of an EP>1 layer hold only this rank's experts: without the EP group the
    norm would be a per-rank norm, different on each rank, and each rank would clip differently."""
    for p in parameters:
        name = getattr(p, "group_name", "")
        if is_expert_param(p) and name.startswith("ep_size_") and name != "ep_size_1":
            have = "groups=None" if groups is None else f"groups with ep_size={groups.ep_size}"
            raise ValueError(
                f"clip_grad_norm_ got expert parameters of an EP>1 layer (group_name '{name}') "
                f"but {have}: pass the ParallelGroups the model was built with, so that expert "
                "norms are summed over the EP group"
            )


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    groups,
    norm_type: float = 2.0,
) -> torch.Tensor:
    """Scales gradients in place so that their global norm is at most max_norm; returns the norm
    before clipping. `groups` is the ParallelGroups the model was built with (None: one process)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    total = total_grad_norm(parameters, groups, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        if p.grad is not None:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grad.mul_(coef.to(device=grad.device, dtype=grad.dtype))
    return total
