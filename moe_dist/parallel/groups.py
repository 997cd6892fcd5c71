"""ParallelGroups: which ranks share experts, and which hold replicas of the same experts.

World of W ranks, expert-parallel size P, laid out as a (W/P) x P grid with EP ranks contiguous
(rank = edp_index * P + ep_index), so an EP group stays inside a node when P <= GPUs per node:

    ep group   (a row):    ranks that split the experts between them; tokens travel inside it
    edp group  (a column): ranks holding the same experts; expert gradients are reduced over it
    dp group   (all):      every rank; non-expert gradients are reduced over it

Groups are objects passed to layers and integrations, never module-level globals.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.distributed as dist


class ParallelGroups:
    def __init__(self, ep_size: int = 1):
        if not isinstance(ep_size, int) or ep_size < 1:
            raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelGroups needs torch.distributed initialised first "
                "(moe_dist.parallel.init_distributed() or dist.init_process_group)"
            )
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        if self.world_size % ep_size:
            raise ValueError(
                f"world size ({self.world_size}) must be divisible by ep_size ({ep_size})"
            )
        self.ep_size = ep_size
        self.edp_size = self.world_size // ep_size
        self.ep_rank = self.rank % ep_size
        self.edp_rank = self.rank // ep_size
        self.backend = dist.get_backend()
        self.device_type = "cuda" if self.backend == "nccl" else "cpu"
        # One DeviceMesh owns the sub-groups, so FSDP2 and DTensor see the very groups tokens use.
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(
            self.device_type, (self.edp_size, ep_size), mesh_dim_names=("edp", "ep")
        )
        self.ep_group = self.mesh.get_group("ep")
        self.edp_group = self.mesh.get_group("edp")
        self.dp_group = dist.group.WORLD

    @cached_property
    def dp_mesh(self):
        """1-D mesh over every rank, for sharding non-expert parameters (FSDP2)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device_type, (self.world_size,), mesh_dim_names=("dp",))

    @property
    def ep_ranks(self) -> list[int]:
        return list(range(self.edp_rank * self.ep_size, (self.edp_rank + 1) * self.ep_size))

    @property
    def edp_ranks(self) -> list[int]:
        return list(range(self.ep_rank, self.world_size, self.ep_size))

    def __repr__(self) -> str:
        return (
            f"ParallelGroups(world={self.world_size}, ep_size={self.ep_size},"
            f" edp_size={self.edp_size}, rank={self.rank}, ep_rank={self.ep_rank},"
            f" edp_rank={self.edp_rank})"
        )


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over `group` (no-op for a group of one); returns t."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t
