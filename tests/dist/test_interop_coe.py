"""Chain-of-Experts at EP=2 equals EP=1 (outputs, aux loss, counts, input and weight gradients,
router biases after training steps), over gloo with 2 CPU processes; and EP=1 equals the plain-torch
reference (tests/unit/test_interop_coe.py), so EP=2 does too.

Both layers are built under the same seed on every rank (EP-invariant initialisation, no copying).
Token counts differ per rank, and one step gives rank 1 no tokens at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe_dist import MoEConfig, ParallelGroups
from moe_dist.extensions.coe import ChainOfExperts
from moe_dist.training.router_bias import RouterBiasUpdater

from .harness import run_distributed

H, FF, E = 16, 12, 8
COUNTS = [(9, 0), (5, 13), (7, 4)]  # tokens of (rank 0, rank 1) at each step


def tokens(step: int, rank: int) -> torch.Tensor:
    return torch.randn(COUNTS[step][rank], H, generator=torch.Generator().manual_seed(100 * step + rank))


def compare(cfg: MoEConfig, iterations: int, seed: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = ParallelGroups(ep_size=world)
    torch.manual_seed(seed)
    ep = ChainOfExperts(cfg.replace(transport="collective"), groups, iterations=iterations).train()
    torch.manual_seed(seed)
    ref = ChainOfExperts(cfg.replace(transport="local"), iterations=iterations).train()
    G = E // world
    mine_e = slice(rank * G, (rank + 1) * G)
    for step in range(len(COUNTS)):
        xs = [tokens(step, r) for r in range(world)]
        x_mine = xs[rank].clone().requires_grad_(True)
        x_all = torch.cat(xs).requires_grad_(True)
        g_all = torch.cos(torch.arange(x_all.numel(), dtype=torch.float32)).view_as(x_all)
        start = sum(x.shape[0] for x in xs[:rank])
        mine = slice(start, start + x_mine.shape[0])
        ep.zero_grad()
        ref.zero_grad()
        out, aux, counts = ep(x_mine)
        ref_out, _, ref_counts = ref(x_all)
        (out * g_all[mine]).sum().backward()
        (ref_out * g_all).sum().backward()

        torch.testing.assert_close(out, ref_out[mine], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x_mine.grad, x_all.grad[mine], rtol=1e-5, atol=1e-5)
        total = counts.clone()
        dist.all_reduce(total)
        assert torch.equal(total, ref_counts), (total, ref_counts)
        for name in ("w_in", "w_out"):
            torch.testing.assert_close(getattr(ep.moe.experts, name).grad,
                                       getattr(ref.moe.experts, name).grad[mine_e], rtol=1e-5, atol=1e-5)
        for (name, p), (_, p_ref) in zip(ep.named_parameters(), ref.named_parameters()):
            if name.startswith("moe.experts."):
                continue
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)  # replicated weights: a data-parallel all-reduce
            torch.testing.assert_close(grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        RouterBiasUpdater(ep, groups).step()  # the optimizer step's update, loads summed over ranks
        RouterBiasUpdater(ref).step()
        for t in range(iterations):  # every router's bias moved by the load of the whole batch
            torch.testing.assert_close(ep.router_of(t).expert_bias, ref.router_of(t).expert_bias)
        with torch.no_grad():  # a plain SGD step keeps the two in lockstep for the next step
            for (name, p), (_, p_ref) in zip(ep.named_parameters(), ref.named_parameters()):
                p_ref -= 0.01 * p_ref.grad
                p.copy_(p_ref[mine_e] if name.startswith("moe.experts.") else p_ref)


def scenario():
    base = MoEConfig(hidden_size=H, ffn_hidden_size=FF, num_experts=E, top_k=2)
    compare(base, iterations=2, seed=1)
    compare(base.replace(num_shared_experts=1, norm_topk_prob=False, top_k=3), iterations=3, seed=2)
    compare(base.replace(router="sigmoid", num_expert_groups=4, topk_groups=2, routed_scaling_factor=2.0,
                         router_bias_update_rate=0.05), iterations=2, seed=3)


def test_coe_ep2_equals_ep1():
    run_distributed(scenario, 2)
