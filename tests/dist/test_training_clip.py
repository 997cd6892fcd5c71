"""moe_dist.clip_grad_norm_ equals torch.nn.utils.clip_grad_norm_ of one process holding the whole
model.

Four gloo processes, replicated and FSDP2-sharded models at EP=2 and EP=4, L2 and inf norms. The
clipped gradients are gathered back to whole tensors (experts by global index) and compared element
by element. """
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import moe_dist
from moe_dist import ParallelGroups, is_expert_param
from moe_dist.training.ddp import allreduce_gradients
from moe_dist.training.fsdp import shard

from .harness import run_distributed
from .test_training_equivalence import WORLD, build, global_batch

MAX_NORM = 0.3


def reference_grads(norm_type: float) -> tuple[float, dict[str, torch.Tensor]]:
    model = build(None)
    for micro in global_batch(0).chunk(WORLD):
        (model(micro[:, :-1], micro[:, 1:]).loss / WORLD).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, norm_type=norm_type)
    return float(norm), {name: p.grad for name, p in model.named_parameters()}


def whole_grad(p: torch.Tensor, groups) -> torch.Tensor:
    grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
    if is_expert_param(p) and groups.ep_size > 1:  # this EP rank's experts -> all experts, in global order
        parts = [torch.empty_like(grad) for _ in range(groups.ep_size)]
        dist.all_gather(parts, grad.contiguous(), group=groups.ep_group)
        grad = torch.cat(parts)
    return grad


CASES = {2.0: [(2, False), (2, True), (4, False), (4, True)], float("inf"): [(2, False), (4, True)]}


def scenario_clip():
    for norm_type, cases in CASES.items():
        want_norm, want_grads = reference_grads(norm_type)
        assert want_norm > MAX_NORM, "the reference must actually clip"
        for ep, sharded in cases:
            groups = ParallelGroups(ep_size=ep)
            model = build(groups)
            if sharded:
                shard(model, groups)
            mine = global_batch(0).chunk(WORLD)[groups.rank]
            model(mine[:, :-1], mine[:, 1:]).loss.backward()
            if not sharded:
                allreduce_gradients(model, groups)
            norm = moe_dist.clip_grad_norm_(model.parameters(), MAX_NORM, groups, norm_type=norm_type)
            what = f"ep={ep} fsdp={sharded} norm_type={norm_type}"
            torch.testing.assert_close(float(norm), want_norm, rtol=1e-5, atol=1e-6, msg=what)
            for name, p in model.named_parameters():
                torch.testing.assert_close(whole_grad(p, groups), want_grads[name], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{what}, {name}: {m}")


def test_clip_equals_single_process_reference():
    run_distributed(scenario_clip, WORLD)


def test_clip_rejects_nonpositive_max_norm():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"max_norm must be > 0, got 0"):
        moe_dist.clip_grad_norm_([p], 0, None)
