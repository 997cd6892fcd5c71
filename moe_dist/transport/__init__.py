"""Transports move tokens to their experts and back; one interface (base.py), several paths."""

from __future__ import annotations

import os

import torch

from .base import Transport
from .collective import CollectiveTransport
from .fp8 import fp8_unsupported_reason
from .local import LocalTransport
from .permute import sort_slots_by_expert
from .reference import ReferenceTransport


# fp8 rows on nvshmem: the deduplicated (all-P2P) path; its dispatch refuses put peers clearly
NVSHMEM_DISPATCH_DTYPES = ("bf16", "fp8_e4m3")


def nvshmem_unavailable_reason(device: torch.device | None) -> str | None:
    """Why the nvshmem transport cannot run here, or None when it can."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "it needs CUDA tensors on a GPU (this layer is on %s)" % (device or "cpu")
    try:
        import nvshmem.core  # noqa: F401
    except ImportError as e:
        return f"nvshmem4py is not importable ({e}); pip install nvshmem4py-cu13"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    return None


def ep_nodes(ep_ranks: list[int], env: dict[str, str] | None = None) -> int:
    """How many nodes the EP group spans: ranks are laid out node by node (torchrun, mpirun), with
    LOCAL_WORLD_SIZE (or Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE) ranks per node; unknown: one node.
    """
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 0)
    if local < 1:
        return 1
    return len({r // local for r in ep_ranks})


def build_transport(
    kind: str,
    num_experts: int,
    groups,
    device: torch.device | None,
    cfg=None,
    dtype: torch.dtype | None = None,
) -> Transport:
    """`groups=None` means one process (EP=1). "auto" = nvshmem where it can run, else
    collective."""
    ep_size = 1 if groups is None else groups.ep_size
    dispatch_dtype = getattr(cfg, "dispatch_dtype", "bf16")
    if dispatch_dtype != "bf16":
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            raise ValueError(f"dispatch_dtype={dispatch_dtype!r} cannot run: {reason}")
    load_group = None if groups is None else groups.dp_group
    if kind == "reference":
        return ReferenceTransport(
            num_experts, None if groups is None else groups.ep_group, load_group
        )
    if kind == "auto":
        if ep_size == 1:
            kind = "local"
        else:
            # across nodes the peers take NVSHMEM puts, a path not yet measured over a real network:
            one_node = ep_nodes(groups.ep_ranks) == 1  # "auto" keeps nvshmem to one node for now
            kind = (
                "nvshmem"
                if one_node
                and nvshmem_unavailable_reason(device) is None
                and dispatch_dtype in NVSHMEM_DISPATCH_DTYPES
                else "collective"
            )
    if kind == "local":
        if ep_size != 1:
            raise ValueError(
                f"transport='local' holds every expert on one rank; ep_size is {ep_size}"
            )
        return LocalTransport(num_experts, load_group)
    if kind == "nvshmem":
        reason = nvshmem_unavailable_reason(device)
        nodes = 1 if groups is None else ep_nodes(groups.ep_ranks)
        if reason is None and nodes > 1 and cfg is not None and cfg.nvshmem_peer_path == "p2p":
            reason = (
                f"its EP group (ranks {groups.ep_ranks}) spans {nodes} nodes, and"
                " nvshmem_peer_path='p2p' stores through P2P pointers only: use 'auto' (puts to"
                " peers without P2P) or 'put'"
            )
        if reason is None and dispatch_dtype not in NVSHMEM_DISPATCH_DTYPES:
            reason = f"it does not implement dispatch_dtype={dispatch_dtype!r} yet"
        if reason is not None:
            raise RuntimeError(
                f"transport='nvshmem' cannot run: {reason}. Use transport='auto' or 'collective'."
            )
        from .nvshmem.transport import NvshmemTransport

        return NvshmemTransport(num_experts, groups, device, cfg, dtype)
    if groups is None:
        return LocalTransport(num_experts, None)  # collective over a world of one is the local case
    timeout_s = 60.0 if cfg is None else cfg.peer_timeout_s
    return CollectiveTransport(
        num_experts, groups.ep_group, load_group, dispatch_dtype, peer_timeout_s=timeout_s
    )


__all__ = [
    "CollectiveTransport",
    "LocalTransport",
    "ReferenceTransport",
    "Transport",
    "build_transport",
    "ep_nodes",
    "nvshmem_unavailable_reason",
    "sort_slots_by_expert",
]
