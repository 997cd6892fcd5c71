"""Upcycling: a dense FFN split into fine-grained experts equals the dense FFN with every expert
active."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_dist import MoELayer
from moe_dist.experts import DenseFFN
from moe_dist.extensions.interop import all_experts_output, upcycle
from moe_dist.extensions.interop.upcycle import dense_ffn_weights

H, FD = 16, 48


class LlamaStyleMLP(nn.Module):  # the HF Llama/Qwen/Mistral MLP, without importing transformers
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, FD, bias=False), nn.Linear(H, FD, bias=False)
        self.down_proj = nn.Linear(FD, H, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GptFastFeedForward(nn.Module):  # w2(silu(w1 x) * w3 x)
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(H, FD, bias=False), nn.Linear(H, FD, bias=False)
        self.w2 = nn.Linear(FD, H, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def gelu_mlp():
    return nn.Sequential(nn.Linear(H, FD, bias=False), nn.GELU(), nn.Linear(FD, H, bias=False))


DENSE = {
    "densffn_swiglu": lambda: DenseFFN(H, FD, "swiglu", gate=False),
    "densffn_gelu": lambda: DenseFFN(H, FD, "gelu", gate=False),
    "llama_mlp": LlamaStyleMLP,
    "gpt_fast": GptFastFeedForward,
    "gelu_sequential": gelu_mlp,
}


@pytest.mark.parametrize("kind", sorted(DENSE))
@pytest.mark.parametrize("num_experts", [1, 4, 6])
def test_all_experts_active_equals_dense(kind, num_experts):
    torch.manual_seed(0)
    dense = DENSE[kind]()
    layer = upcycle(dense, num_experts, top_k=2 if num_experts > 1 else 1)
    assert isinstance(layer, MoELayer) and layer.experts.w_in.shape[0] == num_experts
    assert layer.cfg.ffn_hidden_size == FD // num_experts
    x = torch.randn(3, 5, H)
    with torch.no_grad():
        torch.testing.assert_close(all_experts_output(layer, x), dense(x), rtol=1e-5, atol=1e-6)
        out = layer(x).output  # the routed layer (fresh random router, top-2) runs and differs
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["llama_mlp", "gelu_sequential"])
def test_uniform_router_with_top_k_all_is_the_dense_ffn(kind):
    """router_init="zeros" + top_k = num_experts: the ordinary forward (not the helper) is the dense
    FFN."""
    torch.manual_seed(1)
    dense = DENSE[kind]()
    for E in (4, 6):
        layer = upcycle(dense, E, top_k=E, router_init="zeros")
        x = torch.randn(17, H)
        torch.testing.assert_close(layer(x).output, dense(x), rtol=1e-5, atol=1e-6)


def test_upcycled_layer_trains_and_keeps_dense_weights_untouched():
    torch.manual_seed(2)
    dense = LlamaStyleMLP()
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    layer = upcycle(dense, 4, top_k=2, capacity_factor=None, aux_loss_coef=0.01)
    x = torch.randn(32, H)
    out, aux, counts = layer(x)
    (out.square().mean() + aux).backward()
    assert layer.router.weight.grad is not None and layer.experts.w_in.grad.abs().sum() > 0
    assert int(counts.sum()) == 32 * 2
    with torch.no_grad():
        layer.experts.w_in.add_(1.0)
    for n, p in dense.named_parameters():
        torch.testing.assert_close(p, before[n])  # the copy is a copy


def test_errors_name_the_problem():
    with pytest.raises(
        ValueError, match=r"hidden size \(48\) must be divisible by num_experts \(5\)"
    ):
        upcycle(LlamaStyleMLP(), 5, top_k=2)
    biased = nn.Sequential(nn.Linear(H, FD), nn.GELU(), nn.Linear(FD, H))
    with pytest.raises(ValueError, match="has biases"):
        upcycle(biased, 4, top_k=2)
    tanh_gelu = nn.Sequential(
        nn.Linear(H, FD, bias=False), nn.GELU("tanh"), nn.Linear(FD, H, bias=False)
    )
    with pytest.raises(ValueError, match="approximate='tanh'"):
        upcycle(tanh_gelu, 4, top_k=2)
    relu_mlp = LlamaStyleMLP()
    relu_mlp.act_fn = nn.ReLU()
    with pytest.raises(ValueError, match="ReLU is not SiLU"):
        upcycle(relu_mlp, 4, top_k=2)
    with pytest.raises(ValueError, match="output gate"):
        upcycle(DenseFFN(H, FD, "swiglu", gate=True), 4, top_k=2)
    with pytest.raises(ValueError, match=r"top_k \(8\) must be <= num_experts \(4\)"):
        upcycle(LlamaStyleMLP(), 4, top_k=8)
    with pytest.raises(ValueError, match="cannot read a dense FFN from Linear"):
        upcycle(nn.Linear(H, H), 4, top_k=2)


def test_dense_weights_layout_matches_densffn():
    """The reader's [gate rows; up rows] layout is DenseFFN's: loading it back reproduces the
    MLP."""
    torch.manual_seed(3)
    mlp = LlamaStyleMLP()
    w_in, w_out, act = dense_ffn_weights(mlp)
    ffn = DenseFFN(H, FD, act, gate=False)
    with torch.no_grad():
        ffn.w_in.copy_(w_in)
        ffn.w_out.copy_(w_out)
    x = torch.randn(9, H)
    torch.testing.assert_close(ffn(x), mlp(x))
