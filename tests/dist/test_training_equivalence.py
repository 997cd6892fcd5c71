"""Training at EP=2 and EP=4 equals EP=1 on the same global batch: FSDP2, DeepSpeed ZeRO-1/2, plain
DP.

Four gloo processes train the example model for a few AdamW steps (gradient clipping on) at each EP
size; every rank also trains a single-process reference (no collectives, the global batch as one
micro-batch per rank, losses averaged: what data parallelism computes) and the losses of every run
must match it. Clipping is checked on its own against torch.nn.utils.clip_grad_norm_ of the same
single-process gradient. """
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from moe_dist import MoEConfig, ParallelGroups
from moe_dist.lm import ModelConfig, MoETransformer
from moe_dist.lm.train import make_backend, parse_args

from .harness import run_distributed

WORLD = 4
STEPS = 3
LR = 1e-2
CLIP = 0.5  # small enough that it clips: the clip norm must be the true global one
MODEL = ModelConfig(d_model=16, n_layers=2, n_heads=2, max_seq_len=12)
MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=8, top_k=2, num_shared_experts=1,
                transport="collective")
ROWS_PER_RANK = 2


def global_batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, MODEL.vocab_size, (WORLD * ROWS_PER_RANK, MODEL.max_seq_len + 1), generator=gen)


def build(groups):
    torch.manual_seed(0)  # EP-invariant initialisation: the same model at every EP size
    moe = MOE if groups is not None and groups.ep_size > 1 else MOE.replace(transport="auto")
    return MoETransformer(MODEL, moe, groups)


def reference_run(steps: int = STEPS, clip: float = CLIP) -> tuple[list[float], list[float]]:
    """One process, no collectives: (per-step mean loss, per-step gradient norm before clipping)."""
    model = build(None)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    losses, norms = [], []
    for step in range(steps):
        total = 0.0
        for micro in global_batch(step).chunk(WORLD):
            out = model(micro[:, :-1], micro[:, 1:])
            (out.loss / WORLD).backward()
            total += out.loss.item() / WORLD
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms


def distributed_run(backend: str, ep: int, zero_stage: int = 1, steps: int = STEPS) -> tuple[list[float], list]:
    groups = ParallelGroups(ep_size=ep)
    args = parse_args(["--lr", str(LR), "--clip", str(CLIP), "--warmup", "1", "--zero-stage", str(zero_stage),
                       "--dtype", "fp32"])
    trainer = make_backend(backend, build(groups), groups, args, device=torch.device("cpu"),
                           micro_batch=ROWS_PER_RANK)
    losses, norms = [], []
    try:
        for step in range(steps):
            mine = global_batch(step).chunk(WORLD)[groups.rank]
            out = trainer.forward_backward(mine[:, :-1], mine[:, 1:])
            norms.append(trainer.step(LR))
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            losses.append(loss.item() / WORLD)
    finally:
        if backend == "deepspeed":
            from moe_dist.training.deepspeed import unregister_groups
            unregister_groups(groups)
    return losses, norms


def assert_curves_match(got: list[float], want: list[float], what: str) -> None:
    assert all(x is not None and math.isfinite(x) for x in got), f"{what}: {got}"
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-5, atol=2e-5,
                               msg=lambda m: f"{what}: {got} vs EP=1 single process {want}\n{m}")


def scenario_backend(backend: str, zero_stages: list[int]):
    want, want_norms = reference_run()
    assert want[-1] < want[0], f"the reference did not learn: {want}"  # the comparison means something
    assert min(want_norms) > CLIP, f"clipping never engaged: {want_norms}"
    for stage in zero_stages:
        for ep in (1, 2, 4):
            got, norms = distributed_run(backend, ep, stage)
            # Adam hides a uniformly mis-scaled gradient; the pre-clip norm does not.
            assert_curves_match(norms, want_norms, f"{backend} zero_stage={stage} EP={ep} gradient norms")
            assert_curves_match(got, want, f"{backend} zero_stage={stage} EP={ep} losses")


@pytest.mark.parametrize("backend,stages", [("fsdp", [0]), ("none", [0]), ("deepspeed", [0, 1, 2])],
                         ids=["fsdp", "replicated", "deepspeed-zero0-zero1-zero2"])
def test_ep_n_training_equals_ep1(backend, stages):
    run_distributed(scenario_backend, WORLD, backend, stages)
