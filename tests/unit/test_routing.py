"""Routers, losses and capacity on hand-worked cases."""

import math

import pytest
import torch

from moe_dist import MoEConfig
from moe_dist.routing import (
    Router,
    drop_over_capacity,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)
from moe_dist.routing.select import group_limited_topk, sigmoid_topk, softmax_topk, top_p_select


def test_softmax_topk_hand_case():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    idx, w, probs = softmax_topk(logits, 2, normalize=True)
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.5 / 0.8, 0.3 / 0.8]]))
    _, w_raw, _ = softmax_topk(logits, 2, normalize=False)
    torch.testing.assert_close(w_raw, torch.tensor([[0.5, 0.3]]))


def test_group_limited_keeps_tokens_inside_best_group():
    # Groups {0,1} (best prob is expert 0) and {2,3}. Experts 3 and 2 beat expert 1 globally, but
    # with topk_groups=1 the token may only use group {0,1}.
    logits = torch.tensor([[5.0, 0.0, 4.0, 4.5]])
    idx, w, _ = group_limited_topk(logits, 2, groups=2, topk_groups=1, normalize=True)
    assert idx.tolist() == [[0, 1]]
    idx2, _, _ = group_limited_topk(logits, 2, groups=2, topk_groups=2, normalize=True)
    assert idx2.tolist() == [[0, 3]]


def test_sigmoid_bias_steers_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    no_bias = torch.zeros(4)
    idx, w, _ = sigmoid_topk(logits, no_bias, 1, 1, 1, normalize=False)
    assert idx.tolist() == [[0]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[2.0]])))
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])  # sigmoid(-1)+1 = 1.27 > sigmoid(2) = 0.88
    idx, w, _ = sigmoid_topk(logits, bias, 1, 1, 1, normalize=False)
    assert idx.tolist() == [[3]]
    torch.testing.assert_close(
        w, torch.sigmoid(torch.tensor([[-1.0]]))
    )  # the weight ignores the bias


def test_sigmoid_group_score_is_sum_of_top_two():
    # Group A = {0,1,2}: one strong expert; group B = {3,4,5}: two good ones. V3 scores groups by
    # the sum of their two best affinities, so B wins although A holds the single best expert.
    s = torch.tensor([[0.95, 0.05, 0.05, 0.7, 0.7, 0.05]])
    logits = torch.log(s / (1 - s))
    idx, _, _ = sigmoid_topk(logits, torch.zeros(6), 2, groups=2, topk_groups=1, normalize=True)
    assert sorted(idx.tolist()[0]) == [3, 4]


@pytest.mark.parametrize("p,expected_used", [(0.5, 1), (0.7, 2), (0.95, 2), (0.85, 2)])
def test_top_p_takes_experts_until_mass_reached(p, expected_used):
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    idx, w, _ = top_p_select(logits, max_k=2, p=p, normalize=True)
    used = (idx >= 0).sum().item()
    assert used == expected_used
    assert w.sum().item() == pytest.approx(1.0)
    assert (w[idx < 0] == 0).all()


def test_top_p_uses_more_experts_for_flat_distributions():
    peaked = torch.log(torch.tensor([[0.9, 0.05, 0.03, 0.02]]))
    flat = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    n = lambda lg: (top_p_select(lg, 4, 0.8, True)[0] >= 0).sum().item()
    assert n(peaked) == 1 and n(flat) == 4


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0], [1], [2], [3]])
    assert load_balancing_loss(probs, idx, 4).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    skewed_idx = torch.zeros(4, 1, dtype=torch.long)
    # f = [1,0,0,0], P = [0.7,...] -> 4 * 0.7
    assert load_balancing_loss(skewed_probs, skewed_idx, 4).item() == pytest.approx(2.8)
    # unused slots (-1) are not counted
    assert load_balancing_loss(
        probs, torch.tensor([[0, -1], [1, -1], [2, -1], [3, -1]]), 4
    ).item() == pytest.approx(1.0)


def test_z_loss_hand_case():
    logits = torch.zeros(2, 4)  # logsumexp = log 4
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_capacity_drops_lowest_weight_first():
    # 4 tokens, top-1, 2 experts, capacity 1 per expert... use capacity 2 for expert 0.
    idx = torch.tensor([[0], [0], [0], [1]])
    w = torch.tensor([[0.5], [0.9], [0.7], [0.4]])
    kept_idx, kept_w, dropped = drop_over_capacity(idx, w, num_experts=2, capacity=2)
    assert kept_idx.flatten().tolist() == [-1, 0, 0, 1]  # token 0 (0.5) is the lowest of expert 0
    torch.testing.assert_close(kept_w.flatten(), torch.tensor([0.0, 0.9, 0.7, 0.4]))
    assert dropped.item() == 1


def test_capacity_ties_drop_later_tokens_and_respects_unused_slots():
    idx = torch.tensor([[1, -1], [1, -1], [1, 0]])
    w = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.5, 0.5]])
    kept_idx, _, dropped = drop_over_capacity(idx, w, num_experts=2, capacity=2)
    assert kept_idx.tolist() == [[1, -1], [1, -1], [-1, 0]]
    assert dropped.item() == 1


def test_expert_capacity_formula():
    assert expert_capacity(100, 2, 8, 1.0) == 25
    assert expert_capacity(100, 2, 8, 1.25) == 32
    assert expert_capacity(1, 1, 64, 1.0) == 1


def test_router_plan_counts_and_drops():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, capacity_factor=0.5)
    plan = Router(cfg)(torch.randn(16, 8))
    cap = expert_capacity(16, 2, 4, 0.5)
    assert (plan.tokens_per_expert_E <= cap).all()
    assert plan.tokens_per_expert_E.sum().item() + plan.dropped_tokens.item() == 32
    assert plan.may_have_unused_slots


def test_bias_update_moves_toward_balance():
    cfg = MoEConfig(
        hidden_size=8,
        ffn_hidden_size=8,
        num_experts=4,
        router="sigmoid",
        router_bias_update_rate=0.1,
    )
    r = Router(cfg)
    r.update_bias(torch.tensor([10, 2, 4, 4]))  # mean 5
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


@pytest.mark.parametrize(
    "router,aux", [("softmax", 0.0), ("softmax", 0.01), ("sigmoid", 0.0), ("top_p", 0.0)]
)
def test_router_with_its_gate_folded_in_holds_no_logits_and_routes_as_the_logits_path(router, aux):
    """Router(x) with the routing kernel (here its CPU oracle) keeps x, w and the ids for
    backward, not the [T, E] fp32 logits (the backward recomputes them); the plan and every
    gradient equal the path that computes the logits first."""
    T, H, E, K = 40, 24, 12, 3
    cfg = MoEConfig(
        hidden_size=H,
        ffn_hidden_size=16,
        num_experts=E,
        top_k=K,
        router=router,
        aux_loss_coef=aux,
        **({"top_p": 0.7} if router == "top_p" else {}),
        routed_scaling_factor=1.5,
    )
    torch.manual_seed(3)
    r = Router(cfg)
    r.fused_routing = True  # the kernel's path (on CPU: its plain-torch oracle)
    if router == "sigmoid":
        r.expert_bias.normal_(0, 0.1)
    x = torch.randn(T, H, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dw = torch.randn(T, K)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plan = r(x, check_finite=True)
    assert ((T, E), torch.float32) not in saved, saved
    assert plan.logits_finite.item() is True
    want = r(x2, r.logits(x2))
    assert want.logits_finite is None  # not asked for
    with torch.no_grad():
        poisoned = x.detach().clone()
        poisoned[T // 2, 0] = float("nan")
        assert r(poisoned, check_finite=True).logits_finite.item() is False
    assert torch.equal(plan.expert_idx_TK, want.expert_idx_TK)
    assert torch.equal(plan.tokens_per_expert_E, want.tokens_per_expert_E)
    torch.testing.assert_close(plan.weights_TK, want.weights_TK)
    torch.testing.assert_close(plan.aux_loss, want.aux_loss)
    got_grads = torch.autograd.grad(
        (plan.weights_TK * dw).sum() + plan.aux_loss, [x, r.weight], allow_unused=False
    )
    want_grads = torch.autograd.grad((want.weights_TK * dw).sum() + want.aux_loss, [x2, r.weight])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_folded_gate_stays_fp32_under_autocast():
    """Under bf16 autocast the folded gate computes (and recomputes in backward) fp32 logits: the
    same plan and gradients as without autocast."""
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=8, top_k=2)
    torch.manual_seed(4)
    r = Router(cfg)
    r.fused_routing = True
    x = torch.randn(30, 32, requires_grad=True)
    dw = torch.randn(30, 2)
    want = r(x)
    want_g = torch.autograd.grad((want.weights_TK * dw).sum() + want.aux_loss, [x, r.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(x)
        loss = (got.weights_TK * dw).sum() + got.aux_loss
    got_g = torch.autograd.grad(loss, [x, r.weight])
    assert torch.equal(got.expert_idx_TK, want.expert_idx_TK)
    torch.testing.assert_close(got.weights_TK, want.weights_TK)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w)
