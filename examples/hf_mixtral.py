"""Hugging Face drop-in: replace every sparse-MoE block of a transformers model by moe_dist's layer,
expert-parallel, with the same weights and routing; the logits stay the same.

    torchrun --nproc-per-node 2 examples/hf_mixtral.py

A tiny random Mixtral built from the installed transformers' MixtralConfig (nothing downloaded);
with a real checkpoint call from_pretrained instead and pass the same `groups`.
"""

import torch
import transformers

from moe_dist import ParallelGroups, exit_distributed, init_distributed
from moe_dist.extensions.interop import replace_moe_blocks

rank, world, device = init_distributed()
groups = ParallelGroups(ep_size=world)
config = transformers.MixtralConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)
torch.manual_seed(0)  # the same model on every rank
model = transformers.MixtralForCausalLM(config).eval()
ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank))
with torch.no_grad():
    expected = model(ids).logits

replace_moe_blocks(model, groups)  # in place; each rank keeps only its experts
with torch.no_grad():
    actual = model(ids).logits  # tokens now travel to the rank holding their experts
experts = [m.moe.experts.num_local for m in model.modules() if hasattr(m, "moe")]
print(
    f"rank {rank}: {len(experts)} Mixtral MoE blocks replaced, {experts[0]} of 8 experts each here;"
    f" max |logit difference| {(actual - expected).abs().max():.2e}",
    flush=True,
)
assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)
exit_distributed()  # barrier, destroy the process groups, exit (see its docstring)
