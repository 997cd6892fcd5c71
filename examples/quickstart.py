"""The README's API example, whole: one MoE layer, experts sharded over every process.

    torchrun --nproc-per-node 2 examples/quickstart.py

gloo on CPU, NCCL when every process has a GPU. Each rank feeds its own tokens; the layer sends
each token to the ranks holding its experts and brings the results back. Five training steps.
Legend: B batch, S sequence, H hidden.
"""

import torch
import torch.nn.functional as F

from moe_dist import MoEConfig, MoELayer, ParallelGroups, exit_distributed, init_distributed
from moe_dist.training.ddp import allreduce_gradients

rank, world, device = init_distributed()  # reads torchrun's (or mpirun's) environment
groups = ParallelGroups(ep_size=world)  # expert parallel over every process
cfg = MoEConfig(
    hidden_size=64,
    ffn_hidden_size=128,
    num_experts=8,
    top_k=2,
    num_shared_experts=1,
    router="sigmoid",  # DeepSeek-V3 style, with the aux-loss-free balancing bias
    capacity_factor=None,  # None = dropless
    transport="auto",  # "local" at EP=1, "nvshmem" on one GPU node, else "collective"
)
torch.manual_seed(0)  # the same seed everywhere: rank r holds exactly EP=1's experts r*E/N...
layer = MoELayer(cfg, groups=groups, device=device)
optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)

# This rank's tokens (and a target to regress on): different on every rank.
gen = torch.Generator().manual_seed(1000 + rank)
x_BSH = torch.randn(4, 16, cfg.hidden_size, generator=gen).to(device)
target_BSH = torch.randn(4, 16, cfg.hidden_size, generator=gen).to(device).tanh()

for step in range(5):
    y_BSH, aux_loss, tokens_per_expert = layer(x_BSH)  # a NamedTuple: .output, .aux_loss, ...
    loss = F.mse_loss(y_BSH, target_BSH) + aux_loss
    loss.backward()
    # Router and shared expert: averaged over the data-parallel ranks. Experts: each rank's
    # gradient already holds every rank's tokens (the all-to-all's backward brought them).
    allreduce_gradients(layer, groups)
    optimizer.step()
    optimizer.zero_grad()
    if rank == 0:
        print(
            f"step {step}: loss {loss.item():.4f} (aux {aux_loss.item():.4f}), rank 0 routed"
            f" {tokens_per_expert.tolist()} token slots to experts 0..{cfg.num_experts - 1}"
        )
first, local = layer.experts.first_expert, layer.experts.num_local
print(
    f"rank {rank}/{world}: holds experts {first}..{first + local - 1} of {cfg.num_experts},"
    f" transport {layer.transport.name}, device {device.type}",
    flush=True,
)
exit_distributed()  # barrier, destroy the process groups, exit (see its docstring)
