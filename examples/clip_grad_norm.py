"""moe_dist.clip_grad_norm_: the gradient norm over every parameter of the model, although each
rank holds only its own experts (torch.nn.utils.clip_grad_norm_ would see only those).

    torchrun --nproc-per-node 2 examples/clip_grad_norm.py
"""

import torch

from moe_dist import (
    ParallelGroups,
    clip_grad_norm_,
    exit_distributed,
    init_distributed,
    is_expert_param,
)
from moe_dist.lm import MoETransformer
from moe_dist.training.ddp import allreduce_gradients
from toy_data import MODEL, MOE, batch

rank, world, device = init_distributed()
groups = ParallelGroups(ep_size=world)
torch.manual_seed(0)
model = MoETransformer(MODEL, MOE, groups, device=device)  # replicated, experts sharded (no FSDP)
tokens, targets = batch(0, rows=8, rank=rank, device=device)
model(tokens, targets).loss.backward()
allreduce_gradients(model, groups)  # plain data parallelism: average over the ranks

local = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])  # this rank's view
norm = clip_grad_norm_(model.parameters(), max_norm=0.5, groups=groups)  # global, then clip
after = clip_grad_norm_(model.parameters(), max_norm=1e9, groups=groups)  # measure again
experts = sum(p.numel() for p in model.parameters() if is_expert_param(p))
print(
    f"rank {rank}: {experts:,} expert parameters here; norm over this rank's parameters"
    f" {local:.4f}, global norm {norm:.4f} (the same on every rank), after clipping to 0.5:"
    f" {after:.4f}",
    flush=True,
)
exit_distributed()  # barrier, destroy the process groups, exit (see its docstring)
