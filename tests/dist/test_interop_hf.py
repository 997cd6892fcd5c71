"""Hugging Face interop at EP=2 over gloo: every rank builds the same tiny random model, computes
HF's logits on its own tokens (different batch shapes per rank), replaces the MoE blocks
expert-parallel (each rank keeps only its half of the experts) and must get the same logits (fp32,
rtol 1e-5). Training: the loss on each rank and, for expert weights, the gradient summed over ranks
match HF. """
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from moe_dist import ParallelGroups  # noqa: E402
from moe_dist.extensions.interop import HFMoEBlock, find_moe_blocks, replace_moe_blocks  # noqa: E402
from tests.unit.test_interop_hf import FAMILIES, assert_logits_close, tiny_model, token_ids  # noqa: E402

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
        hf_experts = [b.experts.gate_up_proj.detach().clone() for _, b in find_moe_blocks(model)]
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
            # Router: this rank's tokens only (a data-parallel all-reduce is the trainer's
            # business).
            torch.testing.assert_close(block.moe.router.weight.grad, block_ref.gate.weight.grad, rtol=1e-4, atol=1e-6)
            # Experts: this rank's experts saw every rank's tokens, so their gradient is HF's summed
            # over ranks.
            for ours, theirs in ((block.moe.experts.w_in, block_ref.experts.gate_up_proj),
                                 (block.moe.experts.w_out, block_ref.experts.down_proj)):
                total = theirs.grad.clone()
                dist.all_reduce(total)
                E = total.shape[0]
                mine = slice(rank * E // world, (rank + 1) * E // world)
                torch.testing.assert_close(ours.grad, total[mine], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{family} {name}: {m}")


def test_logits_equal_at_ep2():
    run_distributed(scenario_logits, 2, sorted(FAMILIES))


def test_training_gradients_at_ep2():
    run_distributed(scenario_training, 2, ["deepseek_v3", "qwen2_moe"])
