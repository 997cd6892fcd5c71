"""Runs under torchrun on ONE GPU with N processes (NVSHMEM PEs sharing it): the nvshmem transport
pipelined over chunks (comm stream, per-chunk epochs) against the same transport unpipelined,
forward and backward, two steps, uneven tokens and a rank with none. Prints 'OVERLAP WORKER OK <n>'.
Used by tests/gpu/test_overlap_gpu.py. Legend: T tokens, H hidden, E experts."""

import os
import sys

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer
from moe_dist.transport import NvshmemOptions, TransportOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchrun_pes import setup_pe  # noqa: E402

H, F, E = 64, 32, 8
rank, world, dev, groups = setup_pe()


def fwd_bwd(layer, x, g):
    xi = x.clone().requires_grad_(True)
    out, aux, counts = layer(xi)
    ((out * g).sum() + aux).backward()
    layer.check_errors()
    return out.detach(), counts, xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


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
        (y1, c1, gx1, gp1), (y2, c2, gx2, gp2) = fwd_bwd(piped, x, g), fwd_bwd(plain, x, g)
        label = f"rank {rank} chunks {chunks} step {step}"
        torch.testing.assert_close(
            y1, y2, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} output: {m}"
        )
        assert torch.equal(c1, c2), label
        torch.testing.assert_close(
            gx1, gx2, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} grad x: {m}"
        )
        for n in gp2:
            torch.testing.assert_close(
                gp1[n], gp2[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} grad {n}: {m}"
            )
    print(f"[rank {rank}] chunks {chunks}: pipelined == unpipelined", flush=True)

torch.cuda.synchronize()
dist.barrier()
print(f"OVERLAP WORKER OK {world}", flush=True)
