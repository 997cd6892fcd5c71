"""Activation checkpointing (torch.utils.checkpoint, use_reentrant=False) around MoE layers changes
nothing: input and parameter gradients, the recorded load and the router bias after the optimizer
step equal the run without checkpointing. Sigmoid (the bias learns, once per optimizer step) and
softmax routers, EP=1 in process and EP=2 over gloo, two micro-batches of accumulation per step.

The defect this guards: the forward used to update the sigmoid router's bias, so the recompute
updated it again and routed with the new bias (wrong gradients at EP=1, CheckpointError at EP=2).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_dist import MoEConfig, MoELayer, ParallelGroups
from moe_dist.training.router_bias import RouterBiasUpdater

from .harness import run_distributed

H, FF, E = 16, 12, 8
STEPS, MICRO = 2, 2


class TwoLayers(nn.Module):
    """Two MoE blocks with residuals; `ckpt` recomputes each block in backward."""

    def __init__(self, cfg: MoEConfig, groups, ckpt: bool):
        super().__init__()
        self.ckpt = ckpt
        self.blocks = nn.ModuleList(
            MoELayer(cfg.replace(init_seed_offset=i), groups, name=f"moe{i}") for i in range(2)
        )

    def block(self, i: int, x_TH: torch.Tensor) -> torch.Tensor:
        out = self.blocks[i](x_TH)
        return x_TH + out.output + out.aux_loss

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.blocks)):
            if self.ckpt:
                x_TH = checkpoint(self.block, i, x_TH, use_reentrant=False)
            else:
                x_TH = self.block(i, x_TH)
        return x_TH


def micro_batch(step: int, micro: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    T = [13, 6][rank % 2] + micro  # ranks differ in token count
    return torch.randn(T, H, generator=gen)


def train(cfg: MoEConfig, groups, ckpt: bool, rank: int):
    torch.manual_seed(5)
    model = TwoLayers(cfg, groups, ckpt).train()
    with torch.no_grad():  # sharper routers, so a changed bias changes the routing
        for layer in model.blocks:
            layer.router.weight.mul_(6.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bias = RouterBiasUpdater(model, groups).attach(opt)
    record = []
    for step in range(STEPS):
        opt.zero_grad()
        x_grads = []
        for micro in range(MICRO):
            x = micro_batch(step, micro, rank).requires_grad_(True)
            y = model(x)
            g = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y)
            (y * g).sum().backward()
            x_grads.append(x.grad)
        loads = [layer.router.load_E.clone() for layer in model.blocks]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()  # the pre-hook updates the bias from the loads of both micro-batches
        biases = [layer.router.expert_bias.clone() for layer in model.blocks]
        record.append((x_grads, loads, grads, biases))
    bias.detach()
    return record


def compare(cfg: MoEConfig, groups, rank: int) -> None:
    plain, ckpt = train(cfg, groups, False, rank), train(cfg, groups, True, rank)
    for step, (a, b) in enumerate(zip(plain, ckpt)):
        label = f"rank {rank} router {cfg.router} step {step}"
        for gx_a, gx_b in zip(a[0], b[0]):
            torch.testing.assert_close(gx_b, gx_a, rtol=1e-5, atol=1e-5, msg=f"{label} x.grad")
        for load_a, load_b in zip(a[1], b[1]):  # exact: the recompute records nothing
            assert torch.equal(load_b, load_a), f"{label} load {load_b} != {load_a}"
        assert a[2].keys() == b[2].keys(), label
        for name in a[2]:
            torch.testing.assert_close(
                b[2][name], a[2][name], rtol=1e-5, atol=1e-5, msg=f"{label} grad {name}"
            )
        for bias_a, bias_b in zip(a[3], b[3]):
            assert torch.equal(bias_b, bias_a), f"{label} bias"
    if cfg.router == "sigmoid":  # the bias did learn, and equally on every rank
        last = plain[-1][3][0]
        assert last.abs().sum() > 0
        if groups is not None:
            other = last.clone()
            dist.broadcast(other, src=0)
            assert torch.equal(other, last), f"rank {rank}: bias differs from rank 0"
    else:
        assert all(b.abs().sum() == 0 for b in plain[-1][3])


CONFIGS = {
    "sigmoid": MoEConfig(
        hidden_size=H,
        ffn_hidden_size=FF,
        num_experts=E,
        top_k=2,
        router="sigmoid",
        router_bias_update_rate=0.05,
        num_shared_experts=1,
        expert_backend="loop",
    ),
    "softmax": MoEConfig(
        hidden_size=H, ffn_hidden_size=FF, num_experts=E, top_k=2, expert_backend="loop"
    ),
}


@pytest.mark.parametrize("router", sorted(CONFIGS))
def test_checkpointing_changes_nothing_ep1(router):
    compare(CONFIGS[router], None, 0)


def scenario_ep2() -> None:
    groups = ParallelGroups(ep_size=2)
    for router in sorted(CONFIGS):
        compare(CONFIGS[router].replace(transport="collective"), groups, dist.get_rank())


def test_checkpointing_changes_nothing_ep2():
    run_distributed(scenario_ep2, 2, timeout_s=120)
