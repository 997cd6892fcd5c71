"""The sigmoid router's bias in training: the trainer's backends update it once per optimizer step
(FSDP2 and the replicated backend through an optimizer pre-hook, DeepSpeed through its engine's
step), from the load of the whole global batch. Losses and biases at EP=2 over 4 gloo processes
equal one process that accumulates the gradients of all micro-batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_dist import ParallelGroups
from moe_dist.lm import MoETransformer
from moe_dist.lm.train import make_backend, parse_args
from moe_dist.training.router_bias import RouterBiasUpdater

from .harness import run_distributed
from .test_training_equivalence import LR, MODEL, MOE, ROWS_PER_RANK, WORLD, global_batch

STEPS = 3
SIGMOID = MOE.replace(router="sigmoid", router_bias_update_rate=0.05)


def build(groups):
    torch.manual_seed(0)
    moe = (
        SIGMOID if groups is not None and groups.ep_size > 1 else SIGMOID.replace(transport="auto")
    )
    return MoETransformer(MODEL, moe, groups)


def biases(model) -> torch.Tensor:
    return torch.stack([layer.router.expert_bias for layer in model.moe_layers()])


def reference_run():
    model = build(None)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    RouterBiasUpdater(model).attach(opt)
    losses = []
    for step in range(STEPS):
        total = 0.0
        for micro in global_batch(step).chunk(
            WORLD
        ):  # gradient accumulation over WORLD micro-batches
            out = model(micro[:, :-1], micro[:, 1:])
            (out.loss / WORLD).backward()
            total += out.loss.item() / WORLD
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, biases(model)


def scenario(backend: str):
    want, want_bias = reference_run()
    assert want_bias.abs().sum() > 0
    groups = ParallelGroups(ep_size=2)
    args = parse_args(
        ["--lr", str(LR), "--clip", "0", "--warmup", "1", "--zero-stage", "1", "--dtype", "fp32"]
    )
    trainer = make_backend(
        backend, build(groups), groups, args, device=torch.device("cpu"), micro_batch=ROWS_PER_RANK
    )
    got = []
    try:
        for step in range(STEPS):
            mine = global_batch(step).chunk(WORLD)[groups.rank]
            out = trainer.forward_backward(mine[:, :-1], mine[:, 1:])
            trainer.step(LR)
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            got.append(loss.item() / WORLD)
    finally:
        if backend == "deepspeed":
            from moe_dist.training.deepspeed import unregister_groups

            unregister_groups(groups)
    torch.testing.assert_close(biases(trainer.model), want_bias, msg=f"{backend}: router biases")
    torch.testing.assert_close(
        torch.tensor(got),
        torch.tensor(want),
        rtol=2e-5,
        atol=2e-5,
        msg=lambda m: f"{backend}: losses {got} vs {want}\n{m}",
    )


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_trainer_updates_the_bias_once_per_step(backend):
    run_distributed(scenario, WORLD, backend, timeout_s=240)
