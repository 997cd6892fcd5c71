"""Chain-of-Experts: against a plain-torch reference (every expert on every token, then pick), and
the properties that make it a drop-in for MoELayer. EP=2 is tests/dist/test_interop_coe.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_dist import MoEConfig, MoELayer, is_expert_param
from moe_dist.extensions.coe import ChainOfExperts, build_moe_layer
from moe_dist.training.router_bias import RouterBiasUpdater

from tests.conftest import config_builder

H, FF, E = 16, 12, 8


make = config_builder(hidden_size=H, ffn_hidden_size=FF, num_experts=E)


# -- the oracle
# --------------------------------------------------------------------------------------
def reference_select(cfg: MoEConfig, h, router_w, bias):
    logits = h.float() @ router_w.float().T
    k = cfg.top_k
    if cfg.router == "softmax":
        w, idx = logits.softmax(-1).topk(k, dim=-1)
    else:  # sigmoid, DeepSeek-V3: bias picks, scores weigh; groups ranked by their two best biased scores
        scores = logits.sigmoid()
        biased = scores + bias
        if cfg.num_expert_groups > 1:
            G = cfg.num_expert_groups
            per_group = biased.view(-1, G, E // G)
            best = per_group.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_groups, dim=-1).indices
            keep = torch.zeros(biased.shape[0], G, dtype=torch.bool).scatter_(1, best, True)
            biased = biased.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = biased.topk(k, dim=-1).indices
        w = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return idx, w * cfg.routed_scaling_factor


def reference_coe(cfg: MoEConfig, coe: ChainOfExperts, x, iterations: int):
    """x_t = x_{t-1} + sum_k g_tk E_{i_tk}(x_{t-1}) + shared(x_{t-1}); returns x_C - x_0."""
    w_in, w_out = coe.moe.experts.w_in, coe.moe.experts.w_out
    h, update = x, torch.zeros_like(x)
    for t in range(iterations):
        router = coe.router_of(t)
        idx, w = reference_select(cfg, h, router.weight, router.expert_bias)
        gate, up = torch.einsum("th,efh->tef", h, w_in).chunk(2, dim=-1)
        y_all = torch.einsum(
            "tef,ehf->teh", F.silu(gate) * up, w_out
        )  # every expert on every token
        y = (y_all[torch.arange(h.shape[0])[:, None], idx] * w[..., None]).sum(1)
        if coe.moe.shared_experts is not None:
            s = coe.moe.shared_experts
            sg, su = F.linear(h, s.w_in).chunk(2, dim=-1)
            y = y + F.linear(F.silu(sg) * su, s.w_out)
        update, h = update + y, h + y
    return update


CASES = {
    "softmax": make(),
    "softmax_unnormalised_shared": make(norm_topk_prob=False, num_shared_experts=1, top_k=3),
    "sigmoid_grouped_scaled": make(
        router="sigmoid",
        num_expert_groups=4,
        topk_groups=2,
        routed_scaling_factor=2.5,
        num_shared_experts=2,
        shared_ffn_hidden_size=8,
    ),
}


@pytest.mark.parametrize("iterations", [2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_plain_torch_reference(case, iterations):
    cfg = CASES[case].replace(aux_loss_coef=0.0, router_bias_update_rate=0.0)
    torch.manual_seed(0)
    coe = ChainOfExperts(cfg, iterations=iterations)
    with torch.no_grad():
        for t in range(iterations):  # routers that differ visibly, biases that matter
            coe.router_of(t).weight.mul_(4.0)
            coe.router_of(t).expert_bias.normal_(0.0, 0.2)
    x = torch.randn(29, H)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(29, H)
    out, _, counts = coe(x1)
    ref = reference_coe(cfg, coe, x2, iterations)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == 29 * cfg.top_k * iterations

    grads = torch.autograd.grad((out * g).sum(), [x1, *coe.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [x2, *coe.parameters()], allow_unused=True)
    names = ["x"] + [n for n, _ in coe.named_parameters()]
    for name, a, b in zip(names, grads, ref_grads):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_one_iteration_is_exactly_a_moe_layer():
    cfg = make(num_shared_experts=1, z_loss_coef=1e-3)
    torch.manual_seed(5)
    coe = ChainOfExperts(cfg, iterations=1)
    torch.manual_seed(5)
    layer = MoELayer(cfg)
    x = torch.randn(3, 7, H)
    a, b = coe(x), layer(x)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert isinstance(build_moe_layer(cfg), MoELayer)
    assert isinstance(build_moe_layer(cfg, iterations=2), ChainOfExperts)


def test_experts_shared_across_iterations_routers_not():
    cfg = make(num_shared_experts=1)
    torch.manual_seed(6)
    layer, coe = MoELayer(cfg), ChainOfExperts(cfg, iterations=3)
    n_layer = sum(p.numel() for p in layer.parameters())
    n_coe = sum(p.numel() for p in coe.parameters())
    assert n_coe == n_layer + 2 * E * H  # only the two extra routers
    assert not torch.equal(coe.router_of(0).weight, coe.router_of(1).weight)
    assert all(is_expert_param(p) for p in coe.moe.experts.parameters())
    assert not any(is_expert_param(p) for p in coe.routers.parameters())


def test_state_output_and_aux_loss():
    cfg = make(aux_loss_coef=0.01)
    torch.manual_seed(7)
    update_coe = ChainOfExperts(cfg, iterations=2)
    torch.manual_seed(7)
    state_coe = ChainOfExperts(cfg, iterations=2, return_state=True)
    x = torch.randn(11, H)
    upd, aux, _ = update_coe(x)
    state, aux2, _ = state_coe(x)
    torch.testing.assert_close(state, x + upd)
    # The aux loss sums every pass's router loss: pass 1 routes x, pass 2 routes x + update of pass
    # 1.
    expected = update_coe.router_of(0)(x).aux_loss
    first, _ = update_coe.moe.routed_pass(x, update_coe.router_of(0)(x))
    expected = expected + update_coe.router_of(1)(x + first).aux_loss
    torch.testing.assert_close(aux, expected)
    torch.testing.assert_close(aux2, expected)


def test_each_router_keeps_its_own_bias_update():
    cfg = make(router="sigmoid", router_bias_update_rate=0.1)
    torch.manual_seed(8)
    coe = ChainOfExperts(cfg, iterations=2).train()
    coe(torch.randn(40, H))
    b0, b1 = coe.router_of(0).expert_bias, coe.router_of(1).expert_bias
    assert b0.abs().sum() == 0 and b1.abs().sum() == 0  # the forward only records the load
    assert int(coe.router_of(0).load_E.sum()) == int(coe.router_of(1).load_E.sum()) == 40 * 2
    RouterBiasUpdater(coe).step()  # once per optimizer step
    assert coe.router_of(0).load_E.sum() == 0
    b0, b1 = coe.router_of(0).expert_bias, coe.router_of(1).expert_bias
    assert b0.abs().sum() > 0 and b1.abs().sum() > 0 and not torch.equal(b0, b1)
    coe.eval()
    before = (b0.clone(), b1.clone())
    coe(torch.randn(40, H))
    assert torch.equal(b0, before[0]) and torch.equal(b1, before[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="iterations must be a positive int, got 0"):
        ChainOfExperts(make(), iterations=0)
    with pytest.raises(ValueError, match=r"input hidden size \(5\) does not match"):
        ChainOfExperts(make())(torch.randn(3, 5))


@pytest.mark.parametrize("shared", [0, 1])
def test_fused_passes_equal_plain_ones_with_and_without_shared_experts(shared):
    # Each pass is one MoELayer.routed_pass, which adds the shared experts on every path, the
    # fused one-go path too (the defect, on the chunked path since removed: its passes returned
    # the routed output alone, max-abs off by ~0.9).
    cfg = make(num_shared_experts=shared, router_bias_update_rate=0.0)
    torch.manual_seed(11)
    plain = ChainOfExperts(cfg, iterations=2)
    torch.manual_seed(11)
    piped = ChainOfExperts(cfg, iterations=2)
    piped.moe.transport.fused = True  # the one-go path (CPU: the fused ops' oracles)
    x = torch.randn(23, H)
    g = torch.randn(23, H)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, aux1, counts1 = plain(x1)
    out2, aux2, counts2 = piped(x2)
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux2, aux1)
    assert torch.equal(counts2, counts1)
    (out1 * g).sum().backward()
    (out2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    for (name, p1), (_, p2) in zip(plain.named_parameters(), piped.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-5, msg=name)
    if shared:  # the shared experts are in the output: their weights get a gradient
        assert piped.moe.shared_experts.w_in.grad.abs().sum() > 0
