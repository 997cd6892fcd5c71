"""Plain data parallelism for models holding MoELayers (no sharding): after backward, average every
gradient the way one process on the whole global batch would have it.

Non-expert gradients: mean over the DP group (all ranks). Expert gradients: summed over the EDP
group and divided by the whole DP degree W, because the all-to-all backward has already summed the
contributions of the EP row into each expert (fsdp.py explains the arithmetic). """

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_dist.layer import is_expert_param


@torch.no_grad()
def _sum_and_scale(grads: list[torch.Tensor], group, scale: float) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


@torch.no_grad()
def allreduce_gradients(model: nn.Module, groups) -> None:
    """Collective over all ranks; parameters without a gradient get zeros so every rank sends the
    same."""
    dense, expert = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(p) else dense).append(p.grad)
    scale = 1.0 / groups.world_size
    for dtype in sorted({g.dtype for g in dense + expert}, key=str):  # one flat buffer per dtype
        _sum_and_scale([g for g in dense if g.dtype == dtype], groups.dp_group, scale)
        _sum_and_scale([g for g in expert if g.dtype == dtype], groups.edp_group, scale)
