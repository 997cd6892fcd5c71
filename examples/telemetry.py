"""Routing telemetry: what the routers did (load per expert, imbalance, dropped slots, dead experts,
local routing consistency), accumulated on the device and summed over the ranks.

    torchrun --nproc-per-node 2 examples/telemetry.py
"""

import torch

from moe_dist import ParallelGroups, RoutingTelemetry, exit_distributed, init_distributed
from moe_dist.lm import MoETransformer
from moe_dist.training.ddp import allreduce_gradients
from toy_data import MODEL, MOE, batch

rank, world, device = init_distributed()
groups = ParallelGroups(ep_size=world)
torch.manual_seed(0)
model = MoETransformer(MODEL, MOE, groups, device=device)
telemetry = RoutingTelemetry(model, segment_length=16)  # observes every MoELayer
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(10):
    model(*batch(step, rows=8, rank=rank, device=device)).loss.backward()
    allreduce_gradients(model, groups)
    optimizer.step()
    optimizer.zero_grad()

report = telemetry.reduce(groups.dp_group)  # every rank calls it (all_reduce)
if rank == 0:
    # imbalance: busiest expert / mean; SRP@16: how well one fixed expert set serves each 16-token
    # window; SCH@16,C=2k: hit rate of a 2k-expert cache that sees 16 tokens ahead.
    print(report.summary())
    for name, m in report.metrics().items():
        print(f"{name}: tokens per expert {m['tokens_per_expert']}")
exit_distributed()  # barrier, destroy the process groups, exit (see its docstring)
