"""FSDP2 training of a model holding MoELayers: experts sharded over the expert-data-parallel mesh,
everything else over the data-parallel mesh (torchtitan's layout), with the global gradient clip.

    torchrun --nproc-per-node 2 examples/fsdp2.py
"""

import torch

from moe_dist import ParallelGroups, clip_grad_norm_, exit_distributed, init_distributed
from moe_dist.lm import MoETransformer
from moe_dist.training.fsdp import shard
from toy_data import MODEL, MOE, batch

rank, world, device = init_distributed()
groups = ParallelGroups(ep_size=world)
torch.manual_seed(0)
model = MoETransformer(MODEL, MOE, groups, device=device)  # your model: any nn.Module of MoELayers
shard(model, groups)  # fully_shard in place: each MoELayer's experts, each block, the root
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

for step in range(30):
    tokens, targets = batch(step, rows=8, rank=rank, device=device)
    out = model(tokens, targets)  # the example LM returns its loss (cross-entropy + MoE aux loss)
    out.loss.backward()  # FSDP reduce-scatters the gradients during backward
    norm = clip_grad_norm_(model.parameters(), 1.0, groups)  # the norm over every rank's shards
    optimizer.step()
    optimizer.zero_grad()
    if rank == 0 and step % 10 in (0, 9):
        print(f"step {step:2d}: loss {out.ce_loss.item():.3f} nats/byte, grad norm {norm:.3f}")
exit_distributed()  # barrier, destroy the process groups, exit (see its docstring)
