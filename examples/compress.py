"""Expert compression: prune (keep the most important experts) or merge (fold similar experts
together), from routing statistics on calibration batches. Runs on one process (EP=1); the result
holds ordinary MoELayers that load at any EP size dividing the new expert count.

    python examples/compress.py
"""

import torch

from moe_dist.extensions.compress import merge_experts, prune_experts
from moe_dist.lm import MoETransformer
from toy_data import MODEL, MOE, batch

torch.manual_seed(0)
model = MoETransformer(MODEL, MOE)  # groups=None: one process, EP=1
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(40):  # a little training, so that the routers have preferences
    model(*batch(step, rows=8, rank=0, device="cpu")).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

calibration = [batch(1000 + i, rows=8, rank=0, device="cpu")[0] for i in range(4)]
held_out = batch(2000, rows=16, rank=0, device="cpu")


def loss_of(m) -> float:
    with torch.no_grad():
        return m.eval()(*held_out).ce_loss.item()


pruned = prune_experts(model, calibration, keep=4)  # EASY-EP importance; `model` is untouched
merged = merge_experts(model, calibration, num_experts=4)  # MC-SMoE merging
for name, m in (("original (8 experts)", model), ("pruned to 4", pruned), ("merged to 4", merged)):
    experts = m.moe_layers()[0].cfg.num_experts
    print(f"{name:22s} layers hold {experts} experts; held-out loss {loss_of(m):.3f} nats/byte")
