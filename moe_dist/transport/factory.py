"""build_transport: the one place a transport is made from (config, groups, TransportOptions).

The layer is given a transport (MoELayer(cfg, groups, transport=...)) or calls this with default
options. What runs where: "auto" = local at EP=1, else nvshmem where it can run on one node, else
collective. Side effects a transport must not have live here: starting a world-of-one process
group for NVSHMEM's bootstrap and reading the launcher's environment (ranks per node, the NVSHMEM
bootstrap) when the options leave them open.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

from .base import Transport
from .collective import CollectiveTransport
from .fp8 import fp8_unsupported_reason
from .local import LocalTransport
from .options import BOOTSTRAP_ENV, TransportOptions
from .reference import ReferenceTransport

# fp8 rows on nvshmem: the deduplicated path (the default); with put peers under put_dedup=False its
# dispatch refuses them clearly
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


def ep_nodes(ep_ranks: list[int], env: Mapping[str, str] | None = None) -> int:
    """How many nodes the EP group spans: ranks are laid out node by node (torchrun, mpirun), with
    LOCAL_WORLD_SIZE (or Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE) ranks per node; unknown: one node.
    """
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or 0)
    if local < 1:
        return 1
    return len({r // local for r in ep_ranks})


def build_transport(
    cfg,
    groups=None,
    options: TransportOptions | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transport:
    """The transport for layers of `cfg` (MoEConfig: num_experts, top_k, hidden_size, transport)
    over `groups` (None: one process, EP=1). `options.kind` overrides cfg.transport. With `dtype`
    the nvshmem transport allocates its symmetric buffers now (collective: every rank builds)."""
    options = options or TransportOptions()
    kind = options.kind or cfg.transport
    device = torch.device(device) if device is not None else None
    ep_size = 1 if groups is None else groups.ep_size
    if cfg.num_experts % ep_size:
        raise ValueError(
            f"num_experts ({cfg.num_experts}) must be divisible by ep_size ({ep_size})"
        )
    dispatch_dtype = getattr(cfg, "dispatch_dtype", "bf16")
    if dispatch_dtype != "bf16":
        reason = fp8_unsupported_reason(device)
        if reason is not None:
            raise ValueError(f"dispatch_dtype={dispatch_dtype!r} cannot run: {reason}")
    if kind == "reference":
        return ReferenceTransport(cfg.num_experts, None if groups is None else groups.ep_group)
    if kind == "auto":
        if ep_size == 1:
            kind = "local"
        else:
            # across nodes the peers take NVSHMEM puts, a path not yet measured over a real network:
            one_node = ep_nodes(groups.ep_ranks) == 1  # "auto" keeps nvshmem to one node for now
            usable = (
                one_node
                and nvshmem_unavailable_reason(device) is None
                and dispatch_dtype in NVSHMEM_DISPATCH_DTYPES
            )
            kind = "nvshmem" if usable else "collective"
    if kind == "local":
        if ep_size != 1:
            raise ValueError(
                f"transport='local' holds every expert on one rank; ep_size is {ep_size}"
            )
        return LocalTransport(cfg.num_experts)
    if kind == "nvshmem":
        return _nvshmem(cfg, groups, options, device, dtype)
    if groups is None:
        return LocalTransport(cfg.num_experts)  # collective over a world of one is the local case
    return CollectiveTransport(
        cfg.num_experts, groups.ep_group, dispatch_dtype, peer_timeout_s=options.peer_timeout_s
    )


def _nvshmem(cfg, groups, options: TransportOptions, device, dtype) -> Transport:
    nv = options.nvshmem
    reason = nvshmem_unavailable_reason(device)
    nodes = 1 if groups is None else ep_nodes(groups.ep_ranks)
    if reason is None and nodes > 1 and nv.peer_path == "p2p":
        reason = (
            f"its EP group (ranks {groups.ep_ranks}) spans {nodes} nodes, and"
            " peer_path='p2p' stores through P2P pointers only: use 'auto' (puts to"
            " peers without P2P) or 'put'"
        )
    dispatch_dtype = getattr(cfg, "dispatch_dtype", "bf16")
    if reason is None and dispatch_dtype not in NVSHMEM_DISPATCH_DTYPES:
        reason = f"it does not implement dispatch_dtype={dispatch_dtype!r} yet"
    if reason is not None:
        raise RuntimeError(
            f"transport='nvshmem' cannot run: {reason}. Use transport='auto' or 'collective'."
        )
    if nv.bootstrap is None:  # the launcher's choice (launch/mpirun.sh exports it)
        nv = dataclasses.replace(nv, bootstrap=os.environ.get(BOOTSTRAP_ENV) or "uid")
    if not dist.is_initialized():
        if groups is not None:
            raise RuntimeError("groups were given but torch.distributed is not initialised")
        from ..parallel import init_distributed

        init_distributed()  # NVSHMEM's uid bootstrap rides on a (world of one) process group
    from .nvshmem.transport import NvshmemTransport

    return NvshmemTransport(
        cfg.num_experts,
        cfg.top_k,
        groups,
        device,
        nv,
        hidden_size=cfg.hidden_size,
        dtype=dtype,
        dispatch_dtype=dispatch_dtype,
        num_comm_sms=getattr(cfg, "num_comm_sms", None),
    )
