"""Runs under torchrun on ONE GPU with N processes (NVSHMEM PEs sharing it): a layer on the nvshmem
transport with its shared experts on the side stream against the same layer with them on the
compute stream, forward and backward, two steps (both buffer parities), uneven tokens and a rank
with none. Prints 'OVERLAP WORKER OK <n>'. Used by tests/gpu/test_overlap_gpu.py (split calls:
tests/gpu/microbatch_worker.py). Legend: T tokens, H hidden, E experts."""

import os

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer
from moe_dist.transport import NvshmemOptions, TransportOptions

from tests.conftest import assert_fwd_bwd_close, fwd_bwd
from tests.gpu.torchrun_pes import setup_pe

H, F, E = 64, 32, 8
rank, world, dev, groups = setup_pe()

base = MoEConfig(
    hidden_size=H,
    ffn_hidden_size=F,
    num_experts=E,
    top_k=2,
    num_shared_experts=1,
    transport="nvshmem",
    expert_backend="loop",
    router_bias_update_rate=0.0,
)
options = TransportOptions(
    nvshmem=NvshmemOptions.from_env(os.environ, max_tokens_per_rank=64, peer_timeout_s=20.0)
)


def seeded_layer(name: str, shared_expert_overlap: bool) -> MoELayer:
    torch.manual_seed(0)  # both layers get the same weights
    cfg = base.replace(shared_expert_overlap=shared_expert_overlap)
    return MoELayer(cfg, groups, transport_options=options, name=name, device=dev)


plain, side = seeded_layer("plain", False), seeded_layer("side", True)
for step in range(2):  # the second step runs on the other buffer parity
    T = [11, 0, 7, 3][rank % 4] + step
    gen = torch.Generator().manual_seed(10 * step + rank)
    x = torch.randn(T, H, generator=gen).to(dev)
    g = torch.randn(T, H, generator=gen).to(dev)
    plain.zero_grad()
    side.zero_grad()
    got = fwd_bwd(side, x, g)
    side.check_errors()
    want = fwd_bwd(plain, x, g)
    plain.check_errors()
    label = f"rank {rank} step {step}"
    assert_fwd_bwd_close(got, want, label, rtol=1e-5, atol=1e-5)
    print(f"[rank {rank}] step {step}: side stream == compute stream", flush=True)

torch.cuda.synchronize()
dist.barrier()
print(f"OVERLAP WORKER OK {world}", flush=True)
