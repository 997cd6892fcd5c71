"""RouterBiasUpdater on one process: the forward only records the load; the bias moves once per
optimizer step from the load of every micro-batch since the last step, then the load is cleared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_dist import MoEConfig, MoELayer
from moe_dist.training.router_bias import RouterBiasUpdater

H = 16


def make(E: int, **kw) -> MoEConfig:
    base = dict(hidden_size=H, ffn_hidden_size=8, num_experts=E, top_k=2, router="sigmoid")
    return MoEConfig(**{**base, "router_bias_update_rate": 0.1, **kw})


def test_bias_moves_once_per_optimizer_step_from_the_accumulated_load():
    torch.manual_seed(0)
    model = nn.ModuleList(
        [MoELayer(make(8)), MoELayer(make(4)), MoELayer(make(4, router="softmax"))]
    ).train()
    learning = [model[0].router, model[1].router]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    bias = RouterBiasUpdater(model).attach(opt)
    assert bias.routers == learning  # the softmax router has no bias to learn
    xs = [torch.randn(n, H) for n in (9, 14)]
    for x in xs:  # two micro-batches before one step
        for layer in model:
            layer(x).output.sum().backward()
    for router in learning:
        assert router.expert_bias.abs().sum() == 0  # the forward never moves it
        assert int(router.load_E.sum()) == 23 * 2
    # The expected update, from the load of both micro-batches together.
    expected = []
    for layer in model[:2]:
        load = sum(layer.router(x).tokens_per_expert_E for x in xs).float()
        expected.append(0.1 * torch.sign(load.mean() - load))
    opt.step()
    for router, want in zip(learning, expected):
        torch.testing.assert_close(router.expert_bias, want)
        assert router.load_E.sum() == 0
    with torch.no_grad():  # eval forwards record nothing
        model.eval()
        model[0](xs[0])
    assert model[0].router.load_E.sum() == 0
    with pytest.raises(RuntimeError, match="already attached"):
        bias.attach(opt)
    bias.detach()
    before = model[0].router.expert_bias.clone()
    model.train()
    model[0](xs[0])
    opt.step()  # detached: no update
    assert torch.equal(model[0].router.expert_bias, before)
