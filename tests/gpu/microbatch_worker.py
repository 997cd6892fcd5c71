"""Runs under torchrun on ONE GPU with N processes (NVSHMEM PEs sharing it): two micro-batches
through the nvshmem transport's split call (MoELayer.start / run_experts / finish, dispatches on
the comm stream, two in flight) against the same layer's plain forward on each, forward and
backward, two steps (both buffer parities), uneven tokens and an empty micro-batch on one rank.
Prints 'MICROBATCH WORKER OK <n>'. Used by tests/gpu/test_microbatch_gpu.py.
Legend: T tokens, H hidden, E experts."""

import os

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, MoELayer
from moe_dist.transport import NvshmemOptions, TransportOptions

from tests.gpu.torchrun_pes import setup_pe

H, F, E = 64, 32, 8
rank, world, dev, groups = setup_pe()

cfg = MoEConfig(
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


def run(layer, xs, gs, split: bool):
    xs = [x.clone().requires_grad_(True) for x in xs]
    if split:
        calls = [layer.start(x) for x in xs]
        for call in calls:
            layer.run_experts(call)
        outs = [layer.finish(call) for call in calls]
    else:
        outs = [layer(x) for x in xs]
    loss = sum((o.output.float() * g).sum() + o.aux_loss for o, g in zip(outs, gs))
    loss.backward()
    layer.check_errors()
    grads = {n: p.grad.float().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return [o.output.detach().float() for o in outs], [x.grad.float() for x in xs], grads


torch.manual_seed(0)
plain = MoELayer(cfg, groups, transport_options=options, name="plain", device=dev)
torch.manual_seed(0)
split = MoELayer(cfg, groups, transport_options=options, name="split", device=dev)
for step in range(2):  # the second step runs on the other buffer parity
    sizes = [[9, 4], [5, 0], [7, 7], [0, 3]][rank % 4]
    gen = torch.Generator().manual_seed(10 * step + rank)
    xs = [torch.randn(t + step, H, generator=gen).to(dev) for t in sizes]
    gs = [torch.randn(x.shape, generator=gen).to(dev) for x in xs]
    plain.zero_grad()
    split.zero_grad()
    got, want = run(split, xs, gs, True), run(plain, xs, gs, False)
    label = f"rank {rank} step {step}"
    for what, a, b in [("outputs", got[0], want[0]), ("input grads", got[1], want[1])]:
        for i, (u, v) in enumerate(zip(a, b)):
            torch.testing.assert_close(
                u, v, rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} {what} {i}: {m}"
            )
    assert got[2].keys() == want[2].keys(), label
    for n in want[2]:
        torch.testing.assert_close(
            got[2][n], want[2][n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{label} {n}: {m}"
        )
    print(f"[rank {rank}] step {step}: split calls == plain calls", flush=True)

torch.cuda.synchronize()
dist.barrier()
print(f"MICROBATCH WORKER OK {world}", flush=True)
