"""Checkpoints reshard across EP sizes and resume training exactly (four gloo processes).

- saved at EP=4 (FSDP2) after some training, then passed along EP=2 (FSDP2) -> EP=1 (FSDP2) -> EP=1
  replicated -> EP=4 (FSDP2), each loading the previous one's checkpoint into a model built from
  another seed and saving its own: the same logits at every step;
- model + optimizer saved at EP=4 after 2 steps and resumed at EP=4 and at EP=2: the next steps'
losses
  equal those of the run that never stopped;
- a checkpoint of another model shape fails naming the tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe_dist import ParallelGroups
from moe_dist.training import checkpoint
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.lm.train import make_backend, parse_args

from .harness import run_distributed
from .test_training_equivalence import MOE, MODEL, ROWS_PER_RANK, WORLD, global_batch

LR = 1e-2


def trainer(ep: int, backend: str = "fsdp", seed: int = 0):
    groups = ParallelGroups(ep_size=ep)
    torch.manual_seed(seed)
    model = MoETransformer(MODEL, MOE if ep > 1 else MOE.replace(transport="auto"), groups)
    args = parse_args(["--lr", str(LR), "--clip", "1.0", "--dtype", "fp32"])
    return make_backend(backend, model, groups, args, device=torch.device("cpu"), micro_batch=ROWS_PER_RANK), groups


def train(backend, groups, steps: range) -> list[float]:
    losses = []
    for step in steps:
        mine = global_batch(step).chunk(WORLD)[groups.rank]
        out = backend.forward_backward(mine[:, :-1], mine[:, 1:])
        backend.step(LR)
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / WORLD)
    return losses


@torch.no_grad()
def logits_of_everyone(backend, groups) -> torch.Tensor:
    mine = global_batch(99).chunk(WORLD)[groups.rank]
    logits = backend.model(mine[:, :-1]).logits
    parts = [torch.empty_like(logits) for _ in range(WORLD)]
    dist.all_gather(parts, logits)
    return torch.cat(parts)


def scenario_reshard_and_resume(root: str):
    # Train at EP=4, keep going to step 4 as the uninterrupted reference, saving at step 2.
    base, groups = trainer(ep=4)
    first = train(base, groups, range(0, 2))
    checkpoint.save(base.model, f"{root}/ep4", optimizer=base.optimizer, extra={"step": 2})
    saved_logits = logits_of_everyone(base, groups)
    uninterrupted = train(base, groups, range(2, 4))
    assert uninterrupted[-1] < first[0], (first, uninterrupted)

    # Weights only, along a chain EP=4 -> EP=2 -> EP=1 -> EP=4: each model loads the previous one's
    # checkpoint, gives the first model's logits, and saves its own (at its EP size, FSDP-sharded or
    # replicated).
    source = "ep4"
    for ep, kind in ((2, "fsdp"), (1, "fsdp"), (1, "none"), (4, "fsdp")):
        other, other_groups = trainer(ep, kind, seed=7)
        assert not torch.allclose(logits_of_everyone(other, other_groups), saved_logits)
        extra = checkpoint.load(other.model, f"{root}/{source}")
        assert extra == {"step": 2}
        torch.testing.assert_close(logits_of_everyone(other, other_groups), saved_logits, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"checkpoint {source} loaded at EP={ep} ({kind}): {m}")
        if ep != 4:
            source = f"ep{ep}_{kind}"
            checkpoint.save(other.model, f"{root}/{source}", extra=extra)

    # Model + optimizer: resuming continues the curve, at the same EP size and at another one.
    for ep in (4, 2):
        resumed, resumed_groups = trainer(ep, seed=7)
        checkpoint.load(resumed.model, f"{root}/ep4", optimizer=resumed.optimizer)
        torch.testing.assert_close(train(resumed, resumed_groups, range(2, 4)), uninterrupted, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"resumed at EP={ep}: {m}")

    # A model of another shape: the error names the tensor and both shapes.
    groups = ParallelGroups(ep_size=2)
    torch.manual_seed(0)
    wider = MoETransformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=12),
                           MOE.replace(ffn_hidden_size=32), groups)
    try:
        checkpoint.load(wider, f"{root}/ep4")
    except checkpoint.CheckpointMismatch as e:
        # SwiGLU: w_in holds 2 x ffn_hidden_size rows.
        assert "'model.layers.0.moe.shared_experts.w_in'" in str(e) and "[48, 16]" in str(e) \
            and "[64, 16]" in str(e), str(e)
    else:
        raise AssertionError("loading a checkpoint of another shape did not fail")


def test_checkpoint_reshards_across_ep_sizes_and_resumes(tmp_path):
    run_distributed(scenario_reshard_and_resume, WORLD, str(tmp_path))
