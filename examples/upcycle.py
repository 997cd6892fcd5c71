"""Upcycling: turn a dense FFN into a MoE layer whose experts are slices of its hidden units
(sharded over the ranks), then train the MoE layer.

    torchrun --nproc-per-node 2 examples/upcycle.py
"""

import torch
from torch import nn

from moe_dist import ParallelGroups, exit_distributed, init_distributed
from moe_dist.extensions.interop import all_experts_output, upcycle
from moe_dist.training.ddp import allreduce_gradients

rank, world, device = init_distributed()
groups = ParallelGroups(ep_size=world)
torch.manual_seed(0)  # the same dense FFN on every rank (a pretrained one in real use)
dense = nn.Sequential(nn.Linear(64, 256, bias=False), nn.GELU(), nn.Linear(256, 64, bias=False))
moe = upcycle(dense, num_experts=8, top_k=2, groups=groups).to(device)  # 8 experts of 32 units

x = torch.randn(16, 64, generator=torch.Generator().manual_seed(rank)).to(device)
with torch.no_grad():  # with every expert active the MoE layer is the dense FFN
    exact = (all_experts_output(moe, x) - dense.to(device)(x)).abs().max()
optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-3)
for step in range(3):  # then it trains as a sparse layer: top-2 of 8 experts per token
    out = moe(x)
    loss = out.output.pow(2).mean() + out.aux_loss
    loss.backward()
    allreduce_gradients(moe, groups)
    optimizer.step()
    optimizer.zero_grad()
print(
    f"rank {rank}: experts {moe.experts.first_expert}..{moe.experts.first_expert + 3} of 8 here;"
    f" all experts vs dense FFN max diff {exact:.1e}; top-2 training loss {loss.item():.4f}",
    flush=True,
)
exit_distributed()  # barrier, destroy the process groups, exit (see its docstring)
