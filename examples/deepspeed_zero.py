"""DeepSpeed ZeRO-2 training of a model holding MoELayers: moe_dist registers its expert-parallel
groups with DeepSpeed, which then partitions and reduces expert state over the expert-data-parallel
group and the rest over the data-parallel group.

    torchrun --nproc-per-node 2 examples/deepspeed_zero.py
"""

import torch

from moe_dist import ParallelGroups, exit_distributed, init_distributed
from moe_dist.lm import MoETransformer
from moe_dist.training import deepspeed as moe_ds
from toy_data import MODEL, MOE, batch

rank, world, device = init_distributed()
groups = ParallelGroups(ep_size=world)
torch.manual_seed(0)
model = MoETransformer(MODEL, MOE, groups, device=device)
config = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "gradient_clipping": 1.0,
    "bf16": {"enabled": device.type == "cuda"},
}
# The optimizer needs separate MoE parameter groups (ZeRO partitions them over the EDP group).
optimizer = torch.optim.AdamW(moe_ds.moe_param_groups(model), lr=3e-3)
engine, optimizer, _, _ = moe_ds.initialize(model, groups, config, optimizer=optimizer)

for step in range(30):
    tokens, targets = batch(step, rows=8, rank=rank, device=device)
    out = engine(tokens, targets)
    engine.backward(out.loss)
    engine.step()
    if rank == 0 and step % 10 in (0, 9):
        print(
            f"step {step:2d}: loss {out.ce_loss.item():.3f} nats/byte,"
            f" grad norm {engine.get_global_grad_norm():.3f}"
        )
exit_distributed()  # barrier, destroy the process groups, exit (see its docstring)
