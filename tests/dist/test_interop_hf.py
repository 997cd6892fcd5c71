"""Hugging Face interop at EP=2 over gloo: every rank builds the same tiny random model, computes
HF's logits on its own tokens (different batch shapes per rank), replaces the MoE blocks
expert-parallel (each rank keeps only its half of the experts) and must get the same logits (fp32,
rtol 1e-5). Training: the loss on each rank and, for expert weights, the gradient summed over ranks
match HF."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from moe_dist import ParallelGroups  # noqa: E402
from moe_dist.extensions.interop import (
    HFMoEBlock,
    find_moe_blocks,
    replace_moe_blocks,
)  # noqa: E402
from tests.unit.test_interop_hf import (  # noqa: E402
    FAMILIES,
    assert_logits_close,
    hf_tensors,
    ours,
    tiny_model,
    token_ids,
)

from .harness import run_distributed  # noqa: E402

SHAPES = [(2, 7), (1, 12)]  # (batch, seq) of rank 0 and rank 1


def scenario_logits(families):
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = ParallelGroups(ep_size=world)
    for family in families:
        model = tiny_model(family)
        ids = token_ids(*SHAPES[rank], seed=10 + rank)
        with torch.no_grad():
            expected = model(ids).logits
        hf_experts = [hf_tensors(b)["experts.w_in"].clone() for _, b in find_moe_blocks(model)]
        replace_moe_blocks(model, groups)
        blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
        for block, full in zip(blocks, hf_experts):
            E = full.shape[0]
            mine = slice(rank * E // world, (rank + 1) * E // world)
            assert block.moe.transport.name == "collective"
            torch.testing.assert_close(block.moe.experts.w_in, full[mine])  # only the local experts
        with torch.no_grad():
            actual = model(ids).logits
        try:
            assert_logits_close(actual, expected)
        except AssertionError as e:
            raise AssertionError(f"{family}, rank {rank}: {e}") from None


def scenario_training(families):
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = ParallelGroups(ep_size=world)
    for family in families:
        ref, model = tiny_model(family), tiny_model(family)
        replace_moe_blocks(model, groups)
        ids = token_ids(*SHAPES[rank], seed=20 + rank)
        ref_loss, loss = ref(ids, labels=ids).loss, model(ids, labels=ids).loss
        ref_loss.backward()
        loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for (name, block_ref), (_, block) in zip(find_moe_blocks(ref), find_moe_blocks(model)):
            params = ours(block.moe)
            for key, g_ref in hf_tensors(block_ref, grad=True).items():
                if key.startswith("experts."):
                    # This rank's experts saw every rank's tokens: HF's gradient summed over ranks.
                    g_ref = g_ref.clone()
                    dist.all_reduce(g_ref)
                    E = g_ref.shape[0]
                    g_ref = g_ref[rank * E // world : (rank + 1) * E // world]
                # Router: this rank's tokens only (the data-parallel all-reduce is the trainer's).
                torch.testing.assert_close(
                    params[key].grad,
                    g_ref,
                    rtol=1e-4,
                    atol=1e-6,
                    msg=lambda m: f"{family} {name} {key}: {m}",
                )


def test_logits_equal_at_ep2():
    # One run for every family: spawning the two processes (torch + transformers imports) costs
    # more than the families themselves.
    run_distributed(scenario_logits, 2, sorted(FAMILIES))


def test_training_gradients_at_ep2():
    families = ["deepseek_v3", "qwen2_moe", "gpt_oss", "llama4_top2", "dbrx"]
    run_distributed(scenario_training, 2, families)
