"""Expert activations and biases beyond plain SwiGLU (experts/activations.py), and the layer
features the Hugging Face families need (router bias, expert biases, input-scaled routing), each
against a plain-torch oracle on fresh random inputs.

Legend: T tokens, H hidden, F ffn hidden, E experts, K slots per token, M rows, G local experts.
"""

import pytest
import torch
import torch.nn.functional as F

from moe_dist import MoEConfig, MoELayer
from moe_dist.experts.activations import (
    add_expert_bias,
    add_expert_bias_reference,
    clamped_swiglu,
    clamped_swiglu_reference,
)


def test_clamped_swiglu_matches_its_oracle_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    alpha, limit = 1.702, 1.5
    h = torch.randn(57, 2 * 24, generator=gen, dtype=torch.float64) * 2.5  # many beyond limit
    h[0, :4] = torch.tensor([limit, -limit, limit + 1, -limit - 1], dtype=torch.float64)
    h[1, 24:28] = torch.tensor([limit, -limit, limit + 1, -limit - 1], dtype=torch.float64)
    g = torch.randn(57, 24, generator=gen, dtype=torch.float64)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    y1, y2 = clamped_swiglu(h1, alpha, limit), clamped_swiglu_reference(h2, alpha, limit)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(h1.grad, h2.grad)
    # The clamps bite: some gradients are exactly 0, the rest are not.
    assert (h1.grad == 0).float().mean() > 0.1 and (h1.grad != 0).float().mean() > 0.5
    assert torch.autograd.gradcheck(
        lambda t: clamped_swiglu(t, alpha, limit),
        (h1.detach()[2:8].clone().requires_grad_(),),  # no kinks
    )


def test_clamped_swiglu_hand_case():
    # gate 2 -> clamped to 1; up -3 -> -1; glu = 1 * sigmoid(alpha); out = glu * (up + 1) = 0
    h = torch.tensor([[2.0, 0.5, -3.0, 0.25]])
    y = clamped_swiglu(h, 1.702, 1.0)
    expected = torch.tensor([[0.0, 0.5 * torch.sigmoid(torch.tensor(0.851)) * 1.25]])
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("counts", [[3, 0, 5], [0, 0, 4], [2, 2, 2]])
def test_expert_bias_rows_match_per_expert_slices(counts):
    gen = torch.Generator().manual_seed(len(counts) + sum(counts))
    counts_G = torch.tensor(counts)
    M = sum(counts) + 3  # 3 spare rows past the groups, as a shape-static transport leaves
    y = torch.randn(M, 7, generator=gen, requires_grad=True)
    b = torch.randn(3, 7, generator=gen, requires_grad=True)
    out, ref = add_expert_bias(y, b, counts_G), add_expert_bias_reference(y, b, counts_G)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out[-3:], y[-3:])  # spare rows get no bias
    g = torch.randn(M, 7, generator=gen)
    (db,) = torch.autograd.grad((out * g).sum(), b)
    (db_ref,) = torch.autograd.grad((ref * g).sum(), b)
    torch.testing.assert_close(db, db_ref)


def _family_cfg(**kw):
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, aux_loss_coef=0.0)
    base.update(kw)
    return MoEConfig(**base)


def _randomise(layer, seed):
    # Biases start at zero: draw them (and every weight) so that they matter.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _oracle(layer, x_TH):
    """Token by token, slot by slot, in plain torch: logits (+ bias) -> top-k -> weights; each
    chosen expert's FFN (with biases and the configured activation) on x (or on w * x)."""
    cfg, ex = layer.cfg, layer.experts
    logits_TE = x_TH @ layer.router.weight.t()
    if layer.router.bias is not None:
        logits_TE = logits_TE + layer.router.bias
    if cfg.router == "sigmoid":
        top, idx_TK = logits_TE.topk(cfg.top_k, dim=-1)
        w_TK = top.sigmoid()
    else:
        top, idx_TK = logits_TE.topk(cfg.top_k, dim=-1)
        w_TK = top.softmax(dim=-1)
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(cfg.top_k):
            e, w = int(idx_TK[t, k]), w_TK[t, k]
            x = w * x_TH[t] if cfg.scale_expert_input else x_TH[t]
            h = ex.w_in[e] @ x + (ex.b_in[e] if ex.b_in is not None else 0)
            if cfg.activation == "clamped_swiglu":
                h = clamped_swiglu_reference(h, cfg.swiglu_alpha, cfg.swiglu_limit)
            else:
                gate, up = h.chunk(2)
                h = F.silu(gate) * up
            y = ex.w_out[e] @ h + (ex.b_out[e] if ex.b_out is not None else 0)
            out[t] += y if cfg.scale_expert_input else w * y
    return out


CASES = {
    # GPT-OSS: router bias, softmax over the top-k, biased experts, clamped SwiGLU
    "gpt_oss": dict(
        router_bias=True,
        expert_ffn_bias=True,
        activation="clamped_swiglu",
        swiglu_limit=1.0,
        swiglu_alpha=1.5,
    ),
    # Llama 4: sigmoid of the top-k logits scales the expert's input (top-1 and top-2)
    "llama4_top1": dict(router="sigmoid", norm_topk_prob=False, scale_expert_input=True, top_k=1),
    "llama4_top2": dict(router="sigmoid", norm_topk_prob=False, scale_expert_input=True),
}


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_token_by_token_oracle(case, backend):
    cfg = _family_cfg(**CASES[case], router_bias_update_rate=0.0, expert_backend=backend)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    _randomise(layer, seed=1)
    x = torch.randn(23, 16, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1).output, _oracle(layer, x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x1, *layer.parameters()])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x2, *layer.parameters()])
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for n, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_new_fields_change_nothing_by_default_and_add_no_rng_draws():
    cfg = _family_cfg()
    torch.manual_seed(3)
    plain = MoELayer(cfg)
    after_plain = torch.rand(2)
    torch.manual_seed(3)
    biased = MoELayer(cfg.replace(router_bias=True, expert_ffn_bias=True))
    torch.testing.assert_close(torch.rand(2), after_plain)  # same RNG stream: EP-invariant init
    torch.testing.assert_close(biased.experts.w_in, plain.experts.w_in)
    assert plain.router.bias is None and plain.experts.b_in is None
    x = torch.randn(9, 16)
    torch.testing.assert_close(biased(x).output, plain(x).output)  # zero biases: same function


def test_bad_new_fields_fail_at_construction_naming_the_value():
    clamped = dict(activation="clamped_swiglu")
    with pytest.raises(ValueError, match=r"swiglu_limit must be a finite number > 0, got -1\.0"):
        _family_cfg(swiglu_limit=-1.0, **clamped)
    with pytest.raises(ValueError, match=r"swiglu_limit must be a finite number > 0, got inf"):
        _family_cfg(swiglu_limit=float("inf"), **clamped)
    with pytest.raises(ValueError, match=r"swiglu_alpha must be a finite number > 0, got 'x'"):
        _family_cfg(swiglu_alpha="x", **clamped)
    with pytest.raises(ValueError, match=r"shared_expert_scale must be a finite number > 0, got 0"):
        _family_cfg(shared_expert_scale=0)
    with pytest.raises(ValueError, match=r"activation='swiglu' ignores swiglu_limit=3"):
        _family_cfg(swiglu_limit=3)
    with pytest.raises(ValueError, match=r"scale_expert_input must be a bool, got 1"):
        _family_cfg(scale_expert_input=1)
    with pytest.raises(
        ValueError, match=r"softmax_selection_bias=True needs router='softmax', got"
    ):
        _family_cfg(softmax_selection_bias=True, router="sigmoid")
    with pytest.raises(ValueError, match=r"activation must be one of .*clamped_swiglu"):
        _family_cfg(activation="relu")


@pytest.mark.parametrize("top_k", [1, 2])
def test_input_scaled_routing_is_the_same_on_the_fused_path(top_k):
    """The one-go (fused) path scales the expert inputs like the plain path."""
    cfg = _family_cfg(**CASES["llama4_top2"], top_k=top_k, router_bias_update_rate=0.0)
    torch.manual_seed(5)
    one = MoELayer(cfg)
    torch.manual_seed(5)
    fused = MoELayer(cfg)
    fused.transport.fused = True  # forces the fused path (CPU: its oracle ops)
    _randomise(one, seed=6)
    _randomise(fused, seed=6)
    x = torch.randn(17, 16, generator=torch.Generator().manual_seed(7))
    assert fused._one_go_path(x) == "fused"
    torch.testing.assert_close(fused(x).output, one(x).output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one(x).output, _oracle(one, x), rtol=1e-5, atol=1e-5)


def test_forced_fused_local_path_keeps_expert_biases():
    """The local transport's fused expert path has no biases: a biased layer must not take it."""
    cfg = _family_cfg(expert_ffn_bias=True, router_bias=True)
    torch.manual_seed(8)
    layer = MoELayer(cfg)
    _randomise(layer, seed=9)
    layer.transport.fused = True  # forces the fused path where it applies (CPU: its oracle ops)
    x = torch.randn(13, 16, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(layer(x).output, _oracle(layer, x), rtol=1e-5, atol=1e-5)


def test_forced_routing_kernel_keeps_the_softmax_selection_bias():
    """The fused routing kernel has no selection bias on softmax probabilities (ERNIE-4.5)."""
    cfg = _family_cfg(softmax_selection_bias=True)
    torch.manual_seed(11)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(12)))
    x = torch.randn(29, 16, generator=torch.Generator().manual_seed(13))
    layer.router.fused_routing = False
    expected = layer.router(x)
    layer.router.fused_routing = True  # forces the kernel where it applies (CPU: its oracle)
    plan = layer.router(x)
    assert torch.equal(plan.expert_idx_TK, expected.expert_idx_TK)
    torch.testing.assert_close(plan.weights_TK, expected.weights_TK)
