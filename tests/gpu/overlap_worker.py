"""Runs under torchrun on ONE GPU with N processes (NVSHMEM PEs sharing it): the nvshmem transport
pipelined over chunks (comm stream, per-chunk epochs) against the same transport unpipelined,
forward and backward, two steps, uneven tokens and a rank with none. Prints 'OVERLAP WORKER OK <n>'.
Used by tests/gpu/test_overlap_gpu.py. Legend: T tokens, H hidden, E experts."""

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
for chunks in (3, 5):
    torch.manual_seed(chunks)
    plain = MoELayer(
        base.replace(shared_expert_overlap=False),
        groups,
        transport_options=options,
        name="plain",
        device=dev,
    )
    torch.manual_seed(chunks)
    piped = MoELayer(
        base.replace(num_chunks=chunks), groups, transport_options=options, name="piped", device=dev
    )
    for step in range(2):  # the second step runs on the other buffer parity
        T = [11, 0, 7, 3][rank % 4] + step
        gen = torch.Generator().manual_seed(100 * chunks + 10 * step + rank)
        x = torch.randn(T, H, generator=gen).to(dev)
        g = torch.randn(T, H, generator=gen).to(dev)
        plain.zero_grad()
        piped.zero_grad()
        got = fwd_bwd(piped, x, g)
        piped.check_errors()
        want = fwd_bwd(plain, x, g)
        plain.check_errors()
        label = f"rank {rank} chunks {chunks} step {step}"
        assert_fwd_bwd_close(got, want, label, rtol=1e-5, atol=1e-5)
    print(f"[rank {rank}] chunks {chunks}: pipelined == unpipelined", flush=True)

torch.cuda.synchronize()
dist.barrier()
print(f"OVERLAP WORKER OK {world}", flush=True)
